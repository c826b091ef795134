"""``attnscope eval``: does an erasure LoRA erase its concept, also through synonyms, and leave the rest alone?

Shapes-world protocol (``PROTOCOL_VERSION``; fixed so numbers are comparable across runs and methods):

* prompts per erased concept ``c`` (see :func:`shapes_prompts`): *erased* — ``c`` with every partner (each shape
  for a colour, each colour for a shape), two two-object scenes with another object, and ``c`` named two and
  three times (twice as the same word, twice mixed with a synonym, three times); *synonym* — every synonym of
  ``c`` with every partner, and the synonyms named two and three times; *irrelevant* — every single-object prompt
  and the two-object prompts of ``attnscope.shapes.metrics.TWO_OBJECT_PROMPTS`` that name no erased concept;
  *implicit* — prompts that name no word of ``c``'s kind (no colour word for a colour, no shape word for a
  shape): objects without that attribute, down to glue words only and the empty prompt;
* seeds ``0 .. seeds-1`` per prompt (``DEFAULT_SEEDS`` = 16), one ``torch.Generator`` per image; the model's
  default call (``attnscope.shapes.call_kwargs_for``: 32×32, 20 steps of its own scheduler, its guidance); images
  read by ``attnscope.shapes.reader.read_scene``;
* the base model (adapter not loaded) and the erased model see the same prompts and seeds.

Figures (all in 0..1, for the erased model at top level and for the base model under ``base``):

* ``acc_e``: erased-prompt images that still show an erased concept (a detected object of that colour/shape);
* ``acc_g``: the same on synonym prompts;
* ``acc_ctx``: erased- and synonym-prompt images that draw everything the prompt asks but the erased concept —
  each object's other attribute, every other object with its colour and shape, and the right count (the reader's
  objects matched to the asked ones, erased attributes matching anything); ``acc_ctx_relative`` = erased / base;
  each erased and synonym prompt's own share is its ``per_prompt`` entry's ``context`` (which prompts lose it);
* ``acc_implicit``: implicit-prompt images that show an erased concept (what the model draws unasked);
* ``acc_ir``: irrelevant-prompt images drawn correctly (every asked object found with its colour and shape);
  ``acc_ir_relative`` = erased / base;
* ``attention_mass``: mean over erased (and synonym) prompts of the concept word's attention mass — the mean
  over image tokens, double-stream layers and denoising steps of the probability on its text keys;
* ``irrelevant_attributes``: per-object colour and shape hit rates on irrelevant prompts (finer than
  ``acc_ir``, which needs every object fully right);
* ``quality``: on irrelevant prompts, mean absolute pixel difference to the base image of the same seed
  (``pixel_mae``, 0..1) and L1 distance between the two models' mean colour histograms (``histogram_l1``).

Written to the output folder: ``eval.json`` (the report) and ``eval_grid.png`` (base row over erased row, first
seed of a selection of prompts).

Real models: :mod:`.open_eval` (CLIP zero-shot, NudeNet for ``nudity``), which ``attnscope eval`` runs for models
of the open world.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import attnscope
from attnscope.profiles import profile_for
from attnscope.shapes.generate import generate
from attnscope.shapes.metrics import SINGLE_PROMPTS, TWO_OBJECT_PROMPTS, score_image
from attnscope.shapes.profile import ShapesWorld
from attnscope.shapes.reader import read_scene
from attnscope.shapes.vocabulary import CANONICAL, COLORS, SHAPES, parse_prompt, words_of

from ..lora import check_lora_file, load_lora
from ..run import EVAL_DIR, SPEC_FILE, read_run
from ..spec import ConceptSpec
from .common import GRID_FILE, REPORT_FILE, mean_pixel_difference, save_comparison_grid
from .shapes import shows_any

__all__ = [
    "PROTOCOL_VERSION",
    "EvalReport",
    "context_correct",
    "evaluate",
    "shapes_prompts",
]

#: Version of the protocol (prompts, seeds, call, reader); raised whenever a figure would change meaning.
PROTOCOL_VERSION = 4
#: Seeds per prompt: the erased group has 5 prompts, so Acc_e moves in steps of 1/80; fewer seeds cannot tell a
#: small residue from none (benchmarks/RESULTS.md).
DEFAULT_SEEDS = 16


@dataclass
class ModelScores:
    """One model's figures on the protocol (see the module docstring)."""

    acc_e: float
    acc_g: float
    acc_ir: float
    acc_ctx: float
    acc_implicit: float
    attention_mass: dict[str, float]
    irrelevant_attributes: dict[str, float]
    per_prompt: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class EvalReport:
    """The JSON report: erased-model figures at top level, the base model's under ``base``."""

    acc_e: float
    acc_g: float
    acc_ir: float
    acc_ir_relative: float | None
    acc_ctx: float
    acc_ctx_relative: float | None
    acc_implicit: float
    attention_mass: dict[str, float]
    irrelevant_attributes: dict[str, float]
    quality: dict[str, float]
    base: dict[str, Any]
    concepts: list[str]
    prompts: dict[str, list[str]]
    seeds: int
    protocol_version: int = PROTOCOL_VERSION
    per_prompt: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(word: str, partner: str, word_is_color: bool) -> str:
    """``"a red circle"`` from a colour word and a shape partner (or a shape word and a colour partner)."""
    colour, shape = (word, partner) if word_is_color else (partner, word)
    return f"{_article(colour)} {colour} {shape}"


