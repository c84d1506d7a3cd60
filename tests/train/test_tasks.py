import pytest
import torch

from crate_kernels.train.config import from_flat
from crate_kernels.train.data import Batch, load_dataset
from crate_kernels.train.tasks import MAE, MLM, model_for_run


def _setup(task_cls, task: str, args: str):
    cfg = from_flat({"task.name": task, "model.args": args, "model.backend": "torch"}).resolved()
    t = task_cls(cfg)
    train_set, _ = load_dataset(cfg.data, t.text)
    if t.text:
        train_set.block_size = 16
    torch.manual_seed(0)
    model, _ = model_for_run(cfg, t, train_set)
    batch = train_set.batch(torch.tensor([5, 11, 2, 40]), epoch=3)
    return t, model, batch


def _part(batch: Batch, lo: int, hi: int) -> Batch:
    return Batch(batch.inputs[lo:hi], batch.targets[lo:hi], batch.ids[lo:hi], batch.epoch)


def test_mae_masks_do_not_depend_on_the_global_rng_or_the_split():
    """Under DDP every rank holds the same global RNG state (one seed, for identical initial weights): masks drawn
    from it would repeat across ranks. Each sample's mask comes from its own stream (seed, epoch, sample id), so one
    micro-batch of 4 and two of 2 (two ranks, or grad_accum 2) train on the same masks."""
    task, model, batch = _setup(MAE, "mae", "dim=32,depth=1,heads=2,dim_head=16")

    def loss(lo: int, hi: int, global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return task.loss(model, _part(batch, lo, hi))

    whole = loss(0, 4)
    assert torch.equal(whole, loss(0, 4, global_seed=1))  # the global RNG plays no part
    # every sample has the same number of masked patches: the whole batch's mean is the mean of the halves'
    assert whole.item() == pytest.approx(((loss(0, 2) + loss(2, 4)) / 2).item(), rel=1e-6)
    later = Batch(batch.inputs, batch.targets, batch.ids, epoch=4)
    assert not torch.equal(task._noise(model, later), task._noise(model, batch))  # new masks each epoch


def test_mlm_masks_do_not_depend_on_the_split():
    task, model, batch = _setup(MLM, "mlm", "dim=32,depth=1,heads=2,block_size=16")
    whole = task._mask(model, batch)
    halves = [task._mask(model, _part(batch, lo, lo + 2)) for lo in (0, 2)]
    for i in range(2):  # inputs, targets
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))


def test_mlm_loss_is_the_mean_over_the_global_batchs_masked_tokens():
    """Micro-batches hold different numbers of masked tokens: ``begin_step`` counts the global batch's (summed over
    ranks), each micro-batch's loss is its sum over that count per sample, and so the average of the micro-batch
    losses (over accumulation steps and ranks) is the mean over every masked token of the global batch."""
    task, model, batch = _setup(MLM, "mlm", "dim=32,depth=1,heads=2,block_size=16")
    task.cfg = from_flat({"optim.batch_size": 4, "task.name": "mlm", "task.mlm_probability": 0.5}, task.cfg)
    halves = [_part(batch, 0, 2), _part(batch, 2, 4)]
    counts = [int((task._mask(model, half)[1] >= 0).sum()) for half in halves]
    assert counts[0] != counts[1]  # else the per-micro-batch means would average to the same
    sums = [torch.tensor(0.0)]

    def all_reduce(t: torch.Tensor) -> torch.Tensor:  # two ranks: this one holds the first half, the other the second
        sums.append(t)
        return t + counts[1]

    task.begin_step(model, halves[:1], all_reduce)
    first = task.loss(model, halves[0])
    task.begin_step(model, halves[1:], lambda t: t + counts[0])
    second = task.loss(model, halves[1])
    task.begin_step(model, [batch], lambda t: t)
    whole = task.loss(model, batch)
    assert sums[-1].item() == counts[0] and whole.item() == pytest.approx(((first + second) / 2).item(), rel=1e-6)
    inputs, targets = task._mask(model, batch)
    per_token = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert whole.item() == pytest.approx(per_token.item(), rel=1e-6)
