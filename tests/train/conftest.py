from pathlib import Path

import pytest

from tests.train.helpers import make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A mixed image folder (see make_image_folder) under tmp_path and its unreadable files."""
    root = tmp_path / "images"
    return root, make_image_folder(root)
