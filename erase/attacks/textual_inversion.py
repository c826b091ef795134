"""``textual-inversion``: a white-box attack that learns a new word for the concept (Concept Inversion, CCE,
Pham et al. 2024).

In the start's concept prompt ("a red circle"), the concept word's token inputs are replaced by learned vectors
in the text encoder's input-embedding space (one per token of the word), started from the mean of the allowed
words' embeddings, and optimised through the attacked model's flow-matching loss on reference images of the
concept (:class:`~.base.ReferenceFit`); the pooled vector is the start prompt's. A new word, not a prompt of
existing words: between ``unlearndiff`` and ``soft-prompt`` in power. The budget counts optimiser steps.
"""

from __future__ import annotations

import torch

from ..worlds import AttackStart
from .base import (
    Attack,
    AttackContext,
    Conditioning,
    ProgressChecks,
    ReferenceFit,
    SearchOutcome,
    descend,
    replace_rows,
)
from .registry import register_attack

__all__ = ["TextualInversion"]

#: Adam's step size, relative to the standard deviation of the input-embedding table.
RELATIVE_LR = 0.05


@register_attack
class TextualInversion(Attack):
    name = "textual-inversion"
    unit = "steps"
    default_budget = 96
    white_box = True
    summary = "white box: a new word's input embedding learned in place of the concept word (CCE)"

    def run(self, context: AttackContext, start: AttackStart, budget: int, seed: int) -> SearchOutcome:
        generator = torch.Generator().manual_seed(seed)
        table = context.call.token_embedding()
        template = context.call.token_ids([start.concept_prompt], context.embedding_length)
        positions = torch.tensor(context.embedding_positions(start.concept_prompt, start.word))
        inputs = table(template).detach()  # (1, L, E)
        _, allowed = context.single_token_words()
        init = table.weight.detach()[allowed.to(table.weight.device)].mean(0)
        word = init.expand(len(positions), -1).clone().float().requires_grad_()  # (pieces, E)
        fit = ReferenceFit(context, start, generator)

        def encode() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return context.call.encode_token_embeddings(replace_rows(inputs, positions, word), [start.prompt])

        def current() -> Conditioning:
            with torch.no_grad():
                embeds, pooled, _ = encode()
            return Conditioning(embeds=embeds, pooled=pooled)

        lr = RELATIVE_LR * float(table.weight.detach().std())
        return descend(ProgressChecks(context, budget), [word], lr, lambda: fit(*encode()), current)
