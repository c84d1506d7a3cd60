"""Which samples each step trains on, which rank takes which, and the batches that come out.

Order: epoch e is the permutation of stream ``order`` (seed, e); each step takes the next ``batch_size`` samples of it
(an epoch's incomplete tail is dropped: every step sees a full global batch), and rank r takes its contiguous share
of them in ``grad_accum`` micro-batches. The position in the order (epoch, offset) goes into every checkpoint, so a
resumed run continues at the exact sample, under one process or many. Crops, flips, Mixup and masks are keyed by
(seed, epoch, sample id) (``streams``), so a sample gets the same ones whichever rank, micro-batch or DataLoader worker
handles it. An image folder is decoded in ``--data.workers`` DataLoader processes (0: in this one), each preparing
``PREFETCH`` micro-batches ahead, into pinned memory when training on CUDA.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from crate_kernels.train import distributed, streams
from crate_kernels.train.augment import Augment
from crate_kernels.train.config import TrainConfig
from crate_kernels.train.data import Batch, DataSet, ImageFolder, TextSet, collate
from crate_kernels.train.distributed import Context

PREFETCH = 2  # micro-batches each DataLoader worker prepares ahead (torch's default)


@dataclass(frozen=True)
class Position:
    """``offset`` samples of epoch ``epoch``'s order are taken."""

    epoch: int = 0
    offset: int = 0

    def advance(self, n: int, batch_size: int) -> tuple[int, int, Position]:
        """(epoch, first index in its order) of the next global batch of a set of ``n``, and the position after it."""
        epoch, offset = (self.epoch, self.offset) if self.offset + batch_size <= n else (self.epoch + 1, 0)
        return epoch, offset, Position(epoch, offset + batch_size)


def check_batch_size(n: int, batch_size: int) -> None:
    if n < batch_size:
        raise ValueError(f"--optim.batch_size {batch_size} is larger than the training set ({n} samples)")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation (n,) of epoch ``epoch``."""
    return torch.randperm(n, generator=streams.generator("order", seed, epoch))


def global_batches(n: int, batch_size: int, seed: int, start: Position) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, sample ids (batch_size,)) of each step from ``start`` on."""
    position, order, order_epoch = start, None, None
    while True:
        epoch, offset, position = position.advance(n, batch_size)
        if order_epoch != epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        yield epoch, order[offset : offset + batch_size]


def rank_split(ids: torch.Tensor, world: tuple[int, int], grad_accum: int) -> list[torch.Tensor]:
    """Rank ``world[0]``'s ``grad_accum`` micro-batches (each a slice of ids) of a global batch, ``world[1]`` ranks."""
    rank, world_size = world
    share = len(ids) // world_size
    micro = share // grad_accum
    return [ids[rank * share + k * micro : rank * share + (k + 1) * micro] for k in range(grad_accum)]


def rank_micro_batches(
    dataset: DataSet, epoch: int, ids: torch.Tensor, augment: Augment | None, grad_accum: int, world: tuple[int, int]
) -> list[Batch]:
    """This rank's micro-batches of the global batch ``ids`` (batch_size,) of ``epoch``, each with its sample ids."""
    return [dataset.batch(part, epoch, augment) for part in rank_split(ids, world, grad_accum)]


class _Views(torch.utils.data.Dataset):
    """An image folder as a DataLoader reads it: key (epoch, i) -> sample i's view (training when ``augment``)."""

    def __init__(self, images: ImageFolder, augment: Augment | None):
        self.images, self.augment = images, augment

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        return self.images.sample(i, epoch, self.augment)


class _Keys:
    """The key lists ``make()`` yields, as a DataLoader's ``batch_sampler`` (which each ``iter`` restarts)."""

    def __init__(self, make: Callable[[], Iterator[list[tuple[int, int]]]]):
        self.make = make

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.make()


def _folder_loader(images: ImageFolder, augment: Augment | None, keys: _Keys, cfg: TrainConfig, pin: bool):
    workers = cfg.data.workers
    return torch.utils.data.DataLoader(
        _Views(images, augment),
        batch_sampler=keys,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=PREFETCH if workers else None,
    )


