"""The tiny offline pipelines: they generate, are byte-deterministic, and their tokenizers split as declared."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers.models.normalization import RMSNorm
from transformers import AutoTokenizer

from attnscope.tiny import (
    CLIP_SPLITS,
    T5_SPLITS,
    TINY_FLUX_CALL_KWARGS,
    TINY_SD3_CALL_KWARGS,
    TINY_WORDS,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
)

PROMPT = "a red circle and a crimson square"


def _generate(pipe, kwargs, seed: int = 0, **overrides) -> np.ndarray:
    call = {**kwargs, **overrides}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **call).images


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def _assert_same_weights(a, b) -> None:
    ma, mb = _components(a), _components(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        sa, sb = ma[name].state_dict(), mb[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


# --------------------------------------------------------------------------------------------------- tokenizers
def test_t5_tokenizer_ids_and_splits() -> None:
    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.tokenize("a red circle") == ["▁a", "▁red", "▁circle"]
    assert tok.tokenize("crimson hippopotamus") == ["▁cr", "im", "son", "▁hip", "po", "pot", "amus"]
    assert tok.tokenize("zebra") == ["▁", "ze", "bra"]  # "▁" as a piece of its own
    assert tok("red").input_ids[-1] == tok.eos_token_id
    assert tok.tokenize("Red") == ["▁", "R", "e", "d"]  # cased, like T5: unknown forms fall back to characters


def test_clip_tokenizer_ids_and_splits() -> None:
    tok = build_clip_tokenizer()
    assert tok.model_max_length == 77
    assert tok.tokenize("A Red circle,") == ["a</w>", "red</w>", "circle</w>", ",</w>"]  # lowercased
    assert tok.tokenize("crimson hippopotamus") == ["cr", "im", "son</w>", "hippo", "pot", "amus</w>"]
    ids = tok("red", padding="max_length", max_length=6).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "red</w>"] + ["<|endoftext|>"] * 4
    assert build_clip_tokenizer(pad_token="!").pad_token == "!"


@pytest.mark.parametrize("builder", [build_t5_tokenizer, build_clip_tokenizer])
def test_every_declared_word_splits_as_declared(builder) -> None:
    tok = builder()
    splits = T5_SPLITS if builder is build_t5_tokenizer else CLIP_SPLITS
    assert all(len(tok.tokenize(word)) == 1 for word in TINY_WORDS)
    assert {word: tuple(tok.tokenize(word)) for word in splits} == splits


def test_inconsistent_vocabulary_is_rejected() -> None:
    # "▁hippo" (a word) lets Unigram cover "hippopotamus" in 3 pieces instead of the 4 declared.
    with pytest.raises(ValueError, match="hippopotamus"):
        build_t5_tokenizer(words=("hippo",), splits={"hippopotamus": ("▁hip", "po", "pot", "amus")})
    with pytest.raises(ValueError, match="</w>"):
        build_clip_tokenizer(splits={"crimson": ("cr", "imson")})


@pytest.mark.parametrize("builder", [build_t5_tokenizer, build_clip_tokenizer])
def test_tokenizer_save_load_roundtrip(builder, tmp_path) -> None:
    tok = builder()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in (PROMPT, "Azure zebra, hippopotamus! purple-ish é"):
        assert loaded(prompt, return_offsets_mapping=True).data == tok(prompt, return_offsets_mapping=True).data
    assert loaded.model_max_length == tok.model_max_length


# --------------------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (32, 64)])
def test_flux_generates(size: tuple[int, int]) -> None:
    pipe = build_tiny_flux_pipeline()
    height, width = size
    image = _generate(pipe, TINY_FLUX_CALL_KWARGS, height=height, width=width)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all()
    assert len(pipe.transformer.transformer_blocks) == 2 and len(pipe.transformer.single_transformer_blocks) == 2
    assert not pipe.transformer.config.guidance_embeds


@pytest.mark.parametrize("size", [(32, 32), (64, 64)])
def test_sd3_generates(size: tuple[int, int]) -> None:
    pipe = build_tiny_sd3_pipeline()
    height, width = size
    image = _generate(pipe, TINY_SD3_CALL_KWARGS, height=height, width=width)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all()


def test_sd3_text_dims_follow_encode_prompt() -> None:
    pipe = build_tiny_sd3_pipeline()
    n = TINY_SD3_CALL_KWARGS["max_sequence_length"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=n
        )
    # 77 CLIP positions (16 + 32 features zero-padded to the T5 width 64) then the T5 positions.
    assert embeds.shape == (1, 77 + n, 64)
    assert torch.count_nonzero(embeds[0, :77, 48:]) == 0
    assert pooled.shape == (1, 48)


def test_sd3_dual_attention_and_qk_norm() -> None:
    blocks = build_tiny_sd3_pipeline().transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None
    assert isinstance(blocks[0].attn.norm_q, RMSNorm)
    sd30 = build_tiny_sd3_pipeline(dual_attention_layers=(), qk_norm=None).transformer.transformer_blocks
    assert all(block.attn2 is None and block.attn.norm_q is None for block in sd30)


def test_sd3_without_t5_generates() -> None:
    pipe = build_tiny_sd3_pipeline(with_t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert _generate(pipe, TINY_SD3_CALL_KWARGS).shape == (1, 32, 32, 3)


def test_sd3_rejects_clip_wider_than_t5() -> None:
    with pytest.raises(ValueError, match="t5_dim"):
        build_tiny_sd3_pipeline(clip_hidden_sizes=(48, 48), t5_dim=64)


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [(build_tiny_flux_pipeline, TINY_FLUX_CALL_KWARGS), (build_tiny_sd3_pipeline, TINY_SD3_CALL_KWARGS)],
    ids=["flux", "sd3"],
)
def test_byte_determinism(build, kwargs) -> None:
    first, second = build(seed=3), build(seed=3)
    _assert_same_weights(first, second)
    image = _generate(first, kwargs)
    assert np.array_equal(image, _generate(second, kwargs))
    assert np.array_equal(image, _generate(first, kwargs))  # no state left behind by a call

    other = build(seed=4)
    ta, tb = first.transformer.state_dict(), other.transformer.state_dict()
    assert any(not torch.equal(ta[key], tb[key]) for key in ta)
    assert not np.array_equal(image, _generate(other, kwargs))


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    build_tiny_flux_pipeline(seed=0)
    build_tiny_sd3_pipeline(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
