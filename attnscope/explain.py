"""Explain an existing image: where the model attends for each word (raw maps) and concept (output-space maps).

The image is encoded with the pipeline's VAE, noised to flow time ``t`` with ``samples`` independent noise draws
(``x_t = (1 − t)·x_0 + t·ε``, the rectified-flow path the model was trained on), and the transformer runs once on
all draws as one batch under :func:`attnscope.trace`. The maps are averaged over the draws: one draw's maps carry
that noise's own structure, the average keeps what the image and the prompt put there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import adapter_for, check_size
from .maps import TokenMaps
from .profiles import profile_of
from .trace import trace

__all__ = [
    "DEFAULT_SAMPLES", "DEFAULT_T", "Explanation", "ExplainError", "as_rgb", "check_noise", "explain", "load_image",
]

#: Flow time of the noised image (0 clean, 1 noise): late enough in sampling that the layout is settled, early
#: enough that the image still decides it (chosen on training scenes; benchmarks/RESULTS.md).
DEFAULT_T = 0.3
#: Noise draws averaged per explanation.
DEFAULT_SAMPLES = 4


class ExplainError(ValueError):
    """Input that cannot be explained: an image of the wrong size or an unreadable file, ``t`` outside (0, 1), ..."""


@dataclass(frozen=True)
class Explanation:
    """The maps of one explained image.

    ``maps``: raw joint-attention maps of the prompt's tokens (layer, head-averaged, grid); ``concept_maps``: the
    output-space maps of the concepts (``None`` when none were asked for); both averaged over ``samples`` noise draws
    at flow time ``t``. ``image``: the explained image ``(H, W, 3)`` uint8.
    """

    image: np.ndarray
    prompt: str
    t: float
    samples: int
    maps: TokenMaps
    concept_maps: TokenMaps | None


def load_image(path: str | Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (any mode PIL reads is converted), or :class:`ExplainError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError as err:
        raise ExplainError(f"image file {str(path)!r} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ExplainError(f"{str(path)!r} is not a readable image file ({err})") from err


def as_rgb(image: Any) -> np.ndarray:
    """``image`` (a path, a PIL image in any mode, or a uint8 array: grey, RGB or RGBA) as ``(H, W, 3)`` uint8 RGB,
    or :class:`ExplainError` naming what it is instead."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if hasattr(image, "convert"):  # a PIL image in any mode
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ExplainError(f"the image must be (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey; got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ExplainError(f"the image array must be uint8 (0–255); got {array.dtype}")
    return array[..., :3]


def check_noise(t: float, samples: int) -> None:
    """:class:`ExplainError` for a flow time outside (0, 1) or fewer than one noise draw."""
    if not 0.0 < float(t) < 1.0:
        raise ExplainError(f"t must be inside (0, 1) (0 is the clean image, 1 pure noise); got {t}")
    if int(samples) < 1:
        raise ExplainError(f"samples must be at least 1; got {samples}")


def _mean_over_rows(per_row: list[TokenMaps]) -> TokenMaps:
    return replace(per_row[0], data=torch.stack([m.data for m in per_row]).mean(0))


def explain(
    pipe: Any,
    image: Any,
    prompt: str,
    *,
    words: Sequence[str] | None = None,
    concepts: Sequence[str] | None = None,
    t: float = DEFAULT_T,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    layers: Any = None,
    max_sequence_length: int | None = None,
) -> Explanation:
    """Maps of an existing ``image`` (path, PIL image or uint8 array) under ``prompt``.

    ``words``: keep only these words' raw maps (default: every prompt token); ``concepts``: also output-space maps
    of these concepts (e.g. ``["red", "circle", "background"]``); ``t`` in (0, 1): flow time of the noised image;
    ``samples``: noise draws averaged (one batched forward); ``layers``: as in :func:`attnscope.trace`;
    ``max_sequence_length``: the pipeline's ``max_sequence_length`` (default: the model profile's call, else the
    pipeline's default).
    """
    check_noise(t, samples)
    pixels = as_rgb(image)
    adapter = adapter_for(pipe)
    if not adapter.has_model_call:
        raise ExplainError(f"explaining images needs direct transformer calls, not implemented for {adapter.name} yet")
    height, width = pixels.shape[:2]
    check_size(pipe, height, width)
    length = adapter.text_length(
        pipe, max_sequence_length or profile_of(pipe).default_call(pipe).get("max_sequence_length")
    )
    call = adapter.model_call(pipe, height, width)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = call.encode_images([pixels])
        noise = call.noise(samples, generator)
        x_t = (1 - t) * x0 + t * noise
        sigma = torch.full((samples,), float(t), device=x_t.device)
        with trace(pipe, words=words, concepts=concepts, layers=layers) as tr:
            embeds, pooled, text_ids = call.encode([prompt] * samples, length)
            call.velocity(pipe.transformer, x_t, sigma, embeds, pooled, text_ids)
    raw = _mean_over_rows([tr.maps(i) for i in range(samples)])
    concept = _mean_over_rows([tr.concept_maps(i) for i in range(samples)]) if concepts is not None else None
    return Explanation(image=pixels, prompt=prompt, t=float(t), samples=int(samples), maps=raw, concept_maps=concept)

