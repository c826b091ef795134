"""TokenMaps operations and the viz helpers, on maps captured from a tiny Flux pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import attnscope
from attnscope import viz
from attnscope.tiny import TINY_FLUX_CALL_KWARGS, build_tiny_flux_pipeline

CALL = {**TINY_FLUX_CALL_KWARGS, "height": 48, "width": 32, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def captured():
    pipe = build_tiny_flux_pipeline(seed=0)
    with attnscope.trace(pipe) as tr:
        image = pipe("a red circle and a crimson square", generator=torch.Generator().manual_seed(0), **CALL).images[0]
    return tr.maps(), image


def test_public_api_shape_contract(captured) -> None:
    maps, image = captured
    assert maps.grid == (12, 8), "48x32 px with vae factor 2 and 2x2 packing is a 12x8 grid (rows, cols)"
    grid = maps.word("red").select(layers="double").mean().numpy()
    assert grid.shape == (12, 8) and grid.dtype == np.float32
    assert maps.word("red").upsample(image.size).grid == (48, 32)
    left = maps.word("red").numpy()
    assert left.shape == (len(maps.layers), 3, 12, 8), "layer and step axes first, in that order"


def test_multi_piece_word_is_mean_of_pieces(captured) -> None:
    maps, _ = captured
    word = maps.tokens.word("crimson")
    assert len(word.positions) > 1
    pieces = np.stack([maps.token(p).numpy() for p in word.positions])
    np.testing.assert_allclose(maps.word("crimson").numpy(), pieces.mean(0), rtol=1e-6)
    np.testing.assert_allclose(maps.word("crimson", merge="sum").numpy(), pieces.sum(0), rtol=1e-6)
    phrase = maps.word("red circle").numpy()
    both = np.stack([maps.word("red").numpy(), maps.word("circle").numpy()]).mean(0)
    np.testing.assert_allclose(phrase, both, rtol=1e-6)


def test_layer_and_step_selection(captured) -> None:
    maps, _ = captured
    n_double = sum(layer.kind == "double" for layer in maps.layers)
    assert maps.select(layers="double").shape[1] == n_double
    first = maps.layers[0]
    by_index = maps.select(layers=0).numpy()
    np.testing.assert_array_equal(by_index, maps.select(layers=first.label).numpy())
    np.testing.assert_array_equal(by_index, maps.select(layers=first.name).numpy())
    assert maps.select(steps=slice(1, 3)).steps == (1, 2)
    assert maps.select(layers=slice(0, 2), steps=[0]).shape[1:3] == (2, 1)
    with pytest.raises(attnscope.SelectionError, match="available layers"):
        maps.select(layers="double.9")
    with pytest.raises(attnscope.SelectionError, match="step"):
        maps.select(steps=[7])
    with pytest.raises(attnscope.SelectionError, match="head"):
        maps.select(heads=0)


def test_unknown_word_lists_prompt_words(captured) -> None:
    maps, _ = captured
    with pytest.raises(attnscope.UnknownWordError) as err:
        maps.word("purple")
    message = str(err.value)
    assert "purple" in message and "circle" in message and "crimson" in message


def test_normalize_threshold_iou(captured) -> None:
    maps, _ = captured
    red = maps.word("red").mean()
    norm = red.normalize().numpy()
    assert norm.min() == 0.0 and np.isclose(norm.max(), 1.0)
    mask = red.threshold()
    assert mask.dtype == bool and mask.shape == maps.grid
    assert red.iou(mask) == 1.0
    assert red.iou(~mask) == 0.0
    assert 0.0 < red.iou(np.ones(maps.grid, dtype=bool)) < 1.0
    with pytest.raises(ValueError, match="upsample"):
        red.iou(np.ones((5, 5), dtype=bool))


def test_save_load_roundtrip(captured, tmp_path) -> None:
    maps, _ = captured
    path = maps.save(tmp_path / "maps.safetensors")
    loaded = attnscope.TokenMaps.load(path)
    assert torch.equal(loaded.data, maps.data)
    assert loaded.layers == maps.layers and loaded.steps == maps.steps and loaded.tokens == maps.tokens
    np.testing.assert_array_equal(loaded.word("crimson").numpy(), maps.word("crimson").numpy())
    bad = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not an attnscope maps file"):
        attnscope.TokenMaps.load(bad)


def test_overlay_and_grid_figures(captured) -> None:
    maps, image = captured
    red = maps.word("red").mean().numpy()
    over = viz.overlay(red, image, alpha=0.6)
    assert over.size == image.size
    assert np.asarray(over).std() > 0
    hot = viz.heatmap(red, image.size)
    # the heatmap's hottest pixel sits where the map peaks
    peak_y, peak_x = np.unravel_index(red.argmax(), red.shape)
    sy, sx = image.size[1] // red.shape[0], image.size[0] // red.shape[1]
    pixel = np.asarray(hot)[peak_y * sy + sy // 2, peak_x * sx + sx // 2]
    assert pixel[0] > pixel[2], "jet colormap: the peak is red, not blue"
    fig = viz.grid_figure(maps, ["red", "square"], by="step", image=image)
    assert len(fig.axes) == 2 * 3
    with pytest.raises(ValueError, match="reduce"):
        viz.overlay(maps.word("red").numpy(), image)
    assert isinstance(maps.word("red").mean().plot_overlay(image), Image.Image)
