"""Unit tests of the explorer app's functions (``attnscope.apps``), on the tiny random Flux pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")

import attnscope  # noqa: E402
import attnscope.tiny  # noqa: E402
from attnscope import viz  # noqa: E402
from attnscope.apps import cli, explorer  # noqa: E402
from attnscope.apps.explorer import Limits, Request, RequestError, View  # noqa: E402
from attnscope.profiles import profile_for  # noqa: E402

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def model() -> explorer.Model:
    return explorer.open_model("tiny-flux")


@pytest.fixture(scope="module")
def result(model: explorer.Model) -> explorer.Result:
    return explorer.generate(model, Request(PROMPT, seed=3))


def traced_reference(seed: int, **options: object) -> tuple[object, attnscope.TokenMaps]:
    """The image and maps through the public API alone (a fresh pipeline), to check the app against."""
    pipe = attnscope.load_pipeline("tiny-flux")
    with attnscope.trace(pipe, **options) as tr:
        image = pipe(
            PROMPT, generator=torch.Generator().manual_seed(seed), **profile_for("tiny-flux").default_call()
        ).images[0]
    return image, tr.maps()


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request("   "), "Type a prompt"),
        (Request("x" * 301), "limit is 300"),
        (Request("?!, ..."), "no words"),
        (Request(PROMPT, seed=-1), "seed"),
        (Request(PROMPT, steps=0), "Steps"),
        (Request(PROMPT, steps=51), "Steps"),
        (Request(PROMPT, height=30), "multiples of 4"),
        (Request(PROMPT, width=0), "multiples of 4"),
        (Request(PROMPT, height=2048, width=32), "limit of 1024"),
        (Request(PROMPT, height=32.0, width=32), "whole numbers"),  # type: ignore[arg-type]
    ],
)
def test_invalid_requests_are_refused_with_a_message(model: explorer.Model, request_: Request, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        explorer.call_kwargs(model, request_, Limits())


def test_valid_request_fills_in_the_model_defaults(model: explorer.Model) -> None:
    kwargs, notes = explorer.call_kwargs(model, Request(PROMPT, steps=3), Limits())
    assert kwargs == {**profile_for("tiny-flux").default_call(), "num_inference_steps": 3, "height": 32, "width": 32}
    assert notes == []


def test_model_check_refuses_or_adds_notes(model: explorer.Model) -> None:
    def only_colours(prompt: str, height: int, width: int) -> list[str]:
        if "dog" in prompt:
            raise ValueError("the model cannot draw 'dog'")
        return [] if height == 32 else ["trained at 32 px only"]

    picky = explorer.Model("picky", model.pipe, model.call_kwargs, check=only_colours)
    with pytest.raises(RequestError, match="cannot draw 'dog'"):
        explorer.call_kwargs(picky, Request("a red dog"), Limits())
    assert explorer.call_kwargs(picky, Request(PROMPT), Limits())[1] == []
    result = explorer.generate(picky, Request(PROMPT, height=16, width=16, steps=1))
    assert result.notes == ("trained at 32 px only",)


def test_shapes_model_checks_vocabulary_and_size() -> None:
    pytest.importorskip("attnscope.shapes.vocabulary")
    with pytest.raises(ValueError, match="dog"):
        explorer.call_check(profile_for("shapes"))("a red dog", 32, 32)
    assert explorer.call_check(profile_for("shapes"))("a crimson disc", 32, 32) == []
    assert "trained at 32" in " ".join(explorer.call_check(profile_for("shapes"))("a red circle", 64, 64))


# ------------------------------------------------------------------------------------------- generation
def test_generation_keeps_every_layer_step_and_head(result: explorer.Result) -> None:
    assert result.words == ["a", "red", "circle", "and", "blue", "square"]  # "a" twice -> one chip
    assert result.layer_labels == ["double.0", "double.1", "single.0", "single.1"]
    assert result.n_steps == 2
    assert result.heads == (0, 1)
    assert result.image.size == (32, 32)


def test_heads_are_averaged_when_per_head_maps_exceed_the_budget(model: explorer.Model) -> None:
    small = explorer.generate(model, Request(PROMPT, seed=3), Limits(head_budget_bytes=1000))
    assert small.heads == ()
    with pytest.raises(RequestError, match="Head 0 is not available"):
        explorer.word_map(small, View(word="red", head=0))


def test_progress_is_reported_per_step(model: explorer.Model) -> None:
    seen: list[tuple[int, int]] = []
    explorer.generate(model, Request(PROMPT, steps=3), on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_overlay_matches_the_public_api(result: explorer.Result) -> None:
    image, maps = traced_reference(seed=3)  # heads averaged at capture: the app's mean over kept heads must agree
    assert np.array_equal(np.asarray(result.image), np.asarray(image))
    expected = viz.overlay(maps.word("red").mean().numpy(), image, alpha=0.4, cmap="viridis")
    got = explorer.overlay_image(result, View(word="red", alpha=0.4, cmap="viridis"))
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_view_selects_layers_steps_and_heads(result: explorer.Result) -> None:
    maps = result.maps.word("blue")
    cases = {
        View(word="blue", layers="double"): maps.select(layers="double"),
        View(word="blue", layers="single", steps=(1, 1)): maps.select(layers="single", steps=1),
        View(word="blue", layers="blocks", blocks=("double.1", "single.0")): maps.select(
            layers=["double.1", "single.0"]
        ),
        View(word="blue", head=1, steps=(1, 0)): maps.select(heads=1),  # reversed step range: both steps
    }
    for view, expected in cases.items():
        np.testing.assert_allclose(explorer.word_map(result, view), expected.mean().numpy(), err_msg=str(view))


def test_no_word_shows_the_plain_image(result: explorer.Result) -> None:
    assert np.array_equal(np.asarray(explorer.overlay_image(result, View())), np.asarray(result.image.convert("RGB")))


@pytest.mark.parametrize(
    ("view", "message"),
    [
        (View(word="dog"), "not in the prompt"),
        (View(word="red", layers="blocks"), "at least one block"),
        (View(word="red", steps=(0, 5)), "outside the generation's steps"),
        (View(word="red", head=7), "Head 7 is not available"),
        (View(word="red", cmap="nope"), "Unknown colormap"),
        (View(word="red", alpha=1.5), "Opacity"),
        (View(word=None), "Click a word"),
    ],
)
def test_bad_views_are_refused_with_a_message(result: explorer.Result, view: View, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        explorer.word_map(result, view)


def test_grid_spans_the_gridded_axis_whatever_the_view_selects(result: explorer.Result) -> None:
    view = View(layers="double", steps=(1, 1))  # the grid's own axis ignores the view's selection of it
    by_layer = explorer.grid_image(result, view, ["red", "blue"], "layer")  # 4 layers
    by_step = explorer.grid_image(result, view, ["red", "blue"], "step")  # 2 steps
    assert by_layer.mode == by_step.mode == "RGB"
    assert by_layer.height == by_step.height and by_layer.width > 1.5 * by_step.width


def test_grid_needs_words(result: explorer.Result) -> None:
    with pytest.raises(RequestError, match="at least one word"):
        explorer.grid_image(result, View(), [], "layer")


def test_exports_round_trip(result: explorer.Result, tmp_path: Path) -> None:
    files = explorer.export_result(result, tmp_path)
    loaded = attnscope.TokenMaps.load(files.maps)
    assert torch.equal(loaded.data, result.maps.data) and loaded.words() == result.maps.words()
    overlay = explorer.export_overlay(result, View(word="red"), tmp_path)
    assert overlay.name == "overlay_red.png"
    assert np.array_equal(
        np.asarray(explorer.Image.open(overlay)), np.asarray(explorer.overlay_image(result, View(word="red")))
    )


# ---------------------------------------------------------------------------------------------- compare
def test_compare_runs_base_and_lora_on_the_same_seed(
    model: explorer.Model, result: explorer.Result, lora_folder: Path
) -> None:
    base, erased = explorer.compare(model, Request(PROMPT, seed=3), lora_folder)
    assert np.array_equal(np.asarray(base.image), np.asarray(result.image))
    assert not np.array_equal(np.asarray(erased.image), np.asarray(base.image))
    # add_q_proj / add_k_proj only change attention on the text side: the maps must move
    assert explorer.attention_mass(base, View(word="red")) != explorer.attention_mass(erased, View(word="red"))
    # the LoRA is unloaded afterwards: the base model generates as before
    again = explorer.generate(model, Request(PROMPT, seed=3))
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))


@pytest.mark.parametrize(
    ("folder", "message"),
    [("", "Give the folder"), ("does/not/exist", "does not exist"), ("EMPTY", "no LoRA at"), ("OTHER", "does not fit"),
     ("SD3", "LoRA for sd3 models, not for this flux pipeline")],
)
def test_compare_refuses_folders_without_a_fitting_lora(
    model: explorer.Model, result: explorer.Result, tmp_path: Path, folder: str, message: str
) -> None:
    if folder == "EMPTY":
        folder = str(tmp_path)
    elif folder == "OTHER":  # a LoRA for a model with other layer sizes
        import peft
        from diffusers import FluxPipeline

        other = attnscope.tiny.build_tiny_flux_pipeline(num_attention_heads=3).transformer
        other.add_adapter(peft.LoraConfig(r=2, target_modules=["add_q_proj"], init_lora_weights=False))
        FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=peft.utils.get_peft_model_state_dict(other))
        folder = str(tmp_path)
    elif folder == "SD3":  # module names and sizes that fit, made for the other architecture
        import peft

        from attnscope.erase.lora import LoraSettings, write_lora

        same = attnscope.tiny.build_tiny_flux_pipeline().transformer
        same.add_adapter(peft.LoraConfig(r=2, target_modules=["add_q_proj"], init_lora_weights=False))
        write_lora(tmp_path, peft.utils.get_peft_model_state_dict(same), LoraSettings(rank=2, targets=("add_q_proj",)),
                   ["transformer_blocks.0.attn.add_q_proj"], "sd3")
        folder = str(tmp_path)
    with pytest.raises(RequestError, match=message):
        explorer.compare(model, Request(PROMPT, seed=3), folder)
    with pytest.raises(RequestError, match=message):
        explorer.generate(model, Request(PROMPT, seed=3), lora=folder)
    # nothing was left loaded: the base model generates as before
    again = explorer.generate(model, Request(PROMPT, seed=3))
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))


# -------------------------------------------------------------------------------------------- ui and cli
def test_ui_turns_failures_into_visible_errors() -> None:
    import gradio as gr

    from attnscope.apps import ui

    @ui._user_errors
    def refuse() -> None:
        raise RequestError("Type a prompt first.")

    @ui._user_errors
    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(gr.Error, match="Type a prompt first"):
        refuse()
    with pytest.raises(gr.Error, match="RuntimeError: boom"):
        fail()


def test_ui_reads_widget_values() -> None:
    from attnscope.apps import ui

    assert ui._request(PROMPT, 4.0, 2.0, None, 32.0) == Request(PROMPT, seed=4, steps=2, height=None, width=32)
    for bad in (1.5, float("nan"), float("inf")):
        with pytest.raises(RequestError, match="whole number"):
            ui._request(PROMPT, bad, 2, 32, 32)
    view = ui._view("red", "blocks", ["double.0"], 1.0, 0.0, "1", "magma", 0.3)
    assert view == View(
        word="red", layers="blocks", blocks=("double.0",), steps=(1, 0), head=1, cmap="magma", alpha=0.3
    )


def test_shown_images_are_files_written_once_and_whole(result: explorer.Result, tmp_path: Path) -> None:
    """Two sessions showing the same image at once must not rewrite the file the other is being served."""
    from PIL import Image

    from attnscope.apps import ui

    path = ui._shown(result.image, tmp_path)
    written = path.stat()
    again = ui._shown(result.image.copy(), tmp_path)
    assert again == path
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "rewritten"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(result.image))
    assert ui._shown(explorer.overlay_image(result, View(word="red")), tmp_path) != path
    assert sorted(p.name.startswith(".") for p in path.parent.iterdir()) == [False, False], "staging files left"


def test_demo_builds_with_a_bounded_queue(model: explorer.Model, tmp_path: Path) -> None:
    from attnscope.apps import ui

    demo = ui.build_demo(model, workdir=tmp_path)
    assert demo._queue.max_size == ui.MAX_QUEUE
    model_events = [fn for fn in demo.fns.values() if fn.concurrency_id == "model"]
    assert {fn.api_name for fn in model_events} == {"generate", "compare", "erase", "explain"}
    assert all(fn.concurrency_limit == 1 for fn in model_events)


def test_cli_registers_the_app_command() -> None:
    parser = argparse.ArgumentParser(prog="attnscope")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", "--model", "tiny-flux"])
    assert (args.model, args.host, args.port, args.share, args.device) == ("tiny-flux", "127.0.0.1", 7860, False, "cpu")
    assert args.run is cli.run_app
    assert parser.parse_args(["app", "--share", "--port", "9000"]).share is True


def test_cli_serves_the_chosen_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnscope.apps import ui

    served: dict[str, object] = {}

    def fake_launch(demo: object, host: str, port: int, share: bool) -> None:
        served.update(demo=demo, host=host, port=port, share=share)

    monkeypatch.setattr(ui, "launch", fake_launch)
    parser = argparse.ArgumentParser(prog="attnscope")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", "--model", "tiny-flux", "--port", "9123", "--max-steps", "4"])
    assert args.run(args) == 0
    assert (served["host"], served["port"], served["share"]) == ("127.0.0.1", 9123, False)
    steps = next(c for c in served["demo"].blocks.values() if getattr(c, "elem_id", None) == "steps")
    assert steps.maximum == 4
    args.max_steps = 0
    with pytest.raises(ValueError, match="--max-steps"):
        args.run(args)


def test_compare_shows_the_loras_evaluation_figures(tmp_path: Path) -> None:
    """The Compare tab's table: base beside LoRA for every figure the report has, relative where it is defined."""
    import json

    assert "attnscope eval --lora" in explorer.eval_figures(tmp_path)
    report = {"acc_e": 0.0, "acc_g": 0.05, "acc_ir": 0.97, "acc_ir_relative": 0.99, "acc_ctx": 0.4,
              "acc_ctx_relative": 0.5, "acc_implicit": 0.8, "seeds": 16,
              "base": {"acc_e": 1.0, "acc_g": 1.0, "acc_ir": 0.98, "acc_ctx": 0.8, "acc_implicit": 0.75}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(report))
    table = explorer.eval_figures(tmp_path)
    assert "| Acc_ctx (the rest of an erased prompt drawn) ↑ | 80.0 % | 40.0 % | 50.0 % |" in table
    assert "| Acc_implicit (drawn unasked) ↓ | 75.0 % | 80.0 % |  |" in table and "16 seeds" in table
    # A report of an older protocol has fewer figures: those rows are left out.
    del report["acc_ctx"], report["acc_implicit"]
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(report))
    assert "Acc_ctx" not in explorer.eval_figures(tmp_path)


