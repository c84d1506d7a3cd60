"""The DINO objective's pieces against small hand-written checks: loss, centring, EMA, schedules, k-NN, views."""

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import crate_kernels
from crate_kernels.models.dino import DINOHead, GlobalBatchNorm1d, SelfDistillation
from crate_kernels.train import streams
from crate_kernels.train.config import ConfigError, from_flat
from crate_kernels.train.data import load_dataset
from crate_kernels.train.dino import (
    DINO,
    dino_loss,
    knn_predict,
    local_size,
    teacher_momentum,
    teacher_temperature,
    weight_decay,
)
from crate_kernels.train.loop import train
from crate_kernels.train.tasks import model_for_run

ARGS = "dim=32,depth=1,heads=2,dim_head=16"
FLAGS = {"task.name": "dino", "model.args": ARGS, "model.backend": "torch", "task.dino_head": "32,16,24"}
FLAGS |= {"data.name": "lfw", "data.image_size": 8}  # 200 grey images, loaded in a blink


def _cfg(**values):
    return from_flat(FLAGS | {k.replace("__", "."): v for k, v in values.items()}).resolved()


def _setup(**values):
    cfg = _cfg(**values)
    crate_kernels.set_backend("torch")  # as the loop does (the Triton interpreter is far too slow for this)
    task = DINO(cfg)
    train_set, _ = load_dataset(cfg.data, text=False)
    torch.manual_seed(0)
    model, _ = model_for_run(cfg, task, train_set)
    return task, model, train_set


def test_dino_loss_matches_a_loop_over_view_pairs():
    torch.manual_seed(0)
    V, G, b, K = 4, 2, 3, 5
    student, teacher, center = torch.randn(V, b, K), torch.randn(G, b, K), torch.randn(1, K)
    expected, pairs = 0.0, 0
    for g in range(G):
        for v in range(V):
            if v == g:
                continue
            for i in range(b):
                t = [math.exp((teacher[g, i, k] - center[0, k]) / 0.04) for k in range(K)]
                s = [math.exp(student[v, i, k] / 0.1) for k in range(K)]
                expected -= sum(t[k] / sum(t) * math.log(s[k] / sum(s)) for k in range(K)) / b
            pairs += 1
    assert dino_loss(student, teacher, center, 0.1, 0.04).item() == pytest.approx(expected / pairs, rel=1e-5)


SHARES = (4, 8)  # rows of the global batch each of 2 ranks takes (unequal: the count is all-reduced too)


def _global_batch(channels: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, output weights of the loss, BatchNorm weight, bias), off-centre so the statistics matter."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(sum(SHARES), channels, generator=g) * 3 + 2, torch.randn(sum(SHARES), channels, generator=g)
    return x, c, 1 + torch.randn(channels, generator=g), torch.randn(channels, generator=g)


def _global_bn_rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x, c, weight, bias = _global_batch()
    rows = slice(sum(SHARES[:rank]), sum(SHARES[: rank + 1]))
    bn = GlobalBatchNorm1d(x.shape[1])
    bn.weight.data, bn.bias.data = weight, bias
    mine = x[rows].clone().requires_grad_()
    for _ in range(2):  # twice: the running statistics' update compounds
        y = bn(mine)
    (y * c[rows]).sum().backward()
    state = {"y": y.detach(), "dx": mine.grad, "dw": bn.weight.grad, "db": bn.bias.grad} | bn.state_dict()
    torch.save(state, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_global_batch_norm_across_two_ranks_matches_batch_norm_on_the_whole_batch(tmp_path):
    """2 gloo processes, each a share of the batch: the output, the input and parameter gradients (summed over ranks,
    as DDP's reduction does before averaging) and every rank's running statistics are BatchNorm1d's on the whole."""
    mp.spawn(_global_bn_rank, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    x, c, weight, bias = _global_batch()
    bn = nn.BatchNorm1d(x.shape[1])
    bn.weight.data, bn.bias.data = weight, bias
    x.requires_grad_()
    for _ in range(2):
        y = bn(x)
    (y * c).sum().backward()
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, **close)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad, **close)
    for r in ranks:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(r[name], bn.state_dict()[name], **close)
    bn.eval()  # in eval (and in one process) it is BatchNorm1d itself
    mine = GlobalBatchNorm1d(x.shape[1])
    mine.load_state_dict(bn.state_dict())
    torch.testing.assert_close(mine.eval()(x), bn(x), rtol=0, atol=0)
    assert any(isinstance(m, GlobalBatchNorm1d) for m in DINOHead(4, 3, 8, 4, batch_norm=True).modules())