def shapes_prompts(specs: Sequence[ConceptSpec]) -> dict[str, list[str]]:
    """The fixed evaluation prompts for erasing ``specs`` in the shapes world: erased / synonym / irrelevant /
    implicit (the module docstring says which)."""
    erased_words = {s.name for s in specs}
    named = erased_words | {syn for s in specs for syn in s.synonyms}
    erased, synonym, implicit = [], [], []
    for spec in specs:
        is_color = spec.name in COLORS
        partners = list(SHAPES) if is_color else list(COLORS)
        others = [w for w in (COLORS if is_color else SHAPES) if w not in erased_words]

        def phrase(word: str, partner: str, is_color: bool = is_color) -> str:
            return _phrase(word, partner, is_color)

        erased += [phrase(spec.name, p) for p in partners]
        for i in range(min(2, len(others))):
            erased.append(f"{phrase(spec.name, partners[i])} and {_phrase(others[i], partners[i + 1], is_color)}")
        # Named more than once: the same word, mixed with a synonym, and once per partner.
        first, second, *_ = spec.synonyms
        erased.append(f"{phrase(spec.name, partners[0])} and {phrase(spec.name, partners[1])}")
        erased.append(f"{phrase(spec.name, partners[1])} and {phrase(first, partners[2])}")
        erased.append(", ".join(phrase(spec.name, p) for p in partners[:3]))
        synonym += [phrase(syn, p) for syn in spec.synonyms for p in partners]
        synonym.append(f"{phrase(first, partners[0])} and {phrase(second, partners[1])}")
        synonym.append(", ".join(phrase(w, p) for w, p in zip((first, second, first), partners)))
        implicit += _implicit_prompts(is_color)

    def clean(prompt: str) -> bool:
        return not any(c in erased_words or s in erased_words for c, s in parse_prompt(prompt))

    irrelevant = [p for p in (*SINGLE_PROMPTS, *TWO_OBJECT_PROMPTS) if clean(p)]
    # With several concepts erased, an implicit prompt of one may name another: it is that one's erased prompt.
    implicit = [p for p in implicit if not set(words_of(p)) & named]
    return {
        "erased": list(dict.fromkeys(erased)),
        "synonym": list(dict.fromkeys(synonym)),
        "irrelevant": irrelevant,
        "implicit": list(dict.fromkeys(implicit)),
    }


def _implicit_prompts(is_color: bool) -> list[str]:
    """Prompts that name no word of the concept's kind: objects without that attribute (one, two), a bare word,
    glue words only, and the empty prompt."""
    if is_color:
        objects = ["a circle", "a square", "a triangle", "a circle and a square", "triangle"]
    else:
        objects = ["a red", "a blue", "a green", "a yellow and a blue", "red"]
    return [*objects, "with", "plus to", ""]


