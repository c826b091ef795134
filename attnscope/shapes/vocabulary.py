"""Vocabulary of the shapes world: colours, shapes, their synonyms, and prompt validation.

The bundled model was trained on captions built only from these words (see ``render.make_caption``), so a prompt
may contain nothing else: ``check_prompt`` rejects any other word with an error naming it, because the model has
no way to draw it.

Synonyms appear in training captions (a quarter of the colour/shape words are replaced by one), so the model
generates them like the canonical word. Erasure experiments use them to measure generality: after erasing "red",
"crimson" and "scarlet" should not come back.
"""

from __future__ import annotations

import re

#: Canonical colour names and their RGB values (uint8) as rendered.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 195, 20),
}

#: Canonical shape names.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Plain background colour of every scene (light grey: overlays of heat maps stay readable on it).
BACKGROUND: tuple[int, int, int] = (235, 235, 235)

#: Canonical word -> synonyms used in training captions. Every synonym maps to exactly one canonical word.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "amber"),
    "circle": ("disc", "orb"),
    "square": ("box", "block"),
    "triangle": ("wedge", "pyramid"),
}

#: Words that only glue objects together in captions ("a red circle next to a blue square").
FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "and", "with", "next", "to", "beside", "plus", "the")

#: Synonym (or canonical word) -> canonical word.
CANONICAL: dict[str, str] = {w: w for w in (*COLORS, *SHAPES)} | {
    syn: canon for canon, syns in SYNONYMS.items() for syn in syns
}

#: Every word a prompt may contain.
ALL_WORDS: frozenset[str] = frozenset(CANONICAL) | frozenset(FUNCTION_WORDS)

_WORD_RE = re.compile(r"[a-z]+")


class OutOfVocabularyError(ValueError):
    """A prompt contains words outside the shapes vocabulary (the model cannot draw them); ``.words`` lists them in
    order of appearance. Not a lookup error of a word in a prompt (``attnscope.UnknownWordError``)."""

    def __init__(self, words: list[str]):
        self.words = words
        super().__init__(
            f"the shapes model cannot draw {', '.join(repr(w) for w in words)}: not in its vocabulary. "
            f"Colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; synonyms: "
            + "; ".join(f"{c}: {', '.join(s)}" for c, s in SYNONYMS.items())
        )


def words_of(prompt: str) -> list[str]:
    """Split a prompt into lower-case words (punctuation dropped), in order."""
    return _WORD_RE.findall(prompt.lower())


def check_prompt(prompt: str) -> list[str]:
    """Validate a prompt against the vocabulary and return its words.

    Raises:
        OutOfVocabularyError: naming every word the model was not trained on (also for characters that are not
            letters, spaces or simple punctuation, e.g. digits).
    """
    stray = re.sub(r"[a-zA-Z\s,.;!]", "", prompt)
    unknown = [w for w in words_of(prompt) if w not in ALL_WORDS]
    if stray:
        unknown.append(stray)
    if unknown:
        raise OutOfVocabularyError(list(dict.fromkeys(unknown)))
    return words_of(prompt)


def canonical(word: str) -> str:
    """Canonical colour/shape for a word or synonym (``"crimson"`` -> ``"red"``); KeyError otherwise."""
    return CANONICAL[word.lower()]


def is_color(word: str) -> bool:
    """True for a colour word or a colour synonym."""
    return CANONICAL.get(word.lower()) in COLORS


def is_shape(word: str) -> bool:
    """True for a shape word or a shape synonym."""
    return CANONICAL.get(word.lower()) in SHAPES


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """Objects a prompt asks for, as canonical ``(colour, shape)`` pairs in prompt order.

    Each shape word closes an object whose colour is the last colour word before it ("a crimson box and a blue
    disc" -> [("red", "square"), ("blue", "circle")]). Raises OutOfVocabularyError for unknown words and ValueError
    for a shape without a colour or a dangling colour.
    """
    objects: list[tuple[str, str]] = []
    color: str | None = None
    for w in check_prompt(prompt):
        if is_color(w):
            if color is not None:
                raise ValueError(f"colour {color!r} without a shape in {prompt!r}")
            color = canonical(w)
        elif is_shape(w):
            if color is None:
                raise ValueError(f"shape {w!r} without a colour in {prompt!r}")
            objects.append((color, canonical(w)))
            color = None
    if color is not None:
        raise ValueError(f"colour {color!r} without a shape in {prompt!r}")
    return objects


def occurrence_query(words: list[str], k: int) -> str:
    """``"word#n"`` for ``words[k]``: which occurrence of that word it is, counted in prompt order (the word
    selector of ``TokenMaps.word``)."""
    return f"{words[k]}#{words[: k + 1].count(words[k])}"
