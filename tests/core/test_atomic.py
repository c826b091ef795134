"""Atomic writes: the target holds the old file or the new one, and no staging file outlives a write."""

import pytest
import torch

from attnscope import atomic


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_torch_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic.torch_save({"step": 1, "w": torch.ones(3)}, path)
    atomic.torch_save({"step": 2, "w": torch.zeros(3)}, path)
    state = torch.load(path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_staging_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic.torch_save({"step": 1}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic.torch_save({"step": 2, "bad": _Unpicklable()}, path)
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_write_bytes(tmp_path):
    path = tmp_path / "image.png"
    atomic.write_bytes(b"first", path)
    atomic.write_bytes(b"second", path)
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
