"""How far an erasure LoRA moved each concept's points towards ESD's target, by sampler step and by prompt.

    python benchmarks/esd_reach.py RUN [LORA ...] [--cache RUN2] [--threads 1]

On the cached concept points of RUN (``RUN/cache.pt``; ``--cache`` takes another run's), the share of ESD's base
error that a LoRA leaves, ``‖v_LoRA(x_t, c) − t‖² / ‖v*(x_t, c) − t‖²`` with ``t = v* − η·(v*(c) − v*(c_anc))``
and each concept's η as RUN recorded it: 1 where the LoRA did nothing, 0 where it reached the target. Printed per
concept, per σ of the cached trajectories and per prompt over the middle steps (σ in (0.7, 0.95), where a shape is
decided on the shapes models), for RUN's LoRA and every further LORA folder (a LoRA erasing other concepts reads
as a control). The training loss mixes every point, so a concept whose points differ little from their anchors
can be left far from its target while the loss falls; this shows where.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import attnscope
from attnscope.erase.cache import EraseCache
from attnscope.erase.config import EraseConfig
from attnscope.erase.lora import load_lora
from attnscope.erase.losses import esd_target
from attnscope.erase.methods.rows import point_etas, run_etas
from attnscope.erase.run import CACHE_FILE, RUN_FILE, read_run
from attnscope.erase.sampling import PromptBank
from attnscope.erase.trainer import training_call

#: The fields of a run's recorded config that set the velocities it trained on.
CALL_SETTINGS = ("height", "width", "guidance_scale", "true_cfg_scale", "max_sequence_length", "negative_prompt")
#: The σ range reported per prompt: the sampler's middle steps.
MIDDLE = (0.7, 0.95)


def velocities(pipe, call, bank: PromptBank, cache: EraseCache, batch: int = 32) -> torch.Tensor:
    """The pipeline's velocity at every cached concept point through its own prompt, ``(P, N, C)``."""
    out = []
    with torch.no_grad():
        for start in range(0, len(cache.sigma), batch):
            stop = start + batch
            embeds, pooled = bank.get(cache.prompts[start:stop])
            out.append(call.velocity(pipe.transformer, cache.x[start:stop], cache.sigma[start:stop], embeds, pooled,
                                     bank.text_ids).float())
    return torch.cat(out)


def report(name: str, error: torch.Tensor, base: torch.Tensor, cache: EraseCache, concepts: list[str]) -> dict:
    """Print and return the share ``error / base`` (per-point ``(P,)`` errors) per concept: over all its points, per
    σ, and per prompt over the middle steps."""

    def share(mask: torch.Tensor) -> float:
        return round((error[mask].mean() / base[mask].mean()).item(), 3)

    sigmas = cache.sigma.unique().flip(0).tolist()
    middle = (cache.sigma > MIDDLE[0]) & (cache.sigma < MIDDLE[1])
    result = {}
    for k, concept in enumerate(concepts):
        mine = cache.concept == k
        prompts = sorted({p for p, c in zip(cache.prompts, cache.concept.tolist()) if c == k})
        by_prompt = {q: share(mine & middle & torch.tensor([p == q for p in cache.prompts])) for q in prompts}
        result[concept] = {
            "all": share(mine), "by_sigma": {f"{s:.2f}": share(mine & (cache.sigma == s)) for s in sigmas},
            "middle_by_prompt": by_prompt,
        }
        print(f"{name} · {concept}: all {result[concept]['all']:.2f} | σ "
              + " ".join(f"{s}:{v:.2f}" for s, v in result[concept]["by_sigma"].items()))
        for prompt, value in by_prompt.items():
            print(f"    {prompt:50s} middle {value:.2f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="folder written by `attnscope erase`")
    parser.add_argument("loras", type=Path, nargs="*", help="further LoRA folders to read on RUN's points")
    parser.add_argument("--cache", type=Path, help="read the points of this run's cache instead of RUN's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, specs = read_run(args.run)
    if not specs or not (args.run / RUN_FILE).is_file():
        raise SystemExit(f"{args.run} has no spec.yaml or {RUN_FILE}: pass the --out folder of `attnscope erase`")
    cache_run = args.cache or args.run
    if not (cache_run / CACHE_FILE).is_file():
        raise SystemExit(f"{cache_run} has no {CACHE_FILE}: it was removed, or the run never started")
    cache = EraseCache.load(cache_run / CACHE_FILE)
    recorded = json.loads((args.run / RUN_FILE).read_text())["config"]
    _, cache_specs = read_run(cache_run)
    concepts = [s.name for s in cache_specs]
    balance = recorded.get("balance_eta", False)
    eta = point_etas(cache_specs, cache, run_etas(cache_specs, cache, recorded["eta"], balance), balance)
    pipe = attnscope.load_pipeline(model, progress=False)
    # The velocities the run trained on: its recorded call settings, through the trainer's call.
    call, bank = training_call(pipe, EraseConfig(model=model, **{key: recorded[key] for key in CALL_SETTINGS}))
    target = esd_target(cache.v_concept.float(), cache.v_anchor.float(), eta.view(-1, 1, 1))
    base = ((cache.v_concept.float() - target) ** 2).mean((1, 2))
    results = {}
    for folder in [args.run, *args.loras]:
        load_lora(pipe, folder, adapter_name="reach")
        error = ((velocities(pipe, call, bank, cache) - target) ** 2).mean((1, 2))
        pipe.delete_adapters("reach")
        results[str(folder)] = report(folder.name, error, base, cache, concepts)
    (args.run / "esd_reach.json").write_text(json.dumps({"cache": str(cache_run), "loras": results}, indent=1))


if __name__ == "__main__":
    main()
