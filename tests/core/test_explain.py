"""``attnscope.explain`` and ``attnscope explain`` on the bundled shapes model and tiny random Flux and SD3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import attnscope
from attnscope.cli import main
from attnscope.explain import ExplainError, explain
from attnscope.shapes.render import render_scene


@pytest.fixture(scope="module")
def shapes(one_thread):
    return attnscope.load_pipeline("shapes", progress=False)


@pytest.fixture(scope="module")
def scene():
    """Two objects of different colours and shapes, far enough apart to tell their maps apart."""
    objects = [("red", "circle"), ("blue", "triangle")]
    scene = render_scene(7, objects=objects, caption="a red circle and a blue triangle")
    assert len(scene.objects) == 2 and not (scene.objects[0].mask & scene.objects[1].mask).any()
    return scene


def test_explained_maps_find_each_object_of_a_rendered_scene(shapes, scene) -> None:
    result = explain(shapes, scene.image, scene.caption, concepts=["red", "circle", "blue", "triangle"])
    assert result.maps.present == ("token", "layer", "step") and result.maps.steps == (0,)
    assert result.samples == 4 and result.t == pytest.approx(0.3)
    readout = attnscope.readout_for(shapes)
    size = scene.image.shape[1], scene.image.shape[0]
    for word, index in (("red", 0), ("circle", 0), ("blue", 1), ("triangle", 1)):
        predicted = readout.mask(result.maps.word(word), size)
        own, other = scene.objects[index].mask, scene.objects[1 - index].mask
        iou = (predicted & own).sum() / (predicted | own).sum()
        assert iou > 0.6, (word, iou)
        assert (predicted & other).sum() < 0.2 * other.sum(), word
    concepts = result.concept_maps
    assert concepts is not None and concepts.words() == ["red", "circle", "blue", "triangle"]
    assert torch.allclose(concepts.data.sum(0), torch.ones(()), atol=1e-5)


def test_explanations_repeat_for_a_seed_and_accept_pil_grey_and_rgba(shapes, scene) -> None:
    first = explain(shapes, scene.image, scene.caption, samples=2, seed=3)
    again = explain(shapes, Image.fromarray(scene.image), scene.caption, samples=2, seed=3)
    other = explain(shapes, scene.image, scene.caption, samples=2, seed=4)
    assert torch.equal(first.maps.data, again.maps.data)
    assert not torch.equal(first.maps.data, other.maps.data)
    rgba = np.concatenate([scene.image, np.full(scene.image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert torch.equal(explain(shapes, rgba, scene.caption, samples=2, seed=3).maps.data, first.maps.data)
    grey = explain(shapes, scene.image.mean(-1).astype(np.uint8), scene.caption, samples=1)
    assert grey.image.shape == scene.image.shape


def test_explain_runs_on_a_tiny_random_flux() -> None:
    pipe = attnscope.load_pipeline("tiny-flux", progress=False)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    result = explain(pipe, image, "a red circle", words=["red"], concepts=["red", "circle"], samples=2)
    assert result.maps.words() == ["red"] and result.concept_maps.words() == ["red", "circle"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"t": 0.0}, r"inside \(0, 1\)"),
        ({"t": 1.0}, r"inside \(0, 1\)"),
        ({"samples": 0}, "at least 1"),
        ({"image": np.zeros((31, 32, 3), np.uint8)}, "multiples of 2"),
        ({"image": np.zeros((32, 32, 3), np.float32)}, "uint8"),
        ({"image": np.zeros((32, 32, 2), np.uint8)}, "RGB"),
        ({"concepts": []}, "empty"),
    ],
)
def test_bad_input_is_one_clear_error(shapes, scene, change, message) -> None:
    kwargs = {"image": scene.image, "t": 0.3, "samples": 1} | change
    image = kwargs.pop("image")
    with pytest.raises(ValueError, match=message):
        explain(shapes, image, scene.caption, **kwargs)


def test_unreadable_image_files(tmp_path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(ExplainError, match="not a readable image"):
        attnscope.explain(None, corrupt, "a red circle")
    with pytest.raises(ExplainError, match="does not exist"):
        attnscope.explain(None, tmp_path / "missing.png", "a red circle")


def test_cli_writes_every_file_or_none(tmp_path, scene, capsys) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    out = tmp_path / "explained"
    args = ["explain", "--image", str(image), "--prompt", scene.caption, "--out", str(out), "--samples", "2"]
    assert main([*args, "--words", "red,triangle", "--concepts", "red,triangle,blue"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([
        "image.png", "maps.safetensors", "overlay_red.png", "overlay_triangle.png", "grid_layers.png",
        "concept_maps.safetensors", "concept_red.png", "concept_triangle.png", "concept_blue.png",
        "concept_grid_layers.png",
    ])
    assert attnscope.TokenMaps.load(out / "concept_maps.safetensors").words() == ["red", "triangle", "blue"]
    assert Image.open(out / "overlay_red.png").size[0] >= 256  # enlarged to a viewable size

    fresh = tmp_path / "never"
    for bad, message in (
        (["--concepts", "red,☃"], "no token"),
        (["--t", "1.5"], "inside (0, 1)"),
        (["--words", "zebra"], "zebra"),
    ):
        code = main(["explain", "--image", str(image), "--prompt", scene.caption, "--out", str(fresh), *bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's own loading bars, if any
        assert code == 2 and message in err and err.startswith("error:")
        assert not fresh.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_explain_runs_on_sd3_with_cfg_batch_and_clip_t5_layout() -> None:
    """SD3 (tiny, random): one batched forward per explanation, maps over both of a word's positions (CLIP, T5)."""
    pipe = attnscope.load_pipeline("tiny-sd3", progress=False)
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    result = explain(pipe, image, "a red circle", concepts=["red", "circle"], samples=2, max_sequence_length=16)
    assert result.samples == 2 and result.maps.present == ("token", "layer", "step")
    red = result.maps.tokens.word("red")
    assert len(red.positions) == 2 and red.positions[0] < pipe.tokenizer_max_length <= red.positions[1]
    assert result.maps.word("red").data.shape[-2:] == (8, 8)  # 32 px, VAE factor 2, patch 2
    assert result.concept_maps.word("circle").data.shape[-2:] == (8, 8)
    again = explain(pipe, image, "a red circle", concepts=["red", "circle"], samples=2, max_sequence_length=16)
    torch.testing.assert_close(again.maps.data, result.maps.data)
