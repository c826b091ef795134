"""Stable Diffusion 3 / 3.5: ``[image; text]``, no RoPE, CFG batched as ``[uncond, cond]``.

One module for the architecture: the locator (:class:`SD3Adapter`), the capture processor
(:class:`SD3CaptureProcessor`) and the text layout (:func:`sd3_tokens`: 77 CLIP positions, then T5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..capture import CaptureProcessor, CaptureSite, require_stock, reroute
from ..tokens import PromptTokens, clip_tokens, concat, t5_tokens, zero_tokens
from . import register_adapter
from .base import Adapter, ForwardContext, LayerInfo


@register_adapter(SD3Transformer2DModel)
class SD3Adapter(Adapter):
    """``SD3Transformer2DModel``: every block is dual-stream (``kind="double"``).

    SD3.5's extra image-only attention (``attn2``, called without text) is not a joint attention: it is left
    untouched and nothing is captured from it. The text stream is 77 CLIP positions followed by the T5 sequence.
    """

    name = "sd3"
    text_first = False

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

    def text_length(self, max_sequence_length: int | None) -> int:
        return 77 + (max_sequence_length or 256)  # CLIP positions, then T5 (StableDiffusion3Pipeline's default)

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def make_processor(self, original: Any, site: CaptureSite) -> SD3CaptureProcessor:
        return SD3CaptureProcessor(original, site)

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
    """SD3's text sequence: CLIP (``pipe.tokenizer``, 77) then T5 (``pipe.tokenizer_3``, ``text_length - 77``).

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


__all__ = ["SD3Adapter", "SD3CaptureProcessor", "sd3_tokens"]