# ---------------------------------------------------------------------------------------------- erase
#: Enough of a run to train, checkpoint and write a LoRA on the tiny pipeline in seconds.
TINY_ERASE = {"steps": 4, "batch": 2, "contrastive_rows": 1, "keep_rows": 1, "checkpoint_every": 1}


def _tiny_erase_config() -> dict:
    from attnscope.erase.cache import CacheConfig

    return {**TINY_ERASE, "cache": CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=2)}


def test_erase_a_word_into_the_runs_folder_then_compare_on_it(model: explorer.Model, tmp_path: Path) -> None:
    from attnscope.apps.erasure import EraseRequest, erase_word, list_runs

    steps: list[tuple[int, int]] = []
    run = erase_word(model, EraseRequest("red", PROMPT), tmp_path, on_step=lambda d, t: steps.append((d, t)),
                     config=_tiny_erase_config())
    assert run.parent == tmp_path and run.name.startswith("red-eraseanything-")
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    spec = (run / "spec.yaml").read_text()
    assert "red" in spec and "circle" in spec and "square" in spec  # the prompt's other words are kept
    again = erase_word(model, EraseRequest("red", PROMPT, "uce"), tmp_path,
                       config={"cache": _tiny_erase_config()["cache"]})
    assert list_runs(tmp_path) == [str(again), str(run)]  # newest first
    # The served pipeline is the base model again: no adapter left behind, the same image as before.
    assert not any("lora" in n for n, _ in model.pipe.transformer.named_parameters())
    base, erased = explorer.compare(model, Request(PROMPT, seed=3), run)
    assert np.array_equal(np.asarray(base.image), np.asarray(explorer.generate(model, Request(PROMPT, seed=3)).image))
    assert not np.array_equal(np.asarray(base.image), np.asarray(erased.image))


