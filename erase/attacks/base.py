"""What every attack shares: the context it runs in (the model, its default call, the judge, the seeds), what it
returns (a prompt, or text embeddings), and the objective the white-box attacks descend.

Shapes: ``L`` text positions, ``E`` text-encoder input width, ``D`` transformer text width, ``P`` pooled width,
``N`` image tokens, ``C`` transformer channels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from attnscope.adapters import ModelCall, adapter_for
from attnscope.viz import to_pixels

from ..spec import ConceptSpec
from ..worlds import AttackStart, Judge

__all__ = [
    "REFERENCE_BATCH",
    "SEARCH_SEEDS",
    "Attack",
    "AttackContext",
    "Conditioning",
    "ProgressChecks",
    "ReferenceFit",
    "SearchOutcome",
    "descend",
    "replace_rows",
]

#: Seeds of the images an attack may look at while it searches (``judge`` calls of the black-box search, progress
#: checks of the white-box ones). The ASR is measured on other seeds (``0 .. eval_seeds - 1``): an attack tuned to
#: its own noise draws would not show what a user gets from its prompt.
SEARCH_SEEDS = (1000, 1001, 1002, 1003)

#: Reference latents per step of the white-box objective (:class:`ReferenceFit`).
REFERENCE_BATCH = 8


@dataclass
class Conditioning:
    """What an attack found: a ``prompt`` (discrete attacks) or the text conditioning itself, ``embeds (1, L, D)``
    and ``pooled (1, P)`` (continuous attacks, which no prompt can express)."""

    prompt: str | None = None
    embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def describe(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return f"<text embeddings {tuple(self.embeds.shape[1:])}>"


@dataclass
class SearchOutcome:
    """An attack's result from one start: the ``conditioning`` it found, the budget it used (``spent``, in its
    unit) and when its search images first showed the concept in at least half the search seeds
    (``first_success``, in the same unit; ``None``: never), which shows whether the budget suffices on a model
    that has not been erased."""

    conditioning: Conditioning
    spent: int
    first_success: int | None
    optimizer_steps: int = 0


class AttackContext:
    """One attacked model and concept: draws images for a conditioning with the model's default call, judges them,
    and counts what it drew (``images``: each image is one full sampling run of the model)."""

    def __init__(
        self,
        pipe: Any,
        call: ModelCall,
        call_kwargs: dict[str, Any],
        spec: ConceptSpec,
        judge: Judge,
        words: Sequence[str],
        references: dict[str, torch.Tensor],
    ):
        self.pipe = pipe
        self.call = call
        self.call_kwargs = call_kwargs
        self.spec = spec
        self.judge = judge
        self.words = list(words)
        #: Start prompt -> clean latents ``(R, N, C)`` of reference images of its concept prompt.
        self.references = references
        #: The transformer's text length (for SD3 the CLIP positions and the T5 ones), and how many of its rows
        #: come from the word embeddings white-box attacks edit (``call.token_embedding``), from row
        #: ``call.embedding_offset`` on.
        self.length = adapter_for(pipe).text_length(pipe, call_kwargs.get("max_sequence_length"))
        self.embedding_length = self.length - call.embedding_offset
        self.images_drawn = 0

    def draw(self, conditioning: Conditioning, seeds: Sequence[int]) -> list[np.ndarray]:
        """Images (uint8) of ``conditioning`` for each seed, one generator per image as ``attnscope eval`` draws."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        n = len(generators)
        if conditioning.prompt is not None:
            text: dict[str, Any] = {"prompt": [conditioning.prompt] * n}
        else:
            text = {
                "prompt_embeds": conditioning.embeds.detach().expand(n, -1, -1),
                "pooled_prompt_embeds": conditioning.pooled.detach().expand(n, -1),
            }
        with torch.no_grad():
            out = self.pipe(**text, generator=generators, output_type="np", **self.call_kwargs).images
        self.images_drawn += n
        return to_pixels(out)

    def embedding_positions(self, prompt: str, word: str) -> tuple[int, ...]:
        """The rows of ``word``'s tokens among ``prompt``'s word embeddings (``call.token_ids``' positions)."""
        positions = adapter_for(self.pipe).prompt_tokens(self.pipe, prompt, self.length).positions(word)
        offset = self.call.embedding_offset
        return tuple(p - offset for p in positions if p >= offset)

    def single_token_words(self) -> tuple[list[str], torch.Tensor]:
        """The allowed words that are one token of the text encoder, and their ids ``(V',)``."""
        words, ids = [], []
        for word in self.words:
            pieces = self.call.token_ids([word], 4)[0]
            content = [int(i) for i in pieces if int(i) not in self.call.embedding_tokenizer.all_special_ids]
            if len(content) == 1:
                words.append(word)
                ids.append(content[0])
        if not ids:
            raise ValueError(f"no allowed word of the {self.spec.name!r} attack is a single token of the text encoder")
        return words, torch.tensor(ids)

    def shows(self, images: Sequence[np.ndarray]) -> list[bool]:
        return self.judge(images, self.spec)

    def success_rate(self, conditioning: Conditioning, seeds: Sequence[int] = SEARCH_SEEDS) -> float:
        """Share of ``seeds``' images of ``conditioning`` that show the concept."""
        return float(np.mean(self.shows(self.draw(conditioning, seeds))))


