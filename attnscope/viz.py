"""Pictures of maps: pure functions of arrays and images (no model, no state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .maps import TokenMaps

#: Shorter side, in pixels, below which an image is enlarged before an overlay is drawn on it for viewing: the
#: bundled shapes model draws 32×32 images, on which a heatmap is a few unreadable pixels on screen; a real
#: model's images (1024×1024) are above it and keep their size.
MIN_VIEW_SIDE = 256


def to_pixels(images: np.ndarray) -> list[np.ndarray]:
    """A pipeline's ``output_type="np"`` images ``(B, H, W, 3)`` in [0, 1] as (H, W, 3) uint8 images."""
    return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in images]


def _normalized(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"expected one (h, w) map, got shape {grid.shape}; reduce the maps first (e.g. .mean())")
    lo, hi = float(grid.min()), float(grid.max())
    return (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)


def heatmap(grid: np.ndarray, size: tuple[int, int], cmap: str = "jet") -> Image.Image:
    """An RGB heatmap of an ``(h, w)`` map, min-max normalized and resized (bilinear) to ``size`` = (W, H)."""
    from matplotlib import colormaps

    norm = _normalized(grid)
    resized = np.asarray(Image.fromarray(norm).resize(size, Image.BILINEAR))
    rgba = colormaps[cmap](np.clip(resized, 0.0, 1.0))
    return Image.fromarray((rgba[..., :3] * 255).astype(np.uint8))


def overlay(grid: np.ndarray, image: Image.Image, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend the heatmap of an ``(h, w)`` map over ``image`` (``alpha`` = heatmap opacity, 0..1)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    return Image.blend(base, heatmap(grid, base.size, cmap), alpha)


def enlarged(image: Image.Image, min_side: int = MIN_VIEW_SIDE) -> Image.Image:
    """``image`` scaled by the smallest whole factor that makes its shorter side at least ``min_side``.

    Nearest-neighbour with a whole factor keeps every pixel a sharp, equal square; an image already that large is
    returned unchanged. Draw the overlay on the result (``overlay(grid, enlarged(image))``) so that the heatmap is
    interpolated at the larger size and stays smooth.
    """
    factor = -(-min_side // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def show_overlay(
    grid: np.ndarray, image: Image.Image, ax: Axes, title: str | None = None, alpha: float = 0.5, cmap: str = "jet"
) -> Axes:
    """Draw :func:`overlay` into a matplotlib axes."""
    ax.imshow(overlay(grid, image, alpha, cmap))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def grid_figure(
    maps: TokenMaps,
    words: Sequence[str],
    by: str = "layer",
    image: Image.Image | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """A words × layers (``by="layer"``) or words × steps (``by="step"``) grid of maps.

    Each cell averages over the other axes still present. With ``image``, cells are overlays; otherwise plain
    heatmaps of the token grid.
    """
    import matplotlib.pyplot as plt

    if by not in ("layer", "step"):
        raise ValueError(f"by must be 'layer' or 'step', not {by!r}")
    if by not in maps.present:
        raise ValueError(f"these maps have no {by} axis (present: {maps.present})")
    columns = [layer.label for layer in maps.layers] if by == "layer" else [f"step {s}" for s in maps.steps]
    fig, axes = plt.subplots(len(words), len(columns), figsize=(1.6 * len(columns), 1.7 * len(words)), squeeze=False)
    for r, word in enumerate(words):
        per_word = maps.word(word)
        others = tuple(a for a in ("layer", "step", "head") if a in per_word.present and a != by)
        reduced = per_word.mean(*others) if others else per_word
        stack = reduced.numpy()
        for c, title in enumerate(columns):
            ax = axes[r, c]
            if image is not None:
                show_overlay(stack[c], image, ax, alpha=alpha, cmap=cmap)
            else:
                ax.imshow(_normalized(stack[c]), cmap=cmap)
                ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.text(-0.08, 0.5, word, transform=ax.transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig
