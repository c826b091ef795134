"""Localization of word maps against ground-truth masks, and the shapes-eval protocol that measures it.

Scores of one map against one boolean mask (``score_maps``), every map min-max normalized to [0, 1] first:

* ``iou_mean``: IoU of the map thresholded at its own mean (DAAM's convention, no free parameter);
* ``iou_tau``: IoU at each fixed threshold of ``TAUS``; the protocol reports the single τ that is best over all
  word–object pairs of a layer/step band (an upper bound, reported separately from ``iou_mean``);
* ``pixel_acc``: fraction of pixels where the mean-thresholded map agrees with the mask;
* ``ap``: average precision of the map's values as pixel scores for the mask (threshold-free).

Protocol (``localization_metrics``): every two-object prompt of the eval × seed is generated under
``attnscope.trace`` (heads averaged, every layer and step kept). Each colour / shape word occurrence is paired with
the generated object it describes (the reader's detection matched to the prompt's object; objects not drawn in
the right colour have no ground truth and are skipped). Its map is scored per layer and per *step band*: all
steps, the first half ("early"), the second half ("late"), and every single step.

Maps reach image size by ``MAP_UPSAMPLING`` (nearest): in the shapes world a token *is* a 2×2 pixel patch (the VAE
keeps pixel resolution), so a map is piecewise constant by construction. Bilinear interpolation, right for
FLUX.1-dev's 16-pixel tokens behind a convolutional VAE, would invent a half-token skirt around every object here,
and the mean threshold keeps that skirt, which roughly doubles the predicted area (measured in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from .generate import generate
from .reader import match_objects, read_scene
from .vocabulary import is_color, is_shape, occurrence_query, parse_prompt, words_of

#: Fixed thresholds of the best-τ search (on min-max normalized maps).
TAUS: tuple[float, ...] = tuple(float(t) for t in np.round(np.linspace(0.05, 0.95, 19), 2))
#: Step bands that can carry the headline figure; single steps are reported but never chosen.
BANDS: tuple[str, ...] = ("all", "early", "late")
KINDS: tuple[str, ...] = ("color", "shape")
#: How token maps are brought to the mask's pixel grid (see the module docstring).
MAP_UPSAMPLING: Literal["nearest", "bilinear", "bicubic"] = "nearest"


@dataclass(frozen=True)
class MaskScores:
    """Scores of a stack of maps ``(..., H, W)`` against one mask; every field has the stack's leading shape
    (``iou_tau`` one more trailing axis, over ``TAUS``)."""

    iou_mean: np.ndarray
    iou_tau: np.ndarray
    pixel_acc: np.ndarray
    ap: np.ndarray


def _iou(pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inter = np.logical_and(pred, mask).sum(axis=(-2, -1))
    union = np.logical_or(pred, mask).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def average_precision(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average precision of pixel ``scores (..., H, W)`` for the boolean ``mask (H, W)``: the mean, over the mask's
    pixels, of the precision among the pixels ranked at or above it. NaN for an empty mask."""
    flat = scores.reshape(*scores.shape[:-2], -1)
    truth = np.broadcast_to(mask.reshape(-1), flat.shape)
    order = np.argsort(-flat, axis=-1, kind="stable")
    ranked = np.take_along_axis(truth, order, axis=-1).astype(np.float64)
    hits = np.cumsum(ranked, axis=-1)
    precision = hits / np.arange(1, ranked.shape[-1] + 1)
    n_pos = ranked.sum(axis=-1)
    return np.where(n_pos > 0, (precision * ranked).sum(axis=-1) / np.maximum(n_pos, 1), np.nan)


def score_maps(maps: np.ndarray, mask: np.ndarray) -> MaskScores:
    """Score maps ``(..., H, W)`` (any scale) against a boolean ``mask (H, W)`` of the same spatial size."""
    mask = np.asarray(mask, dtype=bool)
    if maps.shape[-2:] != mask.shape:
        raise ValueError(f"maps are {maps.shape[-2:]} but the mask is {mask.shape}; upsample the maps first")
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    norm = (maps - lo) / np.maximum(hi - lo, 1e-12)
    at_mean = norm > norm.mean(axis=(-2, -1), keepdims=True)
    iou_tau = np.stack([_iou(norm > tau, mask) for tau in TAUS], axis=-1)
    return MaskScores(
        iou_mean=_iou(at_mean, mask),
        iou_tau=iou_tau,
        pixel_acc=(at_mean == mask).mean(axis=(-2, -1)),
        ap=average_precision(norm, mask),
    )


