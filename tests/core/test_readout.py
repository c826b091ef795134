"""Threshold rules of ``TokenMaps`` and the per-model ``Readout``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope
from attnscope.adapters import LayerInfo
from attnscope.maps import TokenMaps, otsu_threshold
from attnscope.readout import Readout


def _maps(data: torch.Tensor, n_layers: int = 1, n_steps: int = 1) -> TokenMaps:
    layers = tuple(LayerInfo(index=i, name=f"transformer_blocks.{i}.attn", kind="double", block=i)
                   for i in range(n_layers))
    return TokenMaps(data=data, present=("token", "layer", "step"), positions=(0,), layers=layers,
                     steps=tuple(range(n_steps)), heads=(), tokens=None)


def test_otsu_splits_a_bimodal_map_between_its_modes() -> None:
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.15, 0.03, 200), rng.normal(0.8, 0.03, 56)
    values = np.clip(np.concatenate([low, high]), 0, 1).reshape(16, 16)
    cut = float(otsu_threshold(values[None])[0, 0, 0])
    assert low.max() < cut < high.min()


def test_threshold_rules() -> None:
    grid = torch.zeros(1, 1, 1, 1, 4, 4)
    grid[..., :2, :2] = 1.0
    grid[..., 0, 3] = 0.4
    maps = _maps(grid)
    assert maps.threshold(0.5).sum() == 4 and maps.threshold(0.3).sum() == 5
    assert maps.threshold("otsu").sum() == 4
    assert maps.threshold().sum() == maps.threshold("mean").sum() == 5  # mean of the normalized map: 0.275
    with pytest.raises(ValueError, match="threshold rule"):
        maps.threshold("median")
    with pytest.raises(ValueError, match="threshold rule"):
        maps.threshold(1.5)


def test_readout_keeps_the_chosen_layers_and_the_late_steps() -> None:
    data = torch.zeros(1, 2, 4, 1, 2, 2)
    data[:, 1, 3] = 1.0  # layer 1, last step
    maps = _maps(data, n_layers=2, n_steps=4)
    late = Readout(layers="double.1", late_steps=0.25).reduce(maps)
    assert late.present == ("token",) and torch.equal(late.data.flatten(), torch.ones(4))
    every = Readout(layers="double", late_steps=1.0).reduce(maps)
    assert torch.allclose(every.data.flatten(), torch.full((4,), 1 / 8))
    soft = Readout(upsample="nearest").soft(maps, (6, 4))
    assert soft.grid == (4, 6)
    with pytest.raises(ValueError, match="late_steps"):
        Readout(late_steps=0.0)


def test_each_model_has_its_readout() -> None:
    assert attnscope.readout_for("shapes").threshold == 0.55
    assert attnscope.readout_for("tiny-flux") == Readout(threshold="otsu")
    assert attnscope.readout_for(attnscope.load_pipeline("shapes", progress=False)) == attnscope.readout_for("shapes")
