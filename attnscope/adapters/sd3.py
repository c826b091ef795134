"""Stable Diffusion 3 / 3.5: ``[image; text]``, no RoPE, CFG batched as ``[uncond, cond]``.

One module for the architecture: the locator (:class:`SD3Adapter`), the capture processor
(:class:`SD3CaptureProcessor`), the text layout (:func:`sd3_tokens`: the CLIP positions, 77 on SD3, then T5) and the
call plumbing (:class:`SD3Call`: latents patchified into states, one velocity call, CFG as
``StableDiffusion3Pipeline.__call__`` batches it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..capture import CaptureProcessor, CaptureSite, require_stock, reroute
from ..tokens import PromptTokens, clip_tokens, concat, t5_tokens, zero_tokens
from . import check_size, register_adapter
from .base import Adapter, ForwardContext, LayerInfo, clean_latents

#: ``StableDiffusion3Pipeline``'s default ``guidance_scale`` (classifier-free guidance).
DEFAULT_GUIDANCE = 7.0


@register_adapter(SD3Transformer2DModel)
class SD3Adapter(Adapter):
    """``SD3Transformer2DModel``: every block is dual-stream (``kind="double"``).

    SD3.5's extra image-only attention (``attn2``, called without text) is not a joint attention: it is left
    untouched and nothing is captured from it. The text stream is the CLIP tokenizer's positions (77 on SD3) followed by
    the T5 sequence.
    """

    name = "sd3"
    text_first = False
    has_model_call = True

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    @classmethod
    def for_transformer(cls, transformer: torch.nn.Module) -> SD3Adapter:
        return cls(patch_size=transformer.config.patch_size)

    def layers(self, transformer: torch.nn.Module) -> list[LayerInfo]:
        return [
            LayerInfo(index=i, name=f"transformer_blocks.{i}.attn", kind="double", block=i)
            for i in range(len(transformer.transformer_blocks))
        ]

    def forward_context(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardContext:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder_hidden_states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
        b, _, height, width = hidden_states.shape
        patch = self.patch_size
        return ForwardContext(
            grid=(height // patch, width // patch),
            text_length=encoder_hidden_states.shape[1],
            batch_size=b,
            timestep=float(timestep.flatten()[0].item()),
        )

    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> PromptTokens:
        return sd3_tokens(pipe, prompt, text_length)

    def encode_text(self, pipe: Any, prompts: Sequence[str], text_length: int) -> torch.Tensor:
        return pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe.transformer.device,
            do_classifier_free_guidance=False, max_sequence_length=text_length - pipe.tokenizer_max_length,
        )[0]

    def text_length(self, pipe: Any, max_sequence_length: int | None) -> int:
        # The CLIP positions (77 on SD3), then T5 (256 is StableDiffusion3Pipeline's default).
        return pipe.tokenizer_max_length + (max_sequence_length or 256)

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def make_processor(self, original: Any, site: CaptureSite) -> SD3CaptureProcessor:
        return SD3CaptureProcessor(original, site)

    def model_call(
        self,
        pipe: Any,
        height: int,
        width: int,
        *,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SD3Call:
        if true_cfg_scale > 1:
            raise ValueError("SD3 pipelines guide with guidance_scale (classifier-free guidance against the negative "
                             "prompt); true_cfg_scale is Flux's")
        return SD3Call(pipe, height, width, DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale, negative)

    def conditional_rows(self, batch_size: int, n_prompts: int | None) -> slice:
        # With CFG the pipeline concatenates [negative; positive] embeddings: the prompted rows are the second half.
        if n_prompts is not None and batch_size == 2 * n_prompts:
            return slice(n_prompts, batch_size)
        return slice(0, batch_size)

    def unconditional_rows(self, batch_size: int, n_prompts: int | None) -> slice | None:
        if n_prompts is not None and batch_size == 2 * n_prompts:
            return slice(0, n_prompts)
        return None


def sd3_tokens(pipe: Any, prompt: str, text_length: int) -> PromptTokens:
    """SD3's text sequence: CLIP (``pipe.tokenizer``, ``pipe.tokenizer_max_length``: 77 on SD3) then T5
    (``pipe.tokenizer_3``, the rest of ``text_length``).

    Without ``pipe.text_encoder_3`` (or ``tokenizer_3``) the T5 positions hold zeros: padding, in no word.
    """
    clip_length = pipe.tokenizer_max_length
    if text_length <= clip_length:
        raise ValueError(f"SD3 text length {text_length} must exceed the {clip_length} CLIP positions")
    clip = clip_tokens(pipe.tokenizer, prompt, clip_length)
    if getattr(pipe, "text_encoder_3", None) is None or getattr(pipe, "tokenizer_3", None) is None:
        t5 = zero_tokens(prompt, text_length - clip_length, offset=clip_length)
    else:
        t5 = t5_tokens(pipe.tokenizer_3, prompt, text_length - clip_length, offset=clip_length)
    return concat(clip, t5)


class _RoutedFunctional:
    """``torch.nn.functional`` as seen by one SD3 processor: SDPA replaced, everything else passed through."""

    def __init__(self, sdpa: Callable[..., torch.Tensor]):
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


class SD3CaptureProcessor(CaptureProcessor, JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` whose ``F.scaled_dot_product_attention`` call goes through a site.

    Calls without text (SD3.5's ``attn2`` never gets here: it keeps its own processor) pass straight through.
    """

    def __init__(self, original: JointAttnProcessor2_0, site: CaptureSite):
        require_stock(original, JointAttnProcessor2_0)
        super().__init__()
        self.original = original
        self.site = site
        self._routed_call = reroute(JointAttnProcessor2_0.__call__, F=_RoutedFunctional(self._sdpa))
        self._has_text = False

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.FloatTensor | tuple[torch.FloatTensor, torch.FloatTensor]:
        self._has_text = encoder_hidden_states is not None
        return self._routed_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def _sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        def original() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)

        if not self._has_text:
            return original()

        def plain() -> bool:
            return (
                not args
                and kwargs.get("attn_mask") is None
                and not kwargs.get("dropout_p")
                and not kwargs.get("is_causal")
            )

        return self.site.attend(query, key, value, kwargs.get("scale"), plain, original)


