"""Procedural renderer of the shapes world: scenes, captions and ground-truth masks.

A scene is 1–3 flat-coloured objects (``vocabulary.COLORS`` × ``vocabulary.SHAPES``) on a plain background,
anti-aliased by 4×4 supersampling. Objects never overlap (bounding boxes are kept 2 px apart), so every pixel
belongs to at most one object and the masks are exact. Everything is deterministic for a seed.

Sizes are given for the native 32×32 resolution (the bundled model's) and scale with ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .vocabulary import BACKGROUND, COLORS, SHAPES, SYNONYMS, is_color, is_shape, parse_prompt, words_of

#: Native resolution of the bundled model (pixels).
NATIVE_SIZE = 32
#: Object half-extent range (pixels at 32×32) by number of objects: bigger when alone, so they still fit.
RADIUS_RANGE: dict[int, tuple[float, float]] = {1: (6.0, 11.0), 2: (5.0, 8.5), 3: (4.5, 6.5)}
_SUPERSAMPLE = 4
_GAP = 2.0  # minimum distance between object bounding boxes (px at 32×32)
#: Words joining the two objects of a two-object caption (three objects are joined by commas only).
TWO_OBJECT_CONNECTORS: tuple[str, ...] = ("and", "with", "next to", "beside", "plus")
_CONNECTOR_DRAW = tuple(f" {c} " for c in ("and", *TWO_OBJECT_CONNECTORS))  # "and" drawn twice as often
_VOWEL_START = tuple("aeiou")


@dataclass
class SceneObject:
    """One object. ``bbox`` is (x0, y0, x1, y1) in pixels, exclusive end; ``mask`` is (H, W) bool."""

    color: str
    shape: str
    center: tuple[float, float]
    radius: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: (H, W, 3) uint8.
        caption: the caption, e.g. "a crimson circle next to a blue box".
        objects: objects in drawing order.
        word_masks: word as it appears in the caption (lower case) -> (H, W) bool mask of the pixels it refers
            to; only colour and shape words (incl. synonyms). A word used twice ("a red circle and a red square")
            maps to the union.
        word_objects: (index of the word in ``vocabulary.words_of(caption)``, word, object index) for every colour
            and shape word, for per-occurrence ground truth.
    """

    image: np.ndarray = field(repr=False)
    caption: str
    objects: list[SceneObject]
    word_masks: dict[str, np.ndarray] = field(repr=False)
    word_objects: list[tuple[int, str, int]]


def coverage(shape: str, cx: float, cy: float, r: float, size: int, aspect: float = 1.0) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (size, size) float32 in [0, 1] (4×4 supersampling).

    ``aspect`` stretches the shape horizontally about ``cx`` (width × aspect); the renderer draws 1 only, the
    scene reader fits other values to what a model drew.
    """
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x = cx + (coords[None, :] - cx) / aspect
    y = coords[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        h = 0.88 * r  # about the circle's area, so size alone does not reveal the shape
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        # Equilateral, apex up, bounding box centred on (cx, cy): height 1.8 r, base 2.08 r.
        top, bottom = cy - 0.9 * r, cy + 0.9 * r
        half_base = 1.04 * r
        frac = (y - top) / (bottom - top)  # 0 at the apex, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= half_base * frac)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    cov = inside.astype(np.float32).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    return cov


def _half_extent(shape: str, r: float) -> tuple[float, float]:
    """Half width and half height of the shape's bounding box."""
    return {"circle": (r, r), "square": (0.88 * r, 0.88 * r), "triangle": (1.04 * r, 0.9 * r)}[shape]


def _place(
    rng: np.random.Generator, specs: list[tuple[str, str]], size: int
) -> list[tuple[str, str, float, float, float]]:
    """Random non-overlapping placement: (colour, shape, cx, cy, r) per object, pixels at ``size``."""
    scale = size / NATIVE_SIZE
    lo, hi = RADIUS_RANGE[min(len(specs), 3)]
    for attempt in range(200):
        shrink = 1.0 - 0.002 * attempt  # rarely needed: shrink slowly if crowded layouts keep failing
        placed: list[tuple[str, str, float, float, float]] = []
        boxes: list[tuple[float, float, float, float]] = []
        for color, shape in specs:
            r = float(rng.uniform(lo, hi)) * scale * shrink
            hw, hh = _half_extent(shape, r)
            margin = 1.0 * scale
            cx = float(rng.uniform(hw + margin, size - hw - margin))
            cy = float(rng.uniform(hh + margin, size - hh - margin))
            box = (cx - hw, cy - hh, cx + hw, cy + hh)
            gap = _GAP * scale
            if any(
                box[0] < b[2] + gap and b[0] < box[2] + gap and box[1] < b[3] + gap and b[1] < box[3] + gap
                for b in boxes
            ):
                break
            placed.append((color, shape, cx, cy, r))
            boxes.append(box)
        if len(placed) == len(specs):
            return placed
    raise RuntimeError(f"could not place {len(specs)} objects in a {size}×{size} image")


def draw(
    objects: list[tuple[str, str, float, float, float]], size: int = NATIVE_SIZE
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw (colour, shape, cx, cy, r) objects; returns the (size, size, 3) uint8 image and one coverage map each."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    covs = []
    for color, shape, cx, cy, r in objects:
        cov = coverage(shape, cx, cy, r, size)
        img = img * (1 - cov[..., None]) + np.asarray(COLORS[color], np.float32) * cov[..., None]
        covs.append(cov)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), covs