class TrainBatches:
    """This rank's micro-batches, step after step, from a position the checkpoint saves and restores.

    ``next(batches)`` -> ``grad_accum`` Batches (this rank's share of the step's global batch, with its sample ids);
    ``state_dict()`` / ``load_state_dict()``: the position after the last step taken.
    """

    def __init__(self, dataset: DataSet, cfg: TrainConfig, world: tuple[int, int], pin: bool = False):
        self.dataset, self.cfg, self.world, self.pin = dataset, cfg, world, pin
        self.position, self._steps = Position(), None
        d, text = cfg.data, isinstance(dataset, TextSet)
        self.augment = (
            None
            if text
            else Augment(cfg.seed, d.crop_scale, d.hflip, d.randaugment, d.randaugment_magnitude, d.translate)
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "offset": self.position.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.position = Position(int(state["epoch"]), int(state["offset"]))

    def __next__(self) -> list[Batch]:
        if self._steps is None:
            self._steps = self._micro_batches(self.position)
        micro = next(self._steps)
        self.position = self.position.advance(len(self.dataset), self.cfg.optim.batch_size)[2]
        return micro

    def _micro_batches(self, start: Position) -> Iterator[list[Batch]]:
        accum = self.cfg.optim.grad_accum
        steps = global_batches(len(self.dataset), self.cfg.optim.batch_size, self.cfg.seed, start)
        if not isinstance(self.dataset, ImageFolder):
            return (rank_micro_batches(self.dataset, e, ids, self.augment, accum, self.world) for e, ids in steps)

        def keys() -> Iterator[list[tuple[int, int]]]:  # runs in this process, ahead of the workers
            for epoch, ids in steps:
                for part in rank_split(ids, self.world, accum):
                    yield [(epoch, int(i)) for i in part]

        loader = iter(_folder_loader(self.dataset, self.augment, _Keys(keys), self.cfg, self.pin))
        return ([_noted(self.dataset, next(loader)) for _ in range(accum)] for _ in itertools.count())

    def close(self) -> None:
        """Stops the DataLoader's workers (a later ``next`` starts new ones at the position)."""
        self._steps = None


def eval_batches(
    dataset: DataSet, batch_size: int, world: tuple[int, int], cfg: TrainConfig, pin: bool = False
) -> Iterator[tuple[Batch, float]]:
    """This rank's share of the held-out set, in order: (batch of at most ``batch_size`` samples, weight).

    Every rank yields the same number of batches (FSDP2 runs each forward collectively); a rank left without samples
    in one (none left, or all unreadable) gets a stand-in sample with weight 0.
    """
    rank, world_size = world
    step = batch_size * world_size
    chunks = [torch.arange(lo, min(lo + step, len(dataset)))[rank::world_size] for lo in range(0, len(dataset), step)]
    if isinstance(dataset, ImageFolder):
        keys = _Keys(lambda: ([(-1, int(i)) for i in chunk] for chunk in chunks))
        batches = (_noted(dataset, b) for b in _folder_loader(dataset, None, keys, cfg, pin))
    else:
        batches = (dataset.batch(chunk) for chunk in chunks)
    for batch in batches:
        if len(batch):
            yield batch, 1.0
        else:  # any sample will do; as a training sample (epoch 0), an image folder replaces an unreadable file
            yield dataset.batch(torch.tensor([0]), epoch=0), 0.0


def _noted(images: ImageFolder, batch: Batch) -> Batch:
    images.unreadable.update(batch.unreadable)
    return batch


class UnreadableFiles:
    """The files the image folders of a run could not read, gathered from every rank: each named once (rank 0)."""

    def __init__(self, *datasets: DataSet):
        self.folders = [d for d in datasets if isinstance(d, ImageFolder)]
        self.named: set[str] = set()

    def record(self, ctx: Context, write: Callable[[str], None]) -> dict[str, int]:
        """Names the files met since the last call; returns ``{"unreadable_files": count so far}`` ({} without image
        folders). Collective: every rank calls it at the same step."""
        if not self.folders:
            return {}
        met = set().union(*(f.unreadable for f in self.folders)) - self.named
        new = set().union(*distributed.all_gather_objects(sorted(met), ctx)) - self.named
        if ctx.is_main:
            for name in sorted(new):
                write(f"skipped an unreadable file: {name}")
        self.named |= new
        return {"unreadable_files": len(self.named)}
