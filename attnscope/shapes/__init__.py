"""The shapes world: a tiny bundled text-to-image Flux with ground truth.

* ``vocabulary``: colours, shapes, synonyms, ``check_prompt``.
* ``render``: procedural scenes with captions and per-object / per-word masks.
* ``reader``: reads a (generated) image back into objects.
* ``model`` / ``train`` / ``export``: the offline-built pipeline, its trainer and the export to ``weights/``.
* ``metrics``: ``attnscope shapes eval``.

Load the bundled model with ``FluxPipeline.from_pretrained(bundled_path())`` (its scheduler,
``attnscope.sampling.FlowMatchRenoisingScheduler``, loads once ``attnscope`` is imported, as it is here) and call
it with ``DEFAULT_CALL_KWARGS`` (see ``README.md`` in this folder).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .vocabulary import UnknownWordError, check_prompt

#: Resolution the bundled model was trained at (pixels); the latent grid is 16×16 image tokens.
NATIVE_SIZE = 32

#: Guidance scale of the bundled model's default call, an input of its guidance-distilled transformer
#: (``distill.py``): chosen on held-out seeds (4.5 drew two-object prompts at 0.785, 3.5 at 0.773; RESULTS).
GUIDANCE_SCALE = 4.5
#: True classifier-free guidance scale for a shapes model without a guidance embedding (trained on data, such as
#: the phase-7 teacher of the bundle): 3.5 drew two-object prompts best on held-out seeds (3 to 4 are within a point
#: of it; 5 draws duplicates).
TRUE_CFG_SCALE = 3.5

#: Keyword arguments for ``pipe(prompt, **DEFAULT_CALL_KWARGS)`` on the bundled model: its training resolution, 20
#: steps of its own re-noising sampler (``model.build_scheduler``), the guidance scale as the input of its
#: guidance-distilled transformer (one transformer call per step, as FLUX.1-dev), and the text length it was
#: trained with (shorter truncates captions, longer adds unseen padding). ``call_kwargs_for`` gives the call of
#: any shapes model, distilled or not.
DEFAULT_CALL_KWARGS: dict = {
    "height": NATIVE_SIZE,
    "width": NATIVE_SIZE,
    "num_inference_steps": 20,
    "guidance_scale": GUIDANCE_SCALE,
    "max_sequence_length": 20,
}


def call_kwargs_for(pipe: Any, guidance_scale: float | None = None) -> dict[str, Any]:
    """The default call of a shapes pipeline: ``DEFAULT_CALL_KWARGS``'s size, steps and text length, and guidance
    (``guidance_scale``, or the kind's default) in the form its transformer takes. A guidance-distilled
    transformer (``guidance_embeds``, ``distill.py``) gets it as an input (default ``GUIDANCE_SCALE``), one call
    per step; one without a guidance embedding (a model trained on data, such as a distillation teacher) gets true
    classifier-free guidance against the empty prompt (default ``TRUE_CFG_SCALE``), two calls per step."""
    kwargs = {k: v for k, v in DEFAULT_CALL_KWARGS.items() if k != "guidance_scale"}
    if pipe.transformer.config.guidance_embeds:
        return kwargs | {"guidance_scale": GUIDANCE_SCALE if guidance_scale is None else guidance_scale}
    scale = TRUE_CFG_SCALE if guidance_scale is None else guidance_scale
    return kwargs | {"guidance_scale": 1.0, "true_cfg_scale": scale, "negative_prompt": ""}


def bundled_path() -> Path:
    """Folder of the committed diffusers pipeline (model_index.json, transformer/, text_encoder(_2)/, ...)."""
    return Path(__file__).resolve().parent / "weights"


class UntrainedSizeWarning(UserWarning):
    """The bundled model is asked for a resolution it was not trained at."""


def validate_call(prompt: str, height: int | None = None, width: int | None = None) -> list[str]:
    """Check a call of the bundled model before running it; returns the prompt's words.

    Raises:
        UnknownWordError: words outside the vocabulary (the model cannot draw them).
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
    "DEFAULT_CALL_KWARGS",
    "GUIDANCE_SCALE",
    "TRUE_CFG_SCALE",
    "NATIVE_SIZE",
    "UnknownWordError",
    "UntrainedSizeWarning",
    "bundled_path",
    "call_kwargs_for",
    "check_prompt",
    "validate_call",
]
