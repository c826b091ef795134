"""Images of a shapes model at its default call, as uint8 pixels: what the eval, its localization protocol and the
scene reader work on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..viz import to_pixels
from . import call_kwargs_for


def generate(pipe: Any, prompt: str, seeds: list[int], **call_kwargs: Any) -> list[np.ndarray]:
    """One (H, W, 3) uint8 image per seed; batched, with one generator per image so each is reproducible alone
    (call kwargs override ``call_kwargs_for(pipe)``)."""
    kwargs = call_kwargs_for(pipe) | call_kwargs
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe([prompt] * len(seeds), generator=gens, output_type="np", **kwargs).images
    return to_pixels(out)


__all__ = ["generate"]
