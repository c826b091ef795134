"""Forget-Me-Not's attention re-steering (Zhang et al., CVPR-W 2024): the image queries' attention mass on the
concept's text keys, read by the same hooks as every map attnscope draws, driven down alone — uniformly over the
image, as the paper's map norm does (the localized form alone is ``--method eraseanything --attention-form
localized --weights esd=0,flow=0,contrastive=0,keep=0,implicit=0``). The forward stops after the last layer whose
maps it reads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..losses import LossWeights
from .base import TrainedMethod
from .rows import erase_rows

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["ForgetMeNot"]


class ForgetMeNot(TrainedMethod):
    name = "fmn"
    summary = "Forget-Me-Not: the concept tokens' attention maps driven down alone"
    default_weights = LossWeights.only(attention=1.0)
    losses = ("attention",)
    attention_form = "mass"  # the paper's; EraseAnything's default may move, this method's does not
    options = TrainedMethod.options - {"adversarial"}
    adversarial_refusal = ("trains only the attention on the concept word's text keys, and an adversarial "
                           "embedding has no concept word")

    def step(self, trainer: Trainer, level: str) -> dict[str, Any]:
        return erase_rows(trainer)
