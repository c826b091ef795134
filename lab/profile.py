"""Training checkpoints of the lab (``*.pt``) as a model profile: plugged into ``attnscope.profiles`` through the
``attnscope.profiles`` entry-point group, so ``attnscope.load_pipeline("run/ckpt.pt")`` loads one (EMA weights)
without the product importing the lab. A checkpoint is a shapes model: it gets the shapes world's call, checks and
erasure defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attnscope.profiles import ModelNotFoundError
from attnscope.shapes.profile import ShapesProfile


class CheckpointProfile(ShapesProfile):
    """A training checkpoint of ``attnscope shapes train`` or ``train-sd3`` (``OUT/ckpt.pt``)."""

    def __init__(self) -> None:
        super().__init__("shapes checkpoint (*.pt)")

    def claims(self, name_or_path: str) -> bool:
        return str(name_or_path).endswith(".pt")

    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, **from_pretrained_kwargs: Any) -> Any:
        from .train import load_checkpoint_pipeline

        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{name_or_path}: no such training checkpoint")
        pipe = load_checkpoint_pipeline(path)
        return pipe if dtype is None else pipe.to(dtype=dtype)


#: The instance the ``attnscope.profiles`` entry point names.
CHECKPOINT_PROFILE = CheckpointProfile()

__all__ = ["CHECKPOINT_PROFILE", "CheckpointProfile"]