# ------------------------------------------------------------------------------------------- call plumbing
def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` as states ``(B, H/p · W/p, p·p·C)``: one row per transformer image token, in the
    patch embedding's (row-major) token order, channels ordered as SD3's un-patchify reads its output."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(states: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: states ``(B, N, p·p·C)`` -> latents ``(B, C, height, width)``."""
    b, _, d = states.shape
    c = d // (patch * patch)
    x = states.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


@dataclass
class SD3Call:
    """Everything but the prompt and ``x_t`` that an SD3 transformer call needs, for one image size.

    States are patchified latents ``(B, N, p·p·C)`` (:func:`patchify`), so that ``N`` is the transformer's image
    token count as in every :class:`~attnscope.adapters.base.ModelCall`. ``text_length`` counts the CLIP positions
    and the T5 ones (what :meth:`SD3Adapter.text_length` gives); ``pipe.encode_prompt`` takes the T5 part. With
    ``guidance_scale`` > 1 and the ``negative`` prompt's ``(embeds (1, L, D), pooled (1, P))``, sampling batches
    ``[negative, prompt]`` in one call and follows ``v_neg + s·(v − v_neg)``, as ``StableDiffusion3Pipeline`` does.
    """

    pipe: Any
    height: int
    width: int
    guidance_scale: float = DEFAULT_GUIDANCE
    negative: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        transformer = self.pipe.transformer
        check_size(self.pipe, self.height, self.width)
        self.patch = transformer.config.patch_size
        scale = self.pipe.vae_scale_factor
        self.latent_hw = (self.height // scale, self.width // scale)
        h, w = self.latent_hw
        self.n_tokens = (h // self.patch) * (w // self.patch)
        self.channels = self.patch * self.patch * transformer.config.in_channels

    @property
    def wants_negative(self) -> bool:
        """Whether sampling guides against a negative prompt (then set :attr:`negative`)."""
        return self.guidance_scale > 1

    @property
    def guided(self) -> bool:
        return self.wants_negative and self.negative is not None

    @property
    def guidance_gain(self) -> float:
        return self.guidance_scale if self.guided else 1.0

    def sigmas(self, steps: int) -> torch.Tensor:
        """Set the pipeline's scheduler for ``steps`` steps as ``StableDiffusion3Pipeline.__call__`` does (the
        scheduler's own spacing, the resolution-dependent shift ``mu`` where it shifts dynamically); returns its
        sigmas ``(steps + 1,)``, from ~1 down to 0."""
        scheduler = self.pipe.scheduler
        cfg = scheduler.config
        kwargs = {}
        if cfg.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(self.n_tokens, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device="cpu", **kwargs)
        return scheduler.sigmas.detach().clone().float()

    def _t5_length(self, text_length: int) -> int:
        t5_length = text_length - self.pipe.tokenizer_max_length
        if t5_length < 1:
            raise ValueError(f"SD3 text length {text_length} must exceed the {self.pipe.tokenizer_max_length} "
                             "CLIP positions")
        return t5_length

    def encode(self, prompts: Sequence[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``(embeds (B, L, D), pooled (B, P), None)``: SD3 has no text position ids."""
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.pipe.transformer.device,
                do_classifier_free_guidance=False, max_sequence_length=self._t5_length(max_sequence_length),
            )
        return embeds, pooled, None

    def _t5(self) -> Any:
        if getattr(self.pipe, "text_encoder_3", None) is None:
            raise ValueError("this SD3 pipeline has no T5 encoder (text_encoder_3): attacks on word embeddings "
                             "edit the T5 positions")
        return self.pipe.text_encoder_3

    @property
    def embedding_offset(self) -> int:
        """Text position of the first row that T5 word embeddings feed (after the CLIP positions)."""
        return self.pipe.tokenizer_max_length

    @property
    def embedding_tokenizer(self) -> Any:
        """The tokenizer of :meth:`token_ids` (T5's)."""
        self._t5()
        return self.pipe.tokenizer_3

    def token_ids(self, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        """The T5 token ids ``(B, L_t5)`` of ``prompts``, padded and truncated to ``max_sequence_length`` T5
        positions."""
        ids = self.embedding_tokenizer(
            list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        return ids.to(self._t5().device)

    def token_embedding(self) -> torch.nn.Embedding:
        """The T5 input-embedding table ``(V, E)`` the token ids index."""
        return self._t5().get_input_embeddings()

    def encode_token_embeddings(
        self, inputs: torch.Tensor, pooled_prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``encode`` with the T5 positions computed from T5 input embeddings ``(B, L_t5, E)``, differentiable in
        ``inputs`` (what white-box attacks optimise); the CLIP positions and the pooled vector have no path from
        those embeddings, so they are ``pooled_prompts``' (one per row)."""
        t5 = self._t5()(inputs_embeds=inputs)[0].to(self.pipe.transformer.dtype)
        clip_length = self.pipe.tokenizer_max_length
        embeds, pooled, _ = self.encode(pooled_prompts, clip_length + inputs.shape[1])
        return torch.cat([embeds[:, :clip_length], t5], dim=1), pooled, None

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Clean states ``(B, N, C)`` of uint8 RGB images ``(H, W, 3)`` (this call's size): the VAE's mode,
        shifted and scaled as the pipeline undoes before decoding, patchified."""
        return patchify(clean_latents(self.pipe, images), self.patch)

    def noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian states ``(B, N, C)``, drawn as ``StableDiffusion3Pipeline.prepare_latents`` draws its latents."""
        h, w = self.latent_hw
        transformer = self.pipe.transformer
        x = torch.randn((batch, transformer.config.in_channels, h, w), generator=generator,
                        device=generator.device, dtype=torch.float32)
        return patchify(x.to(transformer.device, transformer.dtype), self.patch)

    def velocity(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: None = None,
    ) -> torch.Tensor:
        """``v(x, sigma, text)``: x ``(B, N, C)``, sigma ``(B,)`` in [0, 1] -> ``(B, N, C)``."""
        latents = unpatchify(x, self.patch, *self.latent_hw)
        out = transformer(
            hidden_states=latents, timestep=(sigma * 1000).to(x.dtype), encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        return patchify(out, self.patch)

    def sampling_velocity(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(velocity the sampler follows, conditional velocity, negative-prompt velocity or None)``; with CFG the
        negative and conditional rows run as one ``[negative, prompt]`` batch, as the pipeline runs them."""
        if not self.guided:
            v = self.velocity(transformer, x, sigma, embeds, pooled)
            return v, v, None
        b = x.shape[0]
        neg_embeds, neg_pooled = (t.expand(b, *t.shape[1:]) for t in self.negative)
        both = self.velocity(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]),
                             torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled]))
        v_neg, v = both.chunk(2)
        return v_neg + self.guidance_scale * (v - v_neg), v, v_neg


__all__ = ["DEFAULT_GUIDANCE", "SD3Adapter", "SD3Call", "SD3CaptureProcessor", "patchify", "sd3_tokens", "unpatchify"]
