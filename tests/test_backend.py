import pytest
import torch

import crate_kernels
from crate_kernels import backend


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        crate_kernels.set_backend("cuda")
    crate_kernels.set_backend("torch")
    assert crate_kernels.get_backend() == "torch"


def test_backend_env_var_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        backend._validated("fast")


def test_forced_triton_lists_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    crate_kernels.set_backend("triton")
    with pytest.raises(NotImplementedError, match="cannot run these inputs") as info:
        backend.use_triton("no_such_op", torch.zeros(1))
    assert "TRITON_INTERPRET=1" in str(info.value) and "no Triton kernel for 'no_such_op'" in str(info.value)


def test_auto_falls_back_silently_on_cpu(monkeypatch, recwarn):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    crate_kernels.set_backend("auto")
    assert backend.use_triton("no_such_op", torch.zeros(1)) is False
    assert not recwarn.list
    assert crate_kernels.not_supported_reasons("no_such_op", torch.zeros(1))
