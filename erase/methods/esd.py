"""ESD-flow alone (Gandikota et al., ICCV 2023, transcribed to flow velocity): every step pulls the concept
prompt's velocity at cached concept points to the base model's negatively guided one, ``v*(c_anc) − η·(v*(c) −
v*(c_anc))``. No preservation, no attention term: the baseline that shows what the rest of EraseAnything adds.
Where it trains is ``--train`` (text-side projections, all dual-stream attention, or all attention)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..losses import LossWeights
from .base import TRAINING_OPTIONS, TrainedMethod
from .rows import erase_rows

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["ESD"]


class ESD(TrainedMethod):
    name = "esd"
    summary = "ESD-flow alone: negative guidance towards the anchor, nothing preserved"
    default_weights = LossWeights.only(esd=1.0, adversarial=1.0)
    losses = ("esd", "adversarial")
    options = TRAINING_OPTIONS | {"eta", "balance_eta", "esd_margin", "erase_velocity"}

    def step(self, trainer: Trainer, level: str) -> dict[str, Any]:
        return erase_rows(trainer)
