"""Output folders filled whole or not at all.

A command that writes several files must not leave a folder that looks finished when it failed half-way: the
files are written into a staging folder beside the target (same file system), then moved in, each with an atomic
rename. A fresh target is one rename of the whole folder.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["staged_folder"]


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on a clean exit its files land in ``target`` (created if needed), on an error nothing
    of it does."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    staging.mkdir()
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
            return
        for item in sorted(staging.iterdir()):
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
