"""The attacks by name: each module registers its class with :func:`register_attack`; the built-ins are imported
the first time a name is asked for."""

from __future__ import annotations

import importlib

from .base import Attack

__all__ = ["UnknownAttackError", "attack_names", "get_attack", "register_attack"]

_REGISTRY: dict[str, type[Attack]] = {}
#: Modules whose import registers the built-in attacks, in the order ``attnscope attack`` runs them.
_BUILTIN_MODULES = ("prompt_search", "unlearndiff", "soft_prompt", "textual_inversion")
_LOADED = False


class UnknownAttackError(ValueError):
    """An attack name that no module registered."""


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` runnable as ``attnscope attack --attack <cls.name>``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")


def attack_names() -> list[str]:
    """Every registered attack, built-ins first."""
    _load()
    return list(_REGISTRY)


def get_attack(name: str) -> Attack:
    """A fresh instance of the attack called ``name`` (``UnknownAttackError``, with a suggestion, otherwise)."""
    from ..spec import suggest

    _load()
    if name not in _REGISTRY:
        raise UnknownAttackError(f"unknown attack {name!r}{suggest(name, _REGISTRY)} (attacks: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]()

