"""Prompt -> text-sequence positions -> words, on the tiny offline T5 / CLIP tokenizers and pipelines."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from attnscope.adapters.flux import flux_tokens
from attnscope.adapters.sd3 import sd3_tokens
from attnscope.tiny import build_clip_tokenizer, build_t5_tokenizer, build_tiny_sd3_pipeline
from attnscope.tokens import (
    PAD_PIECE,
    EmptyPromptError,
    PromptTokens,
    TruncatedWordError,
    UnknownWordError,
    Word,
    clip_tokens,
    concat,
    split_words,
    t5_tokens,
)

PROMPT = "a red circle and a crimson square"


@pytest.fixture(scope="module")
def t5():
    return build_t5_tokenizer()


@pytest.fixture(scope="module")
def clip():
    return build_clip_tokenizer()




def _pieces(tokens: PromptTokens, query: str) -> list[str]:
    return [tokens.pieces[p - tokens.offset] for p in tokens.positions(query)]


# --------------------------------------------------------------------------------------------------- T5 layout
def test_t5_single_and_multi_piece_words(t5) -> None:
    tokens = t5_tokens(t5, PROMPT, 16)
    assert len(tokens) == 16
    assert tokens.pieces[:9] == ("▁a", "▁red", "▁circle", "▁and", "▁a", "▁cr", "im", "son", "▁square")
    assert tokens.positions("red") == (1,)
    assert tokens.positions("crimson") == (5, 6, 7)
    assert _pieces(tokens, "crimson") == ["▁cr", "im", "son"]
    assert [w.text for w in tokens.words] == ["a", "red", "circle", "and", "a", "crimson", "square"]
    assert [w.index for w in tokens.words] == list(range(7))


def test_t5_lone_metaspace_piece_belongs_to_its_word(t5) -> None:
    tokens = t5_tokens(t5, "a zebra and a Red dog", 16)
    assert _pieces(tokens, "zebra") == ["▁", "ze", "bra"]
    assert _pieces(tokens, "red") == ["▁", "R", "e", "d"]  # cased T5: character fallback
    assert tokens.word("red").text == "Red"


def test_t5_shared_piece_string_does_not_confuse_words(t5) -> None:
    # "azure" starts with the piece "▁a", the same string as the word "a": positions come from offsets, not text.
    tokens = t5_tokens(t5, "a azure disk", 8)
    assert tokens.positions("a") == (0,)
    assert _pieces(tokens, "azure") == ["▁a", "zure"]


def test_t5_padding_not_valid_eos_valid(t5) -> None:
    tokens = t5_tokens(t5, "a red circle", 8)
    assert tokens.pieces == ("▁a", "▁red", "▁circle", "</s>") + ("<pad>",) * 4
    assert tokens.valid == (0, 1, 2, 3)  # </s> is a real key
    assert all(3 not in w.positions for w in tokens.words)


def test_t5_offset_shifts_positions(t5) -> None:
    tokens = t5_tokens(t5, PROMPT, 16, offset=77)
    assert len(tokens) == 16 and tokens.offset == 77
    assert tokens.positions("crimson") == (82, 83, 84)
    assert tokens.valid[0] == 77


# --------------------------------------------------------------------------------------------------- CLIP layout
def test_clip_bos_offset_and_multi_piece(clip) -> None:
    tokens = clip_tokens(clip, PROMPT)
    assert len(tokens) == 77
    assert tokens.pieces[0] == "<|startoftext|>"
    assert tokens.positions("a") == (1, 5)  # BOS shifts every piece by one
    assert tokens.positions("red") == (2,)
    assert _pieces(tokens, "crimson") == ["cr", "im", "son</w>"]
    assert tokens.pieces[10] == "<|endoftext|>"
    # Padding repeats <|endoftext|>: only the first one (the real EOS) is valid.
    assert tokens.valid == tuple(range(11))
    assert set(tokens.pieces[11:]) == {"<|endoftext|>"}


def test_clip_lowercases_but_word_keeps_case(clip) -> None:
    tokens = clip_tokens(clip, "A Hippopotamus")
    assert tokens.word("hippopotamus") == Word(text="Hippopotamus", index=1, positions=(2, 3, 4))


# --------------------------------------------------------------------------------------------------- SD3 / Flux
def test_flux_tokens_match_what_the_pipeline_feeds(flux) -> None:
    tokens = flux_tokens(flux, PROMPT, 32)
    fed = flux.tokenizer_2(PROMPT, padding="max_length", max_length=32, truncation=True).input_ids
    assert tokens.pieces == tuple(flux.tokenizer_2.convert_ids_to_tokens(fed))
    assert tokens.positions("crimson") == (5, 6, 7)


def test_sd3_layout_clip_then_t5(sd3) -> None:
    n = 16
    tokens = sd3_tokens(sd3, PROMPT, 77 + n)
    assert len(tokens) == 77 + n and tokens.offset == 0
    assert tokens.positions("red") == (2, 77 + 1)
    assert tokens.positions("crimson") == (6, 7, 8, 77 + 5, 77 + 6, 77 + 7)
    assert tokens.word("crimson").positions == tokens.positions("crimson")
    assert [tokens.pieces[p] for p in tokens.positions("crimson")] == ["cr", "im", "son</w>", "▁cr", "im", "son"]
    # valid: BOS, 9 pieces, EOS of CLIP; the 9 T5 pieces and </s>.
    assert tokens.valid == tuple(range(11)) + tuple(range(77, 77 + 10))
    # The layout length is what SD3's encode_prompt produces.
    with torch.no_grad():
        embeds = sd3.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=n)[0]
    assert embeds.shape[1] == len(tokens)


def test_sd3_without_t5_has_all_padding_there() -> None:
    pipe = build_tiny_sd3_pipeline(with_t5=False)
    tokens = sd3_tokens(pipe, PROMPT, 77 + 8)
    assert tokens.pieces[77:] == (PAD_PIECE,) * 8
    assert max(tokens.valid) < 77
    assert tokens.positions("crimson") == (6, 7, 8)


def test_sd3_word_truncated_in_clip_survives_in_t5(sd3, clip) -> None:
    prompt = " ".join(["dog"] * 80) + " cat"
    tokens = sd3_tokens(sd3, prompt, 77 + 128)
    assert tokens.positions("cat") == (77 + 80,)  # CLIP keeps 75 words, T5 all of them


def test_sd3_rejects_text_length_without_t5_positions(sd3) -> None:
    with pytest.raises(ValueError, match="77"):
        sd3_tokens(sd3, PROMPT, 77)


def test_concat_requires_contiguous_segments_of_one_prompt(clip, t5) -> None:
    head = clip_tokens(clip, PROMPT)
    with pytest.raises(ValueError, match="offset=77"):
        concat(head, t5_tokens(t5, PROMPT, 8))
    with pytest.raises(ValueError, match="different prompts"):
        concat(head, t5_tokens(t5, "a red circle", 8, offset=77))
    joined = concat(head, t5_tokens(t5, PROMPT, 8, offset=77))
    assert len(joined) == 85 and joined.positions("red") == (2, 78)


# --------------------------------------------------------------------------------------------------- lookup
def test_unknown_word_message_lists_the_prompt_words(t5) -> None:
    tokens = t5_tokens(t5, "a red circle", 8)
    with pytest.raises(UnknownWordError) as info:
        tokens.positions("purple")
    assert str(info.value) == "'purple' is not in the prompt 'a red circle'; its words are: a, red, circle"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownWordError):
        tokens.word("circles")  # whole words only


def test_phrase_lookup(t5) -> None:
    tokens = t5_tokens(t5, "a red circle and a red crimson square", 16)
    assert tokens.positions("red circle") == (1, 2)
    assert tokens.positions("Red  Crimson,") == (5, 6, 7, 8)
    assert tokens.positions("a red") == (0, 1, 4, 5)  # both occurrences
    with pytest.raises(UnknownWordError, match="'circle red' is not in the prompt"):
        tokens.positions("circle red")
    with pytest.raises(ValueError, match="phrase"):
        tokens.word("red circle")


def test_punctuation_and_case(clip, t5) -> None:
    prompt = "A red circle, and (a blue square)!"
    for tokens in (t5_tokens(t5, prompt, 24), clip_tokens(clip, prompt)):
        assert [w.text for w in tokens.words] == ["A", "red", "circle", "and", "a", "blue", "square"]
        assert len(tokens.positions("circle,")) == 1
        assert tokens.positions("CIRCLE") == tokens.positions("circle")
        assert len(tokens.positions("square")) == 1
        assert not {p for w in tokens.words for p in w.positions} & {
            p for p in tokens.valid if tokens.pieces[p] in (",", ",</w>", "!", "!</w>")
        }


def test_non_ascii_word_keeps_all_its_pieces(clip, t5) -> None:
    # T5 maps "é" to <unk>; byte-level CLIP splits it into two byte pieces that share one character's offsets.
    assert _pieces(t5_tokens(t5, "a café dog", 12), "CAFÉ") == ["▁", "c", "a", "f", "<unk>"]
    assert _pieces(clip_tokens(clip, "a café dog"), "café") == ["ca", "f", "Ã", "©</w>"]


def test_repeated_words(t5) -> None:
    tokens = t5_tokens(t5, "a red circle and a red square", 16)
    assert [w.index for w in tokens.words if w.text == "red"] == [1, 5]
    assert tokens.positions("red") == (1, 5)
    assert tokens.word("red").positions == (1,)
    assert tokens.word("red#2").positions == (5,)
    assert tokens.word("red", occurrence=2) == tokens.word("red#2")
    assert tokens.positions("red#2") == (5,)
    with pytest.raises(UnknownWordError, match="occurs 2 times"):
        tokens.positions("red#3")
    with pytest.raises(ValueError, match="not both"):
        tokens.positions("red#2", occurrence=1)


def test_empty_prompt(t5, clip) -> None:
    for prompt in ("", "   \n\t"):
        with pytest.raises(EmptyPromptError):
            t5_tokens(t5, prompt, 8)
        with pytest.raises(EmptyPromptError):
            clip_tokens(clip, prompt)


def test_query_without_words(t5) -> None:
    tokens = t5_tokens(t5, "a red circle", 8)
    with pytest.raises(UnknownWordError, match="contains no word"):
        tokens.positions(" , ")


def test_truncation(t5) -> None:
    tokens = t5_tokens(t5, "a red circle and a blue square", 6)  # room for 5 pieces + </s>
    assert tokens.pieces[-1] == "</s>"
    assert tokens.word("a").positions == (0,)
    assert tokens.words[-1] == Word(text="square", index=6, positions=())
    with pytest.raises(TruncatedWordError, match="truncated"):
        tokens.positions("square")
    with pytest.raises(TruncatedWordError):
        tokens.word("blue")
    with pytest.raises(TruncatedWordError):
        tokens.positions("circle and a blue")  # a phrase is only found whole
    assert tokens.positions("a") == (0, 4)


def test_partly_truncated_word_keeps_surviving_pieces(t5) -> None:
    tokens = t5_tokens(t5, "a red crimson", 4)  # ▁a ▁red ▁cr </s>
    assert _pieces(tokens, "crimson") == ["▁cr"]


def test_repeated_word_with_one_occurrence_truncated(t5) -> None:
    tokens = t5_tokens(t5, "red circle red", 3)  # ▁red ▁circle </s>
    assert tokens.positions("red") == (0,)
    with pytest.raises(TruncatedWordError):
        tokens.positions("red#2")


def test_split_words() -> None:
    assert split_words("a cat's light-blue box_2, 3 ") == [
        ("a", 0, 1),
        ("cat's", 2, 7),
        ("light", 8, 13),
        ("blue", 14, 18),
        ("box", 19, 22),
        ("2", 23, 24),
        ("3", 26, 27),
    ]


def test_slow_tokenizer_is_rejected() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        t5_tokens(Slow(), "a red circle", 8)
