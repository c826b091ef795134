"""``attnscope shapes eval``: generation (and localization) metrics of a shapes model on a fixed protocol.

Protocol (fixed, published; change ``PROTOCOL_VERSION`` when it changes):

* prompts: ``SINGLE_PROMPTS`` (every colour × shape), ``TWO_OBJECT_PROMPTS`` (16 pairs incl. same-colour and
  same-shape pairs, varied connectors), ``SYNONYM_PROMPTS`` (synonyms for colours and shapes, one and two
  objects);
* seeds 0..``DEFAULT_SEEDS``−1 per prompt, and 0..``TWO_OBJECT_SEEDS``−1 for the two-object prompts
  (``torch.Generator().manual_seed(seed)``, one generator per image). A seed's noise fixes a layout, and most of
  a layout's errors repeat across prompts, so the two-object figure needs many seeds more than many images: on
  a few seeds it moves with the seed set (see benchmarks/RESULTS.md);
* the model's default call (``call_kwargs_for``, recorded as ``call``): 32×32, 20 steps of the model's own
  scheduler (recorded as ``sampler``), guidance ``GUIDANCE_SCALE`` (4.5) as the input of a guidance-distilled
  transformer or true CFG ``TRUE_CFG_SCALE`` (3.5) against the empty prompt for one without a guidance embedding,
  max_sequence_length 20;
* images are read by ``reader.read_scene``.

Per image the expected objects (``vocabulary.parse_prompt``) are matched to the detected ones by the assignment
that maximizes 2·[colour right] + [shape right] (``reader.match_objects``); an expected object with no detection
counts as wrong.

* ``color_acc`` / ``shape_acc``: fraction of expected objects (canonical prompts) whose match has the right colour /
  shape (the shape *category*: the reader fits each prototype with the object's own width-to-height ratio);
* ``shape_acc_true_to_form``: the right shape drawn within ``ASPECT_TOLERANCE`` of the renderer's proportions
  (a 2:1 box for "square" counts for ``shape_acc``, not here);
* ``two_object_all_correct``: fraction of two-object images whose detected objects are exactly the two asked for
  (colours and shapes, nothing more); ``two_object_by_seed`` gives it per seed, and its spread over seeds, not
  the number of images, sets how far the figure can be trusted;
* ``synonym_color_acc`` / ``synonym_shape_acc``: the same accuracies on synonym prompts;
* ``count_acc``: fraction of images with exactly the asked number of objects; ``spurious_objects``: mean number
  of detections beyond that number per image;
* ``extra_objects``: the detections left unmatched on two-object prompts, counted by how they relate to the prompt
  (``EXTRA_KINDS``): a *duplicate* of an asked object, a *cross-binding* (one asked object's colour with
  another's shape: the prompt drawn as a bag of attributes), *one attribute* from the prompt, or *unrelated*;
* ``sampling_seconds``: median time of one 20-step single-image call (``torch_threads`` threads);
* ``miou_color`` / ``miou_shape``: localization of colour / shape words (mean-threshold mIoU at the best layer
  and step band), with best-τ mIoU, pixel accuracy and AP per layer and per step: see ``localization.py``
  (null when skipped with ``--no-localization``), on the two-object prompts × the first ``DEFAULT_SEEDS`` seeds.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..pipelines import load_pipeline
from . import bundled_path, call_kwargs_for
from .generate import generate
from .localization import localization_metrics, save_sample_maps
from .reader import DetectedObject, match_objects, read_scene
from .vocabulary import COLORS, SHAPES, parse_prompt

#: Version of the protocol, recorded in every result: raise it whenever prompts, seeds, call, reader or map scoring
#: change, so that figures of different versions are never compared (benchmarks/RESULTS.md says what each changed).
PROTOCOL_VERSION = 6
DEFAULT_SEEDS = 4
TWO_OBJECT_SEEDS = 16
#: An object is true to form when its fitted stretch is within this factor of the renderer's proportions.
ASPECT_TOLERANCE = 1.25

SINGLE_PROMPTS: tuple[str, ...] = tuple(f"a {c} {s}" for c in COLORS for s in SHAPES)
TWO_OBJECT_PROMPTS: tuple[str, ...] = (
    "a red circle and a blue square",
    "a blue square and a red circle",
    "a green triangle and a yellow circle",
    "a yellow square next to a green triangle",
    "a red triangle with a blue circle",
    "a blue triangle and a yellow square",
    "a green circle beside a red square",
    "a yellow triangle and a red square",
    "a red circle and a red square",  # same colour: shape words must do the work
    "a blue triangle and a blue circle",
    "a green square and a green triangle",
    "a yellow circle and a yellow triangle",
    "a red square and a blue square",  # same shape: colour binding
    "a green circle and a yellow circle",
    "a blue triangle and a red triangle",
    "red circle and green square",
)
SYNONYM_PROMPTS: tuple[str, ...] = (
    "a crimson circle",
    "a scarlet square",
    "a navy triangle",
    "an azure circle",
    "an emerald square",
    "a lime triangle",
    "a golden circle",
    "an amber square",
    "a red disc",
    "a blue box",
    "a green wedge",
    "a yellow pyramid",
    "a crimson box and a navy disc",
    "an emerald wedge and a golden orb",
)


#: How an unmatched detection relates to the prompt, in the order ``classify_extra`` tests them.
EXTRA_KINDS: tuple[str, ...] = ("duplicate", "cross_binding", "one_attribute", "unrelated")


def classify_extra(expected: list[tuple[str, str]], color: str, shape: str) -> str:
    """Which of ``EXTRA_KINDS`` an extra (colour, shape) detection is, given the prompt's expected objects."""
    if (color, shape) in expected:
        return "duplicate"
    color_asked = any(color == c for c, _ in expected)
    shape_asked = any(shape == s for _, s in expected)
    if color_asked and shape_asked:
        return "cross_binding"
    return "one_attribute" if color_asked or shape_asked else "unrelated"


