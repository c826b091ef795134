"""Erasure methods side by side: the registry, each baseline's effect on the bundled shapes model, the LoRA
placements, gradient-norm logging, and the CLI's refusals of options a method does not take."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import attnscope
import attnscope.cli
from attnscope.adapters import adapter_for
from attnscope.erase import ConceptSpec, erasure_world, losses
from attnscope.erase.cache import CacheConfig, maps_forward
from attnscope.erase.cli import register
from attnscope.erase.config import EraseConfig, fill_model_defaults, model_defaults
from attnscope.erase.lora import LoraSettings, base_model, load_lora
from attnscope.erase.losses import LossWeights
from attnscope.erase.methods import UnknownMethodError, method_for, method_names
from attnscope.erase.methods.uce import token_alignment
from attnscope.erase.run import ResumeMismatchError
from attnscope.erase.sampling import PromptBank
from attnscope.erase.trainer import train
from attnscope.erase.worlds.shapes import shapes_spec, shows_concept
from attnscope.profiles import profile_for
from attnscope.trace import column_mask
from attnscope.viz import to_pixels

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_CACHE = CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=4)


def shapes_pipe():
    pipe = attnscope.load_pipeline("shapes", progress=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(method: str, **changes) -> EraseConfig:
    return EraseConfig(**{"model": "shapes", "method": method, "steps": 4, "batch": 3, "contrastive_rows": 1,
                          "keep_rows": 1, "checkpoint_every": 2, "cache": SMALL_CACHE, **changes})


def _call_and_bank(pipe):
    defaults = model_defaults("shapes", pipe)
    call = adapter_for(pipe).model_call(pipe, defaults["height"], defaults["width"],
                                        guidance_scale=defaults["guidance_scale"])
    return call, PromptBank(call, defaults["max_sequence_length"])


def test_the_registry_names_every_method_and_refuses_an_unknown_one() -> None:
    assert method_names() == ("eraseanything", "esd", "ca", "fmn", "uce")
    assert (method_for("eraseanything").attention_form, method_for("fmn").attention_form) == ("mass", "mass")
    assert [method_for(n).name for n in method_names()] == list(method_names())
    with pytest.raises(UnknownMethodError, match="choose one of eraseanything, esd, ca, fmn, uce"):
        method_for("advunlearn")
    with pytest.raises(UnknownMethodError):
        EraseConfig(method="nope")
    assert LossWeights.only(esd=2.0).used() == ("esd",)
    assert method_for("esd").default_weights.used() == ("esd", "adversarial")  # the latter only when adversarial
    assert set(LossWeights().used()) == {"esd", "attention", "flow", "contrastive", "keep", "implicit", "adversarial"}


@pytest.mark.parametrize("method", ["esd", "ca", "fmn"])
def test_a_trained_baseline_logs_only_its_own_losses_and_writes_a_loadable_lora(method, tmp_path) -> None:
    pipe = shapes_pipe()
    result = train(pipe, [shapes_spec("red")], _config(method, log_gradients_every=2), tmp_path, progress=False)
    expected = set(method_for(method).losses) - {"adversarial"}
    assert set(result.final_losses) == expected
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["config"]["method"] == method and log["config"]["weights"] == vars(method_for(method).default_weights)
    # Gradient norms on steps 0, 1 of every 2 (all four here); the shares of a level sum to one.
    assert all(set(entry["grad_norm"]) == expected for entry in log["steps"])
    assert all(sum(shares.values()) == pytest.approx(1, abs=1e-3) for shares in log["gradient_shares"].values())
    # Nothing the method does not use was drawn from the base model.
    cache = torch.load(tmp_path / "cache.pt", weights_only=False)
    assert len(cache["x0"]) == 0 and len(cache["implicit_point"]) == 0 and not cache["positive_mask"].any()
    fresh = shapes_pipe()
    load_lora(fresh, tmp_path)  # diffusers' load_lora_weights behind the checks
    assert len(fresh.get_active_adapters()) == 1


def test_logged_gradient_norms_are_each_losss_own_and_leave_the_update_as_unlogged() -> None:
    from types import SimpleNamespace

    from attnscope.erase.trainer import Trainer

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def weighted() -> dict[str, torch.Tensor]:
        y = layer(x)
        return {"a": 2.0 * y.square().mean(), "zero": 0.0 * y.sum(), "b": 0.5 * y.abs().sum(), "c": y[:, 0].sum()}

    expected = {}
    for name, loss in weighted().items():
        grads = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
        expected[name] = float(torch.cat([g.flatten() for g in grads]).norm())
    earlier = [torch.randn_like(q) for q in layer.parameters()]  # another forward group's gradients of the step

    def update(logged: bool) -> tuple[list[torch.Tensor], dict[str, float]]:
        for q, g in zip(layer.parameters(), earlier):
            q.grad = g.clone()
        trainer = SimpleNamespace(params=list(layer.parameters()), gradient_norms={})
        losses = weighted()
        if logged:
            Trainer._backward_logging_norms(trainer, losses, ["a", "b", "c"])
        else:
            sum(losses.values()).backward()
        return [q.grad.clone() for q in layer.parameters()], trainer.gradient_norms

    logged, norms = update(True)
    plain, _ = update(False)
    assert all(torch.equal(g, h) for g, h in zip(logged, plain))
    assert norms.keys() == expected.keys() and norms["zero"] == 0.0
    assert all(norms[k] == pytest.approx(expected[k], rel=1e-5) for k in ("a", "b", "c"))


def test_concept_ablation_moves_the_concept_prompt_towards_the_anchor_prompt_and_keeps_the_anchor(tmp_path) -> None:
    pipe = shapes_pipe()
    call, bank = _call_and_bank(pipe)
    drift = {}
    for anchor_weight in (1.0, 0.0):
        out = tmp_path / str(anchor_weight)
        weights = LossWeights.only(ablation=1.0, anchor=anchor_weight)
        train(pipe, [shapes_spec("red")], _config("ca", steps=20, lr=1e-2, batch=4, weights=weights), out,
              progress=False)
        cache = torch.load(out / "cache.pt", weights_only=False)
        x, sigma = cache["x"][:4], cache["sigma"][:4]
        prompts, anchors = cache["prompts"][:4], cache["anchors"][:4]
        assert all("red" in p and "red" not in a for p, a in zip(prompts, anchors))

        def velocity(prompt_list, x=x, sigma=sigma):
            embeds, pooled = bank.get(prompt_list)
            with torch.no_grad():
                return call.velocity(pipe.transformer, x, sigma, embeds, pooled, bank.text_ids)

        target = cache["v_anchor"][:4]
        with base_model(pipe.transformer):
            before = losses.velocity_matching_loss(velocity(prompts), target)
            anchor_before = velocity(anchors)
        assert losses.velocity_matching_loss(velocity(prompts), target) < 0.5 * before
        drift[anchor_weight] = losses.velocity_matching_loss(velocity(anchors), anchor_before)
        pipe.transformer.delete_adapters("erase")
    assert drift[1.0] < 0.5 * drift[0.0]  # the regularizer keeps the anchor prompt where it was


def test_forget_me_not_drives_the_concepts_attention_mass_down(tmp_path) -> None:
    pipe = shapes_pipe()
    train(pipe, [shapes_spec("red")], _config("fmn", steps=20, lr=1e-2), tmp_path, progress=False)
    cache = torch.load(tmp_path / "cache.pt", weights_only=False)
    call, bank = _call_and_bank(pipe)
    prompts, words = cache["prompts"][:6], cache["words"][:6]
    positions = [bank.positions(p, w) for p, w in zip(prompts, words)]
    embeds, pooled = bank.get(prompts)

    def mass():
        with torch.no_grad():
            maps, keep = maps_forward(call, pipe.transformer, cache["x"][:6], cache["sigma"][:6], embeds, pooled,
                                      bank.text_ids, [q for ps in positions for q in ps])
        return float(losses.attention_loss(maps, column_mask(keep, positions, "cpu")))

    with base_model(pipe.transformer):
        before = mass()
    assert mass() < 0.5 * before


def test_token_alignment_pairs_words_and_keeps_the_specials_in_step() -> None:
    pipe = shapes_pipe()
    _, bank = _call_and_bank(pipe)
    red, green = bank.tokens("a red circle"), bank.tokens("a green circle")
    assert token_alignment(red, green) == list(range(len(red)))  # one piece each: position for position
    shorter = bank.tokens("a circle")  # fewer words: position for position, clipped
    assert token_alignment(red, shorter) == list(range(len(red)))


@pytest.fixture(scope="module")
def uce_red(tmp_path_factory):
    out = tmp_path_factory.mktemp("uce-red")
    pipe = shapes_pipe()
    config = EraseConfig(model="shapes", method="uce", cache=CacheConfig(sample_steps=4, seeds=2))
    result = train(pipe, [shapes_spec("red")], config, out, progress=False)
    return out, result


def test_uce_erases_red_in_closed_form_and_leaves_other_colours(uce_red) -> None:
    out, result = uce_red
    log = json.loads((out / "train_log.json").read_text())
    edit = log["edit"]
    modules = [f"transformer_blocks.{b}.attn.{m}" for b in range(4) for m in ("add_k_proj", "add_v_proj")]
    assert list(edit["modules"]) == modules
    assert all(0 < s["energy_kept"] <= 1 and s["condition"] > 1 for s in edit["modules"].values())
    assert edit["rows"]["edit"] == 3 * edit["points"]  # the prompt and its two synonym versions
    assert result.log == [] and set(load_file(str(out / "pytorch_lora_weights.safetensors"))) == {
        f"transformer.{m}.lora_{ab}.weight" for m in modules for ab in "AB"
    }

    def shows(pipe, prompt, spec):
        generators = [torch.Generator().manual_seed(s) for s in range(4)]
        images = to_pixels(pipe([prompt] * 4, generator=generators, output_type="np",
                                **profile_for("shapes").default_call(pipe)).images)
        return sum(shows_concept(images, spec))

    pipe = shapes_pipe()
    red, blue = shapes_spec("red"), shapes_spec("blue")
    assert shows(pipe, "a red circle", red) >= 3 and shows(pipe, "a blue square", blue) >= 3
    load_lora(pipe, out)
    assert shows(pipe, "a red circle", red) == 0 and shows(pipe, "a crimson circle", red) == 0
    assert shows(pipe, "a blue square", blue) >= 3


def test_uce_has_nothing_to_resume(uce_red) -> None:
    out, _ = uce_red
    with pytest.raises(ResumeMismatchError, match="closed-form edit with nothing to resume"):
        train(shapes_pipe(), [shapes_spec("red")], EraseConfig(model="shapes", method="uce"), out, resume=True,
              progress=False)


@pytest.mark.parametrize(("layers", "targets", "single"), [
    ("double", ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), False),
    ("all", ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), True),
])
def test_lora_placement_in_all_dual_stream_or_all_attention_loads_with_diffusers(layers, targets, single,
                                                                                  tmp_path) -> None:
    pipe = shapes_pipe()
    lora = LoraSettings(targets=targets, layers=layers)
    names = lora.target_modules(pipe.transformer)
    assert len([n for n in names if n.startswith("transformer_blocks.")]) == 4 * 8
    assert any(n.startswith("single_transformer_blocks.") for n in names) == single
    train(pipe, [shapes_spec("red")], _config("esd", steps=2, lora=lora), tmp_path, progress=False)
    saved = {k.split(".lora_")[0].removeprefix("transformer.") for k in load_file(
        str(tmp_path / "pytorch_lora_weights.safetensors"))}
    assert saved == set(names)
    fresh = shapes_pipe()
    load_lora(fresh, tmp_path)
    assert sum(".lora_A." in n for n, _ in fresh.transformer.named_parameters()) == len(names)


def _cli(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.run(args)


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "uce", "--steps", "30"], "--method uce does not take --steps; it takes --cache-seeds, --rank"),
    (["--method", "esd", "--schedule", "joint"], "--method esd does not take --schedule"),
    (["--method", "esd", "--weights", "attention=1"], "--method esd has no loss attention: its --weights are esd"),
    (["--method", "uce", "--weights", "esd=1"], "--method uce does not take --weights"),
    (["--method", "uce", "--no-balance-eta"], "--method uce does not take --balance-eta"),
    (["--method", "ca", "--esd-margin", "0.25"], "--method ca does not take --esd-margin"),
    (["--esd-margin", "-1"], "esd_margin must be >= 0"),
    (["--method", "ca", "--erase-velocity", "guided"], "--method ca does not take --erase-velocity"),
    (["--method", "nope"], "unknown erasure method 'nope'"),
    (["--train", "joint", "--targets", "add_k_proj"], "--targets chooses the text-side projections"),
])
def test_the_cli_refuses_what_a_method_does_not_take(argv, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message.replace("-", r"\-").replace("(", r"\(")):
        _cli("erase", "--concept", "red", "--out", str(tmp_path / "out"), *argv)
    assert not (tmp_path / "out").exists()


def test_attnscope_erase_method_prints_one_line_errors(capsys, tmp_path) -> None:
    code = attnscope.cli.main(["erase", "--concept", "red", "--method", "uce", "--steps", "30",
                               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "does not take --steps" in err[0]


def test_adversarial_erasure_trains_on_the_attacks_embeddings_and_resumes_exactly(tmp_path) -> None:
    config = _config("esd", steps=4, adversarial=2, log_gradients_every=1)
    whole = train(shapes_pipe(), [shapes_spec("red")], config, tmp_path / "whole", progress=False)
    assert all(set(entry) >= {"esd", "adversarial"} for entry in whole.log)
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["adversary"]
    assert state["turn"] == 4  # one attack per erase step, prompts in turn
    cache = torch.load(tmp_path / "whole" / "cache.pt", weights_only=False)
    pipe = shapes_pipe()
    _, bank = _call_and_bank(pipe)
    attacked = list(dict.fromkeys(cache["prompts"]))[:4]
    starts = bank.get([cache["anchors"][cache["prompts"].index(p)] for p in attacked])[0]
    # Each attacked conditioning left its start (the anchor prompt's), and only those were attacked.
    assert all(not torch.allclose(state["embeds"][p], starts[i]) for i, p in enumerate(attacked))

    def kill(step: int, _losses) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(shapes_pipe(), [shapes_spec("red")], config, out, progress=False, on_step=kill)
    train(shapes_pipe(), [shapes_spec("red")], config, out, resume=True, progress=False)
    expected, got = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (tmp_path / "whole", out))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize(("method", "reason"), [
    ("uce", "uce is a closed-form edit"), ("fmn", "fmn trains only the attention on the concept word"),
])
def test_adversarial_erasure_is_refused_with_the_reason(method, reason, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"adversarial erasure needs a method .*{reason}"):
        EraseConfig(method=method, adversarial=2)
    with pytest.raises(ValueError, match=f"--adversarial needs a method .*{reason}"):
        _cli("erase", "--concept", "red", "--method", method, "--adversarial", "--out", str(tmp_path / "o"))


def test_the_shapes_models_turn_eraseanythings_attention_term_off_and_only_its(tmp_path) -> None:
    """The profile's ``attention_weight`` sets EraseAnything's attention term (0 on both shapes models, the paper's
    1e-3 where a profile says nothing) and leaves every other loss, and every other method, as it was. Shaping a term
    that is off is refused, naming the weight to give it."""
    eraseanything, fmn = method_for("eraseanything"), method_for("fmn")
    for model in ("shapes", "shapes-sd3"):
        defaults = profile_for(model).erase_defaults
        assert eraseanything.weights_for(defaults) == replace(LossWeights(), attention=0.0)
        assert fmn.weights_for(defaults) == fmn.default_weights and fmn.default_weights.attention == 1.0
    assert eraseanything.weights_for(profile_for("tiny-flux").erase_defaults) == LossWeights()
    filled = fill_model_defaults(EraseConfig(model="shapes"), shapes_pipe())
    assert filled.weights.attention == 0 and filled.weights.esd == 1
    with pytest.raises(ValueError, match="--attention-form localized shapes the attention term, whose weight is 0 on "
                                         "shapes .*add --weights attention=W"):
        _cli("erase", "--concept", "red", "--attention-form", "localized", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_the_localized_attention_term_starts_at_one_with_the_base_maps_in_the_cache(tmp_path) -> None:
    config = _config("eraseanything", attention_form="localized", weights=LossWeights.only(attention=1.0), steps=2)
    result = train(shapes_pipe(), [shapes_spec("red")], config, tmp_path, progress=False)
    cache = torch.load(tmp_path / "cache.pt", weights_only=False)
    assert cache["concept_maps"].shape == (len(cache["x"]), 256) and (cache["concept_maps"] >= 0).all()
    assert result.log[0]["attention"] == pytest.approx(1.0, abs=1e-4)  # the first step sees the base model's maps
    mass = _config("eraseanything", steps=2, attention_form="mass", weights=LossWeights())
    plain = train(shapes_pipe(), [shapes_spec("red")], mass, tmp_path / "mass", progress=False)
    assert len(torch.load(tmp_path / "mass" / "cache.pt", weights_only=False)["concept_maps"]) == 0
    assert plain.log[0]["attention"] < 0.2  # the mass form: a probability mass, not a share


def test_uce_says_when_its_rows_leave_the_solve_to_the_ridge(tmp_path) -> None:
    spec = ConceptSpec(name="red", targets=("red",), prompts=("a red circle",), anchors=("green",))
    config = EraseConfig(model="shapes", method="uce", cache=CacheConfig(sample_steps=1, seeds=1))
    with pytest.warns(UserWarning, match=r"uce: the rows span only \d+ of the 128 input dimensions"):
        train(shapes_pipe(), [spec], config, tmp_path, progress=False)
    modules = json.loads((tmp_path / "train_log.json").read_text())["edit"]["modules"]
    assert all(0 < m["rank"] < 128 for m in modules.values())


@pytest.mark.parametrize(("argv", "expected"), [
    (["--concept", "red"], (300, 1e-3)),
    (["--concept", "red", "--concept", "circle"], (400, 2e-3)),
    (["--concept", "green", "--concept", "yellow", "--concept", "square"], (900, 1e-3)),
    (["--concept", "red", "--concept", "circle", "--method", "esd"], (600, 1e-3)),
    (["--concept", "red", "--concept", "circle", "--steps", "50", "--lr", "5e-4"], (50, 5e-4)),
    (["--concept", "red", "--model", "shapes-sd3"], (450, 1e-3)),
    (["--concept", "red", "--concept", "circle", "--model", "shapes-sd3"], (1200, 1e-3)),
])
def test_erase_takes_the_methods_steps_and_learning_rate_for_the_number_of_concepts(
    argv, expected, monkeypatch, tmp_path
) -> None:
    """Concepts share the erase rows: 300 steps per concept, except EraseAnything's two concepts, 400 steps at
    twice the learning rate; the SD3 model's profile asks for half as many steps again and caps the rate at 1e-3,
    which two concepts take for twice their steps (the same steps × rate); flags win."""
    import attnscope.erase.trainer as trainer

    seen = {}

    def record(pipe, specs, config, out, **kwargs):
        filled = fill_model_defaults(config, pipe, len(specs))  # what train does first
        seen["schedule"] = (filled.steps, filled.lr)
        raise SystemExit(0)

    monkeypatch.setattr(trainer, "train", record)
    with pytest.raises(SystemExit):
        _cli("erase", "--out", str(tmp_path / "out"), *argv)
    assert seen["schedule"] == expected


@pytest.mark.parametrize(("argv", "margin"), [
    ([], 0.25), (["--esd-margin", "0.1"], 0.1), (["--esd-margin", "off"], math.inf), (["--method", "ca"], None),
])
def test_esd_margin_is_the_sd3_models_unless_told(argv, margin, monkeypatch, tmp_path) -> None:
    """`attnscope erase` on the SD3 model stops ESD at the profile's margin; a number or `off` wins, and a method
    that does not push by ESD gets none."""
    assert _sd3_run_config(monkeypatch, tmp_path, argv).esd_margin == margin


@pytest.mark.parametrize(("argv", "velocity"), [
    ([], "guided"), (["--erase-velocity", "conditional"], "conditional"), (["--method", "ca"], None),
    (["--concept", "circle"], "conditional"),
])
def test_the_erase_velocity_is_the_profiles_unless_told(argv, velocity, monkeypatch, tmp_path) -> None:
    """`--erase-velocity` reaches the run's config; without it the model profile's form (on the SD3 model the guided
    one for one concept, the conditional one for two), and a method without ESD or the implicit loss gets none."""
    assert _sd3_run_config(monkeypatch, tmp_path, argv).erase_velocity == velocity


def _sd3_run_config(monkeypatch, tmp_path, argv) -> EraseConfig:
    """The config, defaults filled, that `attnscope erase --concept red --model shapes-sd3 ARGV` would train with."""
    import attnscope.erase.trainer as trainer

    seen = {}

    def record(pipe, specs, config, out, **kwargs):
        seen["config"] = fill_model_defaults(config, pipe, len(specs))
        raise SystemExit(0)

    monkeypatch.setattr(trainer, "train", record)
    with pytest.raises(SystemExit):
        _cli("erase", "--concept", "red", "--model", "shapes-sd3", "--out", str(tmp_path / "out"), *argv)
    return seen["config"]


def test_a_bad_esd_margin_is_refused_naming_what_it_takes(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_:
        attnscope.cli.main(["erase", "--concept", "red", "--esd-margin", "far", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.endswith("expected a number of concept lengths or 'off', got 'far'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("model", "shape_eta"), [("shapes", 1.0), ("shapes-sd3", None)])
def test_a_shapes_eta_is_the_models_choice(model, shape_eta, monkeypatch, tmp_path) -> None:
    """A shape's ESD η comes from the model's profile: 1 on the Flux model, the model's own (a colour's, 2) on the
    SD3 model; a colour always takes the model's. `attnscope erase` trains with the world's view for its model, and
    `--eta` still sets every concept's."""
    import attnscope.erase.trainer as trainer

    world = erasure_world(model)
    assert world.spec("circle").eta == shape_eta and world.spec("red").eta is None
    seen = {}

    def record(pipe, specs, config, out, **kwargs):
        seen["eta"] = [s.eta for s in specs]
        raise SystemExit(0)

    monkeypatch.setattr(trainer, "train", record)
    for argv, expected in ((["--concept", "circle", "--concept", "red"], [shape_eta, None]),
                           (["--concept", "circle", "--eta", "3"], [3.0])):
        with pytest.raises(SystemExit):
            _cli("erase", "--model", model, "--out", str(tmp_path / "out"), *argv)
        assert seen["eta"] == expected
