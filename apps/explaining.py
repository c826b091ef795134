"""Explaining an existing image in the explorer: an upload or a rendered shapes scene, through
:func:`attnscope.explain`. Plain functions, like :mod:`.explorer`: nothing here imports Gradio.

Maps are shown through the model's read-out (:func:`attnscope.readout_for`): its layers averaged, at image size.
An image whose size the model cannot take is resized to the model's default size (with a note), since the app's
user cannot crop it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

import attnscope
from attnscope import viz
from attnscope.explain import DEFAULT_SAMPLES, DEFAULT_T, Explanation, as_rgb

from .explorer import Model, RequestError

__all__ = ["MAX_SAMPLES", "ExplainRequest", "explain_image", "explained_overlay", "fitted", "rendered_scene"]

#: Noise draws one request may ask for (each is a row of one batched forward).
MAX_SAMPLES = 8


@dataclass(frozen=True)
class ExplainRequest:
    """Explain an image under ``prompt``: raw maps of its words and output-space maps of ``concepts``."""

    prompt: str
    concepts: tuple[str, ...] = ()
    t: float = DEFAULT_T
    samples: int = DEFAULT_SAMPLES
    seed: int = 0


def fitted(model: Model, image: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``image`` as RGB uint8 at a size the model takes: as it is when it fits, else resized to the model's default
    size (and a note saying so)."""
    if image is None:
        raise RequestError("Upload an image, or render a scene, first.")
    try:
        array = as_rgb(image)
    except attnscope.ExplainError as err:
        raise RequestError(str(err)) from None
    multiple = model.size_multiple
    if array.shape[0] % multiple == 0 and array.shape[1] % multiple == 0:
        return array, []
    height, width = model.default_size
    note = (f"The image is {array.shape[1]}×{array.shape[0]}; this model takes multiples of {multiple} pixels, so it "
            f"was resized to {width}×{height}.")
    return np.array(Image.fromarray(array).resize((width, height), Image.BICUBIC)), [note]


def rendered_scene(seed: int, objects: int) -> tuple[np.ndarray, str]:
    """A rendered shapes scene (image and caption) with ``objects`` objects: exact test images for any model."""
    from attnscope.shapes.render import render_scene

    if objects not in (1, 2, 3):
        raise RequestError(f"A rendered scene has 1, 2 or 3 objects, not {objects}.")
    scene = render_scene(int(seed), n_objects=int(objects))
    return scene.image, scene.caption


def explain_image(model: Model, image: np.ndarray, request: ExplainRequest) -> tuple[Explanation, list[str]]:
    """The explanation of ``image`` (fitted to the model) and any notes; bad input as :class:`RequestError`."""
    if not request.prompt.strip():
        raise RequestError("Write the prompt that describes the image.")
    if not 1 <= request.samples <= MAX_SAMPLES:
        raise RequestError(f"Noise draws must be between 1 and {MAX_SAMPLES}, not {request.samples}.")
    pixels, notes = fitted(model, image)
    try:
        with model.lock:
            result = attnscope.explain(model.pipe, pixels, request.prompt, concepts=list(request.concepts) or None,
                                       t=request.t, samples=request.samples, seed=request.seed)
    except (attnscope.ExplainError, attnscope.ConceptError, attnscope.UnknownWordError, attnscope.EmptyPromptError,
            attnscope.SelectionError) as err:
        raise RequestError(str(err)) from None
    return result, notes


def explained_overlay(
    model: Model, explanation: Explanation, word: str | None, concept: str | None, cmap: str = "jet",
    alpha: float = 0.5,
) -> Image.Image:
    """The explained image with the map of ``concept`` (output-space) or else ``word`` (raw) over it, read out
    the model's way; the plain image when neither is chosen."""
    image = Image.fromarray(explanation.image)
    if concept:
        if explanation.concept_maps is None:
            raise RequestError("This explanation has no concepts: list some and explain again.")
        maps = explanation.concept_maps.word(concept)
    elif word:
        maps = explanation.maps.word(word)
    else:
        return image
    grid = attnscope.readout_for(model.name).reduce(maps).numpy()
    return viz.overlay(grid, image, alpha=alpha, cmap=cmap)