def score_image(prompt: str, detected: list[DetectedObject]) -> dict[str, Any]:
    """Per-image scores: colour/shape hits per expected object, exact-set correctness, count, spurious and extras."""
    expected = parse_prompt(prompt)
    matched = match_objects(expected, detected)
    color_hits = [d is not None and d.color == c for (c, _), d in zip(expected, matched)]
    shape_hits = [d is not None and d.shape == s for (_, s), d in zip(expected, matched)]
    form_hits = [hit and 1 / ASPECT_TOLERANCE <= d.aspect <= ASPECT_TOLERANCE for hit, d in zip(shape_hits, matched)]
    matched_ids = {id(d) for d in matched if d is not None}
    extras = [classify_extra(expected, d.color, d.shape) for d in detected if id(d) not in matched_ids]
    return {
        "prompt": prompt,
        "expected": expected,
        "detected": [(d.color, d.shape) for d in detected],
        "color_hits": color_hits,
        "shape_hits": shape_hits,
        "form_hits": form_hits,
        "all_correct": len(detected) == len(expected) and all(color_hits) and all(shape_hits),
        "count_ok": len(detected) == len(expected),
        "spurious": max(0, len(detected) - len(expected)),
        "extras": extras,
    }


def load_model(model: str | Path | None, device: str = "cpu") -> Any:
    """A shapes pipeline from a diffusers folder, the bundled weights (None), or anything else a model profile
    claims (a training checkpoint ``*.pt`` once the lab is installed), on ``device`` (``cpu`` or ``cuda[:N]``;
    generators stay on the CPU, so a seed draws the same starting noise on either), without progress bars."""
    pipe = load_pipeline(str(model) if model else "shapes", device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mean(values: list[bool] | list[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def sampler_record(scheduler: Any) -> dict[str, Any]:
    """The model's sampler, as the eval JSON records it: class, shift and re-noising threshold (if any)."""
    config = scheduler.config
    return {"class": type(scheduler).__name__, "shift": config.shift, "renoise_above": config.get("renoise_above")}


def sampling_seconds(pipe: Any, repeats: int = 3) -> float:
    """Median wall time of one single-image call with the model's default call (after one warm-up call)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        generate(pipe, TWO_OBJECT_PROMPTS[0], [i])
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def score_prompts(
    pipe: Any, group: str, prompts: tuple[str, ...], seeds: list[int], **call_kwargs: Any
) -> list[dict[str, Any]]:
    """Generate every prompt × seed and score it: one ``score_image`` record per image, with its ``group``, ``seed``
    and ``image`` (call kwargs override ``call_kwargs_for(pipe)``)."""
    records = []
    for prompt in prompts:
        for seed, image in zip(seeds, generate(pipe, prompt, seeds, **call_kwargs)):
            records.append(score_image(prompt, read_scene(image)) | {"group": group, "seed": seed, "image": image})
    return records


def summarize_generation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The protocol's generation metrics of scored records (groups ``single``, ``two``, ``synonym``; see above)."""
    canon = [r for r in records if r["group"] != "synonym"]
    syn = [r for r in records if r["group"] == "synonym"]
    two = [r for r in records if r["group"] == "two"]
    return {
        "color_acc": _mean([h for r in canon for h in r["color_hits"]]),
        "shape_acc": _mean([h for r in canon for h in r["shape_hits"]]),
        "shape_acc_true_to_form": _mean([h for r in canon for h in r["form_hits"]]),
        "two_object_all_correct": _mean([r["all_correct"] for r in two]),
        "two_object_by_seed": {
            str(seed): _mean([r["all_correct"] for r in two if r["seed"] == seed])
            for seed in sorted({r["seed"] for r in two})
        },
        "single_object_all_correct": _mean([r["all_correct"] for r in records if r["group"] == "single"]),
        "synonym_color_acc": _mean([h for r in syn for h in r["color_hits"]]),
        "synonym_shape_acc": _mean([h for r in syn for h in r["shape_hits"]]),
        "count_acc": _mean([r["count_ok"] for r in records]),
        "spurious_objects": _mean([float(r["spurious"]) for r in records]),
        "extra_objects": {kind: sum(r["extras"].count(kind) for r in two) for kind in EXTRA_KINDS},
        "n_images": len(records),
    }


def generation_metrics(
    pipe: Any, seeds: int = DEFAULT_SEEDS, two_object_seeds: int = TWO_OBJECT_SEEDS
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate the protocol's prompts × seeds and score them; returns (summary, per-image records)."""
    single_call = sampling_seconds(pipe)
    groups = (
        ("single", SINGLE_PROMPTS, seeds),
        ("two", TWO_OBJECT_PROMPTS, two_object_seeds),
        ("synonym", SYNONYM_PROMPTS, seeds),
    )
    jobs = [(group, prompt, n) for group, prompts, n in groups for prompt in prompts]
    t0 = time.time()
    records = []
    # disable=None: a bar on a terminal, nothing in logs and tests
    for group, prompt, n in tqdm(jobs, desc="generating", unit="prompt", leave=False, disable=None):
        records += score_prompts(pipe, group, (prompt,), list(range(n)))
    summary = summarize_generation(records) | {
        "seconds_per_image": (time.time() - t0) / max(len(records), 1),
        "sampling_seconds": single_call,
        "torch_threads": torch.get_num_threads(),
    }
    return summary, records


def evaluate(
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    seeds: int | None = None,
    threads: int | None = None,
    localization: bool = True,
    two_object_seeds: int | None = None,
) -> dict[str, Any]:
    """Run the protocol on a model; writes ``out_dir/shapes_eval.json``, ``out_dir/samples.png`` (every image, one
    prompt per row) and ``out_dir/maps.png`` (seed-0 two-object images with their word maps) if ``out_dir`` is given.

    ``seeds`` and ``two_object_seeds`` default to the protocol's; a run given only ``seeds`` (a quick look) uses
    that many for the two-object prompts too.

    Returns:
        {"summary": {...metrics...}, "records": [...per image, without pixels...]}.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    for name, value in (("seeds", seeds), ("two_object_seeds", two_object_seeds)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    two_object_seeds = two_object_seeds or (TWO_OBJECT_SEEDS if seeds is None else seeds)
    seeds = seeds or DEFAULT_SEEDS
    pipe = load_model(model)
    summary, records = generation_metrics(pipe, seeds, two_object_seeds)
    samples: list[dict[str, Any]] = []
    if localization:
        loc, samples = localization_metrics(pipe, seeds, TWO_OBJECT_PROMPTS)
        summary |= loc
    else:
        summary |= {"miou_color": None, "miou_shape": None}
    summary |= {"protocol_version": PROTOCOL_VERSION, "seeds": seeds, "two_object_seeds": two_object_seeds,
                "model": str(model or bundled_path()), "sampler": sampler_record(pipe.scheduler),
                "call": call_kwargs_for(pipe)}
    images = [r.pop("image") for r in records]
    result = {"summary": summary, "records": records}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shapes_eval.json").write_text(json.dumps(summary | {"records": records}, indent=1) + "\n")
        _save_grid(images, [r["prompt"] for r in records], out / "samples.png")
        if summary.get("localization"):
            save_sample_maps(samples, summary["localization"], summary["localization_bands"], out / "maps.png")
    return result


def _save_grid(images: list[np.ndarray], prompts: list[str], path: Path) -> None:
    """Images as a grid, one prompt per row (consecutive images of a prompt), seeds across; short rows are padded
    with white."""
    from PIL import Image

    rows = [list(group) for _, group in itertools.groupby(zip(prompts, images), key=lambda pair: pair[0])]
    width = max(len(row) for row in rows)
    blank = np.full_like(images[0], 255)
    grid = [np.concatenate([im for _, im in row] + [blank] * (width - len(row)), axis=1) for row in rows]
    Image.fromarray(np.concatenate(grid, axis=0)).save(path)
