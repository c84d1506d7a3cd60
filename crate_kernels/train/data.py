"""Training and held-out sets: small ones in memory, image folders read per sample; every set yields ``Batch``es.

Embedded sets (no download): ``digits`` (scikit-learn, 1,797 8×8 grey digits, 10 classes), ``lfw`` (scikit-image
``lfw_subset``: 200 25×25 grey images, face / non-face), ``shapes`` (``shapes.py``: 4,000 drawn 64×64 RGB images
of 1-3 objects, 5 classes, with object masks), ``pydoc`` (Python's documentation text, ~465k characters,
for character-level LM/MLM). Local paths: an image folder tree (``root/<class>/*``, or ``root/train/<class>`` and
``root/val/<class>``), read per sample (``ImageFolder``), a CIFAR-10/100 python-batches directory, a text file.

Every set answers ``batch(ids, epoch, augment)``: the samples ``ids`` as a ``Batch``, in their training view of
``epoch`` under ``augment`` or (``augment`` None) their held-out view. Which samples a step takes, and which rank
takes which, is ``loader.py``'s.
"""

from __future__ import annotations

import codecs
import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crate_kernels.train import folder, shapes, streams
from crate_kernels.train.augment import (
    Augment,
    box_theta,
    crop_and_flip,
    draw_shift,
    eval_transform,
    rand_augment,
    resample,
    resize,
    train_transform,
)
from crate_kernels.train.config import DataConfig

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

TEXT_VOCAB = 128  # ASCII; id 127 (DEL) never occurs in encoded text, so MLM can use it as [MASK]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # image folders are normalised with these
FOLDER_SIZE = 224  # an image folder's side at --data.image_size 0: the paper's ImageNet resolution


def encode_text(text: str) -> torch.Tensor:
    """Characters -> int64 ids (T,) in [0, 127): non-ASCII becomes '?'."""
    ids = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
    ids[ids == 127] = ord("?")
    return torch.from_numpy(ids)


def decode_text(ids: torch.Tensor) -> str:
    return bytes(int(i) if 0 <= i < 127 else ord("?") for i in ids.tolist()).decode("ascii")


@dataclass
class Batch:
    """Samples ready for a model: ``inputs`` (b, C, H, W) normalised images or (b, T) token ids; ``targets`` (b,)
    labels or (b, T) next-token ids; ``ids`` (b,) int64 their indices in their set, which per-sample streams (masks,
    Mixup) are keyed by with ``epoch`` (−1 for held-out samples); ``unreadable``: files skipped on the way."""

    inputs: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor
    epoch: int = -1
    unreadable: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return dataclasses.replace(self, inputs=move(self.inputs), targets=move(self.targets))

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader's ``pin_memory`` calls this), for an asynchronous copy to the GPU."""
        return dataclasses.replace(self, inputs=self.inputs.pin_memory(), targets=self.targets.pin_memory())


