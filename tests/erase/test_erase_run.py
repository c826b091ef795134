"""Erasure runs end to end on a small random shapes-world pipeline: training, resume, faults, CLI, evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import attnscope.cli
from attnscope.adapters.flux import FluxCall
from attnscope.erase import losses
from attnscope.erase.cache import CacheConfig, EraseCache
from attnscope.erase.cli import register
from attnscope.erase.config import EraseConfig, LossWeights, model_defaults
from attnscope.erase.lora import LoraFileError
from attnscope.erase.run import OutputExistsError, ResumeMismatchError
from attnscope.erase.sampling import PromptBank
from attnscope.erase.trainer import NonFiniteLossError, Trainer, train
from attnscope.erase.worlds.shapes import shapes_spec
from attnscope.erase.worlds.shapes_eval import evaluate
from attnscope.lab.model import (
    ShapesModelConfig,
    build_clip_tokenizer,
    build_scheduler,
    build_t5_tokenizer,
    build_text_encoders,
    build_transformer,
    build_vae,
)
from attnscope.sampling import FlowMatchRenoisingScheduler
from attnscope.shapes import GUIDANCE_SCALE

FAST = {
    "batch": 3,
    "contrastive_rows": 1,
    "keep_rows": 1,
    "cache": CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=4),
    "checkpoint_every": 2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_shapes_pipeline(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """The shapes-world pipeline layout (tokenizers, one-level VAE, 32×32) with a small random transformer (with a
    guidance input: a guidance-distilled one)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = ShapesModelConfig(hidden_heads=2, head_dim=16, double_layers=2, single_layers=1, t5_d_ff=64,
                                clip_hidden=16, guidance_embeds=guidance_embeds)
        t5_tok, clip_tok = build_t5_tokenizer(), build_clip_tokenizer()
        clip, t5 = build_text_encoders(cfg, t5_tok, clip_tok)
        pipe = FluxPipeline(
            scheduler=build_scheduler(),
            vae=build_vae(cfg).eval(),
            text_encoder=clip.eval(),
            tokenizer=clip_tok,
            text_encoder_2=t5.eval(),
            tokenizer_2=t5_tok,
            transformer=build_transformer(cfg).eval(),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(**changes) -> EraseConfig:
    return EraseConfig(**{"model": "shapes", "steps": 4, **FAST, **changes})


def _lora(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def red_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("red")
    result = train(small_shapes_pipeline(), [shapes_spec("red")], _config(), out, progress=False)
    return out, result


def test_run_writes_diffusers_lora_spec_and_log(red_run) -> None:
    out, result = red_run
    assert result.lora_path == out / "pytorch_lora_weights.safetensors"
    keys = set(_lora(out))
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    # An EraseConfig that names no LoRA and no η takes the model's, as `attnscope erase` does: q/k/v and η 2 here.
    assert {k.split(".")[-3] for k in keys} == {"add_q_proj", "add_k_proj", "add_v_proj"}
    assert json.loads((out / "run.json").read_text())["config"]["eta"] == 2.0
    log = json.loads((out / "train_log.json").read_text())
    assert [e["level"] for e in log["steps"]] == ["erase", "preserve", "erase", "preserve"]
    # The shapes models' profile turns the attention term off (measured to buy nothing there).
    assert log["config"]["weights"]["attention"] == 0 and "attention" not in log["steps"][0]
    assert {"esd", "implicit"} <= set(log["steps"][0])
    assert {"flow", "contrastive", "keep"} <= set(log["steps"][1])
    assert set(log["final_losses"]) == {"esd", "implicit", "flow", "contrastive", "keep"}
    # Keep points: every state of the preservation trajectories with its own prompt's base velocity and, as the
    # shapes model samples with true CFG, the negative prompt's.
    assert log["config"]["true_cfg_scale"] > 1
    cache = torch.load(out / "cache.pt", weights_only=False)
    assert len(cache["keep_prompts"]) == len(cache["preserve_prompts"]) * FAST["cache"].preserve_steps
    assert set(cache["keep_prompts"]) == set(cache["preserve_prompts"])
    shape = (len(cache["keep_prompts"]), *cache["x"].shape[1:])
    assert cache["keep_x"].shape == cache["keep_v"].shape == cache["keep_v_negative"].shape == shape
    assert (out / "spec.yaml").is_file() and (out / "checkpoint.pt").is_file()
    # The LoRA changed the model (B matrices start at zero).
    assert any(v.abs().sum() > 0 for k, v in _lora(out).items() if "lora_B" in k)


def test_a_guidance_distilled_shapes_model_erases_through_its_guidance_input(tmp_path) -> None:
    """A distilled shapes model (like FLUX.1-dev) is sampled with one call per step: no true CFG, no negative-prompt
    keep points, and every transformer call gets the guidance scale."""
    pipe = small_shapes_pipeline(guidance_embeds=True)
    assert model_defaults("shapes", pipe)["true_cfg_scale"] == 1.0
    scales: list[torch.Tensor] = []
    hook = pipe.transformer.time_text_embed.register_forward_pre_hook(lambda module, args: scales.append(args[1]))
    try:
        result = train(pipe, [shapes_spec("red")], _config(steps=2), tmp_path, progress=False)
    finally:
        hook.remove()
    assert result.lora_path.is_file()
    cache = torch.load(tmp_path / "cache.pt", weights_only=False)
    assert set(cache["keep_prompts"]) == set(cache["preserve_prompts"]) and len(cache["keep_v_negative"]) == 0
    # The model's own guidance scale (the bundled shapes model's), scaled by 1000 as the transformer scales timesteps.
    assert scales and all(torch.all(g == 1000 * GUIDANCE_SCALE) for g in scales)


def test_contrastive_rows_run_only_up_to_the_last_attention_layer(tmp_path) -> None:
    """A preserve step is one full forward of its flow-matching and keep rows and one of its contrastive rows that
    ends after the last double-stream attention (the only maps the loss reads): the single-stream blocks see the
    batch without the contrastive rows; an erase step runs all its rows through every block (the implicit loss off,
    whose rows the next test counts)."""
    pipe = small_shapes_pipeline()
    # Four rows: one contrastive, one keep point (two rows under this model's true CFG), one flow row.
    config = _config(batch=4, weights=LossWeights(implicit=0.0), **model_defaults("shapes", pipe))
    trainer = Trainer(pipe, [shapes_spec("red")], config, tmp_path)
    trainer.prepare_cache(None)
    calls: dict[str, list[int]] = {"double": [], "single": []}
    hooks = [
        pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: calls["double"].append(kwargs["hidden_states"].shape[0]), with_kwargs=True),
        pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: calls["single"].append(kwargs["hidden_states"].shape[0]), with_kwargs=True),
    ]
    try:
        erase, preserve = trainer.train_step(), trainer.train_step()
    finally:
        for hook in hooks:
            hook.remove()
    assert {"esd", "attention"} == set(erase) and {"flow", "keep", "contrastive"} == set(preserve)
    rows, contrastive = config.batch, config.contrastive_rows
    assert calls == {"double": [rows, rows - contrastive, contrastive], "single": [rows, rows - contrastive]}
    assert len(trainer.cache.implicit_prompts) == 0  # the implicit loss is off: nothing sampled for it