def test_dino_schedules():
    cfg = _cfg(steps=100, optim__weight_decay=0.04, task__dino_teacher_temp="0.04,0.07")
    cfg_epochs = cfg.task.dino_teacher_temp_epochs  # 10: linear, then flat
    assert teacher_temperature(0, cfg) == pytest.approx(0.04)
    assert teacher_temperature(cfg_epochs // 2, cfg) == pytest.approx(0.055)
    assert teacher_temperature(cfg_epochs, cfg) == teacher_temperature(-1, cfg) == pytest.approx(0.07)
    assert teacher_momentum(0, cfg) == pytest.approx(0.996)
    assert teacher_momentum(50, cfg) == pytest.approx((0.996 + 1) / 2)
    assert teacher_momentum(100, cfg) == pytest.approx(1.0)
    assert weight_decay(0, cfg) == pytest.approx(0.04) and weight_decay(100, cfg) == pytest.approx(0.4)


def test_dino_teacher_ema_and_centre():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(3, 4)
    backbone.reset_classifier = lambda n: None  # a stand-in image model
    model = SelfDistillation(backbone, DINOHead(4, 6, hidden_dim=8, bottleneck_dim=5))
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.update_teacher(0.9)
    for name, p in model.backbone.named_parameters():
        teacher = model.teacher_backbone.get_buffer(name)
        torch.testing.assert_close(teacher, 0.9 * before[name] + 0.1 * p.detach())
    model.update_center(torch.ones(6), 0.9)
    model.update_center(torch.ones(6), 0.9)
    torch.testing.assert_close(model.center, torch.full((1, 6), 0.19))  # 0.9 · 0.1 + 0.1
    x = torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            model.teacher(x, head=False), x @ model.teacher_backbone.weight.T + model.teacher_backbone.bias
        )
        student, teacher = model(torch.stack([x, x, x]))  # 3 views of 2 samples; the teacher scores the 2 global
    assert student.shape == (3, 2, 6) and teacher.shape == (2, 2, 6)
    assert {n for n, _ in model.named_parameters()} == {f"backbone.{n}" for n in before} | {
        f"head.{n}" for n, _ in model.head.named_parameters()
    }  # the teacher and the centre are buffers: the optimizer never sees them


def test_dino_knn_weighted_vote():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_predict(queries, bank, labels, 2, k=5, temperature=0.07).tolist() == [0, 1]  # 2 near votes beat 3 far
    assert knn_predict(queries, bank, labels, 2, k=1, temperature=0.07).tolist() == [0, 1]


def test_dino_views_are_per_sample_and_grayscale_safe():
    """Each sample's views come from its own stream: the same in a batch of 4 or of 2; one channel works. The local
    views at the default size (3/7 of 8 pixels in 2 × 2 patches: 4) are the full-size ones' crops, resampled smaller:
    the same draws."""
    task, _, train_set = _setup(task__dino_local_crops=3)
    assert task.crops.local_size == (4, 4)
    batch = train_set.batch(torch.tensor([5, 11, 2, 40]), epoch=3)
    views = task.crops(batch.inputs, streams.sample_generators("crops", 0, 3, samples=batch.ids))
    assert [v.shape for v in views] == [(2, 4, 1, 8, 8), (3, 4, 1, 4, 4)]
    assert all(torch.isfinite(v).all() for v in views)
    half = task.crops(batch.inputs[2:], streams.sample_generators("crops", 0, 3, samples=batch.ids[2:]))
    for whole, part in zip(views, half, strict=True):
        torch.testing.assert_close(whole[:, 2:], part, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(views[0][0], views[0][1])  # two different global views
    assert not torch.allclose(views[0][0], batch.inputs)
    full = dataclasses.replace(task.crops, local_size=None)
    (same,) = full(batch.inputs, streams.sample_generators("crops", 0, 3, samples=batch.ids))
    torch.testing.assert_close(same[:2], views[0], rtol=0, atol=0)
    assert same.shape == (5, 4, 1, 8, 8)


@pytest.mark.parametrize(
    ("image", "patch", "flag", "expected"),
    [(8, 2, 0, (4, 4)), (8, 4, 0, (8, 8)), (64, 8, 0, (24, 24)), (224, 16, 0, (96, 96)), (8, 2, 6, (6, 6))],
)
def test_dino_local_size(image, patch, flag, expected):
    cfg = _cfg(task__dino_local_size=flag)
    assert local_size(cfg, (1, image, image), patch) == expected
    with pytest.raises(ValueError, match="dino_local_size must be a multiple of the patch size"):
        local_size(_cfg(task__dino_local_size=5), (1, 8, 8), 2)


def test_dino_student_runs_each_resolution_and_the_teacher_the_globals():
    task, model, train_set = _setup(task__dino_local_crops=2)
    batch = train_set.batch(torch.tensor([0, 1, 2]), epoch=0)
    views = task.crops(batch.inputs, streams.sample_generators("crops", 0, 0, samples=batch.ids))
    student, teacher = model(views)
    assert student.shape == (4, 3, 24) and teacher.shape == (2, 3, 24)
    model.eval()  # BatchNorm with running statistics: each view's scores do not depend on the others
    with torch.no_grad():
        alone = model.head(model.backbone(views[1][0]))
        torch.testing.assert_close(model(views)[0][2], alone)
        torch.testing.assert_close(model(views)[1][0], model.teacher(views[0][0]))


def test_dino_last_layer_frozen_in_the_first_epoch_and_weight_decay_scheduled():
    task, model, train_set = _setup(task__dino_freeze_last_layer=1, steps=10)
    optimizer = torch.optim.AdamW([{"params": [model.head.last_layer.weight], "weight_decay": 0.05}])
    for epoch, frozen in ((0, True), (1, False)):
        task.begin_step(model, [train_set.batch(torch.tensor([0, 1]), epoch=epoch)], lambda t: t)
        model.head.last_layer.weight.grad = torch.ones_like(model.head.last_layer.weight)
        task.before_update(model, optimizer, step=5)
        assert (model.head.last_layer.weight.grad is None) == frozen
        assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(weight_decay(5, task.cfg))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"task.dino_local_scale": "0.5,0.4"}, "dino_local_scale"),
        ({"task.dino_head": "0,8,8"}, "dino_head"),
        ({"model.name": "crate_mae_demo", "model.args": ""}, "image classifier"),
    ],
)
def test_dino_bad_config_fails_before_training(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        train(from_flat(FLAGS | values | {"out": str(tmp_path), "progress": False}))
    assert not any(tmp_path.iterdir())
