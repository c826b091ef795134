"""Concept specs: what to erase, what it is also called, what to draw instead, and what must not change.

A :class:`ConceptSpec` is plain data (YAML on disk, no LLM at run time). Three sources:

* the shapes world: :func:`shapes_spec` derives a spec for every colour and shape from
  ``attnscope.shapes.vocabulary`` (synonyms, the other colours/shapes as irrelevant concepts, prompts);
* shipped YAML files for real models in ``erase/specs/`` (``nudity``, ``van-gogh``, ``parachute``);
* a user YAML file (``--spec``) or CLI flags.

YAML layout (every key but ``name`` and ``targets`` optional)::

    name: red
    targets: [red]                 # words whose concept is erased; every training prompt contains one
    synonyms: [crimson, scarlet]   # must be erased too (generality); never trained on as targets
    anchor: null                   # word replacing the target in the anchor prompt; null: drop the target
    irrelevant: [green, blue]      # concepts that must stay intact (preservation, contrastive positives)
    prompts: ["a red circle"]      # training prompts for the erase step
    preserve_prompts: ["a green circle"]   # prompts sampled for the preservation step
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SPECS_DIR",
    "ConceptNotInPromptError",
    "ConceptSpec",
    "SpecError",
    "UnknownConceptError",
    "builtin_specs",
    "check_known_words",
    "find_word",
    "load_spec",
    "replace_word",
    "resolve_spec",
    "shapes_spec",
]

#: Folder of the shipped YAML specs for real models.
SPECS_DIR = Path(__file__).with_name("specs")


class SpecError(ValueError):
    """A concept spec is malformed (missing keys, wrong types, empty lists)."""


class UnknownConceptError(SpecError):
    """The concept is not a word the model knows / no spec exists for it; the message suggests close words."""


class ConceptNotInPromptError(SpecError):
    """A training prompt does not contain any of the concept's target words, so there is nothing to erase in it."""


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to erase. See the module docstring for the meaning of each field."""

    name: str
    targets: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    anchor: str | None = None
    irrelevant: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    preserve_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SpecError("a concept spec needs a non-empty 'name'")
        for key in ("targets", "synonyms", "irrelevant", "prompts", "preserve_prompts"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) and v.strip() for v in value):
                raise SpecError(f"spec {self.name!r}: {key!r} must be a list of non-empty strings, got {value!r}")
            object.__setattr__(self, key, tuple(v.strip() for v in value))
        if not self.targets:
            raise SpecError(f"spec {self.name!r} has no target words")
        if not self.prompts:
            object.__setattr__(self, "prompts", tuple(f"a photo of {t}" for t in self.targets))
        overlap = {w.lower() for w in self.targets} & {w.lower() for w in self.irrelevant}
        if overlap:
            raise SpecError(f"spec {self.name!r}: {sorted(overlap)} cannot be both a target and irrelevant")

    # ------------------------------------------------------------------------------------ prompts
    def target_in(self, prompt: str) -> str:
        """The first target word of ``prompt`` (case-insensitive, whole word); ConceptNotInPromptError if none."""
        words = {w.lower() for w in _words(prompt)}
        for target in self.targets:
            if all(part.lower() in words for part in _words(target)) and find_word(prompt, target):
                return target
        raise ConceptNotInPromptError(
            f"training prompt {prompt!r} does not contain the concept {self.name!r} (targets: "
            f"{', '.join(self.targets)}); every training prompt must name it"
        )

    def anchor_prompt(self, prompt: str) -> str:
        """``prompt`` with its target replaced by the anchor (or dropped when the anchor is ``None``)."""
        return replace_word(prompt, self.target_in(prompt), self.anchor or "")

    def check_prompts(self) -> None:
        """Raise ConceptNotInPromptError for the first training prompt that lacks a target word."""
        for prompt in self.prompts:
            self.target_in(prompt)
        erased = [w.lower() for w in (*self.targets, *self.synonyms)]
        for prompt in self.preserve_prompts:
            found = [w for w in erased if find_word(prompt, w)]
            if found:
                raise SpecError(f"spec {self.name!r}: preservation prompt {prompt!r} contains the erased word {found[0]!r}")

    # ------------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> ConceptSpec:
        if not isinstance(data, dict):
            raise SpecError(f"{source}: a spec must be a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if "targets" not in data and "name" in data:
            data = {**data, "targets": [data["name"]]}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def with_overrides(self, **changes: Any) -> ConceptSpec:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['’][^\W_]+)*", text)


def _word_pattern(word: str) -> str:
    # Whole word: not preceded or followed by a letter/digit (the word rule of attnscope.tokens).
    return rf"(?<![^\W_]){re.escape(word)}(?![^\W_])"


def find_word(prompt: str, word: str) -> re.Match[str] | None:
    """The first whole-word, case-insensitive occurrence of ``word`` (may be a phrase) in ``prompt``."""
    return re.search(_word_pattern(word), prompt, flags=re.IGNORECASE)


def replace_word(prompt: str, word: str, by: str, every: bool = False) -> str:
    """Replace the first (``every``: each) whole-word occurrence of ``word`` (case-insensitive) by ``by``; tidy
    the spaces. ConceptNotInPromptError if there is none."""
    if find_word(prompt, word) is None:
        raise ConceptNotInPromptError(f"{word!r} is not a word of {prompt!r}")
    out = re.sub(_word_pattern(word), lambda _: by, prompt, count=0 if every else 1, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", out).strip()


def load_spec(path: str | Path) -> list[ConceptSpec]:
    """Read one spec (a mapping) or several (a list of mappings, or ``{concepts: [...]}``) from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from None
    if isinstance(data, dict) and "concepts" in data:
        data = data["concepts"]
    items = data if isinstance(data, list) else [data]
    return [ConceptSpec.from_dict(item, source=str(path)) for item in items]


