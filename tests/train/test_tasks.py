import pytest
import torch

from crate_kernels.train.config import from_flat
from crate_kernels.train.data import load_dataset
from crate_kernels.train.tasks import MAE, MLM, held_out_generators, model_for_run, sample_generators


def _setup(task_cls, task: str, args: str):
    cfg = from_flat({"task.name": task, "model.args": args, "model.backend": "torch"}).resolved()
    t = task_cls(cfg)
    train_set, _ = load_dataset(cfg.data, t.text)
    if t.text:
        train_set.block_size = 16
    torch.manual_seed(0)
    model, _ = model_for_run(cfg, t, train_set)
    x, y = train_set.batch(torch.arange(4))
    return t, model, x, y


def test_mae_masks_do_not_depend_on_the_global_rng_or_the_split():
    """Under DDP every rank holds the same global RNG state (one seed, for identical initial weights): masks drawn
    from it would repeat across ranks. Each sample's mask comes from a generator keyed by its place in the global
    batch, so one micro-batch of 4 and two of 2 (two ranks, or grad_accum 2) train on the same masks."""
    task, model, x, y = _setup(MAE, "mae", "dim=32,depth=1,heads=2,dim_head=16")
    micro = torch.Generator().manual_seed(0)

    def loss(lo: int, hi: int, global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return task.loss(model, x[lo:hi], y[lo:hi], micro, sample_generators(0, 3, lo, hi - lo))

    whole = loss(0, 4)
    assert torch.equal(whole, loss(0, 4, global_seed=1))  # the global RNG plays no part
    # every sample has the same number of masked patches: the whole batch's mean is the mean of the halves'
    assert whole.item() == pytest.approx(((loss(0, 2) + loss(2, 4)) / 2).item(), rel=1e-6)


def test_mlm_masks_do_not_depend_on_the_split():
    task, model, x, _ = _setup(MLM, "mlm", "dim=32,depth=1,heads=2,block_size=16")
    whole = task._mask(model, x, sample_generators(0, 3, 0, 4))
    halves = [task._mask(model, x[lo : lo + 2], sample_generators(0, 3, lo, 2)) for lo in (0, 2)]
    for i in range(2):  # inputs, targets
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))


def test_mlm_loss_is_the_mean_over_the_global_batchs_masked_tokens():
    """Micro-batches hold different numbers of masked tokens: each one's loss is its sum over the mean count per
    sample of the whole global batch, so the average over micro-batches is the global batch's mean."""
    task, model, x, y = _setup(MLM, "mlm", "dim=32,depth=1,heads=2,block_size=16")
    task.cfg = from_flat({"optim.batch_size": 4, "task.name": "mlm", "task.mlm_probability": 0.3}, task.cfg)
    micro = torch.Generator().manual_seed(0)
    halves = [
        task.loss(model, x[lo : lo + 2], y, micro, sample_generators(task.cfg.seed, 5, lo, 2), 5) for lo in (0, 2)
    ]
    counts = [
        int((task._mask(model, x[lo : lo + 2], sample_generators(task.cfg.seed, 5, lo, 2))[1] >= 0).sum())
        for lo in (0, 2)
    ]
    assert counts[0] != counts[1]  # else the per-micro-batch mean would agree too
    whole = task.loss(model, x, y, micro, sample_generators(task.cfg.seed, 5, 0, 4), 5)
    assert whole.item() == pytest.approx(((halves[0] + halves[1]) / 2).item(), rel=1e-6)
    alone = task.loss(model, x[:2], y, micro, sample_generators(task.cfg.seed, 5, 0, 2))  # no step: its own count
    assert alone.item() == pytest.approx(halves[0].item() * (counts[0] + counts[1]) / 2 / counts[0], rel=1e-6)


@pytest.mark.parametrize(
    ("task_cls", "task", "args"),
    [
        (MAE, "mae", "dim=32,depth=1,heads=2,dim_head=16"),
        (MLM, "mlm", "dim=32,depth=1,heads=2,block_size=16"),
    ],
)
def test_held_out_sums_do_not_depend_on_the_batching(task_cls, task, args):
    """The held-out masks are keyed by each sample's index: any split of the held-out set sums to the same."""
    t, model, x, y = _setup(task_cls, task, args)
    index = torch.arange(4)
    whole = t.eval_sums(model, x, y, held_out_generators(index))
    strided = sum(t.eval_sums(model, x[r::2], y[r::2], held_out_generators(index[r::2])) for r in (0, 1))
    torch.testing.assert_close(strided, whole, rtol=1e-6, atol=0)
