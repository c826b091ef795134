"""``attnscope shapes eval`` scoring and plumbing (tiny random pipeline; no trained model needed)."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from attnscope import shapes
from attnscope.shapes import metrics
from attnscope.shapes.cli import register
from attnscope.shapes.metrics import TWO_OBJECT_PROMPTS, evaluate, score_image
from attnscope.shapes.reader import match_objects, read_scene
from attnscope.shapes.render import render_prompt, render_scene
from attnscope.shapes.vocabulary import occurrence_query, parse_prompt

REQUIRED_KEYS = ("color_acc", "shape_acc", "two_object_all_correct", "synonym_color_acc", "miou_color", "miou_shape")


def test_protocol_prompts_are_valid():
    for prompt in (*metrics.SINGLE_PROMPTS, *TWO_OBJECT_PROMPTS, *metrics.SYNONYM_PROMPTS):
        assert 1 <= len(parse_prompt(prompt)) <= 2
    assert all(len(parse_prompt(p)) == 2 for p in TWO_OBJECT_PROMPTS)


def test_score_image_on_ground_truth_is_perfect():
    for seed, prompt in enumerate(TWO_OBJECT_PROMPTS):
        rec = score_image(prompt, read_scene(render_prompt(prompt, seed).image))
        assert rec["all_correct"] and all(rec["color_hits"]) and all(rec["shape_hits"]) and rec["spurious"] == 0


def test_score_image_counts_errors():
    # Ask for a red circle and a blue square; show a red circle, a green square and a yellow triangle.
    scene = render_scene(0, objects=[("red", "circle"), ("green", "square"), ("yellow", "triangle")])
    rec = score_image("a red circle and a blue square", read_scene(scene.image))
    assert rec["color_hits"] == [True, False]
    assert not rec["all_correct"] and rec["spurious"] == 1 and not rec["count_ok"]
    assert rec["extras"] == ["unrelated"]  # the yellow triangle; the green square is matched to the blue square
    # Missing objects count as wrong.
    assert match_objects([("red", "circle"), ("blue", "square")], []) == [None, None]


def test_two_object_accuracy_is_also_given_per_seed():
    prompt = "a red circle and a blue square"
    right = read_scene(render_prompt(prompt, 0).image)
    wrong = read_scene(render_scene(0, objects=[("red", "circle"), ("red", "circle"), ("blue", "square")]).image)
    records = [
        score_image(prompt, detected) | {"group": "two", "seed": seed}
        for seed, detected in [(0, right), (0, right), (1, right), (1, wrong), (2, wrong)]
    ]
    summary = metrics.summarize_generation(records)
    assert summary["two_object_all_correct"] == pytest.approx(3 / 5)
    assert summary["two_object_by_seed"] == {"0": 1.0, "1": 0.5, "2": 0.0}


def test_extras_are_classified_by_their_relation_to_the_prompt():
    """A bag-of-attributes drawing of "a red circle and a blue square" shows up as a cross-binding, not as noise."""
    prompt = "a red circle and a blue square"
    for third, kind in ((("blue", "circle"), "cross_binding"), (("red", "circle"), "duplicate")):
        scene = render_scene(3, objects=[("red", "circle"), ("blue", "square"), third])
        rec = score_image(prompt, read_scene(scene.image))
        assert len(rec["detected"]) == 3 and all(rec["color_hits"] + rec["shape_hits"]) and not rec["all_correct"]
        assert rec["extras"] == [kind]
    expected = parse_prompt(prompt)
    assert metrics.classify_extra(expected, "green", "circle") == "one_attribute"
    assert metrics.classify_extra(expected, "yellow", "triangle") == "unrelated"


def test_a_box_is_a_square_but_not_true_to_form():
    scene = render_prompt("a blue square and a red circle", 1)
    (box, disc) = sorted(read_scene(scene.image), key=lambda d: d.color)
    assert 0.8 < box.aspect < 1.25
    rec = score_image("a blue square and a red circle", read_scene(scene.image))
    assert rec["shape_hits"] == rec["form_hits"] == [True, True]
    box.aspect = 2.0  # as a model's 2:1 box would be fitted
    rec = score_image("a blue square and a red circle", [box, disc])
    assert rec["shape_hits"] == [True, True] and rec["form_hits"] == [False, True]


@pytest.mark.slow
def test_evaluate_writes_json_with_required_keys(tmp_path, monkeypatch):
    # A random pipeline of the bundle's layout, built by the lab (the world has no model builder of its own).
    from attnscope.lab.model import ShapesModelConfig, assemble_pipeline

    tiny = ShapesModelConfig(hidden_heads=2, head_dim=16, double_layers=1, single_layers=1, t5_d_ff=32, clip_hidden=16)
    folder = tmp_path / "model"
    assemble_pipeline(tiny).save_pretrained(folder)
    # Keep the run short: fewer prompts and steps; the protocol's code path is unchanged.
    monkeypatch.setattr(metrics, "SINGLE_PROMPTS", metrics.SINGLE_PROMPTS[:2])
    monkeypatch.setattr(metrics, "TWO_OBJECT_PROMPTS", TWO_OBJECT_PROMPTS[:2])
    monkeypatch.setattr(metrics, "SYNONYM_PROMPTS", metrics.SYNONYM_PROMPTS[:2])
    monkeypatch.setitem(shapes.DEFAULT_CALL_KWARGS, "num_inference_steps", 2)
    result = evaluate(folder, out_dir=tmp_path / "eval", seeds=1, two_object_seeds=2)
    data = json.loads((tmp_path / "eval" / "shapes_eval.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in data and key in result["summary"]
        assert data[key] is None or 0.0 <= data[key] <= 1.0
    # 2 single-object and 2 synonym prompts × 1 seed, 2 two-object prompts × 2 seeds.
    assert data["n_images"] == 8 and (data["seeds"], data["two_object_seeds"]) == (1, 2)
    assert set(data["two_object_by_seed"]) == {"0", "1"}
    # A model without a guidance embedding is guided by true CFG; the call is recorded.
    assert data["call"]["true_cfg_scale"] == shapes.TRUE_CFG_SCALE and data["call"]["num_inference_steps"] == 2
    with Image.open(tmp_path / "eval" / "samples.png") as grid:  # one row per prompt, as wide as the longest
        assert grid.size == (2 * 32, 6 * 32)
    if data["localization_pairs"]:  # a random model rarely draws an object in the asked colour
        assert set(data["miou_by_layer"]) == {"double.0", "single.0"}
        assert len(data["miou_by_step"]["color"]["double.0"]) == 2
        assert (tmp_path / "eval" / "maps.png").exists()


@pytest.mark.parametrize("kwargs", [{"seeds": -1}, {"two_object_seeds": 0}])
def test_evaluate_rejects_seed_counts_below_one(kwargs):
    with pytest.raises(ValueError, match="at least 1"):
        evaluate("no-model-is-loaded", **kwargs)


def test_occurrence_query_counts_in_prompt_order() -> None:
    """The second "red" stays "red#2" even when the first object was not generated (and so not scored)."""
    words = ["red", "blue", "red"]
    assert [occurrence_query(words, k) for k in range(3)] == ["red#1", "blue#1", "red#2"]


def test_cli_eval_passes_seed_counts_to_the_protocol(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **kw: calls.append((a, kw)) or {"summary": {}})
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "eval", "--seeds", "2", "--two-object-seeds", "8", "--no-localization"])
    assert args.run(args) == 0
    (_, kwargs), = calls
    assert (kwargs["seeds"], kwargs["two_object_seeds"], kwargs["localization"]) == (2, 8, False)
