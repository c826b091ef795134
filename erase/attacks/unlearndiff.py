"""``unlearndiff``: a white-box discrete attack (UnlearnDiffAtk, Zhang et al. 2024), through the erased model.

``TOKENS`` words are put in front of the start prompt, and the word standing where the concept was ("green" in
"a green circle") becomes free too, started from itself. Each free word is a relaxed one-hot over the allowed words
(logits ``(S, V')``); the forward pass uses the projected (hard, argmax) word and the gradient flows through the softmax
(straight-through), so the loss is always that of a prompt that exists. The loss is the attacked model's
flow-matching loss on reference images of the concept (:class:`~.base.ReferenceFit`). The result is the words at
the end, snapped and sampled as an ordinary prompt. The budget counts optimiser steps.
"""

from __future__ import annotations

import torch

from ..spec import replace_word
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

__all__ = ["UnlearnDiff"]

#: Adversarial words put before the start prompt (UnlearnDiffAtk uses 5 on 77-token CLIP prompts; the shapes
#: world's prompts are 20 tokens).
TOKENS = 3
#: Adam's step size on the logits, and the softmax temperature of the relaxation.
LR = 0.1
TEMPERATURE = 1.0


@register_attack
class UnlearnDiff(Attack):
    name = "unlearndiff"
    unit = "steps"
    default_budget = 128
    white_box = True
    summary = f"white box, discrete: {TOKENS} prompt words optimised as relaxed one-hots through the model's loss"

    def run(self, context: AttackContext, start: AttackStart, budget: int, seed: int) -> SearchOutcome:
        generator = torch.Generator().manual_seed(seed)
        words, ids = context.single_token_words()
        embedding = context.call.token_embedding()
        table = embedding.weight.detach()[ids.to(embedding.weight.device)]  # (V', E)
        template = context.call.token_ids([start.prompt], context.embedding_length)
        content = int((template[0] != context.call.embedding_tokenizer.pad_token_id).sum())
        if content + TOKENS > context.embedding_length:
            raise ValueError(f"the start prompt {start.prompt!r} leaves no room for {TOKENS} attack words")
        swapped: tuple[int, ...] = ()
        if start.swap:
            swapped = tuple(TOKENS + p for p in context.embedding_positions(start.prompt, start.swap))
        slots = torch.tensor([*range(TOKENS), *swapped])
        inputs = torch.cat([torch.zeros_like(embedding(template[:, :TOKENS])), embedding(template)], 1)
        inputs = inputs[:, : context.embedding_length].detach()  # (1, L, E): TOKENS free places, then the start prompt
        logits = 0.01 * torch.randn(len(slots), len(words), generator=generator)
        if start.swap in words:  # the swapped word's slot starts as that word: the search starts at the start
            logits[TOKENS:, words.index(start.swap)] += 1.0
        logits = logits.to(table.device).requires_grad_()
        fit = ReferenceFit(context, start, generator)

        def prompt() -> str:
            chosen = [words[int(i)] for i in logits.argmax(-1)]
            text = start.prompt if not start.swap else replace_word(start.prompt, start.swap, " ".join(chosen[TOKENS:]))
            return " ".join([*chosen[:TOKENS], text])

        def loss() -> torch.Tensor:
            soft = torch.softmax(logits / TEMPERATURE, -1)
            hard = torch.nn.functional.one_hot(soft.argmax(-1), len(words)).to(soft.dtype)
            chosen = (hard + soft - soft.detach()) @ table  # (S, E): the projected words, with the soft gradient
            return fit(*context.call.encode_token_embeddings(replace_rows(inputs, slots, chosen), [start.prompt]))

        return descend(ProgressChecks(context, budget), [logits], LR, loss, lambda: Conditioning(prompt=prompt()))