def test_implicit_rows_are_the_concepts_points_through_prompts_that_name_nothing(tmp_path) -> None:
    """With the implicit (unconditional ESD) loss on (the default), an erase step also runs ``batch // 2`` rows of the
    concept's own cached points prompted with words that name nothing, through every block, in the same forward
    as the concept rows."""
    pipe = small_shapes_pipeline()
    config = _config(**model_defaults("shapes", pipe))
    trainer = Trainer(pipe, [shapes_spec("red")], config, tmp_path)
    trainer.prepare_cache(None)
    cache = trainer.cache
    assert len(cache.implicit_prompts) == len(cache.prompts) * len(config.cache.implicit_prompts)
    assert set(cache.implicit_prompts) == set(config.cache.implicit_prompts) and "" in cache.implicit_prompts
    assert cache.v_implicit.shape == (len(cache.implicit_prompts), *cache.x.shape[1:])
    torch.testing.assert_close(cache.x[cache.implicit_point[: len(cache.prompts)]], cache.x)
    calls: list[int] = []
    hook = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        erase = trainer.train_step()
    finally:
        hook.remove()
    assert {"esd", "implicit"} == set(erase) and calls == [config.batch + config.batch // 2]


def test_a_row_without_a_concept_word_rides_in_the_captured_forward_without_columns(tmp_path) -> None:
    """Implicit rows share the concept rows' forward: their maps are captured, but no column of theirs is a concept
    column, and the concept rows' maps are what they would be alone."""
    pipe = small_shapes_pipeline()
    trainer = Trainer(pipe, [shapes_spec("red")], _config(**model_defaults("shapes", pipe)), tmp_path)
    call = trainer.call
    x = torch.randn(2, call.n_tokens, call.channels, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6, 0.6])
    seen: dict[str, list[torch.Tensor]] = {}

    def record(key):
        def losses_of(v, maps, columns):
            seen[key] = [columns, *maps]
            return {"attention": losses.attention_loss([m[:1] for m in maps], columns[:1])}
        return losses_of

    trainer.backward_group(x, sigma, ["a red circle", "with"], record("both"), ["red", None])
    trainer.backward_group(x[:1], sigma[:1], ["a red circle"], record("alone"), ["red"])
    columns, *maps = seen["both"]
    assert columns[0].any() and not columns[1].any()
    alone_columns, *alone = seen["alone"]
    torch.testing.assert_close(columns[:1], alone_columns)
    for both_layer, alone_layer in zip(maps, alone):
        torch.testing.assert_close(both_layer[:1], alone_layer, rtol=1e-4, atol=1e-6)


