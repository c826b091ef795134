"""Files written whole or not at all.

A checkpoint killed half-way through its write must not replace the last good one, and a file served to one
client must not be truncated by another writing it. Both hold when the data goes to a staging file beside the
target (same file system) that is then renamed over it: ``os.replace`` is atomic, so a reader sees the old file
or the new one, never a mixture. Staging names are unique, so concurrent writers of one path cannot clash; they
start with a dot, so a listing of finished files can skip them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)  # only left when writing or renaming failed


def write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically."""
    _write_atomically(path, lambda staging: staging.write_bytes(data))


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    _write_atomically(path, lambda staging: torch.save(obj, staging))


__all__ = ["torch_save", "write_bytes"]
