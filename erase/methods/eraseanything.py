"""EraseAnything (Gao et al., ICML 2025), the default method: bi-level erasure on the text-side projections.

The *erase* (lower) level makes the model stop drawing the concept: ESD-flow towards the anchor plus attention
attenuation on the concept's text keys (``--attention-form localized``: where the base model's localized map put
it, the map from the same hooks as every map attnscope draws; weighted as the model's profile says, which on the
shapes models is 0: measured to buy nothing there), and (ours, weight 1 by default) unconditional ESD:
the concept's points through prompts that name nothing, so that it is not drawn unasked either. The *preserve*
(upper) level keeps everything else: flow matching on base-model samples of irrelevant prompts, the keep loss and
the reverse self-contrastive loss. ``schedule="alternate"`` alternates them (the official code: even steps erase,
odd steps preserve); ``schedule="joint"`` takes both levels in every step (their gradients accumulate).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..losses import LossWeights
from .base import TRAINING_OPTIONS, TrainedMethod
from .rows import erase_rows, preserve_rows

if TYPE_CHECKING:
    from attnscope.profiles import EraseDefaults

    from ..trainer import Trainer

__all__ = ["EraseAnything"]

#: Two concepts erased together: each gets half of the erase rows, so at the lone concept's rate they need 300
#: steps each; at twice the rate 400 steps erase them as well in two thirds of the time. Three or more keep the
#: lone rate: there the faster one left the concepts drawn unasked (benchmarks/RESULTS.md). A model whose erasures
#: do not hold at the faster rate caps it (``EraseDefaults.max_lr``, :func:`erase.config.schedule_for`).
TWO_CONCEPT_STEPS = 400
TWO_CONCEPT_LR = 2e-3


class EraseAnything(TrainedMethod):
    name = "eraseanything"
    summary = ("bi-level: ESD-flow + attention attenuation (off on the shapes models) + unconditional ESD, "
               "alternating with preservation")
    default_weights = LossWeights()
    losses = ("esd", "attention", "flow", "contrastive", "keep", "implicit", "adversarial")
    options = TRAINING_OPTIONS | {"eta", "balance_eta", "esd_margin", "erase_velocity", "schedule", "keep_rows",
                                  "preserve_steps", "attention_form"}

    def weights_for(self, defaults: EraseDefaults) -> LossWeights:
        """The paper's weights, with the attention term's weight the model's where its profile sets one (the
        shapes models turn the term off: measured to buy nothing there)."""
        if defaults.attention_weight is None:
            return self.default_weights
        return replace(self.default_weights, attention=defaults.attention_weight)

    def default_schedule(self, concepts: int) -> tuple[int, float]:
        if concepts == 2:
            return TWO_CONCEPT_STEPS, TWO_CONCEPT_LR
        return super().default_schedule(concepts)

    def level(self, trainer: Trainer, step: int) -> str:
        if trainer.config.schedule == "joint":
            return "joint"
        return "erase" if step % 2 == 0 else "preserve"

    def step(self, trainer: Trainer, level: str) -> dict[str, Any]:
        values: dict[str, float] = {}
        if level in ("erase", "joint"):
            values |= erase_rows(trainer)
        if level in ("preserve", "joint"):
            values |= preserve_rows(trainer)
        return values
