"""Reading FSDP2 (torch.distributed.checkpoint) folders without running what a crafted file asks for."""

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from crate_kernels.train import checkpoint
from tests.train.test_faults import WritesAFile

# Single-process DCP here; training runs it inside a process group.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _state() -> dict:
    """A model and optimizer state as FSDP2 saves it: tensors, plus hyper-parameters DCP stores as pickled bytes."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def _blank(state: dict) -> dict:
    """The same keys, to load into: zero tensors, None hyper-parameters."""
    optim = state["optimizer"]
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "optimizer": {
            "state": {p: {k: torch.zeros_like(v) for k, v in s.items()} for p, s in optim["state"].items()},
            "param_groups": [dict.fromkeys(g) for g in optim["param_groups"]],
        },
    }


def test_checkpoint_dcp_round_trip_is_weights_only(tmp_path):
    """The folder DCP writes (metadata pickled at protocol 4) reads back whole through the weights-only path."""
    saved = _state()
    dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    loaded = _blank(saved)
    checkpoint.load_dcp(loaded, tmp_path)
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]  # the pickled bytes entries
    exp_avg = [state["optimizer"]["state"]["weight"]["exp_avg"] for state in (loaded, saved)]
    assert torch.equal(*exp_avg)


def test_checkpoint_crafted_dcp_metadata_runs_nothing(tmp_path):
    dcp.save(_state(), checkpoint_id=tmp_path, no_dist=True)
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(WritesAFile(marker), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        checkpoint._WeightsOnlyReader(tmp_path).read_metadata()
    with pytest.raises(BaseException, match="Unsupported global"):  # DCP reports it as its CheckpointException
        checkpoint.load_dcp(_blank(_state()), tmp_path)
    assert not marker.exists()
    pickle.loads((tmp_path / ".metadata").read_bytes())  # the crafted file does run code when plainly unpickled
    assert marker.read_text() == "ran"


def test_checkpoint_crafted_dcp_bytes_entry_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    state = _state()
    state["optimizer"]["param_groups"][0]["lr"] = WritesAFile(marker)  # saved as a pickled bytes entry
    dcp.save(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    assert not marker.exists()
    with pytest.raises(BaseException, match="Unsupported global"):
        checkpoint.load_dcp(_blank(_state()), tmp_path / "ckpt")
    assert not marker.exists()
    dcp.load(_blank(_state()), checkpoint_id=tmp_path / "ckpt", no_dist=True)  # DCP's own reader runs it
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_checkpoint_protocol_rewrite_keeps_shared_and_nested_objects(protocol):
    shared = [1.5, "x"]
    value = {"a": (shared, shared), "b": {"c": torch.Size([2, 3]), "d": Path("p")}, "e": [None, True, 2**40]}
    data = pickle.dumps(value, protocol=protocol)
    assert checkpoint.weights_only_unpickle(data, [type(Path())]) == value
