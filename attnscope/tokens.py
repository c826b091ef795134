"""Prompt -> tokenizer pieces -> words, in the layout of the transformer's text sequence.

The capture core sees the joint-attention *text sequence*; this module says which of its positions belong to
which word of the prompt.

Layouts (position ``p`` of the text sequence; each adapter builds its own from the segments here):

* Flux: the T5 sequence of length ``max_sequence_length``: ``p`` = T5 piece ``p`` (``</s>`` after the prompt, then
  ``<pad>`` up to the length; Flux does not mask padding, but padding carries no word).
* SD3: 77 CLIP positions (``<|startoftext|>``, pieces, ``<|endoftext|>``, padding) then the T5 sequence of length
  ``max_sequence_length`` at positions ``77 ..``. Both CLIP encoders share this tokenization (their features are
  concatenated, not their positions). Without ``text_encoder_3`` SD3 feeds zeros there: all padding.

Every encoder is assumed to get the same prompt (the pipelines' ``prompt_2`` / ``prompt_3`` left unset).

Alignment: words are found in the prompt text (runs of letters/digits, with inner apostrophes as in ``cat's``;
punctuation and hyphens separate words, so ``"circle,"`` is the word ``circle`` and ``light-blue`` is two words),
and a piece belongs to every word whose character span its *offset mapping* overlaps. Offsets come from the fast
(``tokenizers``-backed) tokenizer, so T5 ``▁`` pieces (also a lone ``▁``, whose offset is the next character),
CLIP ``</w>`` pieces, lowercasing and normalization need no string heuristics. Special tokens (BOS/EOS) and
padding belong to no word; BOS/EOS are still ``valid`` (real keys), padding is not.

Multi-piece words: a word's ``positions`` are all its pieces, in every encoder of the layout (SD3: the CLIP and the
T5 pieces). The maps layer merges them by **mean** over positions by default.

Lookup (``PromptTokens.positions`` / ``word``): case-insensitive; a query is split into words the same way as the
prompt, so ``"Red circle,"`` and ``"red  circle"`` both find the phrase ``red circle`` (consecutive words).
Repeated words: there is one ``Word`` per occurrence; ``positions(q)`` returns the union over all occurrences,
``word(q)`` the first one; ``"red#2"`` (or ``occurrence=2``) picks the second.

Truncation: a word cut off by the tokenizer's ``max_length`` has no positions; looking it up raises
:class:`TruncatedWordError`. A partly cut word keeps the pieces that survived; in SD3 a word past CLIP's 77 may
still have T5 positions. When a word occurs several times, ``positions(q)`` unites the occurrences that survived.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy to import; only the annotations need it
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EmptyPromptError",
    "PAD_PIECE",
    "PromptTokens",
    "TruncatedWordError",
    "UnknownWordError",
    "Word",
    "clip_tokens",
    "concat",
    "split_words",
    "t5_tokens",
    "zero_tokens",
]

# Piece shown at positions that hold zeros instead of an encoded token (SD3 without its T5 encoder).
PAD_PIECE = "<pad>"
# A word: letters/digits (no underscore), optionally joined by apostrophes ("cat's", "don't").
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# "red#2": the second occurrence of "red".
_OCCURRENCE = re.compile(r"^(?P<query>.*?)#(?P<n>\d+)$")


class UnknownWordError(KeyError, ValueError):
    """A word or phrase that is not in the prompt. Both a ``KeyError`` (lookup) and a ``ValueError`` (bad input)."""

    def __str__(self) -> str:
        # KeyError would show repr(message), with quotes and escapes.
        return str(self.args[0])


class TruncatedWordError(UnknownWordError):
    """The word is in the prompt but the tokenizer's ``max_length`` cut all its pieces off."""


class EmptyPromptError(ValueError):
    """The prompt is empty or whitespace only."""