@dataclass
class ImageSet:
    """``images`` (N, C, H, W) float32 in [0, 1]; ``labels`` (N,) int64; ``mean``/``std`` (C,) of the train split;
    ``masks`` (N, H, W) uint8 object ids (0 = background) where the set has them (``shapes``)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, ids: torch.Tensor, epoch: int = -1, augment: Augment | None = None) -> Batch:
        """Normalised images (b, C, H, W) of samples ``ids``, cropped, flipped, shifted and RandAugmented under
        ``augment``."""
        x = self.images[ids]
        if augment is not None and augment.active:
            x = _augmented(x, ids, epoch, augment)
        return Batch((x - self.mean[:, None, None]) / self.std[:, None, None], self.labels[ids], ids, epoch)


def _augmented(images: torch.Tensor, ids: torch.Tensor, epoch: int, augment: Augment) -> torch.Tensor:
    """Each image (b, C, H, W) resampled at its crop box and shift (fractional: these images are small) and flip;
    what a shift or a crop brings in from outside the image is the border reflected."""
    H, W = images.shape[-2:]
    generators = [augment.generator(epoch, int(i)) for i in ids]
    theta = []
    for g in generators:
        box, flip = crop_and_flip(H, W, augment, g, whole_pixels=False)
        theta.append(box_theta(H, W, box, flip, draw_shift(H, W, augment.translate, g)))
    out = resample(images, torch.stack(theta), (H, W))
    if augment.randaugment:
        ops, magnitude = augment.randaugment, augment.magnitude
        out = torch.stack([rand_augment(x, ops, magnitude, g) for x, g in zip(out, generators, strict=True)])
    return out


@dataclass
class TextSet:
    """``tokens`` (T,) int64; sample i is the window ``tokens[i·block : i·block + block + 1]`` (input and target)."""

    tokens: torch.Tensor
    block_size: int

    def __len__(self) -> int:
        return max(0, (self.tokens.numel() - 1) // self.block_size)

    def batch(self, ids: torch.Tensor, epoch: int = -1, augment: Augment | None = None) -> Batch:
        """Inputs (b, block) and next-character targets (b, block)."""
        starts = ids[:, None] * self.block_size + torch.arange(self.block_size + 1)
        window = self.tokens[starts]
        return Batch(window[:, :-1], window[:, 1:], ids, epoch)


@dataclass
class Sample:
    """One image of an ``ImageFolder``: ``image`` (3, size, size) normalised (None: unreadable, dropped), its
    ``label``, ``id`` and ``epoch``, and the files that could not be read on the way to it."""

    image: torch.Tensor | None
    label: int
    id: int
    epoch: int
    unreadable: list[str] = field(default_factory=list)


class ImageFolder:
    """Samples ``index`` (n,) of a scanned folder (``folder.scan``), decoded one by one at ``size`` × ``size``.

    A training sample (``epoch`` ≥ 0) whose file cannot be read is replaced by the next readable file of the set, so
    a batch keeps its size and holds the same samples under any world size; a held-out one (``epoch`` −1) is dropped.
    Either way the file's name travels with the batch (``Batch.unreadable``) and lands in ``self.unreadable``.
    """

    def __init__(self, files: folder.FileList, labels: np.ndarray, index: np.ndarray, num_classes: int, size: int):
        self.files, self.labels, self.index, self.num_classes, self.size = files, labels, index, num_classes, size
        self.mean, self.std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.unreadable: set[str] = set()  # met by this process (the loader adds each batch's)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.size, self.size

    def sample(self, i: int, epoch: int = -1, augment: Augment | None = None) -> Sample:
        unreadable = []
        for j in range(i, i + (len(self) if epoch >= 0 else 1)):
            file_index = int(self.index[j % len(self)])
            try:
                image = folder.decode(self.files[file_index])
            except Exception as err:  # Pillow's decoders raise many types on corrupt data
                unreadable.append(f"{self.files[file_index]} ({type(err).__name__}: {err})")
                continue
            if augment is None:
                view = eval_transform(image, self.size)
            else:
                view = train_transform(image, self.size, augment, epoch, i)
            view = (view - self.mean[:, None, None]) / self.std[:, None, None]
            return Sample(view, int(self.labels[file_index]), i, epoch, unreadable)
        if epoch >= 0:
            raise ValueError(f"--data: no file of this set can be read, e.g. {unreadable[0]}")
        return Sample(None, -1, i, epoch, unreadable)

    def batch(self, ids: torch.Tensor, epoch: int = -1, augment: Augment | None = None) -> Batch:
        return collate([self.sample(int(i), epoch, augment) for i in ids])


def collate(samples: list[Sample]) -> Batch:
    """``ImageFolder`` samples -> one Batch (unreadable held-out samples left out; possibly none left)."""
    kept = [s for s in samples if s.image is not None]
    unreadable = tuple(name for s in samples for name in s.unreadable)
    inputs = torch.stack([s.image for s in kept]) if kept else torch.empty(0)
    targets, ids = torch.tensor([s.label for s in kept]), torch.tensor([s.id for s in kept])
    return Batch(inputs, targets, ids, samples[0].epoch if samples else -1, unreadable)


DataSet = ImageSet | ImageFolder | TextSet


# ---- loading ----


def _split(n: int, val_fraction: float, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out split (stream ``split``: independent of --seed, so every run evaluates on the same images);
    with ``labels`` (n,) stratified: each class holds out the same share (rounded), as scikit-learn's
    ``train_test_split(stratify=...)``, so the classical baselines of a run compare on a split they would use."""
    perm = torch.randperm(n, generator=streams.generator("split"))
    if labels is None:
        n_val = round(n * val_fraction)
        return perm[n_val:], perm[:n_val]
    held_out = torch.zeros(n, dtype=torch.bool)
    for c in labels.unique().tolist():
        members = perm[labels[perm] == c]  # in the permutation's order
        held_out[members[: round(len(members) * val_fraction)]] = True
    return perm[~held_out[perm]], perm[held_out[perm]]  # both in the permutation's order: classes mixed


