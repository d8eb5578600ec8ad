"""cirlab.models.loading: the one checkpoint reader (formats, wrappers, prefix) and its user errors."""

import argparse
import traceback

import pytest
import torch
from safetensors.torch import save_file

from cirlab.errors import CirlabError
from cirlab.models.backbone import Backbone
from cirlab.models.checkpoints import import_reference_checkpoint
from cirlab.models.loading import CheckpointError, read_checkpoint, strip_module_prefix, unwrap_state_dict


def test_reader_formats(tmp_path):
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        got = read_checkpoint(tmp_path / name)
        assert set(got) == {"a.weight", "b"} and torch.equal(got["a.weight"], sd["a.weight"]), name


def test_unwrap_and_strip():
    t = torch.ones(1)
    assert strip_module_prefix({"module.x": t, "module.y": t}) == {"x": t, "y": t}
    assert set(strip_module_prefix({"module.x": t, "y": t})) == {"module.x", "y"}  # only when every key has it
    assert set(unwrap_state_dict({"CLIP": {"module.x": t}, "epoch": 3})) == {"x"}
    assert set(unwrap_state_dict({"state_dict": {"x": t, "input_resolution": t}})) == {"x"}
    with pytest.raises(CheckpointError, match="holds no state dict"):
        unwrap_state_dict({"state_dict": {}})
    with pytest.raises(CheckpointError, match=r"\['n'\] are not tensors"):
        unwrap_state_dict({"x": t, "n": 3})


def _shown(excinfo) -> str:
    """What a user sees of the error: its text and every chained cause that would be printed."""
    return "".join(traceback.format_exception(excinfo.value))


def test_pickled_objects_are_refused_without_torch_advice(tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"args": argparse.Namespace(lr=1.0), "state_dict": {"x": torch.ones(1)}}, path)
    with pytest.raises(CirlabError, match="not unpickle") as e:
        read_checkpoint(path)
    assert "weights_only=False" not in _shown(e) and "re-save only the state dict" in _shown(e)
    with pytest.raises(CheckpointError) as e:
        Backbone("cirlab-tiny", str(path))
    assert "weights_only=False" not in _shown(e)
    with pytest.raises(CheckpointError) as e:
        import_reference_checkpoint(path, "searle-phi")
    assert "weights_only=False" not in _shown(e)


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="'.*notes.pt' is not a readable checkpoint"):
        read_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Backbone("cirlab-tiny", str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        read_checkpoint(tmp_path / "nothing.pt")
