"""Flux (FLUX.1-dev/schnell and any-size tiny variants): ``[text; image]``, RoPE, double + single blocks.

One module for the architecture: the locator (:class:`FluxAdapter`), the capture processor
(:class:`FluxCaptureProcessor`), the text layout (:func:`flux_tokens`) and the call plumbing (:class:`FluxCall`:
packed latents, image ids, one velocity call, as ``FluxPipeline.__call__`` prepares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..capture import CaptureProcessor, CaptureSite, require_stock, reroute, uses_native_sdpa
from ..tokens import PromptTokens, t5_tokens
from . import check_size, register_adapter
from .base import Adapter, ForwardContext, LayerInfo, clean_latents

#: Flux's guidance-embedding input when none is given (``FluxPipeline``'s default ``guidance_scale``).
DEFAULT_GUIDANCE = 3.5


@register_adapter(FluxTransformer2DModel)
class FluxAdapter(Adapter):
    """``FluxTransformer2DModel``: 19 double-stream + 38 single-stream blocks in FLUX.1 (any count works).

    Double-stream blocks see text and image as two streams joined inside attention (``[text; image]``);
    single-stream blocks receive the already-joined sequence with ``encoder_hidden_states=None``, so their
    text length comes from the forward call (the trace reads it before the blocks run). Flux's true CFG runs
    the transformer twice per step, conditional first: the trace tells the calls apart by their timestep.
    """

    name = "flux"
    text_first = True
    has_model_call = True

    def layers(self, transformer: torch.nn.Module) -> list[LayerInfo]:
        infos = [
            LayerInfo(index=i, name=f"transformer_blocks.{i}.attn", kind="double", block=i)
            for i in range(len(transformer.transformer_blocks))
        ]
        offset = len(infos)
        infos += [
            LayerInfo(index=offset + i, name=f"single_transformer_blocks.{i}.attn", kind="single", block=i)
            for i in range(len(transformer.single_transformer_blocks))
        ]
        return infos

    def forward_context(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardContext:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        img_ids = kwargs["img_ids"]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        # img_ids hold (0, row, col) per packed latent token; the grid is their extent, whatever the image size.
        h = int(img_ids[:, 1].max().item()) + 1
        w = int(img_ids[:, 2].max().item()) + 1
        if h * w != hidden_states.shape[1]:
            raise ValueError(
                f"img_ids describe a {h}x{w} grid but the transformer got {hidden_states.shape[1]} image tokens"
            )
        timestep = kwargs["timestep"]
        return ForwardContext(
            grid=(h, w),
            text_length=kwargs["encoder_hidden_states"].shape[1],
            batch_size=hidden_states.shape[0],
            timestep=float(timestep.flatten()[0].item()),
        )

    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> PromptTokens:
        return flux_tokens(pipe, prompt, text_length)

    def encode_text(self, pipe: Any, prompts: Sequence[str], text_length: int) -> torch.Tensor:
        return pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=pipe.transformer.device, max_sequence_length=text_length
        )[0]

    def text_length(self, pipe: Any, max_sequence_length: int | None) -> int:
        return max_sequence_length or 512  # FluxPipeline's default

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2

    def make_processor(self, original: Any, site: CaptureSite) -> FluxCaptureProcessor:
        return FluxCaptureProcessor(original, site)

    def model_call(
        self,
        pipe: Any,
        height: int,
        width: int,
        *,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FluxCall:
        return FluxCall(
            pipe,
            height,
            width,
            DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale,
            true_cfg_scale,
            negative,
        )


def flux_tokens(pipe: Any, prompt: str, text_length: int) -> PromptTokens:
    """Flux's text sequence: the T5 tokens of ``pipe.tokenizer_2``, ``text_length`` = ``max_sequence_length``."""
    return t5_tokens(pipe.tokenizer_2, prompt, text_length)


class FluxCaptureProcessor(CaptureProcessor, FluxAttnProcessor):
    """``FluxAttnProcessor`` whose ``dispatch_attention_fn`` call goes through a :class:`CaptureSite`.

    Flux hands the kernel ``(B, S, H, D)`` tensors; the site works in ``(B, H, S, D)`` (transposed views).
    """

    def __init__(self, original: FluxAttnProcessor, site: CaptureSite):
        require_stock(original, FluxAttnProcessor)
        super().__init__()
        self._attention_backend = original._attention_backend
        self._parallel_config = original._parallel_config
        self.original = original
        self.site = site
        self._routed_call = reroute(FluxAttnProcessor.__call__, dispatch_attention_fn=self._dispatch)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._routed_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _dispatch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        def original() -> torch.Tensor:
            return dispatch_attention_fn(query, key, value, **kwargs).transpose(1, 2)

        def plain() -> bool:
            return (
                kwargs.get("attn_mask") is None
                and not kwargs.get("dropout_p")
                and not kwargs.get("is_causal")
                and not kwargs.get("enable_gqa")
                and kwargs.get("parallel_config") is None
                and not kwargs.get("attention_kwargs")
                and uses_native_sdpa(kwargs.get("backend"))
            )

        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return self.site.attend(q, k, v, kwargs.get("scale"), plain, original).transpose(1, 2)


