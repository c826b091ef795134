"""Calling the Flux transformer directly: prompt encoding, latent geometry, velocities with attention maps,
and few-step sampling with the base model through the pipeline's own scheduler.

Training never goes through ``pipe(...)``: it needs the velocity at a chosen ``x_t`` (and the attention maps of
that call, with gradient), so this module prepares exactly the inputs ``FluxPipeline.__call__`` would give the
transformer (packed latents, ``img_ids``, ``txt_ids``, ``timestep = sigma``, pooled CLIP vector, guidance for
guidance-distilled models) and calls it.

Shapes: ``N`` image tokens (packed 2×2 latent patches), ``C`` = transformer ``in_channels``, ``L`` text
positions (= ``max_sequence_length``), ``D`` text width. Latents are ``(B, N, C)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import attnscope
from attnscope.tokens import PromptTokens, flux_tokens

__all__ = ["FluxCall", "PromptBank", "Trajectory", "flow_sigmas", "sample_trajectory"]


class PromptBank:
    """Encodes each prompt once (text encoders are frozen) and remembers its token layout.

    ``get(prompts)`` -> ``(embeds (B, L, D), pooled (B, P))`` on the transformer's device and dtype.
    """

    def __init__(self, pipe: Any, max_sequence_length: int):
        self.pipe = pipe
        self.length = max_sequence_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tokens: dict[str, PromptTokens] = {}
        self.text_ids: torch.Tensor | None = None

    def encode(self, prompts: Sequence[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if not missing:
            return
        device, dtype = self.pipe.transformer.device, self.pipe.transformer.dtype
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=missing, prompt_2=None, device=device, max_sequence_length=self.length
            )
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
            self._tokens[prompt] = flux_tokens(self.pipe, prompt, self.length)
        return self._tokens[prompt]

    def positions(self, prompt: str, word: str) -> tuple[int, ...]:
        """Text positions of ``word`` in ``prompt`` (UnknownWordError / TruncatedWordError if absent)."""
        return self.tokens(prompt).positions(word)


@dataclass
class FluxCall:
    """Everything but the prompt and ``x_t`` that a Flux transformer call needs, for one image size.

    ``height``/``width`` in pixels; ``img_ids (N, 3)``; ``n_tokens = N``; ``channels = C``. With
    ``true_cfg_scale`` > 1 and the ``negative`` prompt's ``(embeds (1, L, D), pooled (1, P))``, sampling uses true
    classifier-free guidance exactly as ``FluxPipeline`` does (``v_neg + s·(v − v_neg)``).
    """

    pipe: Any
    height: int
    width: int
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    negative: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        transformer = self.pipe.transformer
        attnscope.check_size(self.pipe, self.height, self.width)
        self.channels = transformer.config.in_channels
        scale = self.pipe.vae_scale_factor
        self.latent_hw = (2 * (self.height // (scale * 2)), 2 * (self.width // (scale * 2)))
        h, w = self.latent_hw
        self.n_tokens = (h // 2) * (w // 2)
        self.img_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, transformer.device, transformer.dtype)

    def noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Packed Gaussian latents ``(B, N, C)``, drawn as ``FluxPipeline.prepare_latents`` draws them."""
        h, w = self.latent_hw
        shape = (batch, self.channels // 4, h, w)
        transformer = self.pipe.transformer
        x = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        x = x.to(transformer.device, transformer.dtype)
        return self.pipe._pack_latents(x, batch, self.channels // 4, h, w)

    def velocity(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: torch.Tensor,
    ) -> torch.Tensor:
        """``v(x, sigma, text)``: x ``(B, N, C)``, sigma ``(B,)`` in [0, 1] -> ``(B, N, C)``."""
        b = x.shape[0]
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        return transformer(
            hidden_states=x,
            timestep=sigma.to(x.dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]

    def sampling_velocity(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(velocity the sampler follows, conditional velocity, negative-prompt velocity or None)``; without
        true CFG the first two are the same tensor."""
        v = self.velocity(transformer, x, sigma, embeds, pooled, text_ids)
        if not self.guided:
            return v, v, None
        b = x.shape[0]
        neg_embeds, neg_pooled = (t.expand(b, *t.shape[1:]) for t in self.negative)
        v_neg = self.velocity(transformer, x, sigma, neg_embeds, neg_pooled, text_ids)
        return v_neg + self.true_cfg_scale * (v - v_neg), v, v_neg

    @property
    def guided(self) -> bool:
        """Whether sampling uses true classifier-free guidance."""
        return self.true_cfg_scale > 1 and self.negative is not None


def flow_sigmas(pipe: Any, steps: int, n_tokens: int) -> torch.Tensor:
    """The pipeline scheduler's sigmas for ``steps`` steps, ``(steps + 1,)`` from ~1 down to 0.

    Same schedule as ``FluxPipeline.__call__`` (incl. the resolution-dependent shift ``mu``).
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = pipe.scheduler
    cfg = scheduler.config
    mu = calculate_shift(
        n_tokens,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    kwargs = {"mu": mu} if cfg.get("use_dynamic_shifting", False) else {}
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
    return scheduler.sigmas.detach().clone().float()


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
    call: FluxCall,
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
    sigmas = flow_sigmas(call.pipe, steps, call.n_tokens)  # also starts a new run of the scheduler
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