def test_resume_after_kill_gives_the_uninterrupted_result(red_run, tmp_path) -> None:
    out, _ = red_run

    def kill(step: int, _losses) -> None:
        if step == 3:  # after the checkpoint at step 2, before the one at 4: step 3 is lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_shapes_pipeline(), [shapes_spec("red")], _config(), tmp_path, progress=False, on_step=kill)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = train(small_shapes_pipeline(), [shapes_spec("red")], _config(), tmp_path, resume=True, progress=False)
    expected, got = _lora(out), _lora(tmp_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [e["step"] for e in resumed.log] == [1, 2, 3, 4]


def test_output_folder_rules(red_run, tmp_path) -> None:
    out, _ = red_run
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train(small_shapes_pipeline(), [shapes_spec("red")], _config(), out, progress=False)
    with pytest.raises(ResumeMismatchError, match="nothing to resume"):
        train(small_shapes_pipeline(), [shapes_spec("red")], _config(), tmp_path / "new", resume=True, progress=False)
    with pytest.raises(ResumeMismatchError, match="other settings"):
        train(small_shapes_pipeline(), [shapes_spec("red")], _config(lr=0.5), out, resume=True, progress=False)
    train(small_shapes_pipeline(), [shapes_spec("red")], _config(steps=1), tmp_path / "run", progress=False)
    (tmp_path / "run" / "keep.txt").write_text("user file")
    with pytest.raises(OutputExistsError):
        train(small_shapes_pipeline(), [shapes_spec("red")], _config(steps=1), tmp_path / "run", progress=False)
    train(small_shapes_pipeline(), [shapes_spec("red")], _config(steps=1), tmp_path / "run", overwrite=True,
          progress=False)
    assert (tmp_path / "run" / "keep.txt").read_text() == "user file"  # overwrite replaces the run's files only


def test_a_cache_drawn_by_an_earlier_version_is_refused_naming_the_way_out(red_run, tmp_path) -> None:
    out, _ = red_run
    data = torch.load(out / "cache.pt", weights_only=False)
    del data["keep_v_negative"]
    torch.save(data, tmp_path / "cache.pt")
    with pytest.raises(ResumeMismatchError, match="no keep_v_negative.*--overwrite"):
        EraseCache.load(tmp_path / "cache.pt")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    real = losses.attention_loss
    calls = {"n": 0}

    def exploding(maps, columns):
        calls["n"] += 1
        value = real(maps, columns)
        return value * float("nan") if calls["n"] == 2 else value  # the erase step at step index 2

    monkeypatch.setattr(losses, "attention_loss", exploding)
    paper = _config(weights=LossWeights())  # the paper's weights: the attention term on
    with pytest.raises(NonFiniteLossError, match="attention loss became non-finite at step 2") as err:
        train(small_shapes_pipeline(), [shapes_spec("red")], paper, tmp_path, progress=False)
    assert err.value.loss == "attention" and err.value.checkpoint == tmp_path / "checkpoint.pt"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["lora"].values())
    monkeypatch.setattr(losses, "attention_loss", real)
    train(small_shapes_pipeline(), [shapes_spec("red")], _config(weights=LossWeights()), tmp_path, resume=True,
          progress=False)


