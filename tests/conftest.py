import os

import pytest
import torch

import crate_kernels


def _backport_interpreter_index() -> None:
    """Triton 3.6's interpreter turns loop bounds into Python ints with ``__index__``, which numpy >= 2.4 refuses for
    1-element arrays; triton 3.7 squeezes first. Same fix, applied to the class the interpreter patches (docs/design.md,
    'Pinned versions')."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _backport_interpreter_index()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="keep two shapes per shape list")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--quick"):
        os.environ["CRATE_KERNELS_QUICK_TESTS"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = crate_kernels.get_backend()
    yield
    crate_kernels.set_backend(saved)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else CPU (where the kernels run only under TRITON_INTERPRET=1)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
