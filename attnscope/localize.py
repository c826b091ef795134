"""Zero-shot segmentation of a folder of (image, mask, class), the way ConceptAttention measures it on
ImageNet-Segmentation and PascalVOC, so that a user with a GPU runs our table on a real model
(``attnscope localize``).

Each item's image is resized to the model's size, explained (:func:`attnscope.explain`) under
``prompt_template.format(class)``, and two maps are read out at the mask's own size with the model's read-out:
the raw map of the class words, and the output-space map of the class among ``[class, *competitors]``. Scores:
:mod:`attnscope.segmentation`, overall and per class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from .dataset import SegmentationItem
from .explain import DEFAULT_SAMPLES, DEFAULT_T, explain
from .readout import Readout, readout_for
from .segmentation import PairScores, mean_scores

__all__ = ["DEFAULT_COMPETITORS", "DEFAULT_PROMPT_TEMPLATE", "localize_items"]

DEFAULT_PROMPT_TEMPLATE = "a photo of a {}"
DEFAULT_COMPETITORS: tuple[str, ...] = ("background",)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def localize_items(
    pipe: Any,
    items: Sequence[SegmentationItem],
    *,
    size: int,
    readout: Readout | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    competitors: Sequence[str] = DEFAULT_COMPETITORS,
    t: float = DEFAULT_T,
    samples: int = DEFAULT_SAMPLES,
) -> dict[str, Any]:
    """Scores of raw and output-space maps over ``items`` (module docstring): ``{"raw": ..., "output-space": ...,
    "per_class": {class: {"raw": ..., "output-space": ...}}}``, each as :func:`~attnscope.segmentation.mean_scores`."""
    if "{}" not in prompt_template:
        raise ValueError(f"the prompt template must hold '{{}}' where the class goes; got {prompt_template!r}")
    readout = readout or readout_for(pipe)
    pairs: dict[str, list[PairScores]] = defaultdict(list)
    per_class: dict[str, dict[str, list[PairScores]]] = defaultdict(lambda: defaultdict(list))
    for item in tqdm(items, desc="localizing", unit="item", leave=False, disable=None):
        concepts = [item.label, *(c for c in competitors if c != item.label)]
        result = explain(pipe, _resized(item.image, size), prompt_template.format(item.label), words=[item.label],
                         concepts=concepts, t=t, samples=samples)
        for method, maps in (("raw", result.maps.word(item.label)), ("output-space",
                                                                       result.concept_maps.word(item.label))):
            scores = readout.score(maps, item.mask)
            pairs[method].append(scores)
            per_class[item.label][method].append(scores)
    return {
        **{method: mean_scores(scores) for method, scores in pairs.items()},
        "per_class": {label: {m: mean_scores(s) for m, s in methods.items()}
                      for label, methods in sorted(per_class.items())},
    }