def step_bands(n_steps: int) -> dict[str, slice]:
    """The named step bands of a run with ``n_steps`` steps (see the module docstring)."""
    half = max(n_steps // 2, 1)
    return {"all": slice(0, n_steps), "early": slice(0, half), "late": slice(half, n_steps)} | {
        f"step.{s}": slice(s, s + 1) for s in range(n_steps)
    }


def band_maps(maps: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(layer, step, H, W)`` maps -> band names and ``(layer, band, H, W)`` step-averaged maps."""
    bands = step_bands(maps.shape[1])
    return list(bands), np.stack([maps[:, b].mean(axis=1) for b in bands.values()], axis=1)


class LocalizationTally:
    """Accumulates the scores of word–object pairs (per word kind) and summarizes them per layer and band."""

    def __init__(self, layers: list[str], bands: list[str]):
        self.layers, self.bands = layers, bands
        self.scores: dict[str, list[MaskScores]] = {kind: [] for kind in KINDS}

    def add(self, kind: str, maps: np.ndarray, mask: np.ndarray) -> None:
        """Add one pair: ``maps (layer, band, H, W)`` of the word, ``mask (H, W)`` of its object."""
        self.scores[kind].append(score_maps(maps, mask))

    @property
    def pairs(self) -> int:
        return len(self.scores["color"])

    def _mean(self, kind: str, field: str) -> np.ndarray:
        return np.nanmean(np.stack([getattr(s, field) for s in self.scores[kind]]), axis=0)

    def best(self, kind: str) -> dict[str, Any] | None:
        """The layer and step band (of ``BANDS``) with the highest mean-threshold mIoU, and all its scores."""
        if not self.scores[kind]:
            return None
        miou = self._mean(kind, "iou_mean")
        candidates = [(li, bi) for li in range(len(self.layers)) for bi, b in enumerate(self.bands) if b in BANDS]
        li, bi = max(candidates, key=lambda c: miou[c])
        return {"layer": self.layers[li], "steps": self.bands[bi]} | self._summary(kind, li, bi)

    def _summary(self, kind: str, li: int, bi: int) -> dict[str, float]:
        tau_curve = self._mean(kind, "iou_tau")[li, bi]
        t = int(np.argmax(tau_curve))
        return {
            "miou": float(self._mean(kind, "iou_mean")[li, bi]),
            "miou_best_tau": float(tau_curve[t]),
            "best_tau": TAUS[t],
            "pixel_acc": float(self._mean(kind, "pixel_acc")[li, bi]),
            "ap": float(self._mean(kind, "ap")[li, bi]),
        }

    def by_layer(self) -> dict[str, dict[str, dict[str, float] | None]]:
        """Every layer's scores over all steps, per kind."""
        b = self.bands.index("all")
        return {
            layer: {kind: self._summary(kind, li, b) if self.scores[kind] else None for kind in KINDS}
            for li, layer in enumerate(self.layers)
        }

    def by_step(self) -> dict[str, dict[str, list[float]]]:
        """Mean-threshold mIoU of every single step, per kind and layer."""
        steps = [bi for bi, b in enumerate(self.bands) if b.startswith("step.")]
        out: dict[str, dict[str, list[float]]] = {}
        for kind in KINDS:
            if self.scores[kind]:
                miou = self._mean(kind, "iou_mean")
                out[kind] = {layer: [float(miou[li, bi]) for bi in steps] for li, layer in enumerate(self.layers)}
        return out


def localization_metrics(
    pipe: Any, seeds: int, prompts: tuple[str, ...]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the protocol (module docstring) on ``prompts`` (two-object prompts) × ``seeds``.

    Returns the summary — ``miou_color`` / ``miou_shape`` (mean threshold, at the best layer and step band of each
    kind), ``localization`` (that band's full scores per kind), ``miou_by_layer`` (all steps, mean threshold),
    ``localization_by_layer``, ``miou_by_step`` and ``localization_pairs`` — and, for the sample figure, the
    first seed's images with each scored word's ``(layer, band, H, W)`` maps at image size.
    """
    from ..trace import trace

    tally: LocalizationTally | None = None
    samples: list[dict[str, Any]] = []
    # disable=None: a bar on a terminal, nothing in logs and tests
    for prompt in tqdm(prompts, desc=f"tracing ({seeds} seeds per prompt)", unit="prompt", leave=False, disable=None):
        expected = parse_prompt(prompt)
        kind_words = {"color": [w for w in words_of(prompt) if is_color(w)],
                      "shape": [w for w in words_of(prompt) if is_shape(w)]}
        for seed in range(seeds):
            with trace(pipe) as tr:
                (image,) = generate(pipe, prompt, [seed])
            maps = tr.maps()
            size = image.shape[1], image.shape[0]
            matched = match_objects(expected, read_scene(image))
            sample = {"prompt": prompt, "image": image, "layers": [layer.label for layer in maps.layers], "maps": []}
            for k, ((color, _), det) in enumerate(zip(expected, matched)):
                if det is None or det.color != color:
                    continue
                for kind, words in kind_words.items():
                    query = occurrence_query(words, k)
                    word = maps.word(query)
                    names, banded = band_maps(word.upsample(size, mode=MAP_UPSAMPLING).numpy())
                    if tally is None:
                        tally = LocalizationTally([layer.label for layer in word.layers], names)
                    tally.add(kind, banded, det.mask)
                    if seed == 0:
                        sample["maps"].append((kind, query, banded))
            if seed == 0:
                samples.append(sample)
    if tally is None:
        empty = {"miou_color": None, "miou_shape": None, "localization": None, "miou_by_layer": {},
                 "localization_by_layer": {}, "miou_by_step": {}, "localization_pairs": 0,
                 "map_upsampling": MAP_UPSAMPLING}
        return empty, samples
    best = {kind: tally.best(kind) for kind in KINDS}
    by_layer = tally.by_layer()
    summary = {
        "miou_color": best["color"]["miou"] if best["color"] else None,
        "miou_shape": best["shape"]["miou"] if best["shape"] else None,
        "localization": best,
        "miou_by_layer": {
            layer: {kind: s["miou"] if s else None for kind, s in kinds.items()} for layer, kinds in by_layer.items()
        },
        "localization_by_layer": by_layer,
        "miou_by_step": tally.by_step(),
        "localization_pairs": tally.pairs,
        "localization_bands": tally.bands,
        "map_upsampling": MAP_UPSAMPLING,
    }
    return summary, samples


def save_sample_maps(samples: list[dict[str, Any]], best: dict[str, Any], bands: list[str], path: Any,
                     scale: int = 4, rows: int = 8) -> None:
    """A PNG: per sample, the image, then each scored word's map (at its kind's best layer and band) over it."""
    from PIL import Image, ImageDraw

    from attnscope.viz import overlay

    tiles = []
    for sample in samples[:rows]:
        image = Image.fromarray(sample["image"])
        size = image.width * scale, image.height * scale
        row = [image.resize(size, Image.NEAREST)]
        for kind, query, small in sample["maps"]:
            layer, band = sample["layers"].index(best[kind]["layer"]), bands.index(best[kind]["steps"])
            tile = overlay(small[layer, band], image, alpha=0.6).resize(size, Image.NEAREST)
            ImageDraw.Draw(tile).text((2, 2), query, fill=(255, 255, 255))
            row.append(tile)
        tiles.append(row)
    if not tiles:
        return
    tile_w, tile_h = tiles[0][0].size
    sheet = Image.new("RGB", (max(len(r) for r in tiles) * tile_w, len(tiles) * tile_h), (255, 255, 255))
    for y, row in enumerate(tiles):
        for x, tile in enumerate(row):
            sheet.paste(tile, (x * tile_w, y * tile_h))
    sheet.save(path)
