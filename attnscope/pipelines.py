"""``load_pipeline``: any model a profile knows (the bundled shapes model, a tiny test pipeline, a checkpoint, a
hub id or a local folder), checked to be an architecture attnscope supports."""

from __future__ import annotations

from typing import Any

import torch

from .adapters import UnsupportedModelError, adapter_for, supported
from .profiles import profile_for


def load_pipeline(
    name_or_path: str = "shapes",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a Flux or SD3 pipeline.

    ``"shapes"``: the bundled tiny shapes-world Flux (offline). ``"tiny-flux"`` / ``"tiny-sd3"``: tiny random
    pipelines built offline (for tests and demos). Anything else is a hub id such as
    ``black-forest-labs/FLUX.1-dev`` or a local folder (``DiffusionPipeline.from_pretrained``), unless a plugged-in
    profile claims it (see :mod:`attnscope.profiles`). ``device`` defaults to CPU; pass ``"cuda"`` on a GPU machine.
    Raises :class:`UnsupportedModelError` for non-MMDiT pipelines, :class:`~attnscope.profiles.ModelNotFoundError`
    for a model that cannot be found, ``ValueError`` for a device this machine does not have.
    """
    target = resolve_device(device or "cpu")
    profile = profile_for(name_or_path)
    pipe = profile.load(str(name_or_path), dtype=dtype, **from_pretrained_kwargs)
    try:
        adapter_for(pipe)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"{name_or_path!r} loads a {type(pipe).__name__}; attnscope supports {supported()}"
        ) from None
    pipe.to(target)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device, refusing one this machine does not have (before any work starts)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: this machine's torch sees no CUDA GPU (use cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name}: attnscope runs models on cpu or cuda")
    return device


__all__ = ["load_pipeline", "resolve_device"]
