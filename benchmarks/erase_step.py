"""Cost of one erase+preserve step pair relative to a plain LoRA flow-matching step on the same batch.

    python benchmarks/erase_step.py [--model shapes] [--batch 8] [--repeats 10] [--threads 1]

Both are timed on the same model with the same LoRA and optimizer (``attnscope.erase.trainer.Trainer``):

* plain: flow-matching loss on ``batch`` noised base-model samples, forward + backward + AdamW step, no capture;
* pair: the erase step (``batch`` concept rows: ESD + differentiable attention capture) followed by the preserve
  step (``batch`` rows: a forward of the flow-matching and keep rows, and one of the ``contrastive_rows`` concept
  rows that stops after the last captured attention layer), as ``attnscope erase`` runs them. Base-model
  quantities come from the cache, built once (its time is reported separately).

Plain steps and pairs are timed in alternation. Target: pair / plain <= 2. Writes ``benchmarks/erase_step.json``
(median seconds, ratio, device, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import attnscope
from attnscope.erase.config import EraseConfig, LossWeights
from attnscope.erase.trainer import Trainer
from attnscope.erase.worlds import erasure_world


def _interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each step, timed in alternation so that background load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("erase_step.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pipe = attnscope.load_pipeline(args.model, progress=False)
    # Fields left None take the model's defaults (call settings, LoRA targets, η), as `attnscope erase` does.
    config = EraseConfig(model=args.model, batch=args.batch)
    trainer = Trainer(
        pipe, [erasure_world(args.model).spec(args.concept)], config, Path(tempfile.mkdtemp(prefix="erase-bench-"))
    )
    t0 = time.perf_counter()
    trainer.prepare_cache(None)
    cache_seconds = time.perf_counter() - t0

    def pair() -> None:
        trainer.step = 0  # the level follows the step's parity
        trainer.train_step()  # erase (even step)
        trainer.train_step()  # preserve (odd step)

    full = trainer.config
    plain_config = replace(
        full, schedule="joint", weights=LossWeights(esd=0, attention=0, flow=1, contrastive=0, keep=0)
    )

    def plain() -> None:
        trainer.config = plain_config
        trainer.train_step()
        trainer.config = full

    plain(), pair()  # warm-up
    trainer.step = 0
    medians = _interleaved_medians({"plain": plain, "pair": pair}, args.repeats)
    plain_s, pair_s = medians["plain"], medians["pair"]
    result = {
        "model": args.model,
        "batch": args.batch,
        "contrastive_rows": full.contrastive_rows,
        "threads": args.threads,
        "device": "cpu",
        "plain_lora_fm_step_s": round(plain_s, 4),
        "erase_preserve_pair_s": round(pair_s, 4),
        "ratio": round(pair_s / plain_s, 3),
        "cache_build_s": round(cache_seconds, 2),
        "cache_points": len(trainer.cache.prompts),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
