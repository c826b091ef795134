"""Concept ablation, model-based (Kumari et al., ICCV 2023): the concept prompt's velocity is regressed to the
base model's velocity for the anchor prompt at the same state, and the anchor prompt's own velocity is kept there
(their regularizer), both on the cached concept points. The original draws its states from anchor images; here
they are the concept's own trajectory states, as for every other method, so that the methods differ only in
their losses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..losses import LossWeights
from .base import TrainedMethod
from .rows import ablation_rows

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["ConceptAblation"]


class ConceptAblation(TrainedMethod):
    name = "ca"
    summary = "concept ablation: the concept prompt's velocity regressed to the anchor prompt's"
    default_weights = LossWeights.only(ablation=1.0, anchor=1.0, adversarial=1.0)
    losses = ("ablation", "anchor", "adversarial")

    def step(self, trainer: Trainer, level: str) -> dict[str, Any]:
        return ablation_rows(trainer)
