"""Architecture adapters: find the joint attention of a pipeline's transformer.

Supported: ``FluxTransformer2DModel`` (Flux pipelines) and ``SD3Transformer2DModel`` (SD3 / SD3.5 pipelines).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, ForwardContext, LayerInfo, LayerKind
from .flux import FluxAdapter, is_flux
from .sd3 import SD3Adapter, is_sd3

SUPPORTED = "FluxTransformer2DModel (FluxPipeline) and SD3Transformer2DModel (StableDiffusion3Pipeline)"


class UnsupportedModelError(TypeError):
    """The object handed to attnscope is not a supported MMDiT pipeline or transformer."""


def transformer_of(pipe_or_transformer: Any) -> torch.nn.Module:
    """The MMDiT transformer of a pipeline (``pipe.transformer``), or the argument itself if it is one."""
    if is_flux(pipe_or_transformer) or is_sd3(pipe_or_transformer):
        return pipe_or_transformer
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if transformer is not None and (is_flux(transformer) or is_sd3(transformer)):
        return transformer
    found = type(transformer).__name__ if transformer is not None else type(pipe_or_transformer).__name__
    raise UnsupportedModelError(f"attnscope supports {SUPPORTED}; got {found}.")


def adapter_for(pipe_or_transformer: Any) -> Adapter:
    """The adapter for a pipeline or its transformer; raises :class:`UnsupportedModelError` otherwise."""
    transformer = transformer_of(pipe_or_transformer)
    if is_flux(transformer):
        return FluxAdapter()
    return SD3Adapter(patch_size=transformer.config.patch_size)


__all__ = [
    "Adapter",
    "ForwardContext",
    "LayerInfo",
    "LayerKind",
    "SUPPORTED",
    "UnsupportedModelError",
    "adapter_for",
    "transformer_of",
]
