"""Image folders on disk: the file list and the decoder (``data.ImageFolder`` reads a folder per sample with them).

``root/<class>/**/*.<ext>`` for every extension Pillow opens; any size and any mode (1, L, LA, RGBA, CMYK, P, 16-bit,
...) decodes to 3-channel float32 in [0, 1]. The file list is one byte buffer and offsets, not a Python object per
file: forked DataLoader workers would copy the pages of a list of strings as they touch its reference counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def image_suffixes() -> set[str]:
    """Extensions of every format Pillow can open here (stub formats, which need a plug-in, left out)."""
    from PIL import Image, ImageFile

    Image.init()
    readable = {
        name
        for name, (factory, _) in Image.OPEN.items()
        if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    return {ext for ext, name in Image.registered_extensions().items() if name in readable}


class FileList:
    """Paths under ``root`` held as one byte buffer and offsets: ``files[i]`` -> Path."""

    def __init__(self, root: Path, relative: list[str]):
        encoded = [os.fsencode(p) for p in relative]
        self.root = root
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Path:
        return self.root / os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes())


def scan(root: Path) -> tuple[FileList, np.ndarray, list[str]]:
    """The image files of ``root/<class>/`` (recursively, sorted), their labels (N,) int64 and the class names."""
    suffixes = image_suffixes()
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    relative, labels = [], []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name)):
            base = os.path.relpath(folder, root)
            found = sorted(f for f in files if os.path.splitext(f)[1].lower() in suffixes)
            relative += [os.path.join(base, f) for f in found]
            labels += [label] * len(found)
    if not relative:
        raise ValueError(
            f"--data: no image files (any format Pillow opens: .jpg, .png, ...) under {str(root)!r}/<class>/"
        )
    return FileList(root, relative), np.asarray(labels, dtype=np.int64), classes


def decode(path: Path) -> torch.Tensor:
    """The image at ``path`` as (3, H, W) float32 in [0, 1], whatever its mode; raises what Pillow raises."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit (or float) grey: keep its levels
            array = np.asarray(im, dtype=np.float32) / (1.0 if im.mode == "F" else 65535.0)
            grey = torch.from_numpy(np.clip(array, 0, 1))
            return grey[None].expand(3, -1, -1).contiguous()
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # Pillow's advice for palette images with a transparent colour
        rgb = np.array(im.convert("RGB"))  # writable (torch.from_numpy warns about a read-only view)
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)
