"""Shapes world without a model: vocabulary, renderer, reader (fast, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from attnscope.shapes import DEFAULT_CALL_KWARGS, GUIDANCE_SCALE, NATIVE_SIZE, UntrainedSizeWarning, validate_call
from attnscope.shapes.reader import MALFORMED_ERROR, read_scene
from attnscope.shapes.render import RADIUS_RANGE, coverage, render_prompt, render_scene
from attnscope.shapes.vocabulary import (
    ALL_WORDS,
    BACKGROUND,
    CANONICAL,
    COLORS,
    SHAPES,
    SYNONYMS,
    OutOfVocabularyError,
    check_prompt,
    is_color,
    is_shape,
    parse_prompt,
    words_of,
)


def test_vocabulary_synonyms_are_unique_and_canonical():
    syns = [s for group in SYNONYMS.values() for s in group]
    assert len(syns) == len(set(syns))
    assert set(SYNONYMS) == set(COLORS) | set(SHAPES)
    assert CANONICAL["crimson"] == "red" and CANONICAL["box"] == "square" and CANONICAL["disc"] == "circle"
    assert not (set(syns) & (set(COLORS) | set(SHAPES)))


def test_check_prompt_names_unknown_words():
    assert check_prompt("a red circle and a blue square") == ["a", "red", "circle", "and", "a", "blue", "square"]
    with pytest.raises(OutOfVocabularyError) as err:
        check_prompt("a purple circle and a red dog")
    assert err.value.words == ["purple", "dog"]
    assert "purple" in str(err.value) and "dog" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(OutOfVocabularyError):
        check_prompt("3 red circles")


def test_parse_prompt_binds_colours_to_shapes():
    assert parse_prompt("a crimson box next to an azure disc") == [("red", "square"), ("blue", "circle")]
    with pytest.raises(ValueError):
        parse_prompt("a red")
    with pytest.raises(ValueError):
        parse_prompt("a circle")


def test_validate_call_warns_on_untrained_size():
    with pytest.warns(UntrainedSizeWarning):
        validate_call("a red circle", height=64, width=64)
    assert validate_call("a red circle", height=NATIVE_SIZE, width=NATIVE_SIZE) == ["a", "red", "circle"]
    assert DEFAULT_CALL_KWARGS["height"] == NATIVE_SIZE and DEFAULT_CALL_KWARGS["guidance_scale"] == GUIDANCE_SCALE
    assert "true_cfg_scale" not in DEFAULT_CALL_KWARGS, "the bundle is guidance-distilled: one call per step"


def test_render_is_deterministic_and_consistent():
    a, b = render_scene(123), render_scene(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.image.shape == (NATIVE_SIZE, NATIVE_SIZE, 3) and a.image.dtype == np.uint8
    for seed in range(200):
        s = render_scene(seed)
        assert 1 <= len(s.objects) <= 3
        assert all(w in ALL_WORDS for w in words_of(s.caption))
        assert parse_prompt(s.caption) == [(s.objects[i].color, s.objects[i].shape) for _, _, i in s.word_objects[1::2]]
        # Objects never overlap, so masks are exact and disjoint.
        total = sum(o.mask.astype(int) for o in s.objects)
        assert total.max() <= 1
        for idx, word, obj in s.word_objects:
            assert words_of(s.caption)[idx] == word
            assert (s.word_masks[word] & s.objects[obj].mask).sum() == s.objects[obj].mask.sum()


def test_three_object_captions_share_no_connector_with_two_object_ones():
    # A two-object prompt must not read as the tail of a three-object caption ("..., B and C"): the model then drew
    # a third object for "B and C" twice as often as for "B with C" (benchmarks/two_object_count.py).
    captions = {n: [render_scene(seed, n_objects=n).caption for seed in range(300)] for n in (2, 3)}
    connectors = {n: {w for c in captions[n] for w in words_of(c) if not (is_color(w) or is_shape(w))} for n in (2, 3)}
    assert {"and", "with", "beside"} <= connectors[2]
    assert connectors[3] <= {"a", "an"}
    assert all(c.count(",") == 2 for c in captions[3])


def test_render_same_colour_pair_word_mask_is_union():
    s = render_prompt("a red circle and a red square", seed=0)
    assert [(o.color, o.shape) for o in s.objects] == [("red", "circle"), ("red", "square")]
    assert s.word_masks["red"].sum() == s.objects[0].mask.sum() + s.objects[1].mask.sum()
    assert s.word_masks["square"].sum() == s.objects[1].mask.sum()


def test_render_scales_and_antialiases():
    s = render_scene(7, n_objects=1, size=64)
    assert s.image.shape == (64, 64, 3)
    # Anti-aliasing: edge pixels mix object and background colours.
    colours = {tuple(p) for p in s.image.reshape(-1, 3)}
    assert len(colours) > 2
    assert RADIUS_RANGE[1][0] * 2 <= s.objects[0].bbox[2] - s.objects[0].bbox[0] + 2


def _reader_accuracy(n: int, size: int, noise: float = 0.0) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    hits = total = scenes_ok = 0
    for seed in range(n):
        s = render_scene(50_000 + seed, size=size)
        img = s.image
        if noise:
            img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        found = read_scene(img)
        for o in s.objects:
            match = [d for d in found if (d.mask & o.mask).any()]
            total += 1
            hits += bool(match) and match[0].color == o.color and match[0].shape == o.shape
        scenes_ok += sorted((d.color, d.shape) for d in found) == sorted((o.color, o.shape) for o in s.objects)
    return hits / total, scenes_ok / n


def test_reader_accuracy_on_rendered_scenes():
    obj_acc, scene_acc = _reader_accuracy(300, NATIVE_SIZE)
    assert obj_acc >= 0.98 and scene_acc >= 0.98, (obj_acc, scene_acc)


def test_reader_accuracy_with_pixel_noise():
    # Generated images are never clean: the reader must survive mild noise (σ = 8 grey levels).
    obj_acc, scene_acc = _reader_accuracy(150, NATIVE_SIZE, noise=8.0)
    assert obj_acc >= 0.98 and scene_acc >= 0.95, (obj_acc, scene_acc)


def test_reader_returns_positions_and_masks():
    s = render_prompt("a blue triangle", seed=3, size=64)
    (found,) = read_scene(s.image)
    assert (found.color, found.shape) == ("blue", "triangle")
    iou = (found.mask & s.objects[0].mask).sum() / (found.mask | s.objects[0].mask).sum()
    assert iou > 0.9
    cx, cy = found.centroid
    x0, y0, x1, y1 = s.objects[0].bbox
    assert x0 <= cx <= x1 and y0 <= cy <= y1


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("aspect", [0.65, 1.0, 1.7])
def test_reader_judges_stretched_shapes_by_category_and_measures_the_stretch(shape: str, aspect: float):
    """Models draw boxes for squares and ovals for circles; the reader names the category (the prototype fitted
    with the object's own width-to-height ratio) and reports how far from true form it is."""
    cov = coverage(shape, 16.0, 16.0, 6.0, 32, aspect)
    image = np.rint(np.asarray(BACKGROUND, np.float32) * (1 - cov[..., None])
                    + np.asarray(COLORS["blue"], np.float32) * cov[..., None])
    (found,) = read_scene(image.astype(np.uint8))
    assert (found.color, found.shape) == ("blue", shape)
    assert found.aspect == pytest.approx(aspect, rel=0.12)
    assert min(found.shape_errors.values()) < 0.1


def _painted(*objects: tuple[str, float, float, float, str]) -> np.ndarray:
    """(shape, cx, cy, r, colour) objects painted in order over the background, float (32, 32, 3)."""
    image = np.empty((32, 32, 3), np.float32)
    image[:] = BACKGROUND
    for shape, cx, cy, r, color in objects:
        cov = coverage(shape, cx, cy, r, 32)[..., None]
        image = image * (1 - cov) + np.asarray(COLORS[color], np.float32) * cov
    return image


def test_reader_gives_the_pieces_of_a_blend_its_silhouette_shape():
    """A model sometimes draws one object in two colours: a blue disc with a red cap and a rim of an in-between
    colour where they meet. Read alone, the rim fits no prototype (its label would be the best of three poor fits);
    it is a piece of a circle (shape belongs to the silhouette, colour to the pixels)."""
    image = _painted(("circle", 16.0, 17.0, 9.0, "blue"))
    rows = np.arange(32)[:, None].repeat(32, axis=1)
    inside = np.abs(image - np.asarray(BACKGROUND, np.float32)).sum(-1) > 100
    image[inside & (rows < 11)] = COLORS["red"]
    image[inside & (rows == 11)] = COLORS["yellow"]
    found = {o.color: o for o in read_scene(np.rint(image).astype(np.uint8))}
    rim = found["yellow"]
    assert (rim.shape, rim.blended, found["blue"].shape) == ("circle", True, "circle")
    alone = np.where(rim.mask[..., None], np.asarray(COLORS["yellow"], np.float32), np.asarray(BACKGROUND, np.float32))
    (read_alone,) = read_scene(np.rint(alone).astype(np.uint8))
    assert min(read_alone.shape_errors.values()) >= MALFORMED_ERROR  # alone it is no shape: any label is a guess


def test_reader_keeps_touching_objects_that_are_shapes_of_their_own():
    """Two objects side by side that touch are no blend: each fits a prototype by itself."""
    image = _painted(("triangle", 9.5, 16.0, 6.0, "red"), ("square", 19.5, 16.0, 5.0, "blue"))
    found = read_scene(np.rint(image).astype(np.uint8))
    red, blue = sorted(found, key=lambda o: o.color != "red")
    assert (red.color, red.shape, blue.color, blue.shape) == ("red", "triangle", "blue", "square")
    assert not red.blended and not blue.blended
    assert (ndimage.binary_dilation(red.mask, structure=np.ones((3, 3), bool)) & blue.mask).any()  # they touch


def test_reader_ignores_blank_image_and_rejects_bad_input():
    blank = np.full((32, 32, 3), 235, np.uint8)
    assert read_scene(blank) == []
    with pytest.raises(ValueError):
        read_scene(np.zeros((32, 32), np.uint8))
