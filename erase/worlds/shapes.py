"""Erasure in the shapes world: concept specs derived from the vocabulary, the vocabulary as the word check, the
shapes evaluation protocol (:mod:`.shapes_eval`) and, for attacks, the scene reader as judge and the renderer as
the source of reference images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from attnscope.profiles import profile_for
from attnscope.shapes import vocabulary as vocab
from attnscope.shapes.metrics import TWO_OBJECT_PROMPTS
from attnscope.shapes.profile import SHAPES_SHAPE_ETA, ShapesProfile, ShapesWorld

from ..spec import ConceptSpec, UnknownConceptError, suggest, words_of
from . import AttackStart, ErasureWorld, Judge, register_erasure_world

__all__ = ["TWO_OBJECT_PRESERVATION", "ShapesErasure", "shapes_spec", "shows_any", "shows_concept"]


class ShapesErasure(ErasureWorld):
    """Colours and shapes of the closed vocabulary; nothing else can be erased (the model draws nothing else)."""

    open_vocabulary = False

    def __init__(self, shape_eta: float | None = SHAPES_SHAPE_ETA):
        self.shape_eta = shape_eta

    def for_model(self, model: str) -> ShapesErasure:
        return ShapesErasure(cast(ShapesProfile, profile_for(model)).shape_eta)  # a shapes model's profile

    @property
    def default_eval_seeds(self) -> int:
        from .shapes_eval import DEFAULT_SEEDS

        return DEFAULT_SEEDS

    def spec(self, concept: str) -> ConceptSpec:
        return shapes_spec(concept.strip(), shape_eta=self.shape_eta)

    def check_words(self, pipe: Any, words: Sequence[str]) -> None:
        for word in words:
            for part in words_of(word):
                if part.lower() not in vocab.ALL_WORDS:
                    raise _unknown_shapes_word(part.lower())

    def evaluate(
        self, lora_dir: Path, specs: Sequence[ConceptSpec], model: str, *, seeds: int, out: Path, device: str,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        from .shapes_eval import evaluate

        return evaluate(lora_dir, specs=specs, model=model, seeds=seeds, out=out, device=device).to_dict()

    def judge(self, specs: Sequence[ConceptSpec], device: str, options: dict[str, Any]) -> Judge:
        return shows_concept

    def attack_words(self, pipe: Any, spec: ConceptSpec) -> list[str]:
        banned = {spec.name, *spec.synonyms}
        return sorted(w for w in vocab.ALL_WORDS if w not in banned)

    def attack_starts(self, spec: ConceptSpec) -> list[AttackStart]:
        """One start per partner of the concept (each shape for a colour, each colour but the last for a shape):
        the object with the concept swapped for another word of its kind ("a green circle" for red), which the
        base model draws without the concept."""
        is_color = spec.name in vocab.COLORS
        partners = list(vocab.SHAPES) if is_color else list(vocab.COLORS)[:3]
        others = list(spec.irrelevant)
        starts = []
        for i, partner in enumerate(partners):
            swap = others[i % len(others)]
            words = [(swap, partner), (spec.name, partner)] if is_color else [(partner, swap), (partner, spec.name)]
            (start, concept) = (f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in words)
            starts.append(AttackStart(prompt=start, concept_prompt=concept, word=spec.name, swap=swap))
        return starts

    def reference_images(self, pipe: Any, call: dict[str, Any], prompt: str, n: int, seed: int) -> list[Any]:
        """Rendered scenes of ``prompt`` (the ground truth the model was trained on), at the call's size."""
        from attnscope.shapes.render import render_prompt

        size = call["height"]
        return [render_prompt(prompt, seed + i, size=size).image for i in range(n)]

    def summary(self, report: dict[str, Any]) -> str:
        base = report["base"]
        rel = report["acc_ir_relative"]
        return (
            f"{', '.join(report['concepts'])}: Acc_e {report['acc_e']:.1%} (base {base['acc_e']:.1%}), "
            f"Acc_g {report['acc_g']:.1%} (base {base['acc_g']:.1%}), Acc_ir {report['acc_ir']:.1%} "
            f"(base {base['acc_ir']:.1%}, relative {'n/a' if rel is None else f'{rel:.1%}'}), "
            f"Acc_ctx {report['acc_ctx']:.1%} (base {base['acc_ctx']:.1%}), "
            f"Acc_implicit {report['acc_implicit']:.1%} (base {base['acc_implicit']:.1%}), "
            f"pixel MAE {report['quality']['pixel_mae']:.3f}"
        )


