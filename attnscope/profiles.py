"""Model profiles: everything attnscope knows about one *model* (as opposed to its architecture, which its adapter
knows), in one registry.

A :class:`ModelProfile` says how to load the model, its default call, its own checks of a call (vocabulary,
sizes), its erasure defaults (LoRA placement, ESD's η) and its :class:`World`: what it draws, which erasure uses
to build concept specs and to judge images. Callers ask :func:`profile_for` with what the user typed (``shapes``,
``tiny-flux``, a checkpoint path, a hub id, a folder) and never compare that text themselves.

Where profiles come from, in order of lookup:

* the built-in worlds, which register their own profile when first needed (:mod:`attnscope.shapes.profile`,
  :mod:`attnscope.tiny`);
* packages that plug in through the ``attnscope.profiles`` entry-point group (each entry point is a
  :class:`ModelProfile` instance, or a callable returning one), loaded only for a model no built-in claims; the
  shapes lab registers its training checkpoints this way, so nothing in the product imports the lab;
* anything else is a pretrained pipeline (a hub id or a folder): :class:`PretrainedProfile`, whose facts are keyed
  by the transformer class its ``model_index.json`` names (:func:`register_pretrained`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import torch

from .readout import Readout

#: The paper's LoRA placement: text-side queries and keys of the dual-stream blocks (re-route attention away from
#: the concept's tokens).
PAPER_LORA_TARGETS: tuple[str, ...] = ("add_q_proj", "add_k_proj")
#: The paper's ESD negative-guidance strength η.
PAPER_ETA = 1.0

#: Where an erasure LoRA trains (``attnscope erase --train``): on the text-side targets (``text``), or on every
#: projection of the dual-stream attention layers (``joint``) or of every attention layer (``attention``).
LoraPlacement = Literal["text", "joint", "attention"]
#: Which velocity an erasure's ESD and implicit loss hold under true CFG (:attr:`EraseDefaults.erase_velocity`).
EraseVelocity = Literal["conditional", "guided"]

#: Modules whose import registers a built-in profile.
_BUILTIN_MODULES = ("attnscope.shapes.profile", "attnscope.tiny")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a registered name, nor an existing folder, nor (offline) in the hub cache."""


@dataclass(frozen=True)
class EraseDefaults:
    """What ``attnscope erase`` uses for a model when not told otherwise."""

    lora_targets: tuple[str, ...] = PAPER_LORA_TARGETS
    #: Where the LoRA trains: ``text`` puts it on ``lora_targets``; the wider placements keep the text embedder where
    #: ``lora_targets`` has it.
    placement: LoraPlacement = "text"
    #: The method's step count is multiplied by this: a wider placement may need more steps to finish an erasure.
    steps_scale: float = 1.0
    eta: float = PAPER_ETA
    #: The weight of EraseAnything's attention-attenuation term on this model; ``None``: the method's own (the
    #: paper's 1e-3). A model where the term was measured to buy nothing turns it off with 0.
    attention_weight: float | None = None
    #: The highest learning rate this model's erasures hold at: a method's faster schedule (several concepts at a
    #: higher rate) runs at this one, for proportionally more steps. ``None``: no limit.
    max_lr: float | None = None
    #: Several concepts erased together are pushed equally hard: each concept's η is raised until its ESD push over
    #: the cache points naming it alone, η²·mean‖v*(c) − v*(c_anc)‖², matches the strongest concept's, and a point
    #: naming several takes the smallest of their η (:func:`erase.methods.rows.run_etas`, ``point_etas``). Off,
    #: each concept keeps its own η.
    balance_eta: bool = False
    #: ESD stops pushing a concept point once its velocity is this many concept lengths past its anchor's
    #: (:func:`erase.losses.esd_loss`), divided by how far the balance raised the point's η
    #: (:func:`erase.methods.rows.point_margins`); ``None``: every point is pushed towards ESD's target throughout.
    esd_margin: float | None = None
    #: Which velocity ESD and the implicit loss hold under true CFG in a run of one concept: each row's
    #: ``conditional`` velocity, or the ``guided`` one, the conditional velocity referred to the base model's
    #: negative branch, which the sampler follows (:func:`erase.losses.referred_velocity`). The same without true CFG.
    erase_velocity: EraseVelocity = "conditional"
    #: The same for a run of several concepts.
    erase_velocity_several: EraseVelocity = "conditional"


