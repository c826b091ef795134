"""Explain and concept-map cost on the bundled shapes model.

    python benchmarks/explain_speed.py [--threads 2] [--repeats 15] [--json out.json]

* ``explain``: one 32×32 rendered scene explained with 4 noise draws (VAE encode, one batched traced forward,
  averaging), concepts off and on; the median of ``--repeats`` timed calls after a warm-up.
* concept-map overhead: a traced 20-step generation at the model's default call with ``trace(pipe)`` and with
  ``trace(pipe, concepts=[5 concepts])``, interleaved so that machine noise hits both alike; the overhead is the
  median over repeats of (with concepts) / (without) − 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import attnscope
from attnscope.shapes.generate import generate
from attnscope.shapes.render import render_scene

CONCEPTS = ["red", "circle", "blue", "square", "triangle"]


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = attnscope.load_pipeline("shapes", progress=False)
    scene = render_scene(1, n_objects=2)

    def explain(concepts: list[str] | None) -> None:
        attnscope.explain(pipe, scene.image, scene.caption, concepts=concepts)

    def traced(concepts: list[str] | None) -> None:
        with attnscope.trace(pipe, concepts=concepts):
            generate(pipe, "a red circle and a blue square", [0])

    for fn in (explain, traced):  # warm-up: first calls allocate and pick kernels
        fn(None)
        fn(CONCEPTS)
    explain_plain = [_seconds(lambda: explain(None)) for _ in range(args.repeats)]
    explain_concepts = [_seconds(lambda: explain(CONCEPTS)) for _ in range(args.repeats)]
    ratios, plain_times, concept_times = [], [], []
    for _ in range(args.repeats):
        plain = _seconds(lambda: traced(None))
        with_concepts = _seconds(lambda: traced(CONCEPTS))
        plain_times.append(plain)
        concept_times.append(with_concepts)
        ratios.append(with_concepts / plain)
    result = {
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "explain_s": statistics.median(explain_plain),
        "explain_with_concepts_s": statistics.median(explain_concepts),
        "traced_generation_s": statistics.median(plain_times),
        "traced_generation_with_concepts_s": statistics.median(concept_times),
        "concept_overhead": statistics.median(ratios) - 1,
    }
    print("| measure | value |\n|---|---:|")
    print(f"| explain 32×32, 4 draws | {result['explain_s']:.3f} s |")
    print(f"| explain 32×32, 4 draws, 5 concepts | {result['explain_with_concepts_s']:.3f} s |")
    print(f"| traced 20-step generation | {result['traced_generation_s']:.3f} s |")
    print(f"| traced 20-step generation, 5 concepts | {result['traced_generation_with_concepts_s']:.3f} s |")
    print(f"| concept-map overhead (median ratio − 1) | {100 * result['concept_overhead']:+.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
