"""Flux (FLUX.1-dev/schnell and any-size tiny variants): ``[text; image]``, RoPE, double + single blocks."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from ..tokens import PromptTokens, flux_tokens
from .base import Adapter, ForwardContext, LayerInfo


class FluxAdapter(Adapter):
    """``FluxTransformer2DModel``: 19 double-stream + 38 single-stream blocks in FLUX.1 (any count works).

    Double-stream blocks see text and image as two streams joined inside attention (``[text; image]``);
    single-stream blocks receive the already-joined sequence with ``encoder_hidden_states=None``, so their
    text length comes from the forward call (the trace reads it before the blocks run). Flux's true CFG runs
    the transformer twice per step, conditional first: the trace tells the calls apart by their timestep.
    """

    name = "flux"
    text_first = True

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
            raise ValueError(f"img_ids describe a {h}x{w} grid but the transformer got {hidden_states.shape[1]} image tokens")
        timestep = kwargs["timestep"]
        return ForwardContext(
            grid=(h, w),
            text_length=kwargs["encoder_hidden_states"].shape[1],
            batch_size=hidden_states.shape[0],
            timestep=float(timestep.flatten()[0].item()),
        )

    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> PromptTokens:
        return flux_tokens(pipe, prompt, text_length)

    def text_length(self, max_sequence_length: int | None) -> int:
        return max_sequence_length or 512  # FluxPipeline's default

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2

    def make_processor(self, original: Any, site: Any) -> Any:
        from ..capture import FluxCaptureProcessor

        return FluxCaptureProcessor(original, site)


def is_flux(transformer: torch.nn.Module) -> bool:
    return isinstance(transformer, FluxTransformer2DModel)