class World:
    """What a family of models draws. Erasure keys its concept specs, word checks and evaluation protocol on the
    world's class (``attnscope.erase.worlds``); the base class is the open world of real text-to-image models,
    whose words are whatever their tokenizer knows."""

    #: Short description for messages ("the shapes world").
    description = "an open-vocabulary text-to-image model"


#: The world of real text-to-image models (and of the tiny random pipelines that stand in for them in tests).
OPEN_WORLD = World()


class ModelProfile:
    """Everything model-specific about one model (or one kind of model path). Subclasses override what differs."""

    #: The name users type (``--model shapes``); for path-claiming profiles, a description of the paths.
    name: str = ""
    world: World = OPEN_WORLD
    erase_defaults: EraseDefaults = EraseDefaults()
    #: How its maps become heatmaps and masks (layers, late steps, upsampling, threshold): ``readout_for(model)``.
    #: The generic default cuts at Otsu's threshold, which has no free parameter to tune on a model we cannot run
    #: here; on the shapes model it beat each map's own mean by 0.2 mIoU (benchmarks/RESULTS.md).
    readout: Readout = Readout(threshold="otsu")

    def claims(self, name_or_path: str) -> bool:
        """Whether ``name_or_path`` is this profile's model."""
        return name_or_path == self.name

    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, **from_pretrained_kwargs: Any) -> Any:
        """The pipeline, on the CPU (``load_pipeline`` moves it)."""
        raise NotImplementedError

    def default_call(self, pipe: Any | None = None) -> dict[str, Any]:
        """Keyword defaults for ``pipe(prompt, **...)``; ``pipe`` (when loaded) may refine them, e.g. a checkpoint
        whose transformer takes guidance in another form. Empty: the pipeline's own defaults."""
        return {}

    def check_call(self, prompt: str, height: int | None, width: int | None) -> None:
        """Raise for a call the model cannot do (naming what), warn for one it does badly. Default: anything goes."""


@dataclass(frozen=True)
class PretrainedFacts:
    """Per-architecture facts of pretrained pipelines, keyed by transformer class name (:func:`register_pretrained`)."""

    erase_defaults: EraseDefaults = EraseDefaults()
    default_call: Callable[[], dict[str, Any]] = dict


class PretrainedProfile(ModelProfile):
    """A hub id (``black-forest-labs/FLUX.1-dev``) or a local diffusers folder."""

    def __init__(self, name_or_path: str, facts: PretrainedFacts):
        self.name = name_or_path
        self.facts = facts
        self.erase_defaults = facts.erase_defaults

    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, **from_pretrained_kwargs: Any) -> Any:
        from diffusers import DiffusionPipeline

        check_findable(name_or_path)
        if dtype is not None:
            from_pretrained_kwargs[dtype_keyword()] = dtype
        local = Path(name_or_path).expanduser()
        try:
            return DiffusionPipeline.from_pretrained(
                str(local) if local.is_dir() else name_or_path, **from_pretrained_kwargs
            )
        except OSError as err:
            if local.is_dir() or _cached_model_index(name_or_path) is not None:
                raise
            # The hub could not be reached (or refused): diffusers' own error is a long chained traceback.
            raise ModelNotFoundError(
                _not_cached(name_or_path, f"the hub could not be reached ({_first_line(err)})")
            ) from None

    def default_call(self, pipe: Any | None = None) -> dict[str, Any]:
        return self.facts.default_call()


_PROFILES: list[ModelProfile] = []
_PRETRAINED: dict[str, PretrainedFacts] = {}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False


def register_profile(profile: ModelProfile) -> ModelProfile:
    """Add a profile to the registry (a later registration of the same name and class replaces the earlier one, in
    its place; otherwise the latest registration is asked first)."""
    for i, known in enumerate(_PROFILES):
        if known.name == profile.name and type(known) is type(profile):
            _PROFILES[i] = profile
            return profile
    _PROFILES.append(profile)
    return profile


