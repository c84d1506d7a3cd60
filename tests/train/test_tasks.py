import torch

from crate_kernels.train.config import from_flat
from crate_kernels.train.data import load_dataset
from crate_kernels.train.tasks import MAE, build_model


def test_mae_masks_come_from_the_micro_batch_generator():
    """Under DDP every rank holds the same global RNG state (one seed, for identical initial weights): masks drawn
    from it would repeat across ranks. The loop hands each (step, rank, micro-batch) its own generator."""
    cfg = from_flat({"task.name": "mae", "model.args": "dim=32,depth=1,heads=2,dim_head=16"}).resolved()
    task = MAE(cfg)
    train_set, _ = load_dataset(cfg.data, task.text)
    torch.manual_seed(0)
    model, _ = build_model(cfg, task, train_set)
    x, y = train_set.batch(torch.arange(4))

    def loss(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return task.loss(model, x, y, torch.Generator().manual_seed(seed))

    assert torch.equal(loss(1, global_seed=0), loss(1, global_seed=1))  # the global RNG plays no part
    assert not torch.equal(loss(1, global_seed=0), loss(2, global_seed=0))  # another generator, other masks
