"""Scene reader: turn an image of the shapes world back into objects (colour, shape, position, mask).

Pure pixel statistics, no learned weights, so it judges generated images by the renderer's own definitions:

1. Each pixel gets an opacity ``alpha`` toward every palette colour (projection of pixel − background onto
   colour − background) and the colour whose reconstruction is closest; pixels with alpha ≥ 0.5 are foreground.
2. Foreground pixels of one colour form objects by 8-connected components; tiny components are noise.
3. The shape is the prototype (circle, square, triangle) that, rendered with the same area, centroid and
   width-to-height ratio as the object's soft (alpha-weighted) mask, reproduces it best (``classify_shape``).
   Soft pixels keep small, anti-aliased objects measurable. Fitting the ratio makes the *category* stable on
   what a model draws: a box is judged against the square, an oval against the circle, instead of a tie
   between two prototypes that fit neither. How far the object is from the renderer's proportions is kept
   (``aspect``) so that metrics can also count only true-to-form shapes.
4. Shape belongs to a silhouette, colour to pixels. The renderer never lets objects touch; where components of
   different colours do, they are objects side by side (a red disc sitting on a green square) or one object drawn
   in several colours, a blend (a blue disc with a red cap, and a rim of in-between colours where they meet). A
   piece that fits no prototype by itself (``MALFORMED_ERROR``) while the silhouette it is part of fits one better
   is a piece of a blend: it takes the silhouette's shape and keeps its colour. Read alone, such a rim's best of
   three poor fits is arbitrary, often a triangle.

Accuracy on rendered scenes is tested in ``tests/shapes/test_shapes_world.py`` and reported in the README.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from .render import coverage
from .vocabulary import BACKGROUND, COLORS

#: Components smaller than this fraction of the image are noise, not objects (a 32×32 image: 6 px).
MIN_AREA_FRACTION = 6 / 1024
#: Area of each shape divided by r² (r: the renderer's size parameter), from render.coverage's geometry.
_AREA_PER_R2 = {"circle": float(np.pi), "square": (2 * 0.88) ** 2, "triangle": 0.5 * 2.08 * 1.8}
#: Fitted stretches are clamped to this range (beyond it an object is no shape of the vocabulary anyway).
_ASPECT_RANGE = (0.4, 2.5)
#: A component whose best prototype fits it no better than a wrong prototype fits a clean render
#: (``classify_shape``'s errors: ≈ 0.05 clean, ≥ 0.3 wrong) fits no shape by itself.
MALFORMED_ERROR = 0.3
#: 3×3 neighbourhood: diagonal neighbours touch, so objects are 8-connected and the dilation grows the rim diagonally.
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _spread_ratio(weights: np.ndarray) -> float:
    """Horizontal over vertical standard deviation of a soft mask's pixels."""
    ys, xs = np.nonzero(weights > 0)
    w = weights[ys, xs]
    var_x = float((w * (xs - np.average(xs, weights=w)) ** 2).sum() / w.sum())
    var_y = float((w * (ys - np.average(ys, weights=w)) ** 2).sum() / w.sum())
    return float(np.sqrt(max(var_x, 1e-6) / max(var_y, 1e-6)))


#: The renderer's own width-to-height spread ratio of each shape (1 for circle and square).
_RENDERED_SPREAD = {shape: _spread_ratio(coverage(shape, 128.0, 128.0, 80.0, 256)) for shape in _AREA_PER_R2}


@dataclass
class DetectedObject:
    """An object found in an image.

    Attributes:
        color: canonical colour name.
        shape: canonical shape name.
        mask: (H, W) bool.
        centroid: (x, y) in pixels.
        bbox: (x0, y0, x1, y1), exclusive end.
        area: soft (alpha-weighted) area in pixels.
        shape_errors: shape -> template-fit error (see ``classify_shape``); a high best error means a malformed
            object.
        aspect: width stretch of the object relative to the renderer's proportions of its shape (1: true to form,
            2: twice as wide as tall as it should be).
        blended: the object is a piece of a blend (it touches a component of another colour, fits no prototype
            by itself, and their joint silhouette fits one better): ``shape``, ``shape_errors`` and ``aspect`` are
            the silhouette's.
    """

    color: str
    shape: str
    mask: np.ndarray = field(repr=False)
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: float
    shape_errors: dict[str, float] = field(repr=False)
    aspect: float = 1.0
    blended: bool = False


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square (H, H, 3) RGB image, got shape {arr.shape}")
    return arr.astype(np.float32)