def register_pretrained(transformer_class_name: str, facts: PretrainedFacts) -> None:
    """Facts for pretrained pipelines whose ``model_index.json`` names this transformer class."""
    _PRETRAINED[transformer_class_name] = facts


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if not _PLUGINS_LOADED:
        _PLUGINS_LOADED = True
        for ep in entry_points(group="attnscope.profiles"):
            loaded = ep.load()
            register_profile(loaded if isinstance(loaded, ModelProfile) else loaded())


def registered_names() -> list[str]:
    """The names of the registered profiles, sorted (for help texts and messages)."""
    _load_builtins()
    _load_plugins()
    return sorted(p.name for p in _PROFILES if p.name)


def profile_for(name_or_path: str | os.PathLike[str]) -> ModelProfile:
    """The profile of a model name or path: the registered profile that claims it, else a
    :class:`PretrainedProfile` (whose ``load`` says in one line when the model cannot be found)."""
    text = str(name_or_path)
    # Built-in profiles first; plugged-in ones are imported only for what no built-in claims.
    for load in (_load_builtins, _load_plugins):
        load()
        for profile in reversed(_PROFILES):
            if profile.claims(text):
                return profile
    return PretrainedProfile(text, _PRETRAINED.get(transformer_class_name(text) or "", PretrainedFacts()))


def profile_of(model: Any) -> ModelProfile:
    """The profile of a model name or path, or of a pipeline by the name or folder it was loaded from
    (``name_or_path``); the generic :class:`ModelProfile` for a pipeline built in memory."""
    name = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    return profile_for(name) if name else ModelProfile()


def transformer_class_name(name_or_path: str) -> str | None:
    """The transformer class a pretrained pipeline's ``model_index.json`` names, read from the folder or, for a
    hub id, from the local hub cache; ``None`` where it cannot be read without loading."""
    local = Path(name_or_path).expanduser()
    index = local / "model_index.json" if local.is_dir() else _cached_model_index(name_or_path)
    try:
        entry = json.loads(index.read_text()).get("transformer") if index is not None else None
    except (OSError, ValueError):
        return None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _cached_model_index(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    if not _looks_like_hub_id(repo_id):
        return None
    cached = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(cached) if isinstance(cached, str) else None


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith(("/", ".", "~")) and all(text.split("/"))


def check_findable(name_or_path: str) -> None:
    """Raise :class:`ModelNotFoundError` (one line: what was looked for, how to get it) unless ``name_or_path`` is a
    diffusers folder, a cached hub id, or a hub id the hub may be asked for."""
    from huggingface_hub import constants

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(f"{name_or_path} is a folder but not a diffusers pipeline (no model_index.json)")
        return
    if local.exists():
        raise ModelNotFoundError(f"{name_or_path} is a file, not a model folder or name")
    if not _looks_like_hub_id(name_or_path):
        raise ModelNotFoundError(
            f"{name_or_path!r} is neither a model attnscope knows ({', '.join(registered_names())}), nor an existing "
            "folder, nor a hub id (owner/name)"
        )
    if _cached_model_index(name_or_path) is None and constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(_not_cached(name_or_path, "HF_HUB_OFFLINE is set"))


def _not_cached(repo_id: str, why: str) -> str:
    return (
        f"{repo_id} is neither a local folder nor in the hub cache, and {why}: download it once with network "
        f"access (huggingface-cli download {repo_id}) or pass the folder of a local copy"
    )


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__


def dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has renamed it (``torch_dtype`` then warns)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


__all__ = [
    "OPEN_WORLD",
    "PAPER_ETA",
    "PAPER_LORA_TARGETS",
    "EraseDefaults",
    "EraseVelocity",
    "LoraPlacement",
    "ModelNotFoundError",
    "ModelProfile",
    "PretrainedFacts",
    "PretrainedProfile",
    "World",
    "check_findable",
    "dtype_keyword",
    "profile_for",
    "profile_of",
    "register_pretrained",
    "register_profile",
    "registered_names",
    "transformer_class_name",
]
