"""Datasets held in memory, plain-torch augmentations, and a data order that is a pure function of the step.

Embedded sets (no download): ``digits`` (scikit-learn, 1,797 8×8 grey digits, 10 classes), ``lfw`` (scikit-image
``lfw_subset``: 200 25×25 grey images, face / non-face), ``pydoc`` (Python's documentation text, ~465k characters,
for character-level LM/MLM). Local paths: an image folder tree (``root/<class>/*.png``, or ``root/train/<class>`` and
``root/val/<class>``), a CIFAR-10/100 python-batches directory, a text file.

Order: epoch ``e`` is a permutation seeded by ``(seed, e)``; step ``s`` takes global batch ``s mod batches_per_epoch``
of epoch ``s // batches_per_epoch``, and rank ``r`` its contiguous share of it. Random augmentations are drawn for the
whole global batch from a generator seeded by ``(seed, s)``. So the data position IS the step: a resumed run sees the
same samples with the same crops, and the samples of a step do not depend on the world size.
"""

from __future__ import annotations

import codecs
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crate_kernels.train.config import DataConfig

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

TEXT_VOCAB = 128  # ASCII; id 127 (DEL) never occurs in encoded text, so MLM can use it as [MASK]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def encode_text(text: str) -> torch.Tensor:
    """Characters -> int64 ids (T,) in [0, 127): non-ASCII becomes '?'."""
    ids = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
    ids[ids == 127] = ord("?")
    return torch.from_numpy(ids)


def decode_text(ids: torch.Tensor) -> str:
    return bytes(int(i) if 0 <= i < 127 else ord("?") for i in ids.tolist()).decode("ascii")