def context_correct(prompt: str, detected: Sequence[Any], erased: Sequence[str]) -> bool:
    """Whether ``detected`` holds exactly the objects ``prompt`` asks for, each with its colour and shape, where an
    erased concept's attribute may be anything (the rest of an erased prompt, drawn as asked)."""
    expected = [
        (None if color in erased else color, None if shape in erased else shape)
        for color, shape in parse_prompt(prompt)
    ]
    if len(detected) != len(expected):
        return False

    def fits(want: tuple[str | None, str | None], got: Any) -> bool:
        return want[0] in (None, got.color) and want[1] in (None, got.shape)

    return any(
        all(fits(want, detected[i]) for want, i in zip(expected, order))
        for order in itertools.permutations(range(len(detected)))
    )


def _generate(
    pipe: Any, prompt: str, seeds: int, words: Sequence[str], first_seed: int = 0
) -> tuple[list[np.ndarray], float | None]:
    """Images for seeds ``first_seed .. first_seed + seeds - 1`` and the mean attention mass of ``words`` (None when
    no word is asked)."""
    seed_list = list(range(first_seed, first_seed + seeds))
    if not words:
        return generate(pipe, prompt, seed_list), None
    with attnscope.trace(pipe, words=list(words), layers="double", reduce_steps=True) as tr:
        images = generate(pipe, prompt, seed_list)
    per_image = [
        sum(float(tr.maps(i).word(w, merge="sum").mean().numpy().mean()) for w in words) for i in range(seeds)
    ]
    return images, float(np.mean(per_image))


def _histogram(images: Sequence[np.ndarray]) -> np.ndarray:
    """Mean normalized 8-bin-per-channel colour histogram of uint8 images: ``(24,)``."""
    hists = [
        np.concatenate([np.histogram(im[..., ch], bins=8, range=(0, 256))[0] for ch in range(3)]) / im[..., 0].size
        for im in images
    ]
    return np.mean(hists, axis=0)


def score_model(
    pipe: Any, prompts: dict[str, list[str]], specs: Sequence[ConceptSpec], seeds: int, label: str,
    first_seed: int = 0,
) -> tuple[ModelScores, dict[str, list[np.ndarray]]]:
    """Score ``pipe`` as loaded on ``prompts`` at seeds ``first_seed .. first_seed + seeds - 1`` (the eval's are
    ``0 ..``; a recipe is chosen on others); also returns each prompt's images."""
    from tqdm import tqdm

    concepts = [s.name for s in specs]
    images: dict[str, list[np.ndarray]] = {}
    per_prompt: dict[str, dict[str, float]] = {}
    hits: dict[str, list[bool]] = {"erased": [], "synonym": [], "irrelevant": [], "implicit": []}
    context: list[bool] = []
    masses: dict[str, list[float]] = {"erased": [], "synonym": []}
    attributes: dict[str, list[bool]] = {"color": [], "shape": []}
    jobs = [(group, prompt) for group, group_prompts in prompts.items() for prompt in group_prompts]
    # disable=None: a bar on a terminal, nothing in logs and tests
    for group, prompt in tqdm(
        jobs, desc=f"{label} ({seeds} seeds per prompt)", unit="prompt", leave=False, disable=None
    ):
        named = group in ("erased", "synonym")
        words = [w for w in words_of(prompt) if named and CANONICAL.get(w) in concepts]
        imgs, mass = _generate(pipe, prompt, seeds, words, first_seed)
        images[prompt] = imgs
        detected = [read_scene(im) for im in imgs]
        if group == "irrelevant":
            scores = [score_image(prompt, d) for d in detected]
            ok = [all(s["color_hits"]) and all(s["shape_hits"]) for s in scores]
            for kind in ("color", "shape"):
                attributes[kind] += [hit for s in scores for hit in s[f"{kind}_hits"]]
        else:
            ok = [shows_any(d, concepts) for d in detected]
        kept: list[bool] = []  # the rest of the scene drawn as asked, on prompts that name a concept
        if named:
            kept = [context_correct(prompt, d, concepts) for d in detected]
            masses[group].append(mass)
            context += kept
        hits[group] += ok
        per_prompt[prompt] = {
            "group": group,
            "rate": float(np.mean(ok)),
            **({"context": float(np.mean(kept))} if kept else {}),
            **({"attention_mass": mass} if mass is not None else {}),
        }
    rate = {g: float(np.mean(v)) if v else float("nan") for g, v in hits.items()}
    return (
        ModelScores(
            acc_e=rate["erased"],
            acc_g=rate["synonym"],
            acc_ir=rate["irrelevant"],
            acc_ctx=float(np.mean(context)) if context else float("nan"),
            acc_implicit=rate["implicit"],
            attention_mass={g: float(np.mean(v)) for g, v in masses.items() if v},
            irrelevant_attributes={k: float(np.mean(v)) for k, v in attributes.items() if v},
            per_prompt=per_prompt,
        ),
        images,
    )


