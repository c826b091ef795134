"""Erasure methods, by name: what ``attnscope erase --method NAME`` runs. A registry, filled lazily: a method's
module is imported when its name is first asked for, so the config can name a method without importing them all.

Trained methods (:class:`~erase.methods.base.TrainedMethod`) say which losses a step of the
:class:`~erase.trainer.Trainer` computes on which cached rows; closed-form ones
(:class:`~erase.methods.base.ClosedFormMethod`) compute the weight edit directly. Every one writes the same
diffusers LoRA file, so ``attnscope eval``, ``attnscope attack`` and the explorer measure them all alike.
"""

from __future__ import annotations

import importlib

from .base import ClosedFormMethod, Method, TrainedMethod

__all__ = ["ClosedFormMethod", "Method", "TrainedMethod", "UnknownMethodError", "method_for", "method_names"]

#: name -> "module:class" inside this package.
_METHODS = {
    "eraseanything": "eraseanything:EraseAnything",
    "esd": "esd:ESD",
    "ca": "ablation:ConceptAblation",
    "fmn": "forget_me_not:ForgetMeNot",
    "uce": "uce:UCE",
}


class UnknownMethodError(ValueError):
    """No erasure method has this name."""


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_for(name: str) -> Method:
    """A fresh instance of the method ``name``; UnknownMethodError names the known ones."""
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown erasure method {name!r}; choose one of {', '.join(_METHODS)}")
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
