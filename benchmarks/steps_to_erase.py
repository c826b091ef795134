"""Steps to erase: how a recipe's figures on the erased prompts develop over its optimizer steps.

    python benchmarks/steps_to_erase.py OUT --concept red [--every 50] [--steps 300] [--seeds 8] [--threads 2]
        [-- ERASE FLAGS...]      e.g.  -- --weights attention=1e-3
                                 or    -- --attention-form localized --weights attention=1

Trains ``attnscope erase --concept ... --out OUT`` in stages of ``--every`` steps (each stage resumes the last one's
checkpoint, so the stages together are the uninterrupted run), and after each stage scores the LoRA on the erased
and synonym prompts of ``attnscope eval``'s protocol at ``--seeds`` seeds: Acc_e, Acc_g and the attention mass on
the erased prompts (the eval's own scoring). Prints a Markdown table and writes ``OUT/steps_to_erase.json``; a stage
already scored is not scored again. The first stage at which Acc_e and Acc_g are both ≤ 2 % is the run's steps to
erase.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import attnscope
from attnscope.erase.lora import load_lora
from attnscope.erase.run import read_run
from attnscope.erase.worlds.shapes_eval import score_model, shapes_prompts

#: Acc_e and Acc_g at or below this count as erased (the erasure targets' Acc_e).
ERASED = 0.02


def erase_stage(out: Path, concepts: list[str], steps: int, flags: list[str], threads: int) -> None:
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() else ["--overwrite"]
    command = ["attnscope", "erase", *(a for c in concepts for a in ("--concept", c)), "--out", str(out),
               "--steps", str(steps), "--threads", str(threads), *resume, *flags]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def score_stage(out: Path, seeds: int) -> dict[str, float]:
    model, specs = read_run(out)
    pipe = attnscope.load_pipeline(model, progress=False)
    pipe.set_progress_bar_config(disable=True)
    load_lora(pipe, out)
    prompts = shapes_prompts(specs)
    scores, _ = score_model(pipe, {"erased": prompts["erased"], "synonym": prompts["synonym"]}, specs, seeds,
                            "erased")
    return {"acc_e": scores.acc_e, "acc_g": scores.acc_g, "attention_mass": scores.attention_mass.get("erased")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--concept", action="append", required=True)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # after --: flags for `attnscope erase`
    args, flags = parser.parse_args(argv[:split]), argv[split + 1 :]
    torch.set_num_threads(args.threads)
    record = args.out / "steps_to_erase.json"
    stages = json.loads(record.read_text()) if record.is_file() else {}
    for steps in range(args.every, args.steps + 1, args.every):
        if str(steps) in stages:
            continue
        erase_stage(args.out, args.concept, steps, flags, args.threads)
        stages[str(steps)] = score_stage(args.out, args.seeds)
        record.write_text(json.dumps(stages, indent=1))
        print(f"step {steps}: {stages[str(steps)]}", file=sys.stderr)
    print("| steps | Acc_e | Acc_g | attention mass |\n|---:|---:|---:|---:|")
    for steps, s in sorted(stages.items(), key=lambda kv: int(kv[0])):
        print(f"| {steps} | {s['acc_e']:.1%} | {s['acc_g']:.1%} | {s['attention_mass']:.4f} |")
    erased = [int(k) for k, s in stages.items() if s["acc_e"] <= ERASED and s["acc_g"] <= ERASED]
    print(f"steps to erase: {min(erased) if erased else 'not within ' + str(args.steps)}")


if __name__ == "__main__":
    main()
