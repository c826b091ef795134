"""What erasure needs to know about a model's world, in a registry keyed by the world's class.

A model's :class:`~attnscope.profiles.ModelProfile` names its :class:`~attnscope.profiles.World`; erasure looks up
the matching :class:`ErasureWorld` here (by class, most specific first), which says how to turn ``--concept X``
into a :class:`~erase.spec.ConceptSpec`, which words the model can be asked about, how ``attnscope eval``
measures a LoRA on that world, and what ``attnscope attack`` needs of it: the judge that says whether an image
shows a concept, the words an attack may use, where attacks start, and reference images of the concept.
Built-in: the shapes world (:mod:`.shapes`: specs from its vocabulary, images judged by the scene reader, the
renderer for references) and the open world of real models (:mod:`.open`: shipped YAML specs, CLIP zero-shot
and NudeNet judges, base-model samples for references).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnscope.profiles import World, profile_for

from ..spec import ConceptSpec

__all__ = ["AttackStart", "ErasureWorld", "Judge", "erasure_world", "register_erasure_world"]

#: ``judge(images, spec)``: for each uint8 RGB image, whether it shows ``spec``'s concept.
Judge = Callable[[Sequence[Any], ConceptSpec], list[bool]]


@dataclass(frozen=True)
class AttackStart:
    """Where an attack on a concept starts: ``prompt`` names nothing of the concept (the base model does not draw
    it from there), ``concept_prompt`` is the same scene with the concept (what reference images show), ``word``
    is the concept's word in it, and ``swap`` the word standing in its place in ``prompt`` (``None``: dropped)."""

    prompt: str
    concept_prompt: str
    word: str
    swap: str | None = None

_REGISTRY: dict[type[World], ErasureWorld] = {}
_LOADED = False
#: Modules whose import registers the built-in erasure worlds.
_BUILTIN_MODULES = (f"{__name__}.shapes", f"{__name__}.open")


class ErasureWorld(ABC):
    """Erasure's view of one world."""

    #: Whether a concept the world does not know may be defined from scratch (``--concept X --prompts ...``).
    open_vocabulary: bool = True
    #: Images per prompt of ``attnscope eval`` when ``--seeds`` is not given.
    default_eval_seeds: int

    def for_model(self, model: str) -> ErasureWorld:
        """This view as ``model`` sees it, for a world whose specs depend on the model (the shapes world's η for a
        shape); by default the view itself."""
        return self

    @abstractmethod
    def spec(self, concept: str) -> ConceptSpec:
        """The spec of ``--concept`` (``UnknownConceptError``, with suggestions, when the world has none)."""

    @abstractmethod
    def check_words(self, pipe: Any, words: Sequence[str]) -> None:
        """Raise ``UnknownConceptError`` (with suggestions) for a word the model cannot represent."""

    @abstractmethod
    def evaluate(
        self, lora_dir: Path, specs: Sequence[ConceptSpec], model: str, *, seeds: int, out: Path, device: str,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """Measure the LoRA in ``lora_dir`` against ``model``; write ``out/eval.json`` (and a grid); return the
        report as a dict."""

    @abstractmethod
    def summary(self, report: dict[str, Any]) -> str:
        """One line of the report's headline figures."""

    @abstractmethod
    def judge(self, specs: Sequence[ConceptSpec], device: str, options: dict[str, Any]) -> Judge:
        """The judge of ``attnscope eval`` and ``attnscope attack``: built once (it may load a classifier)."""

    @abstractmethod
    def attack_words(self, pipe: Any, spec: ConceptSpec) -> list[str]:
        """Words a discrete attack on ``spec`` may use: the model's vocabulary without the concept's words."""

    @abstractmethod
    def attack_starts(self, spec: ConceptSpec) -> list[AttackStart]:
        """The fixed starting points of attacks on ``spec``."""

    @abstractmethod
    def reference_images(self, pipe: Any, call: dict[str, Any], prompt: str, n: int, seed: int) -> list[Any]:
        """``n`` uint8 RGB images of ``prompt`` drawn right, at the size of the model's default ``call`` (white-box
        attacks fit them); ``pipe`` is the base model where the world has no other source of truth."""


def register_erasure_world(world_class: type[World], erasure: ErasureWorld) -> None:
    """Make ``erasure`` the erasure view of every model whose profile's world is a ``world_class``."""
    _REGISTRY[world_class] = erasure


def erasure_world(model: str) -> ErasureWorld:
    """The erasure view of ``model``'s world (from its profile)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    world = profile_for(model).world
    for cls in type(world).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls].for_model(model)
    raise LookupError(f"no erasure view is registered for {type(world).__name__}")
