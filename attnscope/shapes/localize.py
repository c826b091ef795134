"""``attnscope shapes localize``: the localization benchmark of a shapes model, with exact masks.

Protocol (fixed; change ``LOCALIZE_PROTOCOL`` when it changes). Every seed is apart from those the model's
read-out (``SHAPES_READOUT``) was chosen on, so the figures are held-out ones:

* **rendered** — ``RENDERED_PER_COUNT`` scenes each with 1, 2 and 3 objects, captions as the renderer varies them
  (synonyms, connectors, same colours or shapes when drawn so), from seed ``RENDERED_SEED``; each explained
  (:func:`attnscope.explain`) at every flow time of ``EXPLAIN_TS`` with the default noise draws. Masks are the
  renderer's own.
* **generated** — the shapes eval's two-object prompts (different, same-colour and same-shape pairs) at seeds
  ``GENERATED_SEEDS``, traced while generated; masks are the scene reader's, for objects drawn in the asked colour.
  Same-colour prompts are also reported on their own and there by word kind: the one place where a colour word
  and a shape word of one object can disagree (the colour word's map may light the other object of its colour).

Pairs: each colour and shape word *occurrence* against its own object (raw maps: "red#2" must light the second
red object, not the first); for output-space maps each distinct colour and shape word of the caption is a concept
(one softmax over them), scored against the union of the objects it names (on generated images, where each of
them was drawn in its asked colour). Protocol 2 added the output-space maps of generated images.

Methods, each read through the model's read-out with its layer choice replaced where the method names one:
``raw.<layer>`` (one layer), ``raw.double-mean`` (every dual-stream block), ``raw.best`` (the best single layer
*on this benchmark*: an oracle, reported as one), ``naive`` (every dual-stream block and step, nearest upsampling,
each map's mean threshold: the read-out before read-outs were chosen), ``default`` (the model's read-out) and
``output-space`` (ConceptAttention's concept maps through the read-out). Scores: :mod:`attnscope.segmentation`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..maps import TokenMaps
from ..readout import Readout, readout_for
from ..segmentation import PairScores, mean_scores
from ..staging import staged_folder

LOCALIZE_PROTOCOL = 3
RENDERED_PER_COUNT = 16
RENDERED_SEED = 20261205
EXPLAIN_TS: tuple[float, ...] = (0.2, 0.3, 0.5)
GENERATED_SEEDS: tuple[int, ...] = (500, 501, 502, 503)

__all__ = ["EXPLAIN_TS", "GENERATED_SEEDS", "LOCALIZE_PROTOCOL", "RENDERED_PER_COUNT", "localize"]


#: The read-out before read-outs were chosen: every dual-stream block and step, nearest upsampling, each map cut at
#: its own mean (the README's earlier example, thresholded as ``TokenMaps.iou`` did).
NAIVE_READOUT = Readout(layers="double", late_steps=1.0, upsample="nearest", threshold="mean")


def _methods(word: TokenMaps, readout: Readout, truth: np.ndarray, out: dict[str, list[PairScores]]) -> None:
    """Score one word's maps by every raw method into ``out``."""
    for layer in word.layers:
        out[f"raw.{layer.label}"].append(replace(readout, layers=layer.label).score(word, truth))
    out["raw.double-mean"].append(replace(readout, layers="double").score(word, truth))
    out["naive"].append(NAIVE_READOUT.score(word, truth))
    out["default"].append(readout.score(word, truth))


def _rendered(pipe: Any, readout: Readout) -> tuple[dict[float, dict[str, list[PairScores]]], list[dict[str, Any]]]:
    from ..explain import explain
    from .render import render_scene
    from .vocabulary import is_color, is_shape, occurrence_query, words_of

    rng = np.random.default_rng(RENDERED_SEED)
    scenes = [render_scene(rng, n_objects=n) for n in (1, 2, 3) for _ in range(RENDERED_PER_COUNT)]
    by_t: dict[float, dict[str, list[PairScores]]] = {t: defaultdict(list) for t in EXPLAIN_TS}
    samples: list[dict[str, Any]] = []
    for scene in tqdm(scenes, desc="rendered scenes", unit="scene", leave=False, disable=None):
        caption_words = words_of(scene.caption)
        concepts = list(dict.fromkeys(w for w in caption_words if is_color(w) or is_shape(w)))
        for t in EXPLAIN_TS:
            result = explain(pipe, scene.image, scene.caption, concepts=concepts, t=t)
            out = by_t[t]
            for word_index, _, obj in scene.word_objects:
                word = result.maps.word(occurrence_query(caption_words, word_index))
                _methods(word, readout, scene.objects[obj].mask, out)
            for concept in concepts:
                out["output-space"].append(readout.score(result.concept_maps.word(concept), scene.word_masks[concept]))
            if t == EXPLAIN_TS[1] and len(samples) < 6 and len(scene.objects) == 2:
                samples.append({"image": scene.image, "caption": scene.caption, "maps": result.maps,
                                "concepts": result.concept_maps, "words": concepts})
    return by_t, samples