@dataclass(frozen=True)
class Word:
    """One occurrence of a word of the prompt.

    ``text``: as written (punctuation stripped, case kept). ``index``: 0-based word index in the prompt.
    ``positions``: sorted text-sequence positions of its pieces, across all encoders of the layout; empty when
    truncated away.
    """

    text: str
    index: int
    positions: tuple[int, ...]


@dataclass(frozen=True)
class PromptTokens:
    """A prompt's tokenization in the layout of (a segment of) the transformer's text sequence.

    ``pieces[p - offset]`` is the tokenizer piece at position ``p`` (raw token strings such as ``▁red``,
    ``red</w>``, ``</s>``, ``<pad>``; padding included), so ``len(self)`` is the segment length. ``valid``: the
    positions that are not padding (BOS/EOS kept). ``words``: one :class:`Word` per word occurrence, in prompt
    order. ``offset``: position of ``pieces[0]``; 0 for a whole layout (what an adapter's ``prompt_tokens`` returns).
    """

    prompt: str
    pieces: tuple[str, ...]
    valid: tuple[int, ...]
    words: tuple[Word, ...]
    offset: int = 0

    def __len__(self) -> int:
        return len(self.pieces)

    def positions(self, query: str, occurrence: int | None = None) -> tuple[int, ...]:
        """Sorted positions of a word or phrase (``"red"``, ``"red circle"``, ``"red#2"``), case-insensitive.

        Without ``occurrence`` (1-based, or a ``#n`` suffix) the union over all occurrences that survived truncation.
        Raises :class:`UnknownWordError` (listing the prompt's words) or :class:`TruncatedWordError`.
        """
        matches = self._matches(query, occurrence)
        kept = [match for match in matches if all(word.positions for word in match)]
        if not kept:
            raise self._truncated(query)
        return tuple(sorted({p for match in kept for word in match for p in word.positions}))

    def word(self, query: str, occurrence: int | None = None) -> Word:
        """The first (or ``occurrence``-th / ``"word#n"``) occurrence of a single word, case-insensitive."""
        match = self._matches(query, occurrence)[0]
        if len(match) != 1:
            raise ValueError(f"{query!r} is a phrase of {len(match)} words: use positions() for phrases")
        if not match[0].positions:
            raise self._truncated(query)
        return match[0]

    def _matches(self, query: str, occurrence: int | None) -> list[tuple[Word, ...]]:
        """Every run of consecutive words equal (case-insensitively) to the query's words; or the chosen one."""
        if found := _OCCURRENCE.match(query.strip()):
            if occurrence is not None:
                raise ValueError(f"{query!r}: give the occurrence either as '#n' or as occurrence=, not both")
            query, occurrence = found["query"], int(found["n"])
        wanted = [w.casefold() for w, _, _ in split_words(query)]
        if not wanted:
            raise UnknownWordError(f"{query!r} contains no word; the prompt's words are: {self._word_list()}")
        texts = [w.text.casefold() for w in self.words]
        n = len(wanted)
        matches = [tuple(self.words[i : i + n]) for i in range(len(texts) - n + 1) if texts[i : i + n] == wanted]
        if not matches:
            raise UnknownWordError(
                f"{query!r} is not in the prompt {self.prompt!r}; its words are: {self._word_list()}"
            )
        if occurrence is None:
            return matches
        if not 1 <= occurrence <= len(matches):
            times = "once" if len(matches) == 1 else f"{len(matches)} times"
            raise UnknownWordError(
                f"occurrence {occurrence} of {query!r} requested, but it occurs {times} in the prompt"
            )
        return [matches[occurrence - 1]]

    def _word_list(self) -> str:
        return ", ".join(dict.fromkeys(w.text for w in self.words)) or "(none)"

    def _truncated(self, query: str) -> TruncatedWordError:
        return TruncatedWordError(
            f"{query!r} is in the prompt {self.prompt!r} but was truncated away: its pieces fall beyond the "
            f"tokenizer's max_length (the text sequence has {len(self)} positions); shorten the prompt or raise "
            f"max_sequence_length"
        )


