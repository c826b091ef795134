"""The SD3-form shapes model: a ``StableDiffusion3Pipeline`` that draws the shapes world, distilled from the
bundled Flux-form model (``attnscope.load_pipeline("shapes-sd3")``; trained by ``attnscope shapes train-sd3``).

Parts (all standard diffusers / transformers classes but the scheduler, as in ``model.py``):

* ``text_encoder_3`` / ``tokenizer_3``, ``vae``: the teacher's trained positional T5 and pixel-space VAE, frozen.
  The T5 is where word order enters (``model.py``), and sharing it and the latent space makes the teacher's
  velocity a target the student can be asked for at the very same inputs.
* ``scheduler``: the teacher's re-noising sampler with the student's own shift and threshold
  (:func:`build_sd3_scheduler`).
* ``text_encoder`` / ``text_encoder_2`` (the CLIP-L / CLIP-G slots): one-layer ``CLIPTextModelWithProjection``
  encoders over the shapes CLIP tokenizer (``CLIP_MAX_LENGTH`` positions). SD3 feeds their penultimate hidden
  states, concatenated and zero-padded to the T5 width, as the first text positions of the joint sequence; with one
  layer that is the token embedding (position embeddings are zero and frozen), which starts at zero and is trained,
  so a word's CLIP position carries what the student learns to put there (the grounding loss asks it to localize).
* The pooled vector: SD3 adds it to the timestep embedding for every image token, which tells every image token
  what the prompt asks for and destroys localization (``model.py``). ``time_text_embed.text_embedder.linear_2``
  has zero weights, frozen: the pooled path adds a constant, the teacher's guidance embedding at scale 1, so the
  student's conditioning starts equal to the teacher's conditional call.
* ``transformer``: ``SD3Transformer2DModel`` (patch 2, RMS qk-norm as SD3.5), ``joint_layers`` joint blocks. The
  first blocks start as copies of the teacher's dual-stream blocks (same modules, same names; the packed-token
  input and output layers become the patch embedding and the un-patchify layer), the rest as identity blocks
  (adaLN-Zero gates at zero). What does not carry over: Flux's RoPE (SD3 adds fixed sin-cos positions to the
  patches instead) and its single-stream blocks, which the extra joint blocks learn to replace.

Sampled as SD3 is, with true classifier-free guidance against the empty prompt: ``[uncond, cond]`` in one batch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from attnscope.sampling import FlowMatchRenoisingScheduler

from .model import build_clip_tokenizer, build_scheduler, clip_config

#: The student's sampler, chosen for two-object accuracy on seeds the eval does not use: more of the steps at high
#: noise than its teacher's (shift 3), and fresh noise only above 0.5 (benchmarks/RESULTS.md).
SD3_SAMPLER_SHIFT = 4.0
SD3_RENOISE_ABOVE = 0.5

#: Joint-block modules a teacher's dual-stream block gives a student's (identical names and shapes in diffusers).
_COPIED_FROM_DOUBLE = ("norm1.", "norm1_context.", "attn.", "ff.", "ff_context.")


@dataclass
class SD3ShapesConfig:
    """Sizes of the SD3-form shapes model; the defaults are the bundled one's."""

    joint_layers: int = 6
    hidden_heads: int = 4
    head_dim: int = 32
    clip_hidden: int = 32  # each of the two CLIP slots; the pooled vector is twice as wide

    @property
    def hidden(self) -> int:
        return self.hidden_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def build_sd3_transformer(cfg: SD3ShapesConfig, text_width: int, latent_channels: int) -> SD3Transformer2DModel:
    """A fresh SD3 transformer for 32-pixel latents of ``latent_channels`` and text ``text_width`` wide, its pooled
    path a frozen constant (zero here; ``transfer_from_flux`` sets it)."""
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=cfg.joint_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.hidden_heads,
        joint_attention_dim=text_width,
        caption_projection_dim=cfg.hidden,
        pooled_projection_dim=2 * cfg.clip_hidden,
        pos_embed_max_size=32,  # up to 64 pixels a side
        qk_norm="rms_norm",
    )
    last = transformer.time_text_embed.text_embedder.linear_2
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    transformer.time_text_embed.text_embedder.requires_grad_(False)
    return transformer


