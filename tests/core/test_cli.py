"""`attnscope maps` end to end on a tiny Flux pipeline, and its input errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import attnscope
from attnscope.cli import main


def _maps(tmp_path, *extra: str) -> int:
    return main(["maps", "--model", "tiny-flux", "--prompt", "a red circle and a crimson square",
                 "--out", str(tmp_path), *extra])


def test_maps_writes_image_overlays_grid_and_maps(tmp_path) -> None:
    assert _maps(tmp_path, "--words", "red,crimson", "--steps", "3", "--height", "48", "--width", "32",
                 "--seed", "3") == 0
    image = Image.open(tmp_path / "image.png")
    assert image.size == (32, 48)
    for name in ("overlay_red.png", "overlay_crimson.png", "grid_layers.png", "grid_steps.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    maps = attnscope.TokenMaps.load(tmp_path / "maps.safetensors")
    assert maps.steps == (0, 1, 2) and maps.grid == (12, 8)
    assert set(maps.words()) == {"red", "crimson"}, "--words keeps only those words' tokens"
    overlay = np.asarray(Image.open(tmp_path / "overlay_red.png"), dtype=float)
    enlarged = np.asarray(image.convert("RGB").resize((256, 384), Image.NEAREST), dtype=float)
    assert overlay.shape == (384, 256, 3), "a small image's overlay is enlarged 8× to a viewable size"
    assert not np.array_equal(overlay, enlarged)


def test_maps_on_the_shapes_model_writes_viewable_overlays_and_the_native_image(tmp_path) -> None:
    from attnscope import viz

    words = ["red", "square"]
    args = ["maps", "--prompt", "a red circle and a blue square", "--words", ",".join(words), "--steps", "4"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "image.png")
    assert image.size == (32, 32), "image.png stays the model's own pixels"
    maps = attnscope.TokenMaps.load(tmp_path / "maps.safetensors")
    for word in words:
        overlay = Image.open(tmp_path / f"overlay_{word}.png")
        assert min(overlay.size) >= viz.MIN_VIEW_SIDE == 256, overlay.size
        # The image is enlarged pixel for pixel (nearest) and the heatmap drawn at the enlarged size.
        expected = viz.overlay(maps.word(word).mean().numpy(), image.resize(overlay.size, Image.NEAREST))
        assert np.abs(np.asarray(overlay, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert viz.enlarged(Image.new("RGB", (1024, 1024))).size == (1024, 1024), "a real model's size is kept"


def test_maps_layers_option(tmp_path) -> None:
    assert _maps(tmp_path, "--words", "red", "--layers", "double", "--steps", "2") == 0
    maps = attnscope.TokenMaps.load(tmp_path / "maps.safetensors")
    assert {layer.kind for layer in maps.layers} == {"double"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--words", "purple"], "'purple' is not in the prompt"),
        (["--words", "red", "--height", "30"], "multiples of 4"),
        (["--words", "red", "--layers", "double.9"], "available layers: double.0"),
        (["--words", ""], "--words is empty"),
    ],
)
def test_maps_bad_input_is_one_clear_line(tmp_path, capsys, extra, message) -> None:
    assert _maps(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert any(m in err for m in message.split("|")), err


def test_maps_on_the_shapes_model_names_the_words_it_cannot_draw_and_warns_at_untrained_sizes(tmp_path, capsys) -> None:
    from attnscope.shapes import UntrainedSizeWarning

    assert main(["maps", "--prompt", "a purple circle and a red dog", "--words", "red", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "purple" in err and "dog" in err and "Traceback" not in err
    assert not (tmp_path / "image.png").exists()  # refused before generating
    with pytest.warns(UntrainedSizeWarning, match="height=48"):
        assert main(["maps", "--prompt", "a red circle", "--words", "red", "--height", "48", "--steps", "2",
                     "--out", str(tmp_path)]) == 0


def test_empty_prompt(tmp_path, capsys) -> None:
    assert main(["maps", "--model", "tiny-flux", "--prompt", " ", "--words", "red", "--out", str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err


def test_installed_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "attnscope.cli", "maps", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--words" in out.stdout and "overlay_<word>.png" in out.stdout


def test_shapes_commands_run_through_the_main_cli(tmp_path, capsys) -> None:
    assert main(["shapes", "export", str(tmp_path / "missing.pt"), "--to", str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().err