def _article(word: str) -> str:
    return "an" if word.startswith(_VOWEL_START) else "a"


def make_caption(
    rng: np.random.Generator, specs: list[tuple[str, str]], synonym_prob: float = 0.25
) -> tuple[str, list[int]]:
    """A varied caption for (colour, shape) objects.

    Objects are mentioned in a random order, each colour/shape word is replaced by a synonym with probability
    ``synonym_prob``, articles are sometimes dropped, and two objects are joined by a varied connector ("and",
    "with", "next to", ...), three by commas.

    Returns:
        (caption, order): ``order[k]`` is the index in ``specs`` of the k-th object mentioned.
    """
    order = [int(i) for i in rng.permutation(len(specs))]
    use_article = rng.random() < 0.85
    phrases = []
    for i in order:
        color, shape = specs[i]
        words = []
        for w in (color, shape):
            if rng.random() < synonym_prob:
                w = str(rng.choice(SYNONYMS[w]))
            words.append(w)
        phrase = " ".join(words)
        phrases.append(f"{_article(words[0])} {phrase}" if use_article else phrase)
    if len(phrases) == 1:
        caption = phrases[0]
    elif len(phrases) == 2:
        caption = phrases[0] + str(rng.choice(_CONNECTOR_DRAW)) + phrases[1]
    else:
        # Commas only: a three-object caption that ended in "B and C" taught the model that a two-object prompt
        # ("B and C") may come with a third object, and it drew one (benchmarks/two_object_count.py; RESULTS.md).
        caption = ", ".join(phrases)
    return caption, order


def render_scene(
    seed: int | np.random.Generator,
    n_objects: int | None = None,
    objects: list[tuple[str, str]] | None = None,
    caption: str | None = None,
    size: int = NATIVE_SIZE,
    synonym_prob: float = 0.25,
) -> Scene:
    """Render a random scene, deterministic for a seed.

    Args:
        seed: an int seed or a numpy Generator (advanced in place).
        n_objects: number of objects (1–3); random (1: 35 %, 2: 55 %, 3: 10 %) when None and ``objects`` is None.
        objects: canonical (colour, shape) pairs to draw instead of random ones (positions stay random).
        caption: use this caption instead of a generated one; it must name exactly ``objects`` (any order,
            synonyms allowed). Used to render the ground truth of an evaluation prompt.
        size: image side in pixels; object sizes scale with it.
        synonym_prob: probability of replacing each colour/shape word of a generated caption by a synonym.

    Returns:
        A Scene with a (size, size, 3) uint8 image, caption, objects and per-word masks.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if objects is None:
        if n_objects is None:
            n_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.55, 0.10]))
        if not 1 <= n_objects <= 3:
            raise ValueError(f"n_objects must be 1..3, got {n_objects}")
        colors, shapes = list(COLORS), list(SHAPES)
        objects = [(str(rng.choice(colors)), str(rng.choice(shapes))) for _ in range(n_objects)]
    placed = _place(rng, list(objects), size)
    image, covs = draw(placed, size)

    if caption is None:
        caption, order = make_caption(rng, list(objects), synonym_prob)
    else:
        order = _match_caption(caption, list(objects))

    scene_objects = []
    for (color, shape, cx, cy, r), cov in zip(placed, covs):
        mask = cov >= 0.5
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        scene_objects.append(SceneObject(color, shape, (cx, cy), r, bbox, mask))

    # Colour/shape words in caption order map onto mentioned objects in order: the k-th shape word (and the colour
    # word before it) belongs to object order[k].
    word_masks: dict[str, np.ndarray] = {}
    word_objects: list[tuple[int, str, int]] = []
    k = 0
    for idx, w in enumerate(words_of(caption)):
        if not (is_color(w) or is_shape(w)):
            continue
        obj = order[k]
        word_objects.append((idx, w, obj))
        word_masks[w] = word_masks.get(w, np.zeros((size, size), bool)) | scene_objects[obj].mask
        if is_shape(w):
            k += 1
    return Scene(image, caption, scene_objects, word_masks, word_objects)


def _match_caption(caption: str, objects: list[tuple[str, str]]) -> list[int]:
    """Order of ``objects`` as mentioned in ``caption``; ValueError if the caption names different objects."""
    wanted = parse_prompt(caption)
    remaining = list(range(len(objects)))
    order = []
    for pair in wanted:
        match = next((i for i in remaining if objects[i] == pair), None)
        if match is None:
            raise ValueError(f"caption {caption!r} does not name the objects {objects}")
        remaining.remove(match)
        order.append(match)
    if remaining:
        raise ValueError(f"caption {caption!r} does not name the objects {objects}")
    return order


def render_prompt(prompt: str, seed: int | np.random.Generator, size: int = NATIVE_SIZE) -> Scene:
    """Ground-truth scene for a prompt: its objects at random positions, with the prompt as caption."""
    return render_scene(seed, objects=parse_prompt(prompt), caption=prompt, size=size)


__all__ = [
    "NATIVE_SIZE",
    "TWO_OBJECT_CONNECTORS",
    "Scene",
    "SceneObject",
    "coverage",
    "draw",
    "make_caption",
    "render_prompt",
    "render_scene",
]
