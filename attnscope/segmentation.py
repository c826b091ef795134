"""Zero-shot segmentation scores of heatmaps against ground-truth masks, as ConceptAttention reports them.

One heatmap and its mask (both at image size) give four numbers, all by scikit-learn: **pixel accuracy** and
**IoU** of the predicted mask (the read-out's threshold; ``accuracy_score``, ``jaccard_score``) and,
threshold-free, **average precision** and **AUROC** of the heatmap's values as pixel scores
(``average_precision_score``, ``roc_auc_score``). A benchmark averages each over its
pairs (mIoU, mAP, ...). A mask that covers no pixel or every pixel has no AP/AUROC (NaN, left out of the means).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairScores", "mean_scores", "score_pair"]


@dataclass(frozen=True)
class PairScores:
    """Scores of one heatmap against one mask."""

    pixel_acc: float
    iou: float
    ap: float
    auroc: float


def score_pair(heat: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> PairScores:
    """``heat (H, W)`` soft map, ``predicted (H, W)`` its thresholded mask, ``truth (H, W)`` the ground truth."""
    # Imported here: scikit-learn takes seconds to import, and every command imports this module via the profiles.
    from sklearn.metrics import accuracy_score, average_precision_score, jaccard_score, roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    if heat.shape != truth.shape or predicted.shape != truth.shape:
        raise ValueError(f"heatmap {heat.shape}, prediction {predicted.shape} and mask {truth.shape} must match")
    labels, chosen, scores = truth.reshape(-1), np.asarray(predicted, dtype=bool).reshape(-1), heat.reshape(-1)
    both = 0 < labels.sum() < labels.size
    return PairScores(
        pixel_acc=float(accuracy_score(labels, chosen)),
        iou=float(jaccard_score(labels, chosen, zero_division=1.0)),  # nothing to find, nothing found: 1
        ap=float(average_precision_score(labels, scores.astype(np.float64))) if both else float("nan"),
        auroc=float(roc_auc_score(labels, scores.astype(np.float64))) if both else float("nan"),
    )


def mean_scores(pairs: Iterable[PairScores]) -> dict[str, float | int]:
    """``pixel_acc``, ``miou``, ``map``, ``auroc`` (means over the pairs) and ``pairs`` (how many)."""
    rows = [asdict(p) for p in pairs]
    if not rows:
        return {"pixel_acc": float("nan"), "miou": float("nan"), "map": float("nan"), "auroc": float("nan"),
                "pairs": 0}

    def mean(key: str) -> float:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    return {"pixel_acc": mean("pixel_acc"), "miou": mean("iou"), "map": mean("ap"), "auroc": mean("auroc"),
            "pairs": len(rows)}
