"""Erasure in the open world of real text-to-image models: concept specs shipped as YAML (``erase/specs/``), the
tokenizer as the word check, the real-model evaluation (:mod:`.open_eval`: CLIP zero-shot, NudeNet) whose judges
also score attacks, and base-model samples as the attacks' reference images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnscope.profiles import World

from ..spec import ConceptSpec, UnknownConceptError, find_word, load_spec, replace_word, suggest
from . import AttackStart, ErasureWorld, Judge, register_erasure_world

__all__ = ["SPECS_DIR", "OpenErasure", "shipped_specs"]

#: Folder of the shipped YAML specs for real models.
SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"


def shipped_specs() -> dict[str, Path]:
    """Shipped real-model specs: name -> YAML path."""
    return {p.stem: p for p in sorted(SPECS_DIR.glob("*.yaml"))}


class OpenErasure(ErasureWorld):
    """Any concept with a spec (shipped, a ``--spec`` file, or ``--prompts``); words must be known to the T5
    tokenizer."""

    open_vocabulary = True

    @property
    def default_eval_seeds(self) -> int:
        from .open_eval import DEFAULT_SEEDS

        return DEFAULT_SEEDS

    def spec(self, concept: str) -> ConceptSpec:
        concept = concept.strip()
        shipped = shipped_specs()
        key = concept.lower().replace(" ", "-")
        if key in shipped:
            return load_spec(shipped[key])[0]
        raise UnknownConceptError(
            f"no spec for the concept {concept!r}{suggest(key, shipped)} Shipped specs: "
            f"{', '.join(shipped) or '(none)'}; write one (see erase/README.md) and pass --spec FILE"
        )

    def check_words(self, pipe: Any, words: Sequence[str]) -> None:
        tokenizer = pipe.tokenizer_2
        unk = tokenizer.unk_token_id
        for word in words:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if not ids or (unk is not None and unk in ids):
                whole = [p.lstrip("▁") for p in tokenizer.get_vocab() if p.startswith("▁") and len(p) > 2]
                hint = suggest(word.lower(), whole, cutoff=0.6, lead="did you mean one of the words it knows,")
                raise UnknownConceptError(f"the model's tokenizer does not know the word {word!r}{hint}")

    def evaluate(
        self, lora_dir: Path, specs: Sequence[ConceptSpec], model: str, *, seeds: int, out: Path, device: str,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        import torch

        import attnscope
        from attnscope.profiles import profile_for

        from .open_eval import DEFAULT_CLIP_MODEL, real_eval

        dtype = torch.bfloat16 if device.startswith("cuda") else None
        pipe = attnscope.load_pipeline(model, device=device, dtype=dtype, progress=False)
        return real_eval(
            lora_dir, specs, pipe, seeds=seeds, clip_model=options.get("clip_model") or DEFAULT_CLIP_MODEL,
            call_kwargs=profile_for(model).default_call(pipe), out=out,
        )

    def summary(self, report: dict[str, Any]) -> str:
        base = report["base"]
        acc_g = "n/a" if report["acc_g"] is None else f"{report['acc_g']:.1%}"
        return (
            f"{', '.join(report['concepts'])}: Acc_e {report['acc_e']:.1%} (base {base['acc_e']:.1%}), Acc_g {acc_g}, "
            f"Acc_ir {report['acc_ir']:.1%} (same zero-shot label as base)"
        )


    def judge(self, specs: Sequence[ConceptSpec], device: str, options: dict[str, Any]) -> Judge:
        from .open_eval import DEFAULT_CLIP_MODEL, ZeroShot, nudity_detector

        classifier = ZeroShot(options.get("clip_model") or DEFAULT_CLIP_MODEL, device)
        exposed = nudity_detector() if any(s.name == "nudity" for s in specs) else None

        def shows(images: Sequence[Any], spec: ConceptSpec) -> list[bool]:
            if exposed is not None and spec.name == "nudity":
                return [exposed(image) for image in images]
            return [label == 0 for label in classifier.labels(images, [spec.targets[0], *spec.irrelevant])]

        return shows

    def attack_words(self, pipe: Any, spec: ConceptSpec) -> list[str]:
        """The tokenizer's whole words (pieces that start a word, two letters or more), without any that contains a
        target or synonym of the concept."""
        banned = [w.lower() for w in spec.erased_words]
        words = {p.lstrip("▁").lower() for p in pipe.tokenizer_2.get_vocab() if p.startswith("▁") and len(p) > 2}
        return sorted(w for w in words if w.isalpha() and not any(b in w for b in banned))

    def attack_starts(self, spec: ConceptSpec) -> list[AttackStart]:
        """The first three training prompts with the concept's word replaced by the first anchor (or the first
        irrelevant concept, or nothing)."""
        swap = (spec.anchors or spec.irrelevant or ("",))[0]
        starts = []
        for prompt in spec.prompts[:3]:
            word = spec.target_in(prompt)
            found = find_word(prompt, word)
            starts.append(AttackStart(
                replace_word(prompt, word, swap).strip(), prompt, found[0] if found else word, swap or None
            ))
        return starts

    def reference_images(self, pipe: Any, call: dict[str, Any], prompt: str, n: int, seed: int) -> list[Any]:
        """Base-model samples of ``prompt`` (the world has no renderer): attacks then fit what the model itself
        drew before erasure."""
        import torch

        from attnscope.viz import to_pixels

        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        return to_pixels(pipe([prompt] * n, generator=generators, output_type="np", **call).images)


register_erasure_world(World, OpenErasure())
