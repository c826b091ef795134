"""The shapes world's model profiles: the bundled models (``shapes``, ``shapes-sd3``) and any exported shapes folder.

An exported folder is recognized by ``training.json`` beside its ``model_index.json`` (the record the lab's export
writes), so a model exported from a training run gets the call, checks and erasure defaults of the bundled model
with its transformer class.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..profiles import (
    EraseDefaults,
    EraseVelocity,
    LoraPlacement,
    ModelProfile,
    World,
    dtype_keyword,
    register_profile,
    transformer_class_name,
)
from ..readout import Readout
from . import DEFAULT_CALL_KWARGS, bundled_path, call_kwargs_for, validate_call


class ShapesWorld(World):
    """Coloured shapes on a plain background, drawn from a closed vocabulary (``vocabulary.py``) and read back by
    the scene reader (``reader.py``)."""

    description = "the shapes world"


SHAPES_WORLD = ShapesWorld()

#: LoRA placement for erasure in the shapes world: the paper's text-side queries and keys, and the values too. The
#: shapes model's one-layer T5 spreads a colour into the context of every prompt token, so re-routing attention
#: alone leaves no token without it; the values carry it out of every token.
SHAPES_LORA_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj")
#: The SD3-form model's LoRA also sits on its text embedder (``context_embedder``, the projection every text token
#: passes before the first block). With the attention projections alone, a colour named two or three times survived
#: erasure there; with the embedder too it does not, and more of the rest of the prompt is kept. On the Flux-form
#: model the embedder changed nothing but triangle's context, which it lowered (benchmarks/RESULTS.md).
SHAPES_SD3_LORA_TARGETS = (*SHAPES_LORA_TARGETS, "context_embedder")
#: On the SD3-form model the LoRA trains every attention projection, the image side too, and the text embedder: it
#: keeps more of the erased prompts' context than the text side, and a glue prompt, whose text tokens add a nearly
#: image-independent term to the image's attention output, draws a concept from the image tokens' own attention,
#: which only the image side reaches (what prompt searches find narrows; measured in benchmarks/RESULTS.md). It needs
#: half as many steps again to finish the named concept; a step costs the same.
SHAPES_SD3_PLACEMENT: LoraPlacement = "attention"
SHAPES_SD3_STEPS_SCALE = 1.5
#: The fastest rate erasures on the SD3-form model hold at: a shape alone is not erased at twice it, so two concepts
#: run at this rate there, for twice the steps of the faster schedule (1200 in all).
SHAPES_SD3_MAX_LR = 1e-3
#: Several concepts on the SD3-form model are pushed equally hard (``EraseDefaults.balance_eta``): each at its own η,
#: a pair erased the concept whose prompts differ more from their anchors and left the other, at any rate, rank,
#: batch or row weighting tried; balanced over the prompts that name one concept, that one is erased too. On the
#: Flux-form model pairs are erased without it.
SHAPES_SD3_BALANCE_ETA = True
#: On the SD3-form model ESD stops pushing a concept point a quarter of a concept length past its anchor
#: (``EraseDefaults.esd_margin``): the η raised for a weak concept otherwise carries its points on towards the far
#: target, and a pair then dropped the object beside the erased one; a point that has reached the margin is erased.
#: A point whose η the balance raised stops that many times nearer, as the raised η carries it that much further.
SHAPES_SD3_ESD_MARGIN = 0.25
#: On the SD3-form model a single concept's ESD and implicit loss hold the velocity the CFG sampler follows
#: (``EraseDefaults.erase_velocity``): the guidance multiplies what a glue word keeps of the concept, and on the
#: velocity the image sees the path through glue words, which prompt search finds, narrows. Several concepts keep
#: the conditional velocity: a pair that loses second objects lost more with the guided one, and irrelevant
#: two-object images with them.
SHAPES_SD3_ERASE_VELOCITY: EraseVelocity = "guided"
#: ESD's negative-guidance strength for the shapes models: their sharp colours need a target pushed twice as far
#: from the concept as the paper's η = 1 to stop drawing it, and so does the unasked path. A concept spec may set its
#: own; the shapes world's shapes do (measurements in benchmarks/RESULTS.md).
SHAPES_ETA = 2.0
#: ESD's η on a shape's prompts on the Flux-form model (a colour's, and the unasked path, are pushed at
#: ``SHAPES_ETA``). Pushed that far, a shape there is often dropped with its object instead of drawn as another
#: shape, which costs the rest of the prompt; a colour pushed at 1 survives in prompts that name it twice or more.
#: On the SD3-form model a shape is pushed at ``SHAPES_ETA`` too: at 1, circle, whose prompts differ least from
#: their anchors' at the start of a trajectory there, was not erased at all (benchmarks/RESULTS.md).
SHAPES_SHAPE_ETA = 1.0
#: EraseAnything's attention-attenuation term is off on the shapes models. At the paper's weight it changes no LoRA
#: beyond float noise, and every weight that moves the attention costs something else: on the Flux model the rest
#: of the prompt, on the SD3 model the erasure itself (the colour moves to the tokens it was not taken from). The
#: search, in both forms, is in benchmarks/RESULTS.md; ``--weights attention=W`` turns it back on.
SHAPES_ATTENTION_WEIGHT = 0.0
#: How the shapes models' maps are read: every dual-stream block and the last quarter of the steps averaged, brought
#: to pixels bilinearly (a 2×2-pixel token's soft map, interpolated, follows an object's edge better than its
#: blocks) and cut at 0.55 of the normalized range. Chosen on training prompts, seeds and rendered scenes
#: (generated, same-colour generated and explained rendered mIoU averaged); held-out figures in benchmarks/RESULTS.md.
SHAPES_READOUT = Readout(layers="double", late_steps=0.25, upsample="bilinear", threshold=0.55)


#: What ``attnscope erase`` uses on a shapes model unless told otherwise.
SHAPES_ERASE_DEFAULTS = EraseDefaults(
    lora_targets=SHAPES_LORA_TARGETS, eta=SHAPES_ETA, attention_weight=SHAPES_ATTENTION_WEIGHT
)


class ShapesProfile(ModelProfile):
    """A bundled shapes model (``shapes``, ``shapes-sd3``) and the exported shapes folders of its architecture
    (``transformer_class``, the class their ``model_index.json`` names)."""

    world = SHAPES_WORLD
    readout = SHAPES_READOUT

    def __init__(
        self, name: str, transformer_class: str, erase_defaults: EraseDefaults = SHAPES_ERASE_DEFAULTS,
        shape_eta: float | None = SHAPES_SHAPE_ETA,
    ):
        self.name = name
        self.transformer_class = transformer_class
        self.erase_defaults = erase_defaults
        #: ESD's η on a shape's prompts (the shapes world's concept specs); ``None``: the model's, as a colour's.
        self.shape_eta = shape_eta

    def claims(self, name_or_path: str) -> bool:
        return name_or_path == self.name or (
            (Path(name_or_path).expanduser() / "training.json").is_file()
            and transformer_class_name(name_or_path) == self.transformer_class
        )

    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, **from_pretrained_kwargs: Any) -> Any:
        from diffusers import DiffusionPipeline

        folder = bundled_path(self.name) if name_or_path == self.name else Path(name_or_path).expanduser()
        return DiffusionPipeline.from_pretrained(
            folder, **{dtype_keyword(): dtype or torch.float32}, **from_pretrained_kwargs
        )

    def default_call(self, pipe: Any | None = None) -> dict[str, Any]:
        # A shapes model's guidance form (an input, or true CFG) depends on its transformer: ask it when loaded.
        return dict(DEFAULT_CALL_KWARGS) if pipe is None else call_kwargs_for(pipe)

    def check_call(self, prompt: str, height: int | None, width: int | None) -> None:
        validate_call(prompt, height, width)


#: The bundled Flux-form model and its exports.
SHAPES_PROFILE = register_profile(ShapesProfile("shapes", "FluxTransformer2DModel"))
#: The bundled SD3-form model and its exports.
SHAPES_SD3_PROFILE = register_profile(ShapesProfile(
    "shapes-sd3", "SD3Transformer2DModel", replace(
        SHAPES_ERASE_DEFAULTS, lora_targets=SHAPES_SD3_LORA_TARGETS, placement=SHAPES_SD3_PLACEMENT,
        steps_scale=SHAPES_SD3_STEPS_SCALE, max_lr=SHAPES_SD3_MAX_LR, balance_eta=SHAPES_SD3_BALANCE_ETA,
        esd_margin=SHAPES_SD3_ESD_MARGIN, erase_velocity=SHAPES_SD3_ERASE_VELOCITY,
    ), shape_eta=None,
))

__all__ = [
    "SHAPES_ATTENTION_WEIGHT", "SHAPES_ERASE_DEFAULTS", "SHAPES_ETA", "SHAPES_LORA_TARGETS", "SHAPES_PROFILE",
    "SHAPES_READOUT", "SHAPES_SD3_BALANCE_ETA", "SHAPES_SD3_ESD_MARGIN", "SHAPES_SD3_LORA_TARGETS",
    "SHAPES_SD3_MAX_LR", "SHAPES_SD3_PLACEMENT", "SHAPES_SD3_PROFILE", "SHAPES_SD3_STEPS_SCALE",
    "SHAPES_SHAPE_ETA", "SHAPES_WORLD", "ShapesProfile", "ShapesWorld",
]
