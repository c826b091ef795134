"""Localization scores (``attnscope.shapes.localization``) on maps whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.maps import TokenMaps
from attnscope.shapes.localization import (
    MAP_UPSAMPLING,
    TAUS,
    LocalizationTally,
    average_precision,
    band_maps,
    score_maps,
    step_bands,
)


def _disc(size: int = 32, cx: float = 10, cy: float = 12, r: float = 6) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def test_a_map_equal_to_its_mask_scores_perfectly():
    mask = _disc()
    s = score_maps(mask.astype(np.float32), mask)
    assert s.iou_mean == 1.0 and s.pixel_acc == 1.0 and s.ap == pytest.approx(1.0)
    assert np.all(s.iou_tau == 1.0)


def test_scores_rank_a_blurred_map_above_a_wrong_one():
    mask = _disc()
    yy, xx = np.mgrid[:32, :32]
    near = np.exp(-((xx - 10) ** 2 + (yy - 12) ** 2) / (2 * 5.0**2))  # peaked on the object
    wrong = np.exp(-((xx - 25) ** 2 + (yy - 25) ** 2) / (2 * 5.0**2))  # peaked elsewhere
    s = score_maps(np.stack([near, wrong]), mask)
    # The mean threshold keeps a blurred map's wide skirt (IoU ≈ 0.39 here); the best τ and AP do not mind it.
    assert s.iou_mean[0] > 0.3 > 0.05 > s.iou_mean[1]
    assert s.iou_tau[0].max() > 0.9 and s.iou_tau[1].max() < 0.1
    assert s.ap[0] > 0.9 and s.ap[1] < mask.mean()  # a map peaked elsewhere ranks the object below chance


def test_average_precision_of_a_random_map_is_the_prevalence():
    mask = _disc(64, 30, 30, 15)
    scores = np.random.default_rng(0).random((64, 64))
    assert average_precision(scores, mask) == pytest.approx(mask.mean(), abs=0.03)


def test_iou_at_tau_is_monotone_in_the_threshold_for_a_cone():
    mask = _disc()
    yy, xx = np.mgrid[:32, :32]
    cone = np.clip(1 - np.hypot(xx - 10, yy - 12) / 12, 0, 1)  # the disc's edge is at 0.5 of the cone
    curve = score_maps(cone, mask).iou_tau
    assert TAUS[int(np.argmax(curve))] == pytest.approx(0.5, abs=0.05)


def test_the_protocol_upsampling_keeps_a_token_exact_map_exact():
    # A word map that is exactly its object on the grid of 2×2-pixel tokens: the protocol's upsampling must score it
    # as the object itself; bilinear interpolation adds a half-token skirt that the mean threshold keeps.
    mask = np.zeros((32, 32), bool)
    mask[8:20, 10:18] = True
    coverage = torch.from_numpy(mask.reshape(16, 2, 16, 2).mean(axis=(1, 3)).reshape(1, 1, 1, 1, 16, 16)).float()
    maps = TokenMaps(data=coverage, present=(), positions=(0,), layers=(), steps=(0,), heads=(), tokens=None)
    exact = score_maps(maps.upsample((32, 32), mode=MAP_UPSAMPLING).numpy(), mask)
    smooth = score_maps(maps.upsample((32, 32), mode="bilinear").numpy(), mask)
    assert exact.iou_mean == 1.0
    assert smooth.iou_mean < 0.8


def test_mask_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="upsample"):
        score_maps(np.zeros((16, 16)), _disc())


def test_bands_and_tally_pick_the_localizing_layer_and_band():
    steps = step_bands(4)
    assert steps["early"] == slice(0, 2) and steps["late"] == slice(2, 4) and steps["step.3"] == slice(3, 4)
    mask = _disc()
    noise = np.random.default_rng(1).random((2, 4, 32, 32))
    maps = noise.copy()
    maps[1, 2:] += 30 * mask  # layer 1 localizes the object in late steps, and avoids it in early ones
    maps[1, :2] -= 30 * mask
    names, banded = band_maps(maps)
    assert banded.shape == (2, len(names), 32, 32)
    tally = LocalizationTally(["double.0", "double.1"], names)
    tally.add("color", banded, mask)
    tally.add("shape", banded, mask)
    best = tally.best("color")
    assert (best["layer"], best["steps"]) == ("double.1", "late") and best["miou"] == 1.0
    assert tally.by_layer()["double.0"]["color"]["miou"] < 0.5
    assert tally.by_step()["shape"]["double.1"][3] == 1.0 and tally.by_step()["shape"]["double.1"][0] < 0.5
