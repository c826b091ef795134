"""``attnscope localize``: zero-shot segmentation of a folder of (image, mask, class), the way ConceptAttention
measures it on ImageNet-Segmentation and PascalVOC, so that a user with a GPU runs our table on a real model.

Each item's image is resized to the model's size, explained (:func:`attnscope.explain`) under
``prompt_template.format(class)``, and two maps are read out at the mask's own size with the model's read-out:
the raw map of the class words, and the output-space map of the class among ``[class, *competitors]``. Scores:
:mod:`attnscope.segmentation`, overall and per class.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .dataset import SegmentationItem
from .explain import DEFAULT_SAMPLES, DEFAULT_T, explain
from .readout import Readout, readout_for
from .segmentation import PairScores, mean_scores, score_pair

__all__ = ["DEFAULT_COMPETITORS", "DEFAULT_PROMPT_TEMPLATE", "localize_items"]

DEFAULT_PROMPT_TEMPLATE = "a photo of a {}"
DEFAULT_COMPETITORS: tuple[str, ...] = ("background",)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _scores(maps: Any, readout: Readout, mask: np.ndarray) -> PairScores:
    soft = readout.soft(maps, (mask.shape[1], mask.shape[0]))
    return score_pair(soft.numpy(), soft.threshold(readout.threshold), mask)


def localize_items(
    pipe: Any,
    items: Sequence[SegmentationItem],
    *,
    size: int,
    readout: Readout | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    competitors: Sequence[str] = DEFAULT_COMPETITORS,
    t: float = DEFAULT_T,
    samples: int = DEFAULT_SAMPLES,
) -> dict[str, Any]:
    """Scores of raw and output-space maps over ``items`` (module docstring): ``{"raw": ..., "output-space": ...,
    "per_class": {class: {"raw": ..., "output-space": ...}}}``, each as :func:`~attnscope.segmentation.mean_scores`."""
    if "{}" not in prompt_template:
        raise ValueError(f"the prompt template must hold '{{}}' where the class goes; got {prompt_template!r}")
    readout = readout or readout_for(pipe)
    pairs: dict[str, list[PairScores]] = defaultdict(list)
    per_class: dict[str, dict[str, list[PairScores]]] = defaultdict(lambda: defaultdict(list))
    for item in tqdm(items, desc="localizing", unit="item", leave=False, disable=None):
        concepts = [item.label, *(c for c in competitors if c != item.label)]
        result = explain(pipe, _resized(item.image, size), prompt_template.format(item.label), words=[item.label],
                         concepts=concepts, t=t, samples=samples)
        for method, maps in (("raw", result.maps.word(item.label)), ("output-space",
                                                                       result.concept_maps.word(item.label))):
            scores = _scores(maps, readout, item.mask)
            pairs[method].append(scores)
            per_class[item.label][method].append(scores)
    return {
        **{method: mean_scores(scores) for method, scores in pairs.items()},
        "per_class": {label: {m: mean_scores(s) for m, s in methods.items()}
                      for label, methods in sorted(per_class.items())},
    }


def add_localize_command(subparsers: Any) -> None:
    import argparse

    p = subparsers.add_parser(
        "localize",
        help="zero-shot segmentation scores on a folder of (image, mask, class)",
        description=(
            "Explain every image of a segmentation folder (images/ + masks/ + classes.txt, or PascalVOC's "
            "JPEGImages/ + SegmentationClass/) under a prompt naming its class, and score the raw and the "
            "output-space maps against the masks (pixel accuracy, mIoU, mAP, AUROC). Writes OUT/localize.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", type=Path, required=True, help="the segmentation folder")
    p.add_argument("--model", default="shapes", help="'shapes', a hub id such as black-forest-labs/FLUX.1-dev, or a "
                   "folder")
    p.add_argument("--split", default="val", help="PascalVOC: ImageSets/Segmentation/<split>.txt, if present")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE, help="prompt with {} for the class")
    p.add_argument("--competitors", default=",".join(DEFAULT_COMPETITORS),
                   help="comma-separated concepts competing with the class in the output-space softmax")
    p.add_argument("--size", type=int, default=None, help="image side the model sees (default: the model's)")
    p.add_argument("--t", type=float, default=DEFAULT_T, help="flow time of the noised images")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="noise draws per image")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("out/localize"), help="output folder")
    p.set_defaults(run=run_localize)


def run_localize(args: Any) -> int:
    from .concepts import check_concepts
    from .dataset import read_folder
    from .explain import check_noise
    from .pipelines import load_pipeline
    from .profiles import profile_for
    from .staging import staged_folder

    started = time.perf_counter()
    check_noise(args.t, args.samples)
    competitors = check_concepts([c for c in args.competitors.split(",") if c.strip()] or ["background"])
    items = read_folder(args.dataset, args.split)[: args.limit]
    pipe = load_pipeline(args.model, device=args.device, progress=False)
    pipe.set_progress_bar_config(disable=True)
    size = args.size or profile_for(args.model).default_call(pipe).get("height") or 1024
    readout = readout_for(args.model)
    result = localize_items(pipe, items, size=size, readout=readout, prompt_template=args.prompt_template,
                            competitors=competitors, t=args.t, samples=args.samples)
    record = {"model": args.model, "dataset": str(args.dataset), "items": len(items), "size": size, "t": args.t,
              "samples": args.samples, "prompt_template": args.prompt_template, "competitors": list(competitors),
              "readout": asdict(readout), **result, "seconds": round(time.perf_counter() - started, 1)}
    with staged_folder(args.out) as out:
        (out / "localize.json").write_text(json.dumps(record, indent=1))
    for method in ("raw", "output-space"):
        s = result[method]
        print(f"{method:<13} mIoU {s['miou']:.3f}  pixel acc {s['pixel_acc']:.3f}  mAP {s['map']:.3f}  "
              f"AUROC {s['auroc']:.3f}  ({s['pairs']} items)")
    print(f"in {record['seconds']}s -> {args.out}/localize.json")
    return 0
