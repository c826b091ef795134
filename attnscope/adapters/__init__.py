"""Architecture adapters: a registry from transformer class to the :class:`Adapter` that knows its joint attention.

Each module of this package is one architecture and registers itself with :func:`register_adapter` when it is
imported; :func:`adapter_for` imports every module of the package the first time it is asked (the pattern of
diffusers' ``hooks/_helpers.py``: per-model facts in a registry keyed by class, registered lazily). Adding an
architecture is adding one module here: its locator (an :class:`Adapter` subclass), its capture processor, its
token layout and its call plumbing, registered for its transformer class.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch

from .base import Adapter, ForwardContext, LayerInfo, LayerKind, ModelCall

_REGISTRY: dict[type[torch.nn.Module], type[Adapter]] = {}
_LOADED = False


class UnsupportedModelError(TypeError):
    """The object handed to attnscope is not a supported MMDiT pipeline or transformer."""


def register_adapter(transformer_class: type[torch.nn.Module]):
    """Class decorator: ``@register_adapter(FluxTransformer2DModel)`` makes the decorated :class:`Adapter` the one
    for that transformer class (and its subclasses, unless they have their own)."""

    def register(adapter_class: type[Adapter]) -> type[Adapter]:
        _REGISTRY[transformer_class] = adapter_class
        return adapter_class

    return register


def _registry() -> dict[type[torch.nn.Module], type[Adapter]]:
    global _LOADED
    if not _LOADED:
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")
        _LOADED = True
    return _REGISTRY


def _adapter_class(module: Any) -> type[Adapter] | None:
    registry = _registry()
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def supported() -> str:
    """The registered transformer classes, for messages."""
    return ", ".join(sorted(cls.__name__ for cls in _registry()))


def transformer_of(pipe_or_transformer: Any) -> torch.nn.Module:
    """The MMDiT transformer of a pipeline (``pipe.transformer``), or the argument itself if it is one."""
    if _adapter_class(pipe_or_transformer) is not None:
        return pipe_or_transformer
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if transformer is not None and _adapter_class(transformer) is not None:
        return transformer
    found = type(transformer).__name__ if transformer is not None else type(pipe_or_transformer).__name__
    raise UnsupportedModelError(f"attnscope supports {supported()}; got {found}.")


def adapter_for(pipe_or_transformer: Any) -> Adapter:
    """The adapter for a pipeline or its transformer; raises :class:`UnsupportedModelError` otherwise."""
    transformer = transformer_of(pipe_or_transformer)
    return _adapter_class(transformer).for_transformer(transformer)


def check_size(pipe: Any, height: int, width: int) -> None:
    """Raise a clear ``ValueError`` unless ``height`` and ``width`` are positive multiples of the patch size."""
    multiple = adapter_for(pipe).size_multiple(pipe)
    bad = [
        f"{name}={value}"
        for name, value in (("height", height), ("width", width))
        if value <= 0 or value % multiple
    ]
    if bad:
        raise ValueError(f"{', '.join(bad)}: height and width must be positive multiples of {multiple} for this model")


__all__ = [
    "Adapter",
    "ForwardContext",
    "LayerInfo",
    "LayerKind",
    "ModelCall",
    "UnsupportedModelError",
    "adapter_for",
    "check_size",
    "register_adapter",
    "supported",
    "transformer_of",
]