def _image_sets(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], cfg: DataConfig
) -> tuple[ImageSet, ImageSet]:
    train_x, val_x = (resize(x, cfg.image_size) if cfg.image_size else x for x in (train[0], val[0]))
    num_classes = int(max(train[1].max(), val[1].max() if val[1].numel() else 0)) + 1
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return ImageSet(train_x, train[1], num_classes, mean, std), ImageSet(val_x, val[1], num_classes, mean, std)


def _split_arrays(images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig):
    train_idx, val_idx = _split(len(labels), cfg.val_fraction, labels)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _folder_sets(path: Path, cfg: DataConfig) -> tuple[ImageFolder, ImageFolder]:
    """``path/train`` and ``path/val`` when both exist, else a held-out share of ``path``; read per sample."""
    size = cfg.image_size or FOLDER_SIZE
    if (path / "train").is_dir() and (path / "val").is_dir():
        files, labels, classes = folder.scan(path / "train")
        val_files, val_labels, val_classes = folder.scan(path / "val")
        if val_classes != classes:
            raise ValueError(f"--data: {str(path / 'val')!r} has classes {val_classes}, train has {classes}")
        train = ImageFolder(files, labels, np.arange(len(files)), len(classes), size)
        val = ImageFolder(val_files, val_labels, np.arange(len(val_files)), len(classes), size)
    else:
        files, labels, classes = folder.scan(path)
        train_index, val_index = _split(len(files), cfg.val_fraction)
        train = ImageFolder(files, labels, train_index.numpy(), len(classes), size)
        val = ImageFolder(files, labels, val_index.numpy(), len(classes), size)
    for split in (train, val):
        if len(split):
            split.sample(0, epoch=0)  # a set without one readable file fails here, before any training
    return train, val


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


def load_dataset(cfg: DataConfig, text: bool) -> tuple[DataSet, DataSet]:
    """(train, held-out) sets for ``cfg.name``; ``text`` selects character-level text (LM/MLM tasks).

    Text sets get their block size later (``TextSet.block_size``, from the model or ``--data.block_size``).
    Raises ValueError for an unknown name, a missing path or data that does not fit the task.
    """
    name = cfg.name
    path = Path(name)
    embedded_text, embedded_images = {"pydoc"}, {"digits", "lfw", "shapes"}
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
    if name == "shapes":
        drawn = shapes.generate(shapes.COUNT, cfg.image_size or 64)
        index = _split(len(drawn.labels), cfg.val_fraction)
        sets = _image_sets(*((drawn.images[i], drawn.labels[i]) for i in index), cfg)
        for split, i in zip(sets, index, strict=True):
            split.masks = drawn.masks[i]
        return sets
    if path.is_dir() and is_cifar(path):
        return _image_sets(*_load_cifar(path), cfg)
    if path.is_dir():
        return _folder_sets(path, cfg)
    raise ValueError(f"--data: an image task needs digits, lfw, shapes, an image folder or CIFAR batches, got {name!r}")


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
