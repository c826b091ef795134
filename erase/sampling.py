"""Prompts encoded once, and few-step sampling with the base model through the pipeline's own scheduler.

Training never goes through ``pipe(...)``: it needs the velocity at a chosen ``x_t`` (and the attention maps of
that call, with gradient), so it calls the transformer through its adapter's :class:`~attnscope.adapters.ModelCall`
(the inputs ``pipe(...)`` would give it). This module adds what training needs on top: a prompt bank and base-model
trajectories.

Shapes: ``N`` image tokens, ``C`` transformer input channels, ``L`` text positions (= ``max_sequence_length``),
``D`` text width. States are ``(B, N, C)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnscope.adapters import ModelCall, adapter_for
from attnscope.tokens import PromptTokens

__all__ = ["PromptBank", "Trajectory", "sample_trajectory"]


class PromptBank:
    """Encodes each prompt once (text encoders are frozen) and remembers its token layout.

    ``get(prompts)`` -> ``(embeds (B, L, D), pooled (B, P))`` on the transformer's device and dtype.
    """

    def __init__(self, call: ModelCall, max_sequence_length: int):
        self.call = call
        self.pipe = call.pipe
        self.adapter = adapter_for(call.pipe)
        self.length = max_sequence_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tokens: dict[str, PromptTokens] = {}
        self.text_ids: torch.Tensor | None = None

    def encode(self, prompts: Sequence[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if not missing:
            return
        dtype = self.pipe.transformer.dtype
        embeds, pooled, text_ids = self.call.encode(missing, self.length)
        self.text_ids = text_ids
        for i, prompt in enumerate(missing):
            self._cache[prompt] = (embeds[i].to(dtype), pooled[i].to(dtype))

    def get(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.encode(prompts)
        embeds = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return embeds, pooled

    def tokens(self, prompt: str) -> PromptTokens:
        if prompt not in self._tokens:
            self._tokens[prompt] = self.adapter.prompt_tokens(self.pipe, prompt, self.length)
        return self._tokens[prompt]

    def positions(self, prompt: str, word: str) -> tuple[int, ...]:
        """Text positions of ``word`` in ``prompt`` (UnknownWordError / TruncatedWordError if absent)."""
        return self.tokens(prompt).positions(word)


@dataclass
class Trajectory:
    """A base-model sample: ``sigmas (K + 1,)``, ``states (K + 1, B, N, C)`` (``states[k]`` at ``sigmas[k]``; the
    last is the sample), the *conditional* velocities ``(K, B, N, C)`` at each state but the last, and with true
    CFG the negative prompt's velocities there too (else None). All float32, states and velocities on the device
    of the start noise."""

    sigmas: torch.Tensor
    states: torch.Tensor
    velocities: torch.Tensor
    negative_velocities: torch.Tensor | None


@torch.no_grad()
def sample_trajectory(
    call: ModelCall,
    transformer: torch.nn.Module,
    x1: torch.Tensor,
    steps: int,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor,
) -> Trajectory:
    """Sample from noise ``x1 (B, N, C)`` in ``steps`` steps of the pipeline's own scheduler (its sigmas and its
    update, e.g. the shapes bundle's re-noising), guided as ``call`` says: the images ``pipe(...)`` draws."""
    scheduler = call.pipe.scheduler
    sigmas = call.sigmas(steps)  # also starts a new run of the scheduler
    x = x1
    states, velocities, negatives = [x.float()], [], []
    for k, timestep in enumerate(scheduler.timesteps):
        sigma = sigmas[k].expand(x.shape[0]).to(x.device)
        v, v_cond, v_neg = call.sampling_velocity(transformer, x, sigma, embeds, pooled, text_ids)
        velocities.append(v_cond.float())
        if v_neg is not None:
            negatives.append(v_neg.float())
        x = scheduler.step(v, timestep, x, return_dict=False)[0].to(x.dtype)
        states.append(x.float())
    return Trajectory(
        sigmas, torch.stack(states), torch.stack(velocities), torch.stack(negatives) if negatives else None
    )
