"""The shapes world: tiny bundled text-to-image models (a Flux and an SD3) with ground truth, and their benchmark.

* ``vocabulary``: colours, shapes, synonyms, ``check_prompt``.
* ``render``: procedural scenes with captions and per-object / per-word masks.
* ``reader``: reads a (generated) image back into objects and matches them to the prompt's.
* ``generate``: a shapes model's images at its default call, as uint8 pixels.
* ``metrics`` / ``localization``: ``attnscope shapes eval`` (generation, and word maps against object masks).
* ``profile``: the world's model profiles (``attnscope.load_pipeline("shapes")`` and ``("shapes-sd3")``, exported
  shapes folders).
* ``weights/``, ``weights-sd3/``: the bundled models, each with ``training.json``, the record of how it was made.

How the weights were made (model construction, trainer, distillation, preference rounds, export) is the shapes
*lab*, ``attnscope.lab`` (the ``lab/`` folder): nothing here imports it. Load the bundled model with
``FluxPipeline.from_pretrained(bundled_path())`` or ``StableDiffusion3Pipeline.from_pretrained(bundled_path(
"shapes-sd3"))`` (their scheduler, ``attnscope.sampling.FlowMatchRenoisingScheduler``,
loads once ``attnscope`` is imported, as it is here) and call it with ``call_kwargs_for(pipe)`` (see ``README.md``
in this folder).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

from .vocabulary import OutOfVocabularyError, check_prompt

#: Resolution the bundled model was trained at (pixels); the latent grid is 16×16 image tokens.
NATIVE_SIZE = 32

#: Text length (T5 tokens incl. </s>, padded) every shapes model is trained with and called with: shorter truncates
#: captions, longer adds padding the model never saw.
MAX_SEQUENCE_LENGTH = 20

#: Guidance scale of the bundled model's default call, an input of its guidance-distilled transformer: the scale
#: that drew two-object prompts best on held-out seeds (see benchmarks/RESULTS.md).
GUIDANCE_SCALE = 4.5
#: True classifier-free guidance scale for a shapes model without a guidance embedding (one trained on data, such
#: as the teacher the bundle was distilled from): chosen on held-out seeds (benchmarks/RESULTS.md); well above it
#: the model draws asked objects twice.
TRUE_CFG_SCALE = 3.5

#: Keyword arguments for ``pipe(prompt, **DEFAULT_CALL_KWARGS)`` on the bundled model: its training resolution, 20
#: steps of its own re-noising sampler (``weights/scheduler``), the guidance scale as the input of its
#: guidance-distilled transformer (one transformer call per step, as FLUX.1-dev), and its text length.
#: ``call_kwargs_for`` gives the call of any shapes model, distilled or not.
DEFAULT_CALL_KWARGS: dict = {
    "height": NATIVE_SIZE,
    "width": NATIVE_SIZE,
    "num_inference_steps": 20,
    "guidance_scale": GUIDANCE_SCALE,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}


def call_kwargs_for(pipe: Any, guidance_scale: float | None = None) -> dict[str, Any]:
    """The default call of a shapes pipeline: ``DEFAULT_CALL_KWARGS``'s size, steps and text length, and guidance
    (``guidance_scale``, or the kind's default) in the form its pipeline and transformer take:

    * a guidance-distilled Flux transformer (``guidance_embeds``) gets it as an input (default ``GUIDANCE_SCALE``),
      one call per step;
    * a Flux transformer without a guidance embedding (a model trained on data, such as a distillation teacher)
      gets true classifier-free guidance against the empty prompt (default ``TRUE_CFG_SCALE``), two calls per step;
    * a pipeline without ``true_cfg_scale`` (``StableDiffusion3Pipeline``) does classifier-free guidance with its
      ``guidance_scale`` (default ``GUIDANCE_SCALE``: the SD3 model learned its Flux teacher's guided velocity).
    """
    kwargs = {k: v for k, v in DEFAULT_CALL_KWARGS.items() if k != "guidance_scale"}
    if getattr(pipe.transformer.config, "guidance_embeds", False) or not _takes(pipe, "true_cfg_scale"):
        return kwargs | {"guidance_scale": GUIDANCE_SCALE if guidance_scale is None else guidance_scale}
    scale = TRUE_CFG_SCALE if guidance_scale is None else guidance_scale
    return kwargs | {"guidance_scale": 1.0, "true_cfg_scale": scale, "negative_prompt": ""}


def _takes(pipe: Any, keyword: str) -> bool:
    return keyword in inspect.signature(type(pipe).__call__).parameters


#: The bundled models by name: the Flux-form model and its SD3-form student (``weights-sd3/``, distilled from it).
BUNDLED_FOLDERS: dict[str, str] = {"shapes": "weights", "shapes-sd3": "weights-sd3"}


def bundled_path(name: str = "shapes") -> Path:
    """Folder of a committed diffusers pipeline (model_index.json, transformer/, text encoders, ...)."""
    if name not in BUNDLED_FOLDERS:
        raise ValueError(f"no bundled shapes model {name!r}; bundled: {', '.join(BUNDLED_FOLDERS)}")
    return Path(__file__).resolve().parent / BUNDLED_FOLDERS[name]


class UntrainedSizeWarning(UserWarning):
    """The bundled model is asked for a resolution it was not trained at."""


def validate_call(prompt: str, height: int | None = None, width: int | None = None) -> list[str]:
    """Check a call of the bundled model before running it; returns the prompt's words.

    Raises:
        OutOfVocabularyError: words outside the vocabulary (the model cannot draw them).
    Warns:
        UntrainedSizeWarning: height/width other than ``NATIVE_SIZE``.
    """
    words = check_prompt(prompt)
    for name, value in (("height", height), ("width", width)):
        if value is not None and value != NATIVE_SIZE:
            warnings.warn(
                f"{name}={value}: the shapes model was trained at {NATIVE_SIZE}×{NATIVE_SIZE} only; other sizes "
                "give untrained layouts",
                UntrainedSizeWarning,
                stacklevel=2,
            )
    return words


__all__ = [
    "BUNDLED_FOLDERS",
    "DEFAULT_CALL_KWARGS",
    "GUIDANCE_SCALE",
    "MAX_SEQUENCE_LENGTH",
    "TRUE_CFG_SCALE",
    "NATIVE_SIZE",
    "OutOfVocabularyError",
    "UntrainedSizeWarning",
    "bundled_path",
    "call_kwargs_for",
    "check_prompt",
    "validate_call",
]