def test_a_cancelled_erasure_stops_keeps_its_checkpoint_and_is_not_listed(
    model: explorer.Model, tmp_path: Path
) -> None:
    from attnscope.apps.erasure import EraseRequest, ErasureCancelled, erase_word, list_runs
    from attnscope.erase import ConceptSpec, EraseConfig, train

    done: list[int] = []
    with pytest.raises(ErasureCancelled, match="cancelled at step 2"):
        erase_word(model, EraseRequest("blue", PROMPT), tmp_path, on_step=lambda d, t: done.append(d),
                   cancelled=lambda: len(done) >= 2, config=_tiny_erase_config())
    (run,) = tmp_path.iterdir()
    assert (run / "checkpoint.pt").is_file() and list_runs(tmp_path) == []
    assert not any("lora" in n for n, _ in model.pipe.transformer.named_parameters())
    # Resuming it with the run's own spec and config finishes it, and the app lists it then.
    record = json.loads((run / "run.json").read_text())
    specs = [ConceptSpec.from_dict(d) for d in record["specs"]]
    config = EraseConfig(model="tiny-flux", **_tiny_erase_config())
    train(attnscope.load_pipeline("tiny-flux"), specs, config, run, resume=True, progress=False)
    assert list_runs(tmp_path) == [str(run)]


