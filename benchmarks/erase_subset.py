"""The recipe subset of the shapes-world eval: quick figures for ablations, on the model a run was trained on.

    python benchmarks/erase_subset.py RUN [--base] [--seeds 8] [--first-seed 0] [--all-prompts] [--threads 1]

The prompts of ``attnscope eval`` (protocol 3) that separate recipes, at fewer seeds: the erased prompts, the
multi-mention synonym prompts, six two-object irrelevant prompts and the implicit prompts. Prints and writes
``RUN/subset.json`` (``RUN/subset_base.json`` with ``--base``, which scores the base model on the run's concepts;
``_seedN`` before ``.json`` with ``--first-seed N``: seeds the eval never draws, for choosing a recipe;
``_all`` with ``--all-prompts``: every prompt of the protocol, i.e. ``attnscope eval``'s figures on other seeds):
Acc_e, Acc_g over the multi-mention prompts, Acc_ir over the two-object prompts, Acc_ctx, Acc_implicit and the
attention mass on the erased prompts. It chooses recipes; `attnscope eval` reports them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnscope
from attnscope.erase.lora import check_lora_file, load_lora
from attnscope.erase.run import read_run
from attnscope.erase.worlds.shapes_eval import score_model, shapes_prompts


def subset_prompts(specs) -> dict[str, list[str]]:
    prompts = shapes_prompts(specs)
    return {
        "erased": prompts["erased"],
        "synonym": [p for p in prompts["synonym"] if " and " in p or "," in p],
        "irrelevant": [p for p in prompts["irrelevant"] if " and " in p][:6],
        "implicit": prompts["implicit"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="folder written by `attnscope erase`")
    parser.add_argument("--base", action="store_true", help="score the base model on the run's concepts")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    parser.add_argument("--all-prompts", action="store_true", help="every prompt of the eval protocol")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, specs = read_run(args.run)
    if not specs:
        raise SystemExit(f"{args.run} has no spec.yaml: pass the --out folder of `attnscope erase`")
    pipe = attnscope.load_pipeline(model, progress=False)
    pipe.set_progress_bar_config(disable=True)
    if not args.base:
        check_lora_file(pipe, args.run)
        load_lora(pipe, args.run)
    prompts = shapes_prompts(specs) if args.all_prompts else subset_prompts(specs)
    start = time.perf_counter()
    scores, _ = score_model(pipe, prompts, specs, args.seeds, "base" if args.base else "erased", args.first_seed)
    log_file = args.run / "train_log.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    # The subset's Acc_g and Acc_ir cover only its multi-mention and two-object prompts: their keys say so.
    g_key, ir_key = ("acc_g", "acc_ir") if args.all_prompts else ("acc_g_multi", "acc_ir_two_object")
    result = {
        "model": model, "seeds": args.seeds, "first_seed": args.first_seed, "all_prompts": args.all_prompts,
        "acc_e": scores.acc_e, g_key: scores.acc_g, ir_key: scores.acc_ir,
        "acc_ctx": scores.acc_ctx, "acc_implicit": scores.acc_implicit,
        "attention_mass": scores.attention_mass.get("erased"), "erase_seconds": log.get("seconds"),
        "eval_seconds": round(time.perf_counter() - start, 1), "prompts": {k: len(v) for k, v in prompts.items()},
        "per_prompt": scores.per_prompt,
    }
    name = "subset_base" if args.base else "subset"
    suffix = (f"_seed{args.first_seed}" if args.first_seed else "") + ("_all" if args.all_prompts else "")
    (args.run / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
