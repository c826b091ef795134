"""``soft-prompt``: a white-box continuous attack, the upper bound of what any prompt could do.

The text conditioning itself (the text encoder's output ``(1, L, D)``, what the transformer attends to) is
optimised, from the start prompt's, through the attacked model's flow-matching loss on reference images of the
concept (:class:`~.base.ReferenceFit`); the pooled vector stays the start prompt's. No words can express the
result, so its ASR bounds what a prompt attack could reach. The budget counts optimiser steps.
"""

from __future__ import annotations

import torch

from ..worlds import AttackStart
from .base import Attack, AttackContext, Conditioning, ProgressChecks, ReferenceFit, SearchOutcome, descend
from .registry import register_attack

__all__ = ["SoftPrompt"]

#: Adam's step size, relative to the start embedding's standard deviation (scale-free across models).
RELATIVE_LR = 0.05


@register_attack
class SoftPrompt(Attack):
    name = "soft-prompt"
    unit = "steps"
    default_budget = 96
    white_box = True
    summary = "white box, continuous: the text encoder's output itself optimised through the model's loss (bound)"

    def run(self, context: AttackContext, start: AttackStart, budget: int, seed: int) -> SearchOutcome:
        generator = torch.Generator().manual_seed(seed)
        embeds, pooled, text_ids = context.call.encode([start.prompt], context.length)
        embeds = embeds.detach().float().clone().requires_grad_()
        fit = ReferenceFit(context, start, generator)
        dtype = context.pipe.transformer.dtype
        return descend(
            ProgressChecks(context, budget), [embeds], RELATIVE_LR * float(embeds.detach().std()),
            lambda: fit(embeds.to(dtype), pooled, text_ids),
            lambda: Conditioning(embeds=embeds.detach().to(dtype).clone(), pooled=pooled),
        )
