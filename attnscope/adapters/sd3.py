"""Stable Diffusion 3 / 3.5: ``[image; text]``, no RoPE, CFG batched as ``[uncond, cond]``."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..tokens import PromptTokens, sd3_tokens
from .base import Adapter, ForwardContext, LayerInfo


class SD3Adapter(Adapter):
    """``SD3Transformer2DModel``: every block is dual-stream (``kind="double"``).

    SD3.5's extra image-only attention (``attn2``, called without text) is not a joint attention: it is left
    untouched and nothing is captured from it. The text stream is 77 CLIP positions followed by the T5 sequence.
    """

    name = "sd3"
    text_first = False

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

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

    def text_length(self, max_sequence_length: int | None) -> int:
        return 77 + (max_sequence_length or 256)  # CLIP positions, then T5 (StableDiffusion3Pipeline's default)

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def make_processor(self, original: Any, site: Any) -> Any:
        from ..capture import SD3CaptureProcessor

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


def is_sd3(transformer: torch.nn.Module) -> bool:
    return isinstance(transformer, SD3Transformer2DModel)