@pytest.mark.parametrize(("word", "method", "message"), [
    ("", "eraseanything", "Click a word"),
    ("red", "advunlearn", "unknown erasure method"),
    ("green", "eraseanything", "not a word of the prompt"),
])
def test_bad_erase_requests_are_refused_with_a_message(model: explorer.Model, tmp_path: Path, word: str,
                                                        method: str, message: str) -> None:
    from attnscope.apps.erasure import EraseRequest, erase_word

    with pytest.raises(RequestError, match=message):
        erase_word(model, EraseRequest(word, PROMPT, method), tmp_path, config=_tiny_erase_config())
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------- explain
def test_explain_an_image_matches_the_public_api(model: explorer.Model) -> None:
    from PIL import Image

    from attnscope.apps.explaining import ExplainRequest, explain_image, explained_overlay, rendered_scene

    image, caption = rendered_scene(5, 2)
    explanation, notes = explain_image(model, image, ExplainRequest(caption, ("red", "circle"), samples=2))
    assert notes == [] and explanation.concept_maps is not None
    reference = attnscope.explain(attnscope.load_pipeline("tiny-flux"), image, caption, concepts=["red", "circle"],
                                  samples=2)
    word = explorer.distinct_words(explanation.maps)[1]
    readout = attnscope.readout_for("tiny-flux")
    expected = viz.overlay(readout.reduce(reference.maps.word(word)).numpy(), Image.fromarray(image), alpha=0.5)
    shown = explained_overlay(model, explanation, word, None)
    assert np.abs(np.asarray(shown, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    concept = explained_overlay(model, explanation, word, "circle")  # the concept wins over the word
    assert not np.array_equal(np.asarray(concept), np.asarray(shown))
    assert np.array_equal(np.asarray(explained_overlay(model, explanation, None, None)), image)


def test_explain_fits_odd_sizes_and_refuses_bad_requests(model: explorer.Model) -> None:
    from attnscope.apps.explaining import ExplainRequest, explain_image, rendered_scene

    odd = np.zeros((30, 31, 3), np.uint8)
    explanation, notes = explain_image(model, odd, ExplainRequest("a red circle", samples=1))
    assert explanation.image.shape == (32, 32, 3) and "resized to 32×32" in notes[0]
    for image, request, message in (
        (None, ExplainRequest("a red circle"), "Upload an image"),
        (odd, ExplainRequest("  "), "prompt"),
        (odd, ExplainRequest("a red circle", samples=9), "between 1 and 8"),
        (odd, ExplainRequest("a red circle", t=1.0), r"inside \(0, 1\)"),
        (odd, ExplainRequest("a red circle", concepts=("red", "red")), "more than once"),
    ):
        with pytest.raises(RequestError, match=message):
            explain_image(model, image, request)
    with pytest.raises(RequestError, match="1, 2 or 3 objects"):
        rendered_scene(0, 4)


def test_a_generation_opens_on_the_models_readout(model: explorer.Model, result: explorer.Result) -> None:
    view = explorer.default_view(model, result)
    readout = attnscope.readout_for("tiny-flux")
    assert view.layers == readout.layers == "double"
    assert view.steps == (result.n_steps - max(1, round(result.n_steps * readout.late_steps)), result.n_steps - 1)
    shown = explorer.word_map(result, View(word="red", layers=view.layers, steps=view.steps))
    np.testing.assert_allclose(shown, readout.reduce(result.maps.word("red")).numpy(), atol=1e-6)
    shapes = explorer.Model(name="shapes", pipe=model.pipe, call_kwargs=model.call_kwargs)
    assert explorer.default_view(shapes, result).layers == attnscope.readout_for("shapes").layers
