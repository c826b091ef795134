"""Generation accuracy of the bundled shapes model under other samplers, on seeds the eval does not use.

    python benchmarks/sampler_sweep.py [--first-seed 100] [--seeds 16] [--threads 2] [--steps N] [--device cuda]
        [SHIFT,RENOISE_ABOVE,GUIDANCE ...]

Each setting (e.g. ``3,0.7,2.5``; ``1,1,1.5`` is plain Euler) samples the 16 two-object prompts of
``attnscope.shapes.metrics`` with ``--seeds`` seeds from ``--first-seed`` (100 by default: the eval uses 0–15, so
a setting chosen here is not tuned on the eval's images) and the 12 single-object prompts with the first 4 of
them, through ``FlowMatchRenoisingScheduler(shift, renoise_above)``, guidance ``GUIDANCE`` in the form the model
takes (``call_kwargs_for``: the input of a guidance-distilled model, true CFG otherwise) and ``--steps`` sampling
steps (the model's 20 by default; more asks whether an error is the sampler's discretization); images are scored
as the eval scores them. Without a setting, the model's own (its scheduler's shift and threshold, its default
guidance) is scored. This is how the bundle's sampler and guidance were chosen (benchmarks/RESULTS.md).
Prints one JSON line per setting: two-object all correct, two-object count accuracy, single-object all correct,
colour and shape accuracy over all objects, and the number of duplicated objects.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from attnscope.sampling import FlowMatchRenoisingScheduler
from attnscope.shapes import DEFAULT_CALL_KWARGS, call_kwargs_for
from attnscope.shapes.metrics import (
    SINGLE_PROMPTS,
    TWO_OBJECT_PROMPTS,
    load_model,
    score_prompts,
    summarize_generation,
)


def parse_setting(text: str) -> tuple[float, float, float]:
    """``"SHIFT,RENOISE_ABOVE,GUIDANCE"`` -> three floats."""
    try:
        shift, renoise_above, guidance = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SHIFT,RENOISE_ABOVE,GUIDANCE such as 3,0.7,2.5") from None
    return shift, renoise_above, guidance


def own_setting(pipe) -> tuple[float, float, float]:
    """The setting ``pipe`` samples with by default: its scheduler's shift and re-noising threshold, and the
    guidance scale of its default call (the input of a distilled model, true CFG otherwise)."""
    call = call_kwargs_for(pipe)
    return (pipe.scheduler.config.shift, pipe.scheduler.config.renoise_above,
            call.get("true_cfg_scale", call["guidance_scale"]))


def sweep_setting(
    pipe,
    shift: float,
    renoise_above: float,
    guidance: float,
    seeds: list[int],
    steps: int = DEFAULT_CALL_KWARGS["num_inference_steps"],
) -> dict:
    # The model's own scheduler config with the two swept knobs changed, so nothing else differs from the bundle.
    pipe.scheduler = FlowMatchRenoisingScheduler.from_config(
        pipe.scheduler.config, shift=shift, renoise_above=renoise_above
    )
    call = call_kwargs_for(pipe, guidance) | {"num_inference_steps": steps}
    two = score_prompts(pipe, "two", TWO_OBJECT_PROMPTS, seeds, **call)
    one = score_prompts(pipe, "single", SINGLE_PROMPTS, seeds[:4], **call)
    summary = summarize_generation(two + one)
    return {
        "shift": shift,
        "renoise_above": renoise_above,
        "guidance": guidance,
        "steps": steps,
        "seeds": f"{seeds[0]}..{seeds[-1]}",
        "two_object_all_correct": round(summary["two_object_all_correct"], 3),
        "two_object_count": round(float(np.mean([r["count_ok"] for r in two])), 3),
        "single_object_all_correct": round(summary["single_object_all_correct"], 3),
        "color": round(summary["color_acc"], 3),
        "shape": round(summary["shape_acc"], 3),
        "duplicates": summary["extra_objects"]["duplicate"],
        "two_object_images": len(two),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="*", type=parse_setting, metavar="SHIFT,RENOISE_ABOVE,GUIDANCE",
                        help="settings to score (default: the model's own)")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=DEFAULT_CALL_KWARGS["num_inference_steps"],
                        help="sampling steps (default: the model's)")
    parser.add_argument("--model", default=None, help="a checkpoint or diffusers folder (default: the bundle)")
    parser.add_argument("--device", default="cpu", help="where the model samples: cpu or cuda[:N] (a GPU draws "
                        "nearly, not bit-for-bit, the CPU's images)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model, args.device)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for shift, renoise_above, guidance in args.settings or [own_setting(pipe)]:
        print(json.dumps(sweep_setting(pipe, shift, renoise_above, guidance, seeds, args.steps)), flush=True)


if __name__ == "__main__":
    main()
