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
    whole = task._mask(model, batch.inputs, task.sample_generators(batch))
    halves = [
        task._mask(model, batch.inputs[lo : lo + 2], task.sample_generators(_part(batch, lo, lo + 2))) for lo in (0, 2)
    ]
    for i in range(2):  # inputs, targets
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
