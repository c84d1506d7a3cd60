"""Test data for the training tests: image folders as users have them."""

from pathlib import Path

import numpy as np

# (mode, file suffix): every mode the image-folder reader must bring to RGB, in the formats that hold it.
MODES = [
    ("RGB", ".jpg"),
    ("L", ".bmp"),
    ("RGBA", ".webp"),
    ("CMYK", ".jpg"),
    ("P", ".gif"),
    ("P-transparent", ".png"),
    ("I;16", ".png"),
    ("1", ".png"),
    ("LA", ".png"),
    ("RGB", ".tiff"),
]


def make_image_folder(root: Path, per_class: int = 12, unreadable: bool = True) -> list[Path]:
    """``root/cat`` and ``root/dog`` (with a nested sub-folder) of small images of random sizes (5–40 px a side) in
    every mode of MODES, and a text file the reader must ignore; with ``unreadable``, also a truncated PNG, a corrupt
    JPEG and a text file named .png. Returns the unreadable files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            mode, suffix = MODES[(i + c) % len(MODES)]
            h, w = (int(v) for v in rng.integers(5, 41, size=2))
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            rgb[..., c] //= 2  # the classes differ in colour
            image = Image.fromarray(rgb)
            if mode == "I;16":
                image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
            elif mode != "RGB":
                image = image.convert(mode.removesuffix("-transparent"))
            path = root / name / ("nested" if i % 3 == 0 else "") / f"{i:02d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, **({"transparency": 0} if mode == "P-transparent" else {}))
        (root / name / "README.txt").write_text("not an image suffix: ignored")
    if not unreadable:
        return []
    truncated, corrupt, text = root / "cat" / "truncated.png", root / "dog" / "corrupt.jpg", root / "dog" / "notes.png"
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    text.write_text("this is not a PNG")
    return [truncated, corrupt, text]