def test_esd_margin_reaches_the_esd_rows_and_the_run_record(tmp_path, monkeypatch) -> None:
    margins = []

    def esd_loss(*args, **kwargs):
        margins.append(args[4] if len(args) > 4 else kwargs.get("margin"))
        return real(*args, **kwargs)

    real = losses.esd_loss
    monkeypatch.setattr(losses, "esd_loss", esd_loss)
    result = train(small_shapes_pipeline(), [shapes_spec("red")], _config(steps=1, esd_margin=0.5), tmp_path,
                   progress=False)
    assert len(margins) == 1 and set(margins[0].tolist()) == {0.5}  # one concept: its margin at every row
    assert result.margins == {"red": 0.5}
    assert json.loads((tmp_path / "run.json").read_text())["config"]["esd_margin"] == 0.5


def test_multi_concept_run(tmp_path) -> None:
    """Two concepts share one run; balanced, the one whose points differ less from their anchors is pushed at a
    higher η until both ESD pushes over the points naming one concept match, and the log says at which, and at
    which margin: the run's divided by the raise."""
    specs = [shapes_spec("red"), shapes_spec("circle")]
    result = train(small_shapes_pipeline(), specs, _config(steps=2, balance_eta=True, esd_margin=0.5), tmp_path,
                   progress=False)
    assert set(result.final_losses) == {"esd", "implicit", "flow", "contrastive", "keep"}
    cache = torch.load(tmp_path / "cache.pt", weights_only=False)
    assert set(cache["concept"].tolist()) == {0, 1}
    assert json.loads((tmp_path / "train_log.json").read_text())["etas"] == result.etas
    etas = torch.tensor([result.etas[spec.name] for spec in specs])
    # Each concept's push is measured over its points whose prompt names the other concept nowhere.
    alone = torch.tensor([not ({"red", "circle"} <= set(p.split())) for p in cache["prompts"]])
    assert alone.any() and not alone.all()
    diff = cache["v_concept"] - cache["v_anchor"]
    push = torch.stack([(diff[(cache["concept"] == k) & alone] ** 2).mean() for k in (0, 1)])
    torch.testing.assert_close(etas[0] ** 2 * push[0], etas[1] ** 2 * push[1])
    own = torch.tensor([spec.eta or 2.0 for spec in specs])  # a shape's own η on the Flux model, else the run's
    assert torch.isclose(etas, own).any() and (etas >= own).all() and not torch.equal(etas, own)
    margins = torch.tensor([result.margins[spec.name] for spec in specs])
    torch.testing.assert_close(margins, 0.5 * own / etas)
    assert json.loads((tmp_path / "train_log.json").read_text())["esd_margins"] == result.margins
    # Preservation prompts name neither erased concept nor a synonym.
    assert not any(
        w in p.split() for p in cache["preserve_prompts"] for w in ("red", "circle", "crimson", "disc", "orb")
    )


