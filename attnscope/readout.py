"""``Readout``: how a word's stack of maps becomes one heatmap and one mask at image size.

Maps know more than a careless read-out keeps: which layers and steps are averaged, how a token grid reaches
pixels and where the soft map is cut decide most of a localization figure. A :class:`Readout` names those choices
once; each model profile carries its own (``attnscope.readout_for(model)``), chosen on training scenes and seeds
and reported on held-out ones (benchmarks/RESULTS.md), and the README's examples and the explorer use it.

    readout = attnscope.readout_for("shapes")
    heat = readout.soft(maps.word("red"), image.size)      # TokenMaps at image size, normalized to [0, 1]
    mask = readout.mask(maps.word("red"), image.size)      # (H, W) bool
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .maps import LayerSelector, ThresholdRule, TokenMaps
from .segmentation import PairScores, score_pair

__all__ = ["Readout", "readout_for"]


@dataclass(frozen=True)
class Readout:
    """``layers``: the layers averaged (any :meth:`TokenMaps.select` layer selector); ``late_steps``: the last
    fraction of the captured denoising steps averaged (1.0: every step; a single step, as in an explanation, is
    kept whatever the fraction); ``upsample``: how the token grid reaches image size; ``threshold``: the rule that
    cuts the normalized soft map into a mask (:meth:`TokenMaps.threshold`)."""

    layers: LayerSelector = "double"
    late_steps: float = 0.5
    upsample: Literal["nearest", "bilinear"] = "bilinear"
    threshold: ThresholdRule = "mean"

    def __post_init__(self) -> None:
        if not 0.0 < self.late_steps <= 1.0:
            raise ValueError(f"late_steps must be in (0, 1], not {self.late_steps}")
        if self.upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', not {self.upsample!r}")

    def reduce(self, maps: TokenMaps) -> TokenMaps:
        """The chosen layers and late steps of ``maps`` (a word's, or a concept's), averaged."""
        if "layer" in maps.present:
            maps = maps.select(layers=self.layers)
        if "step" in maps.present and len(maps.steps) > 1:
            keep = max(1, round(len(maps.steps) * self.late_steps))
            maps = maps.select(steps=list(maps.steps[-keep:]))
        return maps.mean()

    def soft(self, maps: TokenMaps, size: tuple[int, int]) -> TokenMaps:
        """:meth:`reduce`, brought to ``size`` = ``(width, height)`` (PIL's order) and min-max normalized."""
        return self.reduce(maps).upsample(size, mode=self.upsample).normalize()

    def mask(self, maps: TokenMaps, size: tuple[int, int]) -> np.ndarray:
        """The ``(height, width)`` boolean mask of :meth:`soft` cut by the threshold rule."""
        return self.soft(maps, size).threshold(self.threshold)

    def score(self, maps: TokenMaps, truth: np.ndarray) -> PairScores:
        """``maps`` read out at the size of the boolean mask ``truth (H, W)`` and scored against it: the soft map's
        AP and AUROC, the cut mask's IoU and pixel accuracy (:func:`~attnscope.segmentation.score_pair`)."""
        soft = self.soft(maps, (truth.shape[1], truth.shape[0]))
        return score_pair(soft.numpy(), soft.threshold(self.threshold), truth)


def readout_for(model: Any) -> Readout:
    """The read-out of a model: a name or path (``"shapes"``), or a loaded pipeline (found by the folder it was
    loaded from); the generic profile's for a model no profile claims or a pipeline built in memory."""
    from .profiles import profile_of

    return profile_of(model).readout
