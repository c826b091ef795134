"""Erasing a word from the explorer: one ``attnscope erase`` run on the app's own pipeline, into a runs folder
whose runs the Compare tab lists. Plain functions, like :mod:`.explorer`: nothing here imports Gradio.

The run trains on the served pipeline itself (no second copy of a large model) while it holds the model's lock,
so generations wait for it, and the pipeline is back to the base model when it ends, is cancelled or fails. A
cancelled run keeps its checkpoint (``attnscope.erase.train(..., resume=True)`` with the spec and config in its
``run.json`` finishes it); only finished runs are listed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .explorer import Model, RequestError, StepCallback

__all__ = ["EraseRequest", "ErasureCancelled", "erase_word", "list_runs", "method_choices"]


class ErasureCancelled(Exception):
    """The user cancelled the run; its folder keeps the last checkpoint."""


@dataclass(frozen=True)
class EraseRequest:
    """Erase ``word`` (a word of ``prompt``, the prompt it was picked from) with ``method``."""

    word: str
    prompt: str
    method: str = "eraseanything"


def method_choices() -> list[tuple[str, str]]:
    """``(label, name)`` of every erasure method, for a dropdown."""
    from attnscope.erase.methods import method_for, method_names

    return [(f"{name} — {method_for(name).summary}", name) for name in method_names()]


def list_runs(runs: Path) -> list[str]:
    """The run folders under ``runs`` that hold a finished LoRA, newest first."""
    from attnscope.erase.lora import LORA_FILE

    if not runs.is_dir():
        return []
    found = [p for p in runs.iterdir() if (p / LORA_FILE).is_file()]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def _spec(model: Model, request: EraseRequest) -> Any:
    """The world's spec of the word, or, in an open-vocabulary world (which has no list of related concepts), one
    made from the prompt it was picked from: trained on that prompt, the prompt's other content words (longer
    than three letters) as the irrelevant concepts to keep, and the prompt without the word as preservation."""
    from attnscope.erase import ConceptSpec, UnknownConceptError, erasure_world
    from attnscope.erase.spec import find_word, replace_word

    world = erasure_world(model.name)
    try:
        return world.spec(request.word)
    except UnknownConceptError as err:
        if not world.open_vocabulary:
            raise RequestError(str(err)) from None
    if not find_word(request.prompt, request.word):
        raise RequestError(f"{request.word!r} is not a word of the prompt {request.prompt!r}")
    others = [w for w in dict.fromkeys(re.findall(r"[A-Za-z]+", request.prompt))
              if len(w) > 3 and w.casefold() != request.word.casefold()]
    return ConceptSpec(
        name=request.word, targets=(request.word,), prompts=(request.prompt,), irrelevant=tuple(others),
        preserve_prompts=(replace_word(request.prompt, request.word, ""),),
    )


def erase_word(
    model: Model,
    request: EraseRequest,
    runs: Path,
    on_step: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Train ``request.method`` on ``request.word`` into a new folder under ``runs``; returns that folder.

    ``on_step(done, total)`` reports optimizer steps; ``cancelled()`` is asked after each and, once true, the run
    stops with :class:`ErasureCancelled`. ``config``: :class:`~attnscope.erase.EraseConfig` fields other than the
    model's and the method's defaults (the app's operator may shorten runs). Bad input (a word the world cannot
    erase, an unknown method) raises :class:`RequestError`.
    """
    from attnscope.erase import EraseConfig, train
    from attnscope.erase.lora import ADAPTER_NAME
    from attnscope.erase.methods import UnknownMethodError

    word = request.word.strip()
    if not word:
        raise RequestError("Click a word of the prompt to erase first.")
    try:
        settings = EraseConfig(model=model.name, method=request.method, **(config or {}))
    except UnknownMethodError as err:
        raise RequestError(str(err)) from None
    spec = _spec(model, EraseRequest(word, request.prompt, request.method))
    slug = re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") or "concept"
    stem = f"{slug}-{request.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = next(runs / name for name in (stem, *(f"{stem}-{i}" for i in range(2, 1000))) if not (runs / name).exists())

    def step(done: int, _losses: Any) -> None:
        if on_step is not None:
            on_step(done, settings.steps)
        if cancelled is not None and cancelled():
            raise ErasureCancelled(f"erasing {word!r} was cancelled at step {done}; {out} keeps its checkpoint")

    transformer = model.pipe.transformer
    with model.lock:
        try:
            train(model.pipe, [spec], settings, out, progress=False, on_step=step)
        except ValueError as err:  # the erase package's bad-input errors (spec, words, sizes) are ValueErrors
            raise RequestError(str(err)) from None
        finally:
            if ADAPTER_NAME in getattr(transformer, "peft_config", {}):
                transformer.delete_adapters(ADAPTER_NAME)
            transformer.requires_grad_(False)
            transformer.eval()
    return out
