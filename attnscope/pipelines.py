"""``load_pipeline``: the bundled shapes model, a tiny test pipeline, a hub id or a local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .adapters import SUPPORTED, UnsupportedModelError, adapter_for

#: Names that resolve to pipelines shipped with or built by attnscope (no download).
BUILTIN = ("shapes", "tiny-flux", "tiny-sd3")


def load_pipeline(
    name_or_path: str = "shapes",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a Flux or SD3 pipeline.

    ``"shapes"``: the bundled tiny shapes-world Flux (offline). ``"tiny-flux"`` / ``"tiny-sd3"``: tiny random
    pipelines built offline (for tests and demos). Anything else goes to ``DiffusionPipeline.from_pretrained``
    (a hub id such as ``black-forest-labs/FLUX.1-dev``, or a local folder). ``device`` defaults to CPU; pass
    ``"cuda"`` on a GPU machine. Raises :class:`UnsupportedModelError` for non-MMDiT pipelines.
    """
    if name_or_path == "shapes":
        from diffusers import FluxPipeline

        from .shapes import bundled_path

        pipe = FluxPipeline.from_pretrained(bundled_path(), **{_dtype_keyword(): dtype or torch.float32}, **from_pretrained_kwargs)
    elif name_or_path == "tiny-flux":
        from .tiny import build_tiny_flux_pipeline

        pipe = build_tiny_flux_pipeline()
    elif name_or_path == "tiny-sd3":
        from .tiny import build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline()
    else:
        from diffusers import DiffusionPipeline

        local = Path(name_or_path).expanduser()
        if not local.exists() and os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in name_or_path:
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing folder"
            )
        if dtype is not None:
            from_pretrained_kwargs[_dtype_keyword()] = dtype
        pipe = DiffusionPipeline.from_pretrained(str(local) if local.exists() else name_or_path, **from_pretrained_kwargs)
    try:
        adapter_for(pipe)
    except UnsupportedModelError:
        raise UnsupportedModelError(f"{name_or_path!r} loads a {type(pipe).__name__}; attnscope supports {SUPPORTED}") from None
    if dtype is not None and name_or_path in ("tiny-flux", "tiny-sd3"):
        pipe.to(dtype=dtype)
    pipe.to(device or "cpu")
    pipe.set_progress_bar_config(disable=False)
    return pipe


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has renamed it (``torch_dtype`` then warns)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def check_size(pipe: Any, height: int, width: int) -> None:
    """Raise a clear ``ValueError`` unless ``height`` and ``width`` are positive multiples of the patch size."""
    multiple = adapter_for(pipe).size_multiple(pipe)
    bad = [f"{name}={value}" for name, value in (("height", height), ("width", width)) if value <= 0 or value % multiple]
    if bad:
        raise ValueError(f"{', '.join(bad)}: height and width must be positive multiples of {multiple} for this model")


def validate_call(name_or_path: str, prompt: str, height: int | None, width: int | None) -> None:
    """A built-in model's own checks of a call, before any work: the bundled shapes model raises
    ``UnknownWordError`` naming the words it cannot draw and warns at sizes it was not trained for."""
    if name_or_path == "shapes":
        from .shapes import validate_call as validate_shapes_call

        validate_shapes_call(prompt, height, width)


def default_call_kwargs(name_or_path: str) -> dict[str, Any]:
    """Sensible ``pipe(...)`` keyword defaults for a built-in model (empty for hub/folder models)."""
    if name_or_path == "shapes":
        from .shapes import DEFAULT_CALL_KWARGS

        return dict(DEFAULT_CALL_KWARGS)
    if name_or_path == "tiny-flux":
        from .tiny import TINY_FLUX_CALL_KWARGS

        return dict(TINY_FLUX_CALL_KWARGS)
    if name_or_path == "tiny-sd3":
        from .tiny import TINY_SD3_CALL_KWARGS

        return dict(TINY_SD3_CALL_KWARGS)
    return {}
