"""Construction of the tiny shapes-world Flux pipeline, fully offline (the bundled model's architecture).

Components (standard diffusers / transformers classes but the scheduler, a diffusers subclass; all load with
``FluxPipeline.from_pretrained``):

* ``tokenizer_2`` / ``text_encoder_2``: a T5 tokenizer (Unigram over hand-written ``▁word`` pieces: every
  vocabulary word is one piece except ``MULTI_PIECE`` words, which are two) and a 1-layer ``T5EncoderModel``
  trained jointly with the transformer. Its self-attention is **positional** (``t5_attention="positional"``):
  the query and key projections are frozen at zero, so each head attends by T5's relative-position bias alone,
  initialized to one neighbour offset per head (``POSITIONAL_OFFSETS``). A shape token thus always carries the
  word before it (its colour) and a colour token the word after it (its shape). Flux gives text tokens no
  positions (``txt_ids`` are zero), so this encoder is the only place word order can enter the model: a T5 with
  plain ("content") attention learns near one-hot attention by content with a negligible relative bias, its
  output for "a red circle and a blue square" is a permutation of that for "a blue circle and a red square", and
  the model draws both prompts identically — it cannot bind a colour to a shape. One layer keeps the encoder
  close to non-contextual: deeper content-attention encoders moved shape information onto other tokens and shape
  words stopped localizing.
* ``tokenizer`` / ``text_encoder``: a CLIP BPE tokenizer (``</w>`` pieces, every vocabulary word one piece) and a
  tiny random ``CLIPTextModel``. FluxPipeline needs it for the pooled text vector, but the transformer ignores that
  vector: ``time_text_embed.text_embedder.linear_2`` is zero and frozen, so the pooled path adds a constant zero
  and text reaches the image only through joint attention (with a pooled text vector, localization collapses).
* ``vae``: a one-level ``AutoencoderKL`` (scale factor 1) trained to be the identity on rendered images, so the
  latent space *is* pixel space (normalized by ``shift_factor``/``scaling_factor``). With FluxPipeline's 2×2
  packing a 32×32 image gives 16×16 = 256 image tokens.
* ``transformer``: ``FluxTransformer2DModel`` (hidden 128, 4 double + 2 single blocks). A model trained on data
  has no guidance embedding and is sampled with true classifier-free guidance; a guidance-distilled one
  (``guidance_embeds=True``, ``distill.py``) takes the guidance scale as an input, like FLUX.1-dev, and needs one
  transformer call per step instead of two.
* ``scheduler``: ``attnscope.sampling.FlowMatchRenoisingScheduler`` (``SAMPLER_SHIFT``, ``RENOISE_ABOVE``):
  Euler steps that re-draw their noise while the layout forms, because with plain Euler the model draws an asked
  object twice far more often (sweep in benchmarks/RESULTS.md). diffusers loads it once ``attnscope`` is
  imported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from attnscope.sampling import FlowMatchRenoisingScheduler
from attnscope.shapes import MAX_SEQUENCE_LENGTH
from attnscope.shapes.vocabulary import ALL_WORDS

#: Vocabulary words the T5 tokenizer splits into two pieces, so that word-span code is exercised on the bundled
#: model as it is on real T5 ("scarlet" -> "▁scar" + "let").
MULTI_PIECE: dict[str, tuple[str, str]] = {
    "scarlet": ("▁scar", "let"),
    "emerald": ("▁emer", "ald"),
    "pyramid": ("▁pyra", "mid"),
}
#: Sampler of the bundled model, chosen on seeds the eval does not use (100–115) for two-object accuracy: the
#: shift spends more of the 20 steps at high noise, where the layout forms, and the steps above noise level
#: ``RENOISE_ABOVE`` re-draw their noise (``attnscope.sampling``; below 0.7 re-noising changed no image's reading).
SAMPLER_SHIFT = 3.0
RENOISE_ABOVE = 0.7
#: CLIP tokenizer length (only feeds the ignored pooled vector).
CLIP_MAX_LENGTH = 20
T5_ATTENTION_KINDS = ("positional", "content")
#: Relative offset (key position − query position) each head of a positional T5 starts attending to, cycled over
#: the heads: the previous word (a shape reads its colour), the next (a colour reads its shape), and one further
#: each way for two-piece words ("▁scar let ▁circle").
POSITIONAL_OFFSETS = (-1, 1, -2, 2)
#: Initial bias of a head's own offset over every other (softmax weight ≈ 0.96 on it at 20 tokens); trained on.
POSITIONAL_BIAS = 7.0


@dataclass
class ShapesModelConfig:
    """Sizes of the tiny pipeline. The defaults are the bundled model's."""

    hidden_heads: int = 4
    head_dim: int = 32
    double_layers: int = 4
    single_layers: int = 2
    t5_layers: int = 1
    t5_d_ff: int = 256
    latent_channels: int = 3  # the latent is the RGB image itself (see module docstring)
    clip_hidden: int = 32
    # "positional": T5 self-attention by relative position only (see module docstring); "content": plain T5.
    t5_attention: str = "positional"
    # Whether the transformer takes the guidance scale as an input (a guidance-distilled model, ``distill.py``).
    guidance_embeds: bool = False

    def __post_init__(self) -> None:
        if self.t5_attention not in T5_ATTENTION_KINDS:
            raise ValueError(f"t5_attention must be one of {T5_ATTENTION_KINDS}, not {self.t5_attention!r}")

    @classmethod
    def from_dict(cls, record: dict) -> ShapesModelConfig:
        """The config of a recorded model (a checkpoint's or ``training.json``'s ``model``). Records from before
        ``t5_attention`` existed are content-attention models."""
        return cls(**{"t5_attention": "content", **record})

    @property
    def hidden(self) -> int:
        return self.hidden_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def build_t5_tokenizer() -> T5Tokenizer:
    """T5 tokenizer over the shapes vocabulary: ``▁word`` pieces, a few two-piece words, letter fallback.

    Piece scores make whole words win over letter spellings in Unigram's Viterbi search; letters (with and
    without ``▁``) make every lower-case word tokenizable, so unknown words do not crash the tokenizer (they are
    rejected earlier by ``vocabulary.check_prompt``).
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    for w in sorted(ALL_WORDS):
        if w in MULTI_PIECE:
            vocab += [(p, -3.0) for p in MULTI_PIECE[w]]
        else:
            vocab.append((f"▁{w}", -2.0))
    vocab += [("▁,", -2.0), (",", -2.0), ("▁.", -2.0), (".", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab += [(f"▁{c}", -10.0) for c in letters if f"▁{c}" not in dict(vocab)]
    vocab += [(c, -10.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def encode_text(tokenizer: T5Tokenizer, t5: T5EncoderModel, captions: list[str]) -> torch.Tensor:
    """T5 embeddings exactly as FluxPipeline computes them: padded to MAX_SEQUENCE_LENGTH, no attention mask."""
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return t5(ids.to(t5.device))[0]


def build_clip_tokenizer() -> CLIPTokenizer:
    """CLIP byte-level BPE with ``</w>`` suffixes, trained (deterministically) so every vocabulary word is one piece."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz,."),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(sorted(ALL_WORDS) + [",", "."], trainer=trainer)
    # The merges (in order) are only exposed through the serialized model.
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" "))
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    # The trainer numbers the single-character tokens in hash order, which changes from process to process;
    # renumber them alphabetically (merged tokens keep their order of creation) so the vocabulary is reproducible.
    trained = bpe.get_vocab()
    merged = {a + b for a, b in merges}
    specials = ["<|startoftext|>", "<|endoftext|>"]
    singles = sorted(t for t in trained if t not in merged and t not in specials)
    ordered = specials + singles + sorted((t for t in trained if t in merged), key=trained.__getitem__)
    vocab = {token: i for i, token in enumerate(ordered)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_text_encoders(
    cfg: ShapesModelConfig, t5_tok: T5Tokenizer, clip_tok: CLIPTokenizer
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Random-init CLIP (pooled vector only, ignored) and 1-layer T5 encoders sized for the tokenizers."""
    clip = CLIPTextModel(clip_config(clip_tok, cfg.clip_hidden))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=cfg.hidden,
            d_kv=cfg.head_dim,
            d_ff=cfg.t5_d_ff,
            num_layers=cfg.t5_layers,
            num_heads=cfg.hidden_heads,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=MAX_SEQUENCE_LENGTH,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    if cfg.t5_attention == "positional":
        make_attention_positional(t5)
    return clip, t5


def clip_config(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextConfig:
    """A one-layer CLIP text encoder ``hidden`` wide over ``tokenizer`` (``CLIP_MAX_LENGTH`` positions)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_attention_positional(t5: T5EncoderModel) -> None:
    """Freeze every T5 layer's query and key projections at zero, so attention scores are the relative-position
    bias alone, and start head h on ``POSITIONAL_OFFSETS[h % len(POSITIONAL_OFFSETS)]`` (see module docstring)."""
    for block in t5.encoder.block:
        attention = block.layer[0].SelfAttention
        for proj in (attention.q, attention.k):
            with torch.no_grad():
                proj.weight.zero_()
            proj.weight.requires_grad_(False)
    first = t5.encoder.block[0].layer[0].SelfAttention  # T5 shares the first layer's bias with the others
    offsets = torch.tensor(POSITIONAL_OFFSETS)
    buckets = first._relative_position_bucket(
        offsets, bidirectional=True, num_buckets=first.relative_attention_num_buckets,
        max_distance=first.relative_attention_max_distance,
    )
    with torch.no_grad():
        first.relative_attention_bias.weight.zero_()
        for head in range(first.n_heads):
            first.relative_attention_bias.weight[buckets[head % len(offsets)], head] = POSITIONAL_BIAS


def is_attention_positional(t5: T5EncoderModel) -> bool:
    """Whether ``t5`` is a positional encoder: every layer's query projection is zero."""
    return all(not block.layer[0].SelfAttention.q.weight.any() for block in t5.encoder.block)


def build_transformer(cfg: ShapesModelConfig) -> FluxTransformer2DModel:
    """Tiny Flux transformer whose pooled-text path is a frozen zero (text enters only via joint attention).

    With ``cfg.guidance_embeds`` the guidance embedding's output layer starts at zero, so a student initialized
    from a model without one starts as that model's conditional velocity (``distill.py``)."""
    rope = cfg.head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * cfg.latent_channels,  # FluxPipeline packs 2×2 latent pixels per token
        num_layers=cfg.double_layers,
        num_single_layers=cfg.single_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.hidden_heads,
        joint_attention_dim=cfg.hidden,
        pooled_projection_dim=cfg.clip_hidden,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=(cfg.head_dim - 2 * rope * 3 // 2, rope * 3 // 2, rope * 3 // 2),
    )
    zero_pooled_path(transformer)
    if cfg.guidance_embeds:
        last = transformer.time_text_embed.guidance_embedder.linear_2
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    return transformer


def grown_double_stream(weights: dict[str, torch.Tensor], parent_layers: int, layers: int) -> dict[str, torch.Tensor]:
    """A transformer state dict with ``layers`` double-stream blocks from one with ``parent_layers``: the new
    blocks, appended after the parent's, copy its last ones (cycling when more are asked) with the adaLN-Zero
    gates of both streams at zero, so each new block is the identity and the grown model starts as its parent.

    Why copies rather than fresh weights: the gates open from the first step (their gradient is not zero), and
    what opens then is attention already fitted to this depth's inputs.
    """
    if not 0 < parent_layers <= layers:
        raise ValueError(f"cannot grow {parent_layers} double-stream blocks into {layers}")
    grown, extra = dict(weights), layers - parent_layers
    for index in range(parent_layers, layers):
        source = (index - extra) % parent_layers  # block parent_layers + j copies parent_layers - extra + j
        prefix, new_prefix = f"transformer_blocks.{source}.", f"transformer_blocks.{index}."
        for key, value in weights.items():
            if key.startswith(prefix):
                grown[new_prefix + key[len(prefix):]] = value.clone()
        for norm in ("norm1", "norm1_context"):
            # AdaLayerNormZero emits (shift, scale, gate) for attention, then for the MLP, hidden wide each.
            weight, bias = grown[f"{new_prefix}{norm}.linear.weight"], grown[f"{new_prefix}{norm}.linear.bias"]
            hidden = weight.shape[0] // 6
            for gate in (2, 5):
                weight[gate * hidden:(gate + 1) * hidden] = 0
                bias[gate * hidden:(gate + 1) * hidden] = 0
    return grown


def zero_pooled_path(transformer: FluxTransformer2DModel) -> None:
    """Make the pooled-text embedding a constant zero and freeze it (see module docstring for why)."""
    lin = transformer.time_text_embed.text_embedder.linear_2
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    for p in transformer.time_text_embed.text_embedder.parameters():
        p.requires_grad_(False)


def build_vae(cfg: ShapesModelConfig) -> AutoencoderKL:
    """One-level AutoencoderKL (vae_scale_factor 1); ``scaling_factor``/``shift_factor`` are set after training."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_scheduler(shift: float = SAMPLER_SHIFT, renoise_above: float = RENOISE_ABOVE) -> FlowMatchRenoisingScheduler:
    """The bundled sampler: fixed shift (no resolution-dependent one), re-noising above ``renoise_above``."""
    return FlowMatchRenoisingScheduler(
        num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False, renoise_above=renoise_above
    )


def assemble_pipeline(
    cfg: ShapesModelConfig,
    transformer: FluxTransformer2DModel | None = None,
    t5: T5EncoderModel | None = None,
    vae: AutoencoderKL | None = None,
    seed: int = 0,
) -> FluxPipeline:
    """A FluxPipeline of the given (trained) parts; missing parts are freshly initialized from ``seed``.

    The CLIP encoder is never trained (its pooled output is ignored), so it is always fresh from ``seed``.
    """
    torch.manual_seed(seed)
    t5_tok, clip_tok = build_t5_tokenizer(), build_clip_tokenizer()
    clip, fresh_t5 = build_text_encoders(cfg, t5_tok, clip_tok)
    return FluxPipeline(
        scheduler=build_scheduler(),
        vae=(vae or build_vae(cfg)).eval(),
        text_encoder=clip.eval(),
        tokenizer=clip_tok,
        text_encoder_2=(t5 or fresh_t5).eval(),
        tokenizer_2=t5_tok,
        transformer=(transformer or build_transformer(cfg)).eval(),
    )