@dataclass
class ImageSet:
    """``images`` (N, C, H, W) float32 in [0, 1]; ``labels`` (N,) int64; ``mean``/``std`` (C,) of the train split."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor, affine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (b, C, H, W) and labels (b,); ``affine`` (b, 2, 3) resamples them (crop/flip)."""
        x = self.images[index]
        if affine is not None:
            grid = F.affine_grid(affine, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return (x - self.mean[:, None, None]) / self.std[:, None, None], self.labels[index]


@dataclass
class TextSet:
    """``tokens`` (T,) int64; sample i is the window ``tokens[i·block : i·block + block + 1]`` (input and target)."""

    tokens: torch.Tensor
    block_size: int

    def __len__(self) -> int:
        return max(0, (self.tokens.numel() - 1) // self.block_size)

    def batch(self, index: torch.Tensor, affine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (b, block) and next-character targets (b, block)."""
        starts = index[:, None] * self.block_size + torch.arange(self.block_size + 1)
        window = self.tokens[starts]
        return window[:, :-1], window[:, 1:]


# ---- loading ----


def _split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out split (independent of --seed, so every run evaluates on the same images)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    n_val = round(n * val_fraction)
    return perm[n_val:], perm[:n_val]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if size == 0 or images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _image_sets(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], cfg: DataConfig
) -> tuple[ImageSet, ImageSet]:
    train_x, val_x = _resize(train[0], cfg.image_size), _resize(val[0], cfg.image_size)
    num_classes = int(max(train[1].max(), val[1].max() if val[1].numel() else 0)) + 1
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return ImageSet(train_x, train[1], num_classes, mean, std), ImageSet(val_x, val[1], num_classes, mean, std)


def _split_arrays(images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig):
    train_idx, val_idx = _split(len(labels), cfg.val_fraction)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as im:
                    array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                images.append(torch.from_numpy(array).permute(2, 0, 1))
                labels.append(label)
    if not images:
        raise ValueError(f"--data: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(root)!r}/<class>/")
    size = images[0].shape[-2:]
    # Images of other sizes are brought to the first one's (set --data.image_size for a chosen size).
    images = [im if im.shape[-2:] == size else _resize(im[None], size[0])[0] for im in images]
    return torch.stack(images), torch.tensor(labels), classes


# The globals a pickled numpy array names (numpy 1 wrote numpy.core, numpy 2 writes numpy._core), and the one that
# Python 3 names for a bytes object at protocol 2 (a pure str -> bytes conversion).
ARRAY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Reads what a CIFAR python batch holds, a dict of numpy arrays, lists, numbers and byte strings, and nothing
    else: a global the pickle names must be one numpy needs to rebuild an array (a crafted file that names any other
    callable is refused before it is called)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR batch holds numpy arrays and lists only")
        return ARRAY_GLOBALS[module, name]


def _load_cifar(root: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            try:
                with open(root / name, "rb") as f:
                    batch = _ArrayUnpickler(f, encoding="bytes").load()
                if not isinstance(batch, dict) or b"data" not in batch:
                    raise pickle.UnpicklingError("no b'data' entry")
            except (pickle.UnpicklingError, EOFError, ValueError) as err:
                raise ValueError(f"--data: {str(root / name)!r} is not a CIFAR python batch ({err})") from None
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)).float() / 255.0, torch.from_numpy(np.concatenate(ys))

    if (root / "test_batch").is_file():  # CIFAR-10
        return read(sorted(p.name for p in root.glob("data_batch_*"))), read(["test_batch"])
    return read(["train"]), read(["test"])  # CIFAR-100


def is_cifar(root: Path) -> bool:
    return (root / "test_batch").is_file() or ((root / "train").is_file() and (root / "test").is_file())


def load_dataset(cfg: DataConfig, text: bool) -> tuple[ImageSet | TextSet, ImageSet | TextSet]:
    """(train, held-out) sets for ``cfg.name``; ``text`` selects character-level text (LM/MLM tasks).

    Text sets get their block size later (``TextSet.block_size``, from the model or ``--data.block_size``).
    Raises ValueError for an unknown name, a missing path or data that does not fit the task.
    """
    name = cfg.name
    path = Path(name)
    embedded_text, embedded_images = {"pydoc"}, {"digits", "lfw"}
    if name not in embedded_text | embedded_images and not path.exists():
        raise ValueError(
            f"--data: {name!r} is neither an embedded set ({', '.join(sorted(embedded_images | embedded_text))}) "
            "nor an existing path"
        )
    if text:
        if name == "pydoc":
            import pydoc_data.topics

            corpus = "".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
        elif path.is_file():
            corpus = path.read_text(encoding="utf-8", errors="replace")
        else:
            raise ValueError(f"--data: a language-model task needs 'pydoc' or a text file, got {name!r}")
        tokens = encode_text(corpus)
        n_val = round(tokens.numel() * cfg.val_fraction)
        return TextSet(tokens[: tokens.numel() - n_val], 0), TextSet(tokens[tokens.numel() - n_val :], 0)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        return _image_sets(*_split_arrays(images, torch.tensor(digits.target), cfg), cfg)
    if name == "lfw":
        from skimage.data import lfw_subset

        images = torch.tensor(lfw_subset(), dtype=torch.float32)[:, None]
        labels = (torch.arange(len(images)) < 100).long()  # the first 100 are faces
        return _image_sets(*_split_arrays(images, labels, cfg), cfg)
    if path.is_dir() and is_cifar(path):
        return _image_sets(*_load_cifar(path), cfg)
    if path.is_dir() and (path / "train").is_dir() and (path / "val").is_dir():
        train_x, train_y, classes = _load_folder(path / "train")
        val_x, val_y, val_classes = _load_folder(path / "val")
        if val_classes != classes:
            raise ValueError(f"--data: {str(path / 'val')!r} has classes {val_classes}, train has {classes}")
        return _image_sets((train_x, train_y), (val_x, val_y), cfg)
    if path.is_dir():
        images, labels, _ = _load_folder(path)
        return _image_sets(*_split_arrays(images, labels, cfg), cfg)
    raise ValueError(f"--data: an image task needs digits, lfw, an image folder or CIFAR batches, got {name!r}")


def photograph(name: str = "astronaut", size: int = 224, channels: int = 3) -> torch.Tensor:
    """A sample photograph shipped with scikit-image (astronaut, chelsea, coffee, ...), centre-cropped square.

    Returns:
        (1, channels, size, size) fp32 in [0, 1]; grey when ``channels == 1``.
    """
    from skimage import color, data, transform

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    loader = getattr(data, name, None)
    if loader is None:
        raise ValueError(f"name must be a scikit-image sample photograph such as 'astronaut', got {name!r}")
    img = loader()
    if img.ndim == 3 and channels == 1:
        img = color.rgb2gray(img[..., :3])
    elif img.ndim == 2 and channels == 3:
        img = color.gray2rgb(img)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    img = transform.resize(img, (size, size), anti_aliasing=True)  # floats in [0, 1]
    t = torch.as_tensor(img, dtype=torch.float32)
    return (t[None] if channels == 1 else t.permute(2, 0, 1))[None]


# ---- order and augmentation ----


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(keys) & (2**62 - 1))


def batches_per_epoch(n: int, batch_size: int) -> int:
    if n < batch_size:
        raise ValueError(f"--optim.batch_size {batch_size} is larger than the training set ({n} samples)")
    return n // batch_size  # the incomplete last batch is dropped: every step sees a full global batch


def global_batch(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Sample indices (batch_size,) of the global batch that step ``step`` (0-based) trains on."""
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, position = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=_generator(seed, epoch))
    return perm[position * batch_size : (position + 1) * batch_size]


def random_affine(batch_size: int, crop_scale: float, hflip: bool, generator: torch.Generator) -> torch.Tensor | None:
    """``F.affine_grid`` matrices (batch_size, 2, 3) of a random resized crop and flip; None when both are off.

    The crop keeps an area share in [crop_scale, 1] with aspect ratio in [3/4, 4/3] (torchvision's
    RandomResizedCrop, clipped to the image) at a uniform position; the flip mirrors x with probability ½.
    """
    if crop_scale >= 1.0 and not hflip:
        return None
    area = torch.empty(batch_size).uniform_(crop_scale, 1.0, generator=generator)
    log_ratio = torch.empty(batch_size).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    # Half-widths in normalised coordinates ([-1, 1] spans the image).
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (1 - sx) * torch.empty(batch_size).uniform_(-1, 1, generator=generator)
    ty = (1 - sy) * torch.empty(batch_size).uniform_(-1, 1, generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5 if hflip else torch.zeros(batch_size, dtype=torch.bool)
    theta = torch.zeros(batch_size, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    return theta


def rank_micro_batches(
    dataset: ImageSet | TextSet, step: int, cfg: DataConfig, batch_size: int, grad_accum: int, seed: int, world: tuple
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``grad_accum`` micro-batches (inputs, targets) for step ``step``; ``world`` = (rank, world_size)."""
    rank, world_size = world
    index = global_batch(step, len(dataset), batch_size, seed)
    affine = None
    if isinstance(dataset, ImageSet):
        affine = random_affine(batch_size, cfg.crop_scale, cfg.hflip, _generator(seed, step, 1))
    share = batch_size // world_size
    micro = share // grad_accum
    out = []
    for k in range(grad_accum):
        lo = rank * share + k * micro
        part = None if affine is None else affine[lo : lo + micro]
        out.append(dataset.batch(index[lo : lo + micro], part))
    return out


def eval_batches(dataset: ImageSet | TextSet, batch_size: int, world: tuple):
    """This rank's share of the held-out set, in order: (inputs, targets, sample indices, weight) with at most
    ``batch_size`` samples.

    Every rank yields the same number of batches (FSDP2 runs each forward collectively); a rank left without samples
    in the last one gets a stand-in sample with weight 0.
    """
    rank, world_size = world
    for lo in range(0, len(dataset), batch_size * world_size):
        chunk = torch.arange(lo, min(lo + batch_size * world_size, len(dataset)))[rank::world_size]
        index = chunk if len(chunk) else torch.tensor([0])
        yield (*dataset.batch(index), index, float(len(chunk) > 0))