def test_erase_and_eval_cli(tmp_path, monkeypatch, capsys) -> None:
    """The commands through attnscope.cli.main (entry point simulated), tiny-flux with a YAML spec."""

    class EntryPoint:
        def load(self):
            return register

    monkeypatch.setattr(attnscope.cli, "entry_points", lambda group: [EntryPoint()])
    spec = tmp_path / "red.yaml"
    spec.write_text(
        "name: red\ntargets: [red]\nsynonyms: [crimson]\nirrelevant: [blue, green]\n"
        "prompts: [a red circle, a photo of a red car]\npreserve_prompts: [a blue circle]\n"
    )
    out = tmp_path / "run"
    argv = ["erase", "--model", "tiny-flux", "--spec", str(spec), "--steps", "2", "--batch", "2",
            "--sample-steps", "2", "--preserve-steps", "2", "--cache-seeds", "1", "--out", str(out)]
    assert attnscope.cli.main(argv) == 0
    assert "LoRA:" in capsys.readouterr().out and (out / "pytorch_lora_weights.safetensors").is_file()
    assert attnscope.cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert attnscope.cli.main(["erase", "--concept", "redd", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'red'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: red\ntargets: [red]\nprompts: [a blue circle]\n")
    assert attnscope.cli.main(["erase", "--model", "tiny-flux", "--spec", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "does not contain the concept" in capsys.readouterr().err
    # A prompt longer than the model's text length is refused before the run folder exists.
    assert attnscope.cli.main(["erase", "--model", "tiny-flux", "--concept", "parachute",
                               "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "longer than the model's text length (32 tokens)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
    # tiny-flux is not the shapes world: the real-model protocol runs, and says it has no CLIP classifier offline.
    assert attnscope.cli.main(["eval", "--lora", str(out)]) == 2
    assert "--clip-model" in capsys.readouterr().err
    monkeypatch.setattr(losses, "esd_loss", lambda *args: torch.tensor(float("inf")))
    assert attnscope.cli.main([*argv, "--overwrite"]) == 2
    assert "esd loss became non-finite at step 0" in capsys.readouterr().err


def test_eval_report_and_bad_lora(red_run, tmp_path) -> None:
    out, _ = red_run
    report = evaluate(out, pipe_factory=small_shapes_pipeline, seeds=1, out=tmp_path / "report")
    data = json.loads((tmp_path / "report" / "eval.json").read_text())
    for key in ("acc_e", "acc_ir", "acc_g", "acc_ctx", "acc_implicit"):
        assert 0 <= data[key] <= 1 and 0 <= data["base"][key] <= 1
    assert data["protocol_version"] == 4 and set(report.prompts) == {"erased", "synonym", "irrelevant", "implicit"}
    assert data["per_prompt"][""]["group"] == "implicit"  # the empty prompt is drawn and judged too
    # Context per prompt on the prompts that name the concept, whose images it averages to acc_ctx (one seed).
    named = [v for v in data["per_prompt"].values() if v["group"] in ("erased", "synonym")]
    assert all("context" not in v for v in data["per_prompt"].values() if v["group"] not in ("erased", "synonym"))
    assert data["acc_ctx"] == pytest.approx(sum(v["context"] for v in named) / len(named))
    assert data["concepts"] == ["red"] and report.prompts["synonym"][0] == "a crimson circle"
    assert not any("red" in p for p in report.prompts["irrelevant"])
    assert set(data["attention_mass"]) == {"erased", "synonym"} and data["quality"]["pixel_mae"] >= 0
    assert set(data["irrelevant_attributes"]) == set(data["base"]["irrelevant_attributes"]) == {"color", "shape"}
    assert (tmp_path / "report" / "eval_grid.png").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "spec.yaml").write_text((out / "spec.yaml").read_text())
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        evaluate(broken, pipe_factory=small_shapes_pipeline, seeds=1)


def test_gradient_checkpointing_gives_the_same_lora(red_run, tmp_path) -> None:
    """Blocks recomputed in backward must see the capture processors of the forward (same losses, same LoRA)."""
    out, result = red_run
    checkpointed = train(small_shapes_pipeline(), [shapes_spec("red")], _config(gradient_checkpointing=True), tmp_path,
                         progress=False)
    for a, b in zip(result.log, checkpointed.log):
        assert {k: v for k, v in a.items() if k not in ("seconds", "grad_norm")} == pytest.approx(
            {k: v for k, v in b.items() if k not in ("seconds", "grad_norm")}
        )
        assert a.get("grad_norm", {}) == pytest.approx(b.get("grad_norm", {}), rel=1e-3, abs=2e-6)
    expected, got = _lora(out), _lora(tmp_path)
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_spec_flags_override_or_define_a_spec() -> None:
    import argparse

    from attnscope.erase.cli import _specs

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["erase", "--concept", "red", "--synonyms", "crimson", "--irrelevant", "blue,green"])
    (spec,) = _specs(args)
    assert spec.synonyms == ("crimson",) and spec.irrelevant == ("blue", "green")
    assert spec.prompts == shapes_spec("red").prompts
    args = parser.parse_args(["erase", "--model", "tiny-flux", "--concept", "cat",
                              "--prompts", "a photo of a cat;a cat on a car",
                              "--preserve-prompts", "a photo of a dog"])
    (spec,) = _specs(args)
    assert spec.targets == ("cat",) and spec.prompts == ("a photo of a cat", "a cat on a car")
    with pytest.raises(ValueError, match="exactly one --concept"):
        _specs(parser.parse_args(["erase", "--concept", "red", "--concept", "blue", "--anchor", "x"]))
    # --eta is every concept's η, over a spec's own (a shapes-world shape has one).
    red, triangle = _specs(parser.parse_args(["erase", "--concept", "red", "--concept", "triangle"]))
    assert (red.eta, triangle.eta) == (None, 1.0)
    specs = _specs(parser.parse_args(["erase", "--concept", "red", "--concept", "triangle", "--eta", "3"]))
    assert [s.eta for s in specs] == [3.0, 3.0]


@pytest.mark.parametrize("renoise_above", [1.0, 0.5])
@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_sample_trajectory_is_the_pipelines_sampler(true_cfg_scale: float, renoise_above: float) -> None:
    """The cache's base-model samples are the images ``FluxPipeline`` draws, true CFG and re-noising included."""
    from attnscope.erase.sampling import sample_trajectory

    pipe = small_shapes_pipeline()
    pipe.scheduler = FlowMatchRenoisingScheduler.from_config(pipe.scheduler.config, renoise_above=renoise_above)
    prompt, steps = "a red circle", 4
    cfg = {"true_cfg_scale": true_cfg_scale, "negative_prompt": ""} if true_cfg_scale > 1 else {}
    expected = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=1.0, max_sequence_length=20,
                    generator=torch.Generator().manual_seed(5), output_type="latent", **cfg).images
    call = FluxCall(pipe, 32, 32, true_cfg_scale=true_cfg_scale)
    bank = PromptBank(call, 20)
    call.negative = bank.get([""]) if cfg else None
    embeds, pooled = bank.get([prompt])
    x1 = call.noise(1, torch.Generator().manual_seed(5))
    trajectory = sample_trajectory(call, pipe.transformer, x1, steps, embeds, pooled, bank.text_ids)
    torch.testing.assert_close(trajectory.states[-1], expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trajectory.sigmas, call.sigmas(steps))
    # The recorded velocities are the conditional ones (ESD's v*(x_t, c)), not the guided ones.
    sigma = trajectory.sigmas[:1]
    v_cond = call.velocity(pipe.transformer, x1, sigma, embeds, pooled, bank.text_ids)
    torch.testing.assert_close(trajectory.velocities[0], v_cond)
    if cfg:
        v_neg = call.velocity(pipe.transformer, x1, sigma, *bank.get([""]), bank.text_ids)
        torch.testing.assert_close(trajectory.negative_velocities[0], v_neg)
    else:
        assert trajectory.negative_velocities is None
