"""Concept specs: what to erase, what it is also called, what to draw instead, and what must not change.

A :class:`ConceptSpec` is plain data (YAML on disk, no LLM at run time). Three sources:

* the model's world (:mod:`erase.worlds`): the shapes world derives a spec for every colour and shape from its
  vocabulary; the open world of real models ships YAML files in ``erase/specs/`` (``nudity``, ``van-gogh``,
  ``parachute``);
* a user YAML file (``--spec``) or CLI flags.

YAML layout (every key but ``name`` and ``targets`` optional)::

    name: red
    targets: [red]                 # words whose concept is erased; every training prompt contains one
    synonyms: [crimson, scarlet]   # must be erased too (generality); never trained on as targets
    anchors: [green, blue]         # words replacing the target in anchor prompts: the first one the prompt
                                   # does not already name; none: drop the target
    irrelevant: [green, blue]      # concepts that must stay intact (preservation, contrastive positives)
    prompts: ["a red circle"]      # training prompts for the erase step
    preserve_prompts: ["a green circle"]   # prompts sampled for the preservation step
    eta: 1                         # ESD's η on this concept's prompts; none: the run's (``--eta``, the model's);
                                   # raised where a run balances several concepts' pushes (``--balance-eta``)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from attnscope.tokens import split_words

__all__ = [
    "ConceptNotInPromptError",
    "ConceptSpec",
    "PromptTooLongError",
    "SpecError",
    "UnknownConceptError",
    "check_prompts_fit",
    "find_word",
    "load_spec",
    "preservation_prompts",
    "replace_word",
    "suggest",
    "words_of",
]


class SpecError(ValueError):
    """A concept spec is malformed (missing keys, wrong types, empty lists)."""


class UnknownConceptError(SpecError):
    """The concept is not a word the model knows / no spec exists for it; the message suggests close words."""


class ConceptNotInPromptError(SpecError):
    """A training prompt does not contain any of the concept's target words, so there is nothing to erase in it."""


class PromptTooLongError(SpecError):
    """A spec prompt does not fit the model's text length: the words erasure needs would be cut off."""


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to erase. See the module docstring for the meaning of each field."""

    name: str
    targets: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    anchors: tuple[str, ...] = ()
    irrelevant: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    preserve_prompts: tuple[str, ...] = ()
    eta: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SpecError("a concept spec needs a non-empty 'name'")
        if self.eta is not None:
            if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not self.eta > 0:
                raise SpecError(f"spec {self.name!r}: 'eta' must be a positive number, got {self.eta!r}")
            object.__setattr__(self, "eta", float(self.eta))
        for key in ("targets", "synonyms", "anchors", "irrelevant", "prompts", "preserve_prompts"):
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
        words = {w.lower() for w in words_of(prompt)}
        for target in self.targets:
            if all(part.lower() in words for part in words_of(target)) and find_word(prompt, target):
                return target
        raise ConceptNotInPromptError(
            f"training prompt {prompt!r} does not contain the concept {self.name!r} (targets: "
            f"{', '.join(self.targets)}); every training prompt must name it"
        )

    @property
    def erased_words(self) -> tuple[str, ...]:
        """The words whose concept is erased: the targets and their synonyms."""
        return (*self.targets, *self.synonyms)

    def named_in(self, prompt: str) -> str | None:
        """The first of :attr:`erased_words` that ``prompt`` names (whole word, case-insensitive); None if none."""
        return next((w for w in self.erased_words if find_word(prompt, w)), None)

    def anchor_for(self, prompt: str, avoid: Sequence[str] = ()) -> str:
        """The anchor that replaces this concept in ``prompt``: the first that ``prompt`` does not already name (the
        first at all if it names them all), never one that contains a word of ``avoid``; "" (drop the target) when
        none is left."""
        usable = [a for a in self.anchors if not any(find_word(a, word) for word in avoid)]
        return next((a for a in usable if not find_word(prompt, a)), usable[0] if usable else "")

    def anchor_prompt(self, prompt: str) -> str:
        """``prompt`` with its target replaced by :meth:`anchor_for` it."""
        return replace_word(prompt, self.target_in(prompt), self.anchor_for(prompt))

    def check_prompts(self) -> None:
        """Raise ConceptNotInPromptError for the first training prompt that lacks a target word."""
        for prompt in self.prompts:
            self.target_in(prompt)
        for prompt in self.preserve_prompts:
            found = self.named_in(prompt)
            if found:
                raise SpecError(
                    f"spec {self.name!r}: preservation prompt {prompt!r} contains the erased word {found.lower()!r}"
                )

    # ------------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> ConceptSpec:
        if not isinstance(data, dict):
            raise SpecError(f"{source}: a spec must be a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"anchor"})
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if "targets" not in data and "name" in data:
            data = {**data, "targets": [data["name"]]}
        if "anchor" in data:  # the one-anchor form: ``anchor: kite`` is ``anchors: [kite]``
            single = data["anchor"]
            data = {k: v for k, v in data.items() if k != "anchor"} | {"anchors": [single] if single else []}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def with_overrides(self, **changes: Any) -> ConceptSpec:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def words_of(text: str) -> list[str]:
    """The words of ``text``, by the word rule of ``attnscope.tokens``."""
    return [word for word, _, _ in split_words(text)]


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


def preservation_prompts(specs: Sequence[ConceptSpec]) -> list[str]:
    """Union of the specs' preservation prompts without any that name an erased word (multi-concept runs)."""
    prompts = [p for s in specs for p in s.preserve_prompts if not any(spec.named_in(p) for spec in specs)]
    return list(dict.fromkeys(prompts))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice: PyYAML keeps the last value silently, so an
    ``eta: 1`` added above a saved spec's ``eta: null`` would train at the default without a word."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and on which line, without PyYAML's quoted snippet."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        return f"{err.problem}, line {err.problem_mark.line + 1}" if err.problem_mark else err.problem
    return str(err).splitlines()[0]


