"""scripts/preference_rounds.sh, the chain of on-policy preference rounds that made the bundle: one real round on
the bundled model (a few captions, two fine-tune steps, one seed per scored prompt), its tar file kept over a worse
one, and a second run that finds the round finished and redoes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _rounds(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "preference_rounds.sh"), str(out), "1"], env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_round_samples_tunes_exports_scores_packs_and_is_not_redone(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "other-round1-0.1000.tar").write_bytes(b"")  # a worse round of another chain: KEEP=1 drops it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "THREADS": "2", "PROMPTS": "8",
           "SAMPLES": "2", "STEPS": "2", "BATCH": "4", "SWEEP_SEEDS": "1", "PACK": str(pack), "KEEP": "1"}
    out = tmp_path / "chain"
    done = _rounds(out, env)
    assert done.returncode == 0, done.stderr[-3000:]

    round1 = out / "round1"
    rows = [json.loads(line) for line in (round1 / "heldout.jsonl").read_text().splitlines()]
    assert [r["seeds"] for r in rows] == ["100..100", "0..0"]  # held-out seeds, then the eval's
    assert all(r["two_object_images"] == 16 for r in rows)
    record = json.loads((round1 / "export" / "training.json").read_text())
    assert "--init-from attnscope/shapes/weights" in record["command"]
    assert record["preference_set"]["command"].startswith(
        f"attnscope shapes preferences --model attnscope/shapes/weights --out {round1 / 'set.pt'} --prompts 8 "
        "--samples 2 --seed 1")
    assert record["preference_set"]["pairs"] > 0

    (packed,) = pack.iterdir()
    assert packed.name.startswith("chain-round1-")
    score = float(packed.name.removeprefix("chain-round1-").removesuffix(".tar"))
    two_object = sum(r["two_object_all_correct"] for r in rows) / len(rows)
    assert score == pytest.approx(two_object + (min(r["color"] for r in rows) >= 0.97), abs=1e-4)
    with tarfile.open(packed) as tar:
        names = set(tar.getnames())
    assert {"export/transformer/diffusion_pytorch_model.safetensors", "export/text_encoder_2/model.safetensors",
            "export/training.json", "heldout.jsonl", "train.log"} <= names

    log = (round1 / "train.log").read_text()
    again = _rounds(out, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (round1 / "train.log").read_text() == log and [p.name for p in pack.iterdir()] == [packed.name]
