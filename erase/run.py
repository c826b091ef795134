"""The run folder of ``attnscope erase``: what it holds, and its life cycle (create, resume, overwrite, record).

Files: ``checkpoint.pt`` (atomic: LoRA, optimizer, step, RNG, log), ``cache.pt`` (base-model data),
``run.json`` (config + specs, fixed at the first start), and at the end ``pytorch_lora_weights.safetensors``,
``spec.yaml`` and ``train_log.json``; ``attnscope eval`` adds ``eval/`` by default.
A folder is checked before anything is written (every process of a data-parallel run checks, rank 0 writes).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .lora import LORA_FILE
from .spec import ConceptSpec, load_spec

__all__ = [
    "CACHE_FILE",
    "CHECKPOINT_FILE",
    "EVAL_DIR",
    "LOG_FILE",
    "RUN_FILE",
    "SPEC_FILE",
    "OutputExistsError",
    "ResumeMismatchError",
    "check_out",
    "check_resume",
    "read_run",
    "start",
    "write_results",
]

CHECKPOINT_FILE = "checkpoint.pt"
CACHE_FILE = "cache.pt"
RUN_FILE = "run.json"
LOG_FILE = "train_log.json"
SPEC_FILE = "spec.yaml"
#: Default folder of ``attnscope eval`` inside a run folder.
EVAL_DIR = "eval"
#: Files a run writes; ``overwrite`` deletes exactly these (and ``EVAL_DIR``), never anything else in the folder.
RUN_FILES = (CHECKPOINT_FILE, CACHE_FILE, RUN_FILE, LOG_FILE, SPEC_FILE, LORA_FILE)


class OutputExistsError(FileExistsError):
    """The output folder already holds a run; pass ``overwrite`` (or ``resume``)."""


class ResumeMismatchError(ValueError):
    """``resume`` was asked for a folder whose run has different settings or no checkpoint."""


def record(config: Any, specs: Sequence[ConceptSpec]) -> dict[str, Any]:
    """What ``run.json`` holds: the config and the specs."""
    return {"config": config.to_dict(), "specs": [s.to_dict() for s in specs]}


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that cannot be used (read-only: every process checks before any writes)."""
    if resume:
        if not (out / CHECKPOINT_FILE).is_file():
            raise ResumeMismatchError(f"nothing to resume in {out}: no {CHECKPOINT_FILE} (start without --resume)")
        return
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out} already exists and is not empty; pass --overwrite to replace the run in it, "
            "or --resume to continue it"
        )


def check_resume(out: Path, config: Any, specs: Sequence[ConceptSpec]) -> None:
    """Raise :class:`ResumeMismatchError` unless ``run.json`` in ``out`` describes this run (``steps``,
    ``threads`` and ``log_gradients_every`` may differ: a run may continue further, on another machine, logging
    differently)."""
    saved = json.loads((out / RUN_FILE).read_text())
    mine = json.loads(json.dumps(record(config, specs)))
    for part in (saved, mine):
        for key in ("steps", "threads", "log_gradients_every"):
            part["config"].pop(key, None)
    if saved != mine:
        raise ResumeMismatchError(
            f"{out} holds a run with other settings or concepts; resume with the same flags (see {out / RUN_FILE})"
        )


def start(out: Path, config: Any, specs: Sequence[ConceptSpec]) -> None:
    """Clear a previous run's files from ``out`` (nothing else) and write ``run.json``."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / EVAL_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record(config, specs), indent=2))


def write_results(out: Path, config: Any, specs: Sequence[ConceptSpec], extra: dict[str, Any]) -> None:
    """``spec.yaml`` (what ``attnscope eval`` reads) and ``train_log.json`` (the record plus ``extra``)."""
    (out / SPEC_FILE).write_text(yaml.safe_dump([s.to_dict() for s in specs], sort_keys=False, allow_unicode=True))
    (out / LOG_FILE).write_text(json.dumps({**record(config, specs), **extra}, indent=1))


def read_run(out: Path) -> tuple[str | None, list[ConceptSpec] | None]:
    """The model and concept specs a run folder recorded (None where absent)."""
    model, specs = None, None
    for name in (RUN_FILE, LOG_FILE):
        if (out / name).is_file():
            model = json.loads((out / name).read_text())["config"]["model"]
            break
    if (out / SPEC_FILE).is_file():
        specs = load_spec(out / SPEC_FILE)
    return model, specs