def split_words(text: str) -> list[tuple[str, int, int]]:
    """The words of ``text`` as ``(word, start, end)`` character spans (the rule in the module docstring)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int, offset: int) -> PromptTokens:
    """Tokenize exactly as the diffusers pipelines do (pad to ``max_length``, truncate) and align pieces to words."""
    if not prompt.strip():
        raise EmptyPromptError("the prompt is empty: there are no words to look up")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer; attnscope.tokens needs a fast (tokenizers-backed) one "
            "for character offsets (load it with use_fast=True)"
        )
    enc = tokenizer(
        prompt,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=True,
    )
    ids = enc["input_ids"]
    if len(ids) != max_length:
        raise ValueError(f"{type(tokenizer).__name__} returned {len(ids)} tokens for max_length={max_length}")
    spans = split_words(prompt)
    word_positions: list[list[int]] = [[] for _ in spans]
    for i, ((start, end), special, real) in enumerate(
        zip(enc["offset_mapping"], enc["special_tokens_mask"], enc["attention_mask"])
    ):
        if special or not real:
            continue
        # Overlap (not containment): a piece may also hold punctuation ("▁(red") or straddle two words.
        for k, (_, w_start, w_end) in enumerate(spans):
            if start < w_end and w_start < end:
                word_positions[k].append(offset + i)
    words = tuple(
        Word(text=text, index=k, positions=tuple(word_positions[k])) for k, (text, _, _) in enumerate(spans)
    )
    valid = tuple(offset + i for i, real in enumerate(enc["attention_mask"]) if real)
    return PromptTokens(
        prompt=prompt,
        pieces=tuple(tokenizer.convert_ids_to_tokens(ids)),
        valid=valid,
        words=words,
        offset=offset,
    )


def t5_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int, offset: int = 0) -> PromptTokens:
    """T5 layout: ``max_length`` positions from ``offset``: pieces, ``</s>``, then ``<pad>`` (not valid)."""
    return _encode(tokenizer, prompt, max_length, offset)


def clip_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int = 77, offset: int = 0) -> PromptTokens:
    """CLIP layout: ``max_length`` positions from ``offset``: BOS, pieces, EOS, then padding (not valid)."""
    return _encode(tokenizer, prompt, max_length, offset)


def zero_tokens(prompt: str, length: int, offset: int) -> PromptTokens:
    """A segment of zero embeddings: all padding, no word has positions in it."""
    words = tuple(Word(text=text, index=k, positions=()) for k, (text, _, _) in enumerate(split_words(prompt)))
    return PromptTokens(prompt=prompt, pieces=(PAD_PIECE,) * length, valid=(), words=words, offset=offset)


def concat(*parts: PromptTokens) -> PromptTokens:
    """Join consecutive segments of one prompt (SD3: ``clip_tokens(..., offset=0)`` + ``t5_tokens(..., offset=77)``).

    Each part must start where the previous one ends. Words are merged by word index, so a word's positions cover
    every segment.
    """
    if not parts:
        raise ValueError("concat needs at least one part")
    first = parts[0]
    start = first.offset
    for part in parts:
        if part.prompt != first.prompt:
            raise ValueError(f"cannot concat tokens of different prompts: {first.prompt!r} and {part.prompt!r}")
        if part.offset != start:
            raise ValueError(
                f"segment starts at position {part.offset}, expected {start} (build it with offset={start})"
            )
        if [w.text for w in part.words] != [w.text for w in first.words]:
            raise ValueError("segments disagree on the prompt's words")
        start += len(part)
    words = tuple(
        Word(w.text, w.index, tuple(sorted(p for part in parts for p in part.words[k].positions)))
        for k, w in enumerate(first.words)
    )
    return PromptTokens(
        prompt=first.prompt,
        pieces=tuple(piece for part in parts for piece in part.pieces),
        valid=tuple(p for part in parts for p in part.valid),
        words=words,
        offset=first.offset,
    )