class ReferenceFit:
    """UnlearnDiff's objective: the attacked model's flow-matching loss on reference images of the concept (the
    start's concept prompt drawn right), under the conditioning being optimised. The lower it is, the more that
    conditioning makes the model draw the concept. ``batch`` reference latents per step, uniform ``sigma``."""

    def __init__(
        self, context: AttackContext, start: AttackStart, generator: torch.Generator, batch: int = REFERENCE_BATCH
    ):
        self.call = context.call
        self.transformer = context.pipe.transformer
        self.x0 = context.references[start.prompt]
        self.batch = batch
        self.generator = generator

    def __call__(self, embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """``embeds (1, L, D)``, ``pooled (1, P)`` -> the loss (differentiable in both)."""
        g = self.generator
        rows = torch.randint(len(self.x0), (self.batch,), generator=g)
        x0 = self.x0[rows.to(self.x0.device)].float()
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        sigma = torch.rand(self.batch, generator=g).to(x0.device)
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        dtype = self.transformer.dtype
        v = self.call.velocity(
            self.transformer, x_t.to(dtype), sigma, embeds.expand(self.batch, -1, -1),
            pooled.expand(self.batch, -1), text_ids,
        )
        return torch.nn.functional.mse_loss(v.float(), noise - x0)


class Attack(ABC):
    """One attack: from a start prompt without the concept, find a conditioning that makes the model draw it.

    ``unit`` says what ``budget`` counts: ``"images"`` (model calls of a black-box attack) or ``"steps"``
    (optimiser steps of a white-box one). ``default_budget`` is the protocol's (``attnscope attack`` without
    ``--budget``).
    """

    name: ClassVar[str]
    unit: ClassVar[str]
    default_budget: ClassVar[int]
    white_box: ClassVar[bool]
    summary: ClassVar[str]

    @abstractmethod
    def run(self, context: AttackContext, start: AttackStart, budget: int, seed: int) -> SearchOutcome:
        """Attack ``context``'s model from ``start`` within ``budget`` (deterministic for ``seed``)."""


class ProgressChecks:
    """What a white-box attack looks at while it optimises: at ``count`` evenly spaced steps (the last at
    ``budget``) it draws its current conditioning on the search seeds. It keeps the best one seen (most search images
    showing the concept, the later among equals), which is what the attack returns — the loss is a noisy estimate,
    so the last step is not always the best — and when half the search images first showed the concept."""

    def __init__(self, context: AttackContext, budget: int, count: int = 5):
        self.context = context
        self.budget = budget
        self.steps = {max(1, round(budget * (i + 1) / count)) for i in range(count)}
        self.best: tuple[float, Conditioning] | None = None
        self.first_success: int | None = None

    def __call__(self, step: int, current: Callable[[], Conditioning]) -> None:
        if step not in self.steps:
            return
        conditioning = current()
        rate = self.context.success_rate(conditioning)
        if self.best is None or rate >= self.best[0]:
            self.best = (rate, conditioning)
        if self.first_success is None and rate >= 0.5:
            self.first_success = step

    def outcome(self) -> SearchOutcome:
        return SearchOutcome(self.best[1], self.budget, self.first_success, optimizer_steps=self.budget)


def descend(
    checks: ProgressChecks, parameters: list[torch.Tensor], lr: float, loss: Callable[[], torch.Tensor],
    current: Callable[[], Conditioning],
) -> SearchOutcome:
    """The white-box attacks' loop: ``checks.budget`` Adam steps on ``loss()`` over ``parameters``, the
    ``current()`` conditioning checked after each; the best one checked is the outcome."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(1, checks.budget + 1):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        checks(step, current)
    return checks.outcome()


def replace_rows(inputs: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``inputs (1, L, E)`` with the text positions ``positions (S,)`` replaced by ``vectors (S, E)``,
    differentiable in ``vectors``."""
    out = inputs.clone()
    out[0, positions] = vectors.to(inputs.dtype)
    return out
