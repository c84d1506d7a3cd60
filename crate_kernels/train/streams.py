"""Every random stream of a training run, by name: a tag and a key give the same draws in any process.

A stream is ``(tag, key...)``: ``generator("augment", seed, epoch, sample)`` is the generator of one training sample's
crop and flip in one epoch. Its seed is a BLAKE2b hash of the tag and the key (Python's ``hash`` of a string is salted
per process), so the draws depend on nothing else: not the rank, the world size, the split into micro-batches, the
DataLoader worker that decodes the sample, nor whether the run was resumed. That is the determinism contract of
``crate-train``: one global batch gives the same losses under 1 or N processes (up to the reduction's rounding) and
a resumed run continues bit-for-bit.

| tag | key | what it draws |
|---|---|---|
| ``split`` | — | the held-out share of a set without an official split (every run evaluates on the same samples) |
| ``init`` | seed | the torch RNG while the model is built: the same initial weights on every rank |
| ``dropout`` | seed, rank | the torch RNG each rank trains with (dropout): its own masks per rank |
| ``order`` | seed, epoch | the epoch's permutation of the training set |
| ``augment`` | seed, epoch, sample | a training sample's crop, flip, shift and RandAugment ops |
| ``mix`` | seed, epoch, sample | a training sample's Mixup / CutMix weight, choice and box |
| ``mask`` | seed, epoch, sample | a training sample's MAE patch mask or MLM token mask |
| ``crops`` | seed, epoch, sample | a training sample's DINO views: crops, flips, colour jitter, blur, solarisation |
| ``eval`` | sample | a held-out sample's MAE / MLM mask or DINO views: the same at every evaluation |
| ``report`` | — | the end-of-run draws (per-layer table, pictures, generated text): the same on every rank |

``sample`` is the sample's index in its set (``Batch.ids``); an epoch draws each training sample once, so
``(epoch, sample)`` names one draw. Only ``dropout`` depends on the rank: dropout masks are the one draw that cannot
match between 1 and N processes (the checkpoint saves every rank's torch RNG, so a resume still matches).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

KEYS: dict[str, tuple[str, ...]] = {
    "split": (),
    "init": ("seed",),
    "dropout": ("seed", "rank"),
    "order": ("seed", "epoch"),
    "augment": ("seed", "epoch", "sample"),
    "mix": ("seed", "epoch", "sample"),
    "mask": ("seed", "epoch", "sample"),
    "crops": ("seed", "epoch", "sample"),
    "eval": ("sample",),
    "report": (),
}


def seed(tag: str, *key: int) -> int:
    """The 63-bit seed of stream ``(tag, *key)``; raises ValueError for an unknown tag or a key of the wrong length."""
    if tag not in KEYS:
        raise ValueError(f"tag must be one of {sorted(KEYS)}, got {tag!r}")
    if len(key) != len(KEYS[tag]):
        raise ValueError(f"stream {tag!r} is keyed by {KEYS[tag]}, got {len(key)} values {key}")
    text = ",".join([tag, *(str(int(k)) for k in key)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(tag: str, *key: int) -> torch.Generator:
    """A CPU generator seeded for stream ``(tag, *key)``."""
    return torch.Generator().manual_seed(seed(tag, *key))


def sample_generators(tag: str, *key: int, samples: torch.Tensor) -> list[torch.Generator]:
    """One generator per sample id in ``samples`` (b,): stream ``(tag, *key, sample)`` for each."""
    return [generator(tag, *key, int(s)) for s in samples.tolist()]


@contextlib.contextmanager
def fork(tag: str, *key: int, device: torch.device | None = None) -> Iterator[None]:
    """Inside: torch's global RNG (and ``device``'s, when CUDA) seeded for ``(tag, *key)``; restored on exit.

    For draws a model makes from the global RNG itself (``torch.rand`` inside a forward).
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed(tag, *key))
        yield