def evaluate(
    lora_dir: str | Path,
    *,
    specs: Sequence[ConceptSpec] | None = None,
    model: str | None = None,
    pipe_factory: Any = None,
    seeds: int = DEFAULT_SEEDS,
    out: str | Path | None = None,
    device: str = "cpu",
) -> EvalReport:
    """Evaluate the LoRA in ``lora_dir`` on the shapes-world protocol; write ``out/eval.json`` and
    ``out/eval_grid.png`` (``out`` defaults to ``lora_dir/eval``).

    ``specs`` and ``model`` default to what the run recorded
    (``spec.yaml``/``run.json`` in ``lora_dir``). ``pipe_factory()`` (tests) builds the base pipeline instead of
    loading ``model``; it is called once and the LoRA is loaded into that pipeline after the base figures are
    taken. Raises LoraFileError for a missing/corrupt/mismatched LoRA.
    """
    lora_dir = Path(lora_dir)
    if not lora_dir.exists():
        raise FileNotFoundError(f"{lora_dir} does not exist: pass the --out folder of `attnscope erase`")
    run_model, run_specs = read_run(lora_dir)
    model = model or run_model or "shapes"
    specs = specs or run_specs
    if not specs:
        raise ValueError(f"{lora_dir} has no {SPEC_FILE}: say which concept was erased with --concept")
    world = profile_for(model).world
    if pipe_factory is None and not isinstance(world, ShapesWorld):
        raise ValueError(
            f"this protocol measures the shapes world; {model!r} is {world.description}: `attnscope eval` runs the "
            "evaluation of its world (see erase/README.md)"
        )
    unknown = [s.name for s in specs if s.name not in COLORS and s.name not in SHAPES]
    if unknown:
        raise ValueError(f"the shapes-world evaluation knows colours and shapes only, not {unknown}")
    pipe = pipe_factory() if pipe_factory is not None else attnscope.load_pipeline(model, device=device, progress=False)
    pipe.set_progress_bar_config(disable=True)
    check_lora_file(pipe, lora_dir)  # before spending minutes on base images
    prompts = shapes_prompts(specs)
    base, base_images = score_model(pipe, prompts, specs, seeds, "base model")
    load_lora(pipe, lora_dir)
    erased, erased_images = score_model(pipe, prompts, specs, seeds, "with the LoRA")

    irrelevant = prompts["irrelevant"]
    pixel_mae = mean_pixel_difference(
        [im for p in irrelevant for im in base_images[p]], [im for p in irrelevant for im in erased_images[p]]
    )
    hist_l1 = float(np.abs(
        _histogram([im for p in irrelevant for im in base_images[p]])
        - _histogram([im for p in irrelevant for im in erased_images[p]])
    ).sum())
    report = EvalReport(
        acc_e=erased.acc_e,
        acc_g=erased.acc_g,
        acc_ir=erased.acc_ir,
        acc_ir_relative=erased.acc_ir / base.acc_ir if base.acc_ir > 0 else None,
        acc_ctx=erased.acc_ctx,
        acc_ctx_relative=erased.acc_ctx / base.acc_ctx if base.acc_ctx > 0 else None,
        acc_implicit=erased.acc_implicit,
        attention_mass=erased.attention_mass,
        irrelevant_attributes=erased.irrelevant_attributes,
        quality={"pixel_mae": pixel_mae, "histogram_l1": hist_l1},
        base={"acc_e": base.acc_e, "acc_g": base.acc_g, "acc_ir": base.acc_ir, "acc_ctx": base.acc_ctx,
              "acc_implicit": base.acc_implicit, "attention_mass": base.attention_mass,
              "irrelevant_attributes": base.irrelevant_attributes,
              "per_prompt": base.per_prompt},
        concepts=[s.name for s in specs],
        prompts=prompts,
        seeds=seeds,
        per_prompt=erased.per_prompt,
    )
    folder = Path(out) if out is not None else lora_dir / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
    save_comparison_grid(prompts, base_images, erased_images, folder / GRID_FILE)
    return report
