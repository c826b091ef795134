"""Export a training checkpoint (EMA weights) as the bundled diffusers folder (``attnscope shapes export``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from attnscope.shapes import bundled_path

from .preference import PreferenceSet
from .profile import SD3_ARCHITECTURE, checkpoint_architecture
from .sd3_train import train_sd3_command
from .train import load_checkpoint_pipeline, train_command

#: Upper bound on the committed weights (bytes), as the repository promises.
MAX_BUNDLE_BYTES = 20 * 1024 * 1024


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_checkpoint(ckpt_path: str | Path, to: str | Path | None = None, extra_info: dict | None = None) -> Path:
    """Write the checkpoint's pipeline (EMA weights, safetensors) to ``to`` (default: the bundled model of its
    architecture, ``bundled_path("shapes")`` or ``bundled_path("shapes-sd3")``).

    The folder is built next to the target and swapped in by renames, so readers never see a half-written
    bundle. ``training.json`` in the folder records the step, wall time, config, the command, the record of the
    model a fine-tune started from (``fine_tuned_from``), for a preference fine-tune how its preference set is drawn
    again (``preference_set``, when the set's file is still there) and ``extra_info``.

    Raises:
        ValueError: if the result exceeds MAX_BUNDLE_BYTES (the previous folder is kept).
    """
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    sd3 = checkpoint_architecture(state) == SD3_ARCHITECTURE
    target = Path(to) if to is not None else bundled_path("shapes-sd3" if sd3 else "shapes")
    target.parent.mkdir(parents=True, exist_ok=True)
    pipe = load_checkpoint_pipeline(ckpt_path)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the bundle must be readable like any package data
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        cfg = state["config"]
        info = {
            "command": train_sd3_command(cfg) if sd3 else train_command(cfg),
            "step": state["step"],
            "train_minutes": round(state["elapsed"] / 60, 2),
            "config": cfg,
        }
        if sd3:  # the VAE, T5 and sampler are the teacher's
            info["distilled_from"] = state["teacher_record"]
        else:
            info["vae"] = {k: state["vae_config"][k] for k in ("scaling_factor", "shift_factor")}
        if state.get("parent"):
            info["fine_tuned_from"] = state["parent"]
        if cfg.get("preference") and Path(cfg["preference"]).is_file():
            info["preference_set"] = PreferenceSet.load(cfg["preference"]).record(cfg["preference"])
        info |= extra_info or {}
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        size = folder_bytes(tmp)
        if size > MAX_BUNDLE_BYTES:
            raise ValueError(f"exported pipeline is {size / 2**20:.1f} MiB > {MAX_BUNDLE_BYTES / 2**20:.0f} MiB")
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