def builtin_specs() -> dict[str, Path]:
    """Shipped real-model specs: name -> YAML path."""
    return {p.stem: p for p in sorted(SPECS_DIR.glob("*.yaml"))}


# -------------------------------------------------------------------------------------- shapes world
def shapes_spec(word: str) -> ConceptSpec:
    """The spec of a shapes-world colour or shape, from ``attnscope.shapes.vocabulary``.

    Prompts: the concept with every partner (each shape for a colour, each colour for a shape) alone, plus
    two-object scenes with a different object. Irrelevant: the other concepts of the same kind; preservation
    prompts: every single-object scene that contains neither the concept nor a synonym, and
    ``TWO_OBJECT_PRESERVATION`` two-object scenes of them (see :func:`_two_object_preservation`).
    """
    from attnscope.shapes import vocabulary as vocab

    word = word.lower()
    if word not in vocab.COLORS and word not in vocab.SHAPES:
        raise _unknown_shapes_word(word)
    is_color = word in vocab.COLORS
    same_kind = list(vocab.COLORS) if is_color else list(vocab.SHAPES)
    partners = list(vocab.SHAPES) if is_color else list(vocab.COLORS)
    irrelevant = [w for w in same_kind if w != word]

    def phrase(concept: str, partner: str) -> str:
        colour, shape = (concept, partner) if is_color else (partner, concept)
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"

    prompts = [phrase(word, p) for p in partners]
    # Two-object prompts: the concept mentioned first and second, so its position in the sentence varies.
    for i, partner in enumerate(partners):
        other = phrase(irrelevant[i % len(irrelevant)], partners[(i + 1) % len(partners)])
        pair = (phrase(word, partner), other) if i % 2 == 0 else (other, phrase(word, partner))
        prompts.append(" and ".join(pair))
    preserve = [phrase(w, p) for w in irrelevant for p in partners] + _two_object_preservation(irrelevant, partners, phrase)
    return ConceptSpec(
        name=word,
        targets=(word,),
        synonyms=tuple(vocab.SYNONYMS[word]),
        anchor=None,
        irrelevant=tuple(irrelevant),
        prompts=tuple(prompts),
        preserve_prompts=tuple(preserve),
    )


#: Two-object preservation prompts per shapes-world spec. Two-object images are what the base model draws least
#: reliably, so they are what an erasure LoRA perturbs most (8-seed Acc_ir: 3 of them lost 4 of 128 images, these
#: 9 lost 3; the difference is within noise, see benchmarks/RESULTS.md).
TWO_OBJECT_PRESERVATION = 9


