"""Tiny random Flux and SD3 pipelines, built offline in well under a second.

They are real diffusers pipelines (``FluxPipeline``, ``StableDiffusion3Pipeline``) made of real components --
``FluxTransformer2DModel`` / ``SD3Transformer2DModel``, ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``,
``T5EncoderModel``, ``CLIPTextModel(WithProjection)`` and T5 / CLIP fast tokenizers -- with random weights and
tiny configs, so that capture hooks, token lookup, LoRA and the CLI can be tested on CPU without the hub.

Nothing is downloaded: the tokenizers are assembled here with the ``tokenizers`` library over a small English
vocabulary (``TINY_WORDS``). Most words are one piece; the words in ``T5_SPLITS`` / ``CLIP_SPLITS`` are several
pieces, mimicking the real tokenizers' behaviour that word -> piece merging must cope with:

* T5 (sentencepiece Unigram, ``▁`` marks a word start): ``crimson`` -> ``▁cr im son``; ``zebra`` -> ``▁ ze bra``
  (``▁`` as a piece of its own, as real T5 does before pieces that have no ``▁`` form); ``azure`` -> ``▁a zure``
  (shares the piece string ``▁a`` with the word ``a``).
* CLIP (byte-level BPE, ``</w>`` marks a word end): ``crimson`` -> ``cr im son</w>``, BOS/EOS around the prompt.
The builders check that every declared segmentation is reproduced and raise ``ValueError`` if not.

Determinism: ``build_tiny_*_pipeline(seed)`` draws all weights from ``torch.manual_seed(seed)`` inside
``torch.random.fork_rng`` (the caller's global RNG state is left untouched), so the same seed gives byte-identical
weights and -- with the same call and generator -- byte-identical images.

Image grid (defaults): the VAE downsamples by 2 (``vae_scale_factor == 2``, real models use 8). Flux packs 2x2
latent patches, SD3 uses ``patch_size=2``, so both see ``(H/4) * (W/4)`` image tokens: 32x32 px -> 8x8 = 64 tokens,
64x64 px -> 16x16 = 256 tokens. Height and width must be multiples of 4.

Text sequence seen by the transformer: Flux -> T5 pieces, length ``max_sequence_length``; SD3 -> 77 CLIP positions
then ``max_sequence_length`` T5 positions (see ``attnscope.tokens``).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .profiles import ModelProfile, register_profile

__all__ = [
    "CLIP_SPLITS",
    "T5_SPLITS",
    "TINY_FLUX_CALL_KWARGS",
    "TINY_SD3_CALL_KWARGS",
    "TINY_WORDS",
    "TinyProfile",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_flux_pipeline",
    "build_tiny_sd3_pipeline",
]

# Words that are a single piece in both tokenizers (T5: "▁red", CLIP: "red</w>"). Lowercase ASCII only: CLIP
# lowercases its input and the byte-level alphabet maps ASCII letters to themselves.
TINY_WORDS: tuple[str, ...] = (
    # function words
    "a", "an", "the", "of", "and", "with", "on", "in", "at", "to", "is", "two", "one", "three",
    # scene words
    "photo", "picture", "image", "painting", "background", "left", "right", "top", "bottom", "small", "big", "large",
    # colours
    "red", "blue", "green", "yellow", "orange", "purple", "white", "black", "pink", "brown", "gray",
    # shapes
    "circle", "square", "triangle", "star", "disk", "box",
    # things
    "cat", "dog", "bird", "car", "tree", "house", "horse", "apple",
)  # fmt: skip

# Words made of several pieces. Keep the two tables on the same words so that tests can compare layouts.
T5_SPLITS: dict[str, tuple[str, ...]] = {
    "crimson": ("▁cr", "im", "son"),
    "scarlet": ("▁scar", "let"),
    "hippopotamus": ("▁hip", "po", "pot", "amus"),
    "zebra": ("▁", "ze", "bra"),
    "azure": ("▁a", "zure"),
}
CLIP_SPLITS: dict[str, tuple[str, ...]] = {
    "crimson": ("cr", "im", "son</w>"),
    "scarlet": ("scar", "let</w>"),
    "hippopotamus": ("hippo", "pot", "amus</w>"),
    "zebra": ("ze", "bra</w>"),
    "azure": ("az", "ure</w>"),
}

# Small but valid call arguments. SD3 keeps its default guidance_scale (7.0), so the CFG batch [uncond, cond] is
# exercised; Flux has guidance_embeds=False and true_cfg_scale=1, so it runs a single batch.
TINY_FLUX_CALL_KWARGS: dict[str, Any] = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 32}
TINY_SD3_CALL_KWARGS: dict[str, Any] = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# The pre-tokenizer regex of CLIP (as in transformers' CLIPTokenizer): letters, single digits, punctuation runs.
_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# --------------------------------------------------------------------------------------------------- tokenizers
def build_t5_tokenizer(
    *,
    words: Iterable[str] = TINY_WORDS,
    splits: Mapping[str, Sequence[str]] = T5_SPLITS,
    model_max_length: int = 512,
) -> T5TokenizerFast:
    """A T5-style sentencepiece Unigram tokenizer over a small vocabulary.

    Ids: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``▁`` = 3, then the word pieces, then single-character
    fallback pieces (printable ASCII) so that unknown words still tokenize (``mauve`` -> ``▁ m a u v e``, as it is
    not in the vocabulary); other characters become ``<unk>``. Pipeline as transformers' ``T5Tokenizer``: whitespace
    split, Metaspace ``▁`` prepended to every word, ``</s>`` appended, no lowercasing (T5 is cased).
    """
    expected = {word: (f"▁{word}",) for word in words} | {word: tuple(pieces) for word, pieces in splits.items()}
    # Unigram picks the segmentation with the highest total log-probability: word pieces (-1) beat the lone "▁"
    # (-2, as in real T5 it is frequent) which beats character fallbacks (-10), so declared splits win.
    scores: dict[str, float] = {T5_PAD: 0.0, T5_EOS: 0.0, T5_UNK: 0.0, "▁": -2.0}
    for pieces in expected.values():
        for piece in pieces:
            scores.setdefault(piece, -1.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        scores.setdefault(char, -10.0)

    backend = Tokenizer(models.Unigram(list(scores.items()), unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        pad_token=T5_PAD,
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        extra_ids=0,
        model_max_length=model_max_length,
    )
    _check_segmentations(tokenizer, expected)
    return tokenizer


def build_clip_tokenizer(
    *,
    words: Iterable[str] = TINY_WORDS,
    splits: Mapping[str, Sequence[str]] = CLIP_SPLITS,
    pad_token: str = CLIP_EOS,
    model_max_length: int = 77,
) -> CLIPTokenizerFast:
    """A CLIP-style byte-level BPE tokenizer (``</w>`` end-of-word suffix) over a small vocabulary.

    Vocabulary: the 256 byte-level characters, each also with ``</w>`` (so any text tokenizes, like real CLIP), the
    tokens produced by the merges, then ``<|startoftext|>`` and ``<|endoftext|>``. Input is NFC-normalized and
    lowercased; ``<|startoftext|>`` ... ``<|endoftext|>`` wrap the prompt; padding uses ``pad_token``
    (``<|endoftext|>`` like CLIP-L; SD3's second CLIP pads with ``"!"``).
    """
    expected = {word: (f"{word}</w>",) for word in words} | {word: tuple(pieces) for word, pieces in splits.items()}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [f"{char}</w>" for char in alphabet]:
        vocab[token] = len(vocab)

    # Learn merges piece by piece, multi-piece words first so that their pieces get the highest merge priority and
    # are complete before any whole-word merge could glue them together. Each piece is built left to right on top of
    # what the merges learned so far already produce (simulated with _apply_merges).
    ranks: dict[tuple[str, str], int] = {}
    ordered = sorted(expected.items(), key=lambda item: len(item[1]) == 1)
    for _word, pieces in ordered:
        for i, piece in enumerate(pieces):
            symbols = _initial_symbols(piece, is_last=i == len(pieces) - 1)
            while len(symbols := _apply_merges(symbols, ranks)) > 1:
                ranks[(symbols[0], symbols[1])] = len(ranks)
                vocab.setdefault(symbols[0] + symbols[1], len(vocab))
    for special in (CLIP_BOS, CLIP_EOS):
        vocab[special] = len(vocab)

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=list(ranks),
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=CLIP_EOS,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False
    )
    tokenizer = CLIPTokenizerFast(
        tokenizer_object=backend,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    _check_segmentations(tokenizer, expected)
    return tokenizer


def _initial_symbols(piece: str, *, is_last: bool) -> list[str]:
    """BPE starting symbols of one piece: its characters, the word's last one carrying the ``</w>`` suffix."""
    chars = list(piece.removesuffix("</w>"))
    if not all(char.isascii() and (char.islower() or char.isdigit()) for char in chars):
        raise ValueError(f"CLIP vocabulary pieces must be lowercase ASCII letters/digits, got {piece!r}")
    if is_last != piece.endswith("</w>"):
        raise ValueError(f"exactly the last piece of a CLIP word ends with '</w>', got {piece!r}")
    if is_last:
        chars[-1] += "</w>"
    return chars


def _apply_merges(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """BPE on one piece: repeatedly merge the adjacent pair with the best (lowest) rank."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _check_segmentations(tokenizer: Any, expected: Mapping[str, tuple[str, ...]]) -> None:
    """Raise if any word does not tokenize (on its own) into exactly its declared pieces."""
    wrong = {
        word: got
        for word, pieces in expected.items()
        if (got := tuple(tokenizer.tokenize(word))) != pieces
    }
    if wrong:
        detail = "; ".join(f"{word!r} -> {got} (expected {expected[word]})" for word, got in wrong.items())
        raise ValueError(f"tiny vocabulary is inconsistent, these words split unexpectedly: {detail}")


# --------------------------------------------------------------------------------------------------- models
def _tiny_vae(block_out_channels: Sequence[int], latent_channels: int, scaling: float, shift: float) -> AutoencoderKL:
    # No quant convs and a shift factor, like the Flux / SD3 VAEs; 2 norm groups divide every channel count here.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _tiny_t5(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    # T5 v1.1 flavour (gated GELU, as in Flux / SD3); dropout off so the encoder is deterministic even in train().
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _tiny_clip_config(tokenizer: CLIPTokenizerFast, hidden_size: int) -> CLIPTextConfig:
    # eos_token_id must be the real <|endoftext|> id: CLIP pools the hidden state at the first EOS position.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_flux_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    guidance_embeds: bool = False,
    text_dim: int = 32,
    vae_block_out_channels: Sequence[int] = (4, 8),
    latent_channels: int = 4,
) -> FluxPipeline:
    """A random tiny ``FluxPipeline`` (double-stream ``num_layers``, single-stream ``num_single_layers``).

    Shapes: transformer inner dim = ``num_attention_heads * attention_head_dim`` (32); ``sum(axes_dims_rope)`` must
    equal ``attention_head_dim``. T5 ``d_model`` = ``joint_attention_dim`` = ``text_dim``; the CLIP text model
    (pooled output only, as in Flux) has hidden size = ``pooled_projection_dim`` = ``text_dim``. Latents have
    ``latent_channels`` channels, packed 2x2 into ``4 * latent_channels`` transformer input channels.
    Call with e.g. ``pipe(prompt, generator=torch.Generator().manual_seed(0), **TINY_FLUX_CALL_KWARGS)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tokenizer = build_clip_tokenizer()
        t5_tokenizer = build_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim,
            pooled_projection_dim=text_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        ).eval()
        text_encoder = CLIPTextModel(_tiny_clip_config(clip_tokenizer, text_dim)).eval()
        text_encoder_2 = _tiny_t5(t5_tokenizer, text_dim)
        vae = _tiny_vae(vae_block_out_channels, latent_channels, scaling=0.3611, shift=0.1159).eval()
    # FLUX.1's scheduler: resolution-dependent shift (mu) computed by the pipeline from the image sequence length.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_tiny_sd3_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    dual_attention_layers: tuple[int, ...] = (0,),
    qk_norm: str | None = "rms_norm",
    clip_hidden_sizes: tuple[int, int] = (16, 32),
    t5_dim: int = 64,
    with_t5: bool = True,
    vae_block_out_channels: Sequence[int] = (4, 8),
    latent_channels: int = 4,
) -> StableDiffusion3Pipeline:
    """A random tiny ``StableDiffusion3Pipeline``; the defaults are SD3.5-style (``attn2`` in block 0, RMS qk-norm).

    ``dual_attention_layers=(), qk_norm=None`` gives SD3.0-style blocks. Text dims follow SD3's ``encode_prompt``:
    the two CLIP penultimate hidden states (``clip_hidden_sizes``, like CLIP-L 768 / CLIP-G 1280) are concatenated
    along features and zero-padded to the T5 width ``t5_dim`` (= ``joint_attention_dim``, like 4096), then the 77
    CLIP positions are followed by the T5 positions: ``prompt_embeds`` is ``(B, 77 + max_sequence_length, t5_dim)``.
    The pooled vector is the concatenation of both CLIP projections: ``pooled_projection_dim = sum(clip_hidden_sizes)``.
    ``with_t5=False`` leaves ``text_encoder_3``/``tokenizer_3`` out (SD3 then feeds zeros at the T5 positions).
    """
    if sum(clip_hidden_sizes) > t5_dim:
        raise ValueError(f"SD3 pads CLIP features to the T5 width: need sum{clip_hidden_sizes} <= t5_dim={t5_dim}")
    inner_dim = num_attention_heads * attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer()
        tokenizer_2 = build_clip_tokenizer(pad_token="!")  # SD3's CLIP-G pads with "!"; positions are the same
        tokenizer_3 = build_t5_tokenizer() if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=16,  # default resolution = 16 latent pixels * vae_scale_factor 2 = 32 px
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=t5_dim,
            caption_projection_dim=inner_dim,
            pooled_projection_dim=sum(clip_hidden_sizes),
            pos_embed_max_size=32,  # up to 32x32 patches = 128x128 px
            dual_attention_layers=tuple(dual_attention_layers),
            qk_norm=qk_norm,
        ).eval()
        text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, clip_hidden_sizes[0])).eval()
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, clip_hidden_sizes[1])).eval()
        text_encoder_3 = _tiny_t5(tokenizer_3, t5_dim) if tokenizer_3 is not None else None
        vae = _tiny_vae(vae_block_out_channels, latent_channels, scaling=1.5305, shift=0.0609).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# -------------------------------------------------------------------------------------------------- profiles
class TinyProfile(ModelProfile):
    """A tiny random pipeline, built offline: a stand-in for a real model of its architecture (open world, the
    paper's erasure defaults)."""

    def __init__(self, name: str, build: Callable[[], Any], call_kwargs: Mapping[str, Any]):
        self.name, self._build, self._call_kwargs = name, build, dict(call_kwargs)

    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, **from_pretrained_kwargs: Any) -> Any:
        pipe = self._build()
        return pipe if dtype is None else pipe.to(dtype=dtype)

    def default_call(self, pipe: Any | None = None) -> dict[str, Any]:
        return dict(self._call_kwargs)


register_profile(TinyProfile("tiny-flux", build_tiny_flux_pipeline, TINY_FLUX_CALL_KWARGS))
register_profile(TinyProfile("tiny-sd3", build_tiny_sd3_pipeline, TINY_SD3_CALL_KWARGS))