def _generated(pipe: Any, readout: Readout) -> tuple[dict[str, dict[str, list[PairScores]]], dict[str, list[float]]]:
    from ..trace import trace
    from .generate import generate
    from .metrics import TWO_OBJECT_PROMPTS
    from .reader import match_objects, read_scene
    from .vocabulary import is_color, is_shape, occurrence_query, parse_prompt, words_of

    # Colour and shape words of one object share a mask; only where two objects share a colour can a colour word's
    # map light the wrong one, so that subset is also reported by word kind.
    subsets: dict[str, dict[str, list[PairScores]]] = defaultdict(lambda: defaultdict(list))
    by_step: dict[int, list[PairScores]] = defaultdict(list)
    for prompt in tqdm(TWO_OBJECT_PROMPTS, desc="generated prompts", unit="prompt", leave=False, disable=None):
        expected = parse_prompt(prompt)
        same_colour = expected[0][0] == expected[1][0]
        words = words_of(prompt)
        kinds = [[w for w in words if is_color(w)], [w for w in words if is_shape(w)]]
        concepts = list(dict.fromkeys(w for w in words if is_color(w) or is_shape(w)))
        for seed in GENERATED_SEEDS:
            with trace(pipe, concepts=concepts) as tr:
                (image,) = generate(pipe, prompt, [seed])
            maps = tr.maps()
            matched = match_objects(expected, read_scene(image))
            for concept in concepts:  # against the union of the objects it names, when each was drawn as asked
                named = [(found, color) for (color, shape), found in zip(expected, matched)
                         if concept in (color, shape)]
                if all(found is not None and found.color == color for found, color in named):
                    union = np.logical_or.reduce([found.mask for found, _ in named])
                    subsets["all"]["output-space"].append(readout.score(tr.concept_maps().word(concept), union))
            for k, ((color, _), found) in enumerate(zip(expected, matched)):
                if found is None or found.color != color:
                    continue
                for kind, kind_words in zip(("colour", "shape"), kinds):
                    word = maps.word(occurrence_query(kind_words, k))
                    names = ("all", "same-colour", f"same-colour/{kind}-words") if same_colour else ("all",)
                    for name in names:
                        _methods(word, readout, found.mask, subsets[name])
                    for step in word.steps:
                        by_step[step].append(readout.score(word.select(steps=step), found.mask))
    return subsets, {"miou": [mean_scores(by_step[s])["miou"] for s in sorted(by_step)]}


def _summaries(pairs: dict[str, list[PairScores]]) -> dict[str, Any]:
    table = {method: mean_scores(scores) for method, scores in sorted(pairs.items())}
    layers = {m: s for m, s in table.items() if m.startswith("raw.") and m != "raw.double-mean"}
    if layers:
        best = max(layers, key=lambda m: layers[m]["miou"])
        table["raw.best"] = table[best] | {"layer": best.removeprefix("raw.")}
    return table


def localize(model: str = "shapes", out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run the benchmark on a shapes model (module docstring); with ``out``, write ``localize.json``, the per-layer
    and per-step figures and sample overlays there (the folder is filled only when every file is written)."""
    import torch

    from ..pipelines import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    pipe = load_pipeline(model, progress=False)
    pipe.set_progress_bar_config(disable=True)
    readout = readout_for(model)
    rendered, samples = _rendered(pipe, readout)
    generated, by_step = _generated(pipe, readout)
    result = {
        "protocol": LOCALIZE_PROTOCOL,
        "model": model,
        "readout": asdict(readout),
        "rendered": {str(t): _summaries(pairs) for t, pairs in rendered.items()},
        "generated": {name: _summaries(pairs) for name, pairs in generated.items()},
        "generated_by_step": by_step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if out is not None:
        with staged_folder(out) as folder:
            (folder / "localize.json").write_text(json.dumps(result, indent=1))
            _figures(result, samples, readout, folder)
    return result


def _figures(result: dict[str, Any], samples: list[dict[str, Any]], readout: Readout, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ..viz import enlarged, overlay

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label, table in [(f"rendered t={t}", v) for t, v in result["rendered"].items()] + [
            ("generated", result["generated"]["all"]), ("generated, same colour", result["generated"]["same-colour"])]:
        layers = [m for m in table if m.startswith("raw.") and m not in ("raw.double-mean", "raw.best")]
        ax.plot([m.removeprefix("raw.") for m in layers], [table[m]["miou"] for m in layers], marker="o", label=label)
    ax.set_ylabel("mIoU (raw maps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "localize_layers.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(result["generated_by_step"]["miou"], marker="o")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("mIoU (generated, read-out layers)")
    fig.tight_layout()
    fig.savefig(folder / "localize_steps.png", dpi=100)
    plt.close(fig)

    for i, sample in enumerate(samples):
        image = Image.fromarray(sample["image"])
        tiles = [enlarged(image)]
        for word in sample["words"]:
            for maps in (sample["maps"], sample["concepts"]):
                tiles.append(overlay(readout.reduce(maps.word(word)).numpy(), enlarged(image)))
        sheet = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), (255, 255, 255))
        x = 0
        for tile in tiles:
            sheet.paste(tile, (x, 0))
            x += tile.width
        sheet.save(folder / f"sample_{i}.png")