def _two_object_preservation(
    irrelevant: list[str], partners: list[str], phrase: Callable[[str, str], str]
) -> list[str]:
    """Two-object scenes without the concept in a fixed order: pairs of different objects, then pairs sharing the
    irrelevant word (two greens), then pairs sharing the partner (two circles). Object pairs that the shapes evaluation's two-object prompts
    name are held out, so that its Acc_ir measures preservation on pairs the LoRA never trained on."""
    from attnscope.shapes.metrics import TWO_OBJECT_PROMPTS
    from attnscope.shapes.vocabulary import parse_prompt

    n, m = len(irrelevant), len(partners)
    pairs = [((irrelevant[i], partners[i % m]), (irrelevant[(i + 1) % n], partners[(i + 1) % m])) for i in range(n)]
    pairs += [((w, partners[j]), (w, partners[k])) for w in irrelevant for j in range(m) for k in range(j + 1, m)]
    pairs += [((irrelevant[i], p), (irrelevant[j], p)) for p in partners for i in range(n) for j in range(i + 1, n)]
    held_out = {frozenset(parse_prompt(prompt)) for prompt in TWO_OBJECT_PROMPTS}
    prompts: list[str] = []
    for first, second in pairs:
        text = f"{phrase(*first)} and {phrase(*second)}"
        if frozenset(parse_prompt(text)) not in held_out and text not in prompts:
            prompts.append(text)
    return prompts[:TWO_OBJECT_PRESERVATION]


def _unknown_shapes_word(word: str) -> UnknownConceptError:
    from attnscope.shapes import vocabulary as vocab

    if word in vocab.CANONICAL:
        return UnknownConceptError(
            f"{word!r} is a synonym of {vocab.CANONICAL[word]!r} in the shapes world: erase "
            f"--concept {vocab.CANONICAL[word]} (its synonyms are erased with it)"
        )
    concepts = [*vocab.COLORS, *vocab.SHAPES]
    close = difflib.get_close_matches(word, [*concepts, *vocab.CANONICAL], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownConceptError(
        f"the shapes model does not know the concept {word!r}{hint} (concepts: {', '.join(concepts)})"
    )


def resolve_spec(concept: str, model: str = "shapes") -> ConceptSpec:
    """The spec for ``--concept``: the shapes vocabulary for ``model="shapes"``, else a shipped YAML spec.

    Raises UnknownConceptError with close-word suggestions (difflib) when neither knows the concept.
    """
    concept = concept.strip()
    if model == "shapes":
        return shapes_spec(concept)
    shipped = builtin_specs()
    key = concept.lower().replace(" ", "-")
    if key in shipped:
        return load_spec(shipped[key])[0]
    close = difflib.get_close_matches(key, list(shipped), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownConceptError(
        f"no spec for the concept {concept!r}{hint} Shipped specs: {', '.join(shipped) or '(none)'}; "
        "write one (see erase/README.md) and pass --spec FILE"
    )


def check_known_words(pipe: Any, words: Iterable[str], model: str) -> None:
    """Raise UnknownConceptError if the model's text side cannot represent a word.

    Shapes world: the word must be in its vocabulary (the model was trained on nothing else). Other models: the
    T5 tokenizer must not map any of the word's pieces to ``<unk>``. Suggestions come from difflib over the
    shapes vocabulary, or over the tokenizer's whole-word pieces.
    """
    words = list(words)
    if model == "shapes":
        from attnscope.shapes import vocabulary as vocab

        for word in words:
            for part in _words(word):
                if part.lower() not in vocab.ALL_WORDS:
                    raise _unknown_shapes_word(part.lower())
        return
    tokenizer = pipe.tokenizer_2
    unk = tokenizer.unk_token_id
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids or (unk is not None and unk in ids):
            whole = [p.lstrip("▁") for p in tokenizer.get_vocab() if p.startswith("▁") and len(p) > 2]
            close = difflib.get_close_matches(word.lower(), whole, n=3, cutoff=0.6)
            hint = f"; close words it knows: {', '.join(close)}" if close else ""
            raise UnknownConceptError(f"the model's tokenizer does not know the word {word!r}{hint}")