def transfer_from_flux(student: SD3Transformer2DModel, teacher: FluxTransformer2DModel) -> None:
    """Start ``student`` as close to ``teacher`` as the architectures allow (see the module docstring).

    Flux packs a 2×2 latent patch into channels ordered (channel, row, column); SD3's patch embedding is a
    convolution over the same patch, and its un-patchify reads the output as (row, column, channel).
    """
    flux, sd3 = teacher.state_dict(), student.state_dict()
    hidden = student.config.num_attention_heads * student.config.attention_head_dim
    patch, channels = student.config.patch_size, student.config.in_channels
    if teacher.inner_dim != hidden or teacher.config.in_channels != channels * patch * patch:
        raise ValueError(f"the teacher (hidden {teacher.inner_dim}, {teacher.config.in_channels} packed channels) "
                         f"does not match the student (hidden {hidden}, {channels} channels, patch {patch})")
    copied = {
        "pos_embed.proj.weight": flux["x_embedder.weight"].reshape(hidden, channels, patch, patch),
        "pos_embed.proj.bias": flux["x_embedder.bias"],
        "proj_out.weight": flux["proj_out.weight"].reshape(channels, patch, patch, hidden).permute(1, 2, 0, 3)
        .reshape(-1, hidden),
        "proj_out.bias": flux["proj_out.bias"].reshape(channels, patch, patch).permute(1, 2, 0).reshape(-1),
    }
    for prefix in ("time_text_embed.timestep_embedder.", "context_embedder.", "norm_out."):
        copied |= {k: v for k, v in flux.items() if k.startswith(prefix)}
    copies = teacher.config.num_layers
    if sum(not block.context_pre_only for block in student.transformer_blocks) < copies:
        raise ValueError(f"the student needs more than {copies} joint blocks (one per teacher dual-stream block, "
                         "then SD3's last block, whose text stream ends in its attention)")
    for name, value in flux.items():
        block = re.match(r"transformer_blocks\.(\d+)\.(.*)", name)
        if block and int(block[1]) < copies and block[2].startswith(_COPIED_FROM_DOUBLE):
            copied[name] = value
    for i in range(copies, len(student.transformer_blocks)):
        copied |= _identity_gates(sd3, i)
    if teacher.config.guidance_embeds:
        copied["time_text_embed.text_embedder.linear_2.bias"] = guidance_embedding(teacher, 1.0)
    student.load_state_dict(sd3 | copied)


def _identity_gates(state: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """Block ``block``'s image-stream adaLN-Zero weights with the attention and MLP gates at zero (an identity block
    on the image stream; its text stream feeds only later blocks' keys, which start ignoring nothing new)."""
    gated = {}
    for suffix in ("weight", "bias"):
        name = f"transformer_blocks.{block}.norm1.linear.{suffix}"
        value = state[name].clone()
        width = value.shape[0] // 6  # (shift, scale, gate) for attention, then for the MLP
        for gate in (2, 5):
            value[gate * width:(gate + 1) * width] = 0
        gated[name] = value
    return gated


@torch.no_grad()
def guidance_embedding(teacher: FluxTransformer2DModel, scale: float) -> torch.Tensor:
    """What a guidance-distilled Flux transformer adds to its conditioning at guidance ``scale`` ``(hidden,)``."""
    embed = teacher.time_text_embed
    projected = embed.time_proj(torch.tensor([scale * 1000.0]))  # FluxTransformer2DModel scales guidance by 1000
    return embed.guidance_embedder(projected.to(embed.guidance_embedder.linear_1.weight.dtype))[0]


def build_clip_encoders(cfg: SD3ShapesConfig, tokenizer: CLIPTokenizer) -> tuple[CLIPTextModelWithProjection, ...]:
    """The two one-layer CLIP encoders: token embeddings at zero (trained), position embeddings zero and frozen."""
    encoders = []
    for _ in range(2):
        encoder = CLIPTextModelWithProjection(clip_config(tokenizer, cfg.clip_hidden))
        embeddings = encoder.text_model.embeddings
        with torch.no_grad():
            embeddings.token_embedding.weight.zero_()
            embeddings.position_embedding.weight.zero_()
        encoder.requires_grad_(False)
        embeddings.token_embedding.weight.requires_grad_(True)
        encoders.append(encoder)
    return tuple(encoders)


def build_sd3_scheduler() -> FlowMatchRenoisingScheduler:
    """The student's sampler: the teacher's kind, at ``SD3_SAMPLER_SHIFT`` and ``SD3_RENOISE_ABOVE``."""
    return build_scheduler(SD3_SAMPLER_SHIFT, SD3_RENOISE_ABOVE)


def assemble_sd3_pipeline(
    cfg: SD3ShapesConfig,
    transformer: SD3Transformer2DModel,
    clips: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
    t5: T5EncoderModel,
    t5_tokenizer: T5Tokenizer,
    vae: AutoencoderKL,
) -> StableDiffusion3Pipeline:
    """The pipeline of trained parts with the student's sampler (both CLIP slots share the shapes CLIP tokenizer)."""
    clip_tokenizer = build_clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=build_sd3_scheduler(), vae=vae.eval(),
        text_encoder=clips[0].eval(), tokenizer=clip_tokenizer,
        text_encoder_2=clips[1].eval(), tokenizer_2=clip_tokenizer,
        text_encoder_3=t5.eval(), tokenizer_3=t5_tokenizer,
    )


__all__ = [
    "SD3_RENOISE_ABOVE", "SD3_SAMPLER_SHIFT", "SD3ShapesConfig", "assemble_sd3_pipeline", "build_clip_encoders",
    "build_sd3_scheduler", "build_sd3_transformer",
    "guidance_embedding", "transfer_from_flux",
]