def load_spec(path: str | Path) -> list[ConceptSpec]:
    """Read one spec (a mapping) or several (a list of mappings, or ``{concepts: [...]}``) from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({_one_line(err)})") from None
    if isinstance(data, dict) and "concepts" in data:
        data = data["concepts"]
    items = data if isinstance(data, list) else [data]
    return [ConceptSpec.from_dict(item, source=str(path)) for item in items]


def suggest(word: str, candidates: Iterable[str], cutoff: float = 0.5, lead: str = "did you mean") -> str:
    """``"; did you mean 'a', 'b'?"`` (``lead`` says how to ask) for the distinct close matches of ``word`` among
    ``candidates``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=3, cutoff=cutoff)
    return f"; {lead} {', '.join(repr(c) for c in close)}?" if close else ""


def check_prompts_fit(pipe: Any, specs: Sequence[ConceptSpec], text_length: int) -> None:
    """Raise :class:`PromptTooLongError` for the first spec prompt whose words erasure needs fall beyond the
    model's text length: a training prompt's target (and that word swapped for each synonym and irrelevant
    concept, the rows the cache draws), or any word of a preservation prompt."""
    from attnscope.adapters import adapter_for
    from attnscope.tokens import TruncatedWordError

    adapter = adapter_for(pipe)

    def fits(prompt: str, words: Iterable[str]) -> str | None:
        tokens = adapter.prompt_tokens(pipe, prompt, text_length)
        for word in words:
            try:
                tokens.positions(word)
            except TruncatedWordError:
                return word
        return None

    for spec in specs:
        checks = []
        for prompt in spec.prompts:
            target = spec.target_in(prompt)
            checks.append(("training", prompt, [target]))
            checks += [("training", replace_word(prompt, target, w), [w]) for w in (*spec.synonyms, *spec.irrelevant)]
        checks += [("preservation", prompt, words_of(prompt)) for prompt in spec.preserve_prompts]
        for kind, prompt, words in checks:
            cut = fits(prompt, words)
            if cut is not None:
                raise PromptTooLongError(
                    f"spec {spec.name!r}: the {kind} prompt {prompt!r} is longer than the model's text length "
                    f"({text_length} tokens): {cut!r} would be cut off; shorten the prompt"
                )