# ------------------------------------------------------------------------------------------- call plumbing
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` as ``FluxPipeline`` packs them: ``(B, H/2 · W/2, 4C)`` tokens of 2×2 latent pixels."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: tokens ``(B, H/2 · W/2, 4C)`` -> latents ``(B, C, height, width)``."""
    return FluxPipeline._unpack_latents(tokens, height, width, vae_scale_factor=1)


def latent_image_ids(height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """``FluxPipeline``'s position ids ``(H/2 · W/2, 3)`` of the packed tokens of an ``H × W`` latent."""
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def flux_velocity(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    guidance: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer call as ``FluxPipeline`` makes it: packed ``x (B, N, C)`` at ``sigma (B,)`` (the timestep
    divided by 1000) -> velocity ``(B, N, C)``. ``guidance`` (a scale, or ``(B,)``) is passed only to a
    guidance-distilled transformer (``config.guidance_embeds``)."""
    b = x.shape[0]
    if not transformer.config.guidance_embeds:
        guidance = None
    elif guidance is None or not torch.is_tensor(guidance):
        guidance = torch.full(
            (b,), DEFAULT_GUIDANCE if guidance is None else guidance, device=x.device, dtype=torch.float32
        )
    return transformer(
        hidden_states=x,
        timestep=sigma.to(x.dtype),
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


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
    guidance_scale: float = DEFAULT_GUIDANCE
    true_cfg_scale: float = 1.0
    negative: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        transformer = self.pipe.transformer
        check_size(self.pipe, self.height, self.width)
        self.channels = transformer.config.in_channels
        scale = self.pipe.vae_scale_factor
        self.latent_hw = (2 * (self.height // (scale * 2)), 2 * (self.width // (scale * 2)))
        h, w = self.latent_hw
        self.n_tokens = (h // 2) * (w // 2)
        self.img_ids = latent_image_ids(h, w, transformer.device, transformer.dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """Set the pipeline's scheduler for ``steps`` steps as ``FluxPipeline.__call__`` does (linear sigmas from 1
        to 1/steps, the resolution-dependent shift ``mu`` where the scheduler shifts dynamically); returns its
        sigmas ``(steps + 1,)``, from ~1 down to 0."""
        scheduler = self.pipe.scheduler
        cfg = scheduler.config
        mu = calculate_shift(self.n_tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        kwargs = {"mu": mu} if cfg.get("use_dynamic_shifting", False) else {}
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu", **kwargs)
        return scheduler.sigmas.detach().clone().float()

    def encode(
        self, prompts: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, device=self.pipe.transformer.device,
                max_sequence_length=max_sequence_length,
            )

    #: Flux's whole text sequence is T5's: word embeddings feed it from position 0.
    embedding_offset = 0

    @property
    def embedding_tokenizer(self) -> Any:
        """The tokenizer of :meth:`token_ids` (T5's)."""
        return self.pipe.tokenizer_2

    def token_ids(self, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        """The T5 token ids ``(B, L)`` of ``prompts`` as ``encode_prompt`` tokenizes them (padded, truncated)."""
        ids = self.pipe.tokenizer_2(
            list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.pipe.text_encoder_2.device)

    def token_embedding(self) -> torch.nn.Embedding:
        """The T5 input-embedding table ``(V, E)`` the token ids index."""
        return self.pipe.text_encoder_2.get_input_embeddings()

    def encode_token_embeddings(
        self, inputs: torch.Tensor, pooled_prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode`` from T5 input embeddings ``(B, L, E)`` instead of words, differentiable in ``inputs``: what
        white-box attacks optimise. The pooled CLIP vector has no word-embedding path here, so it is taken from
        ``pooled_prompts`` (one per row)."""
        embeds = self.pipe.text_encoder_2(inputs_embeds=inputs)[0].to(self.pipe.transformer.dtype)
        with torch.no_grad():
            _, pooled, text_ids = self.pipe.encode_prompt(
                prompt=list(pooled_prompts), prompt_2=None, device=self.pipe.transformer.device,
                max_sequence_length=inputs.shape[1],
            )
        return embeds, pooled, text_ids

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Clean latents ``(B, N, C)`` of uint8 RGB images ``(H, W, 3)`` (this call's size), as the sampler's
        final state would be before decoding: the VAE's mode, shifted and scaled, packed."""
        return pack_latents(clean_latents(self.pipe, images))

    def noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Packed Gaussian latents ``(B, N, C)``, drawn as ``FluxPipeline.prepare_latents`` draws them."""
        h, w = self.latent_hw
        transformer = self.pipe.transformer
        x = torch.randn(
            (batch, self.channels // 4, h, w), generator=generator, device=generator.device, dtype=torch.float32
        )
        return pack_latents(x.to(transformer.device, transformer.dtype))

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
        return flux_velocity(transformer, x, sigma, embeds, pooled, text_ids, self.img_ids, self.guidance_scale)

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
    def wants_negative(self) -> bool:
        """Whether sampling guides against a negative prompt (then set :attr:`negative`)."""
        return self.true_cfg_scale > 1

    @property
    def guided(self) -> bool:
        """Whether sampling uses true classifier-free guidance."""
        return self.wants_negative and self.negative is not None

    @property
    def guidance_gain(self) -> float:
        return self.true_cfg_scale if self.guided else 1.0


__all__ = [
    "DEFAULT_GUIDANCE",
    "FluxAdapter",
    "FluxCall",
    "FluxCaptureProcessor",
    "flux_tokens",
    "flux_velocity",
    "latent_image_ids",
    "pack_latents",
    "unpack_latents",
]
