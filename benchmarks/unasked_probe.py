"""The unasked path, prompt by prompt: how often base and erased model draw an erased concept from prompts that name
nothing, on seeds held out from ``attnscope eval``'s (which uses 0..15).

    python benchmarks/unasked_probe.py RUN [--seeds 12] [--first-seed 100] [--threads 2] [--prompt TEXT ...]

RUN is an ``attnscope erase`` folder (its model and concepts). The default prompts are the eval's glue-word implicit
prompts, the implicit loss's training prompts and glue words neither uses (the prompt search's finds are of that
kind), and two irrelevant prompts as a check. Images: the model's default call, read by the shapes reader; a hit is
an image that shows an erased concept (the eval's rule). Prints a table and writes ``RUN/unasked_probe.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import attnscope
from attnscope.erase.lora import load_lora
from attnscope.erase.run import read_run
from attnscope.erase.worlds.shapes_eval import shows_any
from attnscope.shapes.generate import generate
from attnscope.shapes.reader import read_scene

PROMPTS = ("", "with", "plus to", "and", "a", "next", "beside", "a plus next", "an with", "the to", "to the",
           "a red circle", "a blue square")


def hit_rates(pipe, prompts, concepts, seeds: range) -> dict[str, float]:
    return {prompt: float(np.mean([shows_any(read_scene(im), concepts) for im in generate(pipe, prompt, list(seeds))]))
            for prompt in prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", action="append", default=None, help="a prompt to probe (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, specs = read_run(args.run)
    if not specs:
        raise SystemExit(f"{args.run} has no spec.yaml: pass the --out folder of `attnscope erase`")
    concepts = [s.name for s in specs]
    prompts = args.prompt or PROMPTS
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    pipe = attnscope.load_pipeline(model, progress=False)
    pipe.set_progress_bar_config(disable=True)
    base = hit_rates(pipe, prompts, concepts, seeds)
    load_lora(pipe, args.run)
    erased = hit_rates(pipe, prompts, concepts, seeds)
    (args.run / "unasked_probe.json").write_text(json.dumps(
        {"concepts": concepts, "seeds": [seeds.start, seeds.stop], "base": base, "erased": erased}, indent=1))
    print(f"| prompt | base | erased |  ({', '.join(concepts)}; seeds {seeds.start}–{seeds.stop - 1})\n|---|---:|---:|")
    for prompt in prompts:
        print(f"| {prompt!r} | {base[prompt]:.0%} | {erased[prompt]:.0%} |")


if __name__ == "__main__":
    main()