def color_alpha(image: np.ndarray | Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel best palette colour and its opacity.

    Returns:
        labels: (H, W) int, index into ``list(COLORS)``.
        alpha: (H, W) float32 in [0, 1], opacity of that colour over the background.
    """
    arr = _as_array(image)
    bg = np.asarray(BACKGROUND, np.float32)
    diff = arr - bg  # (H, W, 3)
    errs, alphas = [], []
    for rgb in COLORS.values():
        d = np.asarray(rgb, np.float32) - bg
        a = np.clip((diff @ d) / (d @ d), 0.0, 1.0)
        errs.append(np.linalg.norm(diff - a[..., None] * d, axis=-1))
        alphas.append(a)
    err = np.stack(errs)
    labels = err.argmin(axis=0)
    alpha = np.take_along_axis(np.stack(alphas), labels[None], axis=0)[0]
    return labels, alpha.astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, as a list of bool masks, in raster order of their first pixel."""
    labels, n = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    return [labels == i for i in range(1, n + 1)]


def classify_shape(weights: np.ndarray) -> tuple[str, dict[str, float], float]:
    """Shape of one object from its soft mask, by fitting each prototype shape.

    For every shape, the stretch follows from the object's horizontal/vertical spread (relative to the
    prototype's own), the size from the soft area and the centre from the centroid (a triangle's centroid sits
    0.3 r below its box centre); the prototype is rendered there with the renderer's own anti-aliasing and
    compared with the object: error = sum |alpha − coverage| / area.

    Args:
        weights: (H, W) float alpha of the object's pixels (0 outside the object).

    Returns:
        (best shape, {shape: error}, the best shape's fitted stretch); errors are ~0.05 on clean renders,
        ≥ 0.3 for a wrong shape.
    """
    ys, xs = np.nonzero(weights > 0)
    w = weights[ys, xs]
    area = float(w.sum())
    cx = float((xs * w).sum() / area) + 0.5
    cy = float((ys * w).sum() / area) + 0.5
    size = weights.shape[0]
    spread = _spread_ratio(weights)
    errors, aspects = {}, {}
    for shape, area_per_r2 in _AREA_PER_R2.items():
        aspect = float(np.clip(spread / _RENDERED_SPREAD[shape], *_ASPECT_RANGE))
        r = float(np.sqrt(area / (area_per_r2 * aspect)))
        centre_y = cy - 0.3 * r if shape == "triangle" else cy
        cov = coverage(shape, cx, centre_y, r, size, aspect)
        errors[shape] = float(np.abs(weights - cov).sum() / area)
        aspects[shape] = aspect
    best = min(errors, key=errors.get)
    return best, errors, aspects[best]


def read_scene(image: np.ndarray | Image.Image, min_area_fraction: float = MIN_AREA_FRACTION) -> list[DetectedObject]:
    """Detect the objects in an image of the shapes world.

    Args:
        image: (H, W, 3) uint8 array or PIL image, any size (objects scale with it).
        min_area_fraction: components smaller than this fraction of the image are ignored as noise.

    Returns:
        Objects sorted by area, largest first.
    """
    arr = _as_array(image)
    labels, alpha = color_alpha(arr)
    min_area = min_area_fraction * arr.shape[0] * arr.shape[1]
    pieces = []  # (colour, hard mask, soft weights) of every component large enough to be an object
    for ci, name in enumerate(COLORS):
        core = (labels == ci) & (alpha >= 0.5)
        soft = np.where((labels == ci) & (alpha >= 0.1), alpha, 0.0)
        for comp in _components(core):
            # Grow the hard mask by one pixel to pick up the anti-aliased rim for the soft measurements.
            weights = np.where(_dilate(comp), soft, 0.0)
            if weights.sum() >= min_area:
                pieces.append((name, comp, weights))
    foreground = np.zeros(labels.shape, dtype=bool)
    for _, comp, _ in pieces:
        foreground |= comp
    silhouettes, _ = ndimage.label(foreground, structure=_EIGHT_NEIGHBOURS)
    outlines: dict[int, tuple[str, dict[str, float], float]] = {}  # silhouette label -> its classify_shape
    found = []
    for name, comp, weights in pieces:
        shape, errors, aspect = classify_shape(weights)
        blended = False
        if min(errors.values()) >= MALFORMED_ERROR and _touches_another_colour(name, comp, pieces):
            label = int(silhouettes[comp][0])
            if label not in outlines:
                outlines[label] = _classify_silhouette(silhouettes == label, alpha)
            if min(outlines[label][1].values()) < min(errors.values()):
                (shape, errors, aspect), blended = outlines[label], True
        ys, xs = np.nonzero(comp)
        found.append(
            DetectedObject(
                color=name,
                shape=shape,
                mask=comp,
                centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                area=float(weights.sum()),
                shape_errors=errors,
                aspect=aspect,
                blended=blended,
            )
        )
    return sorted(found, key=lambda o: -o.area)


def match_objects(expected: list[tuple[str, str]], detected: list[DetectedObject]) -> list[DetectedObject | None]:
    """Best assignment of detections to expected (colour, shape) objects: the one that maximizes
    2·[colour right] + [shape right] (brute force; ≤ 3 objects asked).

    Returns one detection (or None) per expected object.
    """
    slots: list[DetectedObject | None] = list(detected) + [None] * len(expected)
    best, best_score = [None] * len(expected), -1
    for perm in itertools.permutations(range(len(slots)), len(expected)):
        chosen = [slots[i] for i in perm]
        score = sum(
            2 * (d is not None and d.color == c) + (d is not None and d.shape == s)
            for (c, s), d in zip(expected, chosen)
        )
        if score > best_score:
            best, best_score = chosen, score
    return best


def _touches_another_colour(name: str, comp: np.ndarray, pieces: list[tuple[str, np.ndarray, np.ndarray]]) -> bool:
    """Whether the component ``comp`` of colour ``name`` is 8-adjacent to a component of another colour."""
    grown = _dilate(comp)
    return any(other_name != name and (grown & other).any() for other_name, other, _ in pieces)


def _classify_silhouette(whole: np.ndarray, alpha: np.ndarray) -> tuple[str, dict[str, float], float]:
    """:func:`classify_shape` of a blend's silhouette: every pixel of it is object (a colour mix has no single
    colour's full opacity); its anti-aliased edge against the background is soft, as for one colour."""
    edge = np.where(_dilate(whole) & (alpha >= 0.1), alpha, 0.0)
    return classify_shape(np.where(whole, 1.0, edge))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One-pixel 8-neighbour dilation (outside the image counts as background)."""
    return ndimage.binary_dilation(mask, structure=_EIGHT_NEIGHBOURS)
