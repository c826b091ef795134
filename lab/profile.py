"""Training checkpoints of the lab (``*.pt``) as model profiles: plugged into ``attnscope.profiles`` through the
``attnscope.profiles`` entry-point group, so ``attnscope.load_pipeline("run/ckpt.pt")`` loads one (EMA weights)
without the product importing the lab. A checkpoint is a shapes model: it gets the call, checks and erasure
defaults of the bundled model of its architecture (the one ``train-sd3`` records, else the Flux form of ``train``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from attnscope.profiles import ModelNotFoundError
from attnscope.shapes.profile import SHAPES_PROFILE, SHAPES_SD3_PROFILE, ShapesProfile

#: The architecture of ``attnscope shapes train`` checkpoints, which record none.
FLUX_ARCHITECTURE = "flux"
#: The architecture ``attnscope shapes train-sd3`` records in its checkpoints.
SD3_ARCHITECTURE = "sd3"


class CheckpointProfile(ShapesProfile):
    """Training checkpoints (``OUT/ckpt.pt``) of one architecture, with the facts of the bundled model ``like``."""

    def __init__(self, architecture: str, like: ShapesProfile) -> None:
        super().__init__(f"{like.name} checkpoint (*.pt)", like.transformer_class, like.erase_defaults)
        self.architecture = architecture

    def claims(self, name_or_path: str) -> bool:
        if not str(name_or_path).endswith(".pt"):
            return False
        architecture = recorded_architecture(str(name_or_path))
        # A path that is no readable checkpoint goes to the Flux form, whose load says what is wrong with it.
        return architecture == self.architecture or (architecture is None and self.architecture == FLUX_ARCHITECTURE)

    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, **from_pretrained_kwargs: Any) -> Any:
        from .train import load_checkpoint_pipeline

        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{name_or_path}: no such training checkpoint")
        pipe = load_checkpoint_pipeline(path)
        return pipe if dtype is None else pipe.to(dtype=dtype)


def checkpoint_architecture(state: dict) -> str:
    """The architecture a loaded training checkpoint records (``FLUX_ARCHITECTURE`` where it records none)."""
    return state.get("architecture", FLUX_ARCHITECTURE)


def recorded_architecture(path: str) -> str | None:
    """The architecture a training checkpoint records (``"flux"`` where it records none); ``None`` for a path that
    is no readable checkpoint."""
    file = Path(path).expanduser()
    try:
        stat = file.stat()
    except OSError:
        return None
    return _recorded_architecture(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _recorded_architecture(path: str, mtime_ns: int, size: int) -> str | None:
    # Keyed by modification time and size, so a checkpoint rewritten in place is read again; mmap reads only the
    # pickled record, not the weights.
    try:
        state = torch.load(path, weights_only=False, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is "no checkpoint"; load() reports the real error
        return None
    return checkpoint_architecture(state) if isinstance(state, dict) else None


#: The instances the ``attnscope.profiles`` entry points name.
CHECKPOINT_PROFILE = CheckpointProfile(FLUX_ARCHITECTURE, SHAPES_PROFILE)
SD3_CHECKPOINT_PROFILE = CheckpointProfile(SD3_ARCHITECTURE, SHAPES_SD3_PROFILE)

__all__ = [
    "CHECKPOINT_PROFILE", "FLUX_ARCHITECTURE", "SD3_ARCHITECTURE", "SD3_CHECKPOINT_PROFILE", "CheckpointProfile",
    "checkpoint_architecture", "recorded_architecture",
]