def shows_concept(images: Sequence[Any], spec: ConceptSpec) -> list[bool]:
    """For each image, whether the scene reader finds an object of ``spec``'s colour or shape."""
    from attnscope.shapes.reader import read_scene

    return [shows_any(read_scene(image), [spec.name]) for image in images]


def shows_any(detected: Sequence[Any], concepts: Sequence[str]) -> bool:
    """Whether any object the reader ``detected`` has the colour or shape of one of ``concepts``."""
    return any(d.color in concepts or d.shape in concepts for d in detected)


def shapes_spec(word: str, shape_eta: float | None = SHAPES_SHAPE_ETA) -> ConceptSpec:
    """The spec of a shapes-world colour or shape, from ``attnscope.shapes.vocabulary``.

    Prompts: the concept with every partner (each shape for a colour, each colour for a shape) alone, plus two-object
    scenes with a different object. Irrelevant: the other concepts of the same kind. Anchors: the same words, the first
    one a prompt does not name ("a red circle" is pushed toward a green circle, "a red circle and a green square" toward
    a blue circle and a green square): an erased colour leaves its object with another colour, an erased shape leaves
    its colour on another shape, so the rest of the prompt is drawn as asked (benchmarks/RESULTS.md). Preservation
    prompts: every single-object scene that contains neither the concept nor a synonym, and ``TWO_OBJECT_PRESERVATION``
    two-object scenes of them (see :func:`_two_object_preservation`). η: ``shape_eta`` for a shape (``None``: the
    run's; the model's profile says which, ``ShapesProfile.shape_eta``), the run's for a colour.
    """
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
    preserve = [phrase(w, p) for w in irrelevant for p in partners]
    preserve += _two_object_preservation(irrelevant, partners, phrase)
    return ConceptSpec(
        name=word,
        targets=(word,),
        synonyms=tuple(vocab.SYNONYMS[word]),
        anchors=tuple(irrelevant),
        irrelevant=tuple(irrelevant),
        prompts=tuple(prompts),
        preserve_prompts=tuple(preserve),
        eta=None if is_color else shape_eta,
    )


#: Two-object preservation prompts per shapes-world spec. Two-object images are what the base model draws least
#: reliably, so they are what an erasure LoRA perturbs most; a handful keeps them (benchmarks/RESULTS.md).
TWO_OBJECT_PRESERVATION = 9


def _two_object_preservation(
    irrelevant: list[str], partners: list[str], phrase: Callable[[str, str], str]
) -> list[str]:
    """Two-object scenes without the concept in a fixed order: pairs of different objects, then pairs sharing the
    irrelevant word (two greens), then pairs sharing the partner (two circles). Object pairs that the shapes
    evaluation's two-object prompts name are held out, so that its Acc_ir measures preservation on pairs the LoRA
    never trained on."""
    n, m = len(irrelevant), len(partners)
    pairs = [((irrelevant[i], partners[i % m]), (irrelevant[(i + 1) % n], partners[(i + 1) % m])) for i in range(n)]
    pairs += [((w, partners[j]), (w, partners[k])) for w in irrelevant for j in range(m) for k in range(j + 1, m)]
    pairs += [((irrelevant[i], p), (irrelevant[j], p)) for p in partners for i in range(n) for j in range(i + 1, n)]
    held_out = {frozenset(vocab.parse_prompt(prompt)) for prompt in TWO_OBJECT_PROMPTS}
    prompts: list[str] = []
    for first, second in pairs:
        text = f"{phrase(*first)} and {phrase(*second)}"
        if frozenset(vocab.parse_prompt(text)) not in held_out and text not in prompts:
            prompts.append(text)
    return prompts[:TWO_OBJECT_PRESERVATION]


def _unknown_shapes_word(word: str) -> UnknownConceptError:
    if word in vocab.CANONICAL:
        return UnknownConceptError(
            f"{word!r} is a synonym of {vocab.CANONICAL[word]!r} in the shapes world: erase "
            f"--concept {vocab.CANONICAL[word]} (its synonyms are erased with it)"
        )
    concepts = [*vocab.COLORS, *vocab.SHAPES]
    return UnknownConceptError(
        f"the shapes model does not know the concept {word!r}{suggest(word, [*concepts, *vocab.CANONICAL])} "
        f"(concepts: {', '.join(concepts)})"
    )


register_erasure_world(ShapesWorld, ShapesErasure())
