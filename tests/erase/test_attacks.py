"""`attnscope attack` on the bundled shapes model: the attacks' plumbing is exact, each attack does what it says on
a model that was not erased, and the protocol's file, resume and bad input behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnscope
import attnscope.cli
from attnscope.adapters import adapter_for
from attnscope.erase.attacks import AttackContext, Conditioning, get_attack, run_attacks
from attnscope.erase.attacks.base import ReferenceFit
from attnscope.erase.attacks.protocol import AttackExistsError, AttackResumeError
from attnscope.erase.cache import CacheConfig
from attnscope.erase.cli import register
from attnscope.erase.config import EraseConfig, model_defaults
from attnscope.erase.lora import LoraFileError
from attnscope.erase.trainer import train
from attnscope.erase.worlds import erasure_world
from attnscope.erase.worlds.shapes import shapes_spec
from attnscope.profiles import profile_for
from attnscope.shapes.vocabulary import words_of

pytestmark = pytest.mark.usefixtures("one_thread")

#: Budgets small enough for a test: one score of the search, one optimiser step.
SMALL = {"prompt-search": 4, "unlearndiff": 1, "soft-prompt": 1, "textual-inversion": 1}


def shapes_pipe():
    pipe = attnscope.load_pipeline("shapes", progress=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def red_context():
    """The base shapes model attacked on red, from the protocol's starts, with 16 rendered references each."""
    pipe = shapes_pipe()
    world = erasure_world("shapes")
    spec = world.spec("red")
    call_kwargs = profile_for("shapes").default_call(pipe)
    defaults = model_defaults("shapes", pipe)
    call = adapter_for(pipe).model_call(pipe, defaults["height"], defaults["width"],
                                        guidance_scale=defaults["guidance_scale"])
    starts = world.attack_starts(spec)
    references = {
        s.prompt: call.encode_images(world.reference_images(pipe, call_kwargs, s.concept_prompt, 16, 500))
        for s in starts
    }
    context = AttackContext(pipe, call, call_kwargs, spec, world.judge([spec], "cpu", {}),
                            world.attack_words(pipe, spec), references)
    return context, starts


@pytest.fixture(scope="module")
def red_lora(tmp_path_factory):
    """A red erasure LoRA of the bundled model after two steps (attacks only need one that loads)."""
    out = tmp_path_factory.mktemp("erase-red")
    config = EraseConfig(model="shapes", steps=2, batch=3, contrastive_rows=1, keep_rows=1, checkpoint_every=2,
                         cache=CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=4))
    train(shapes_pipe(), [shapes_spec("red")], config, out, progress=False)
    return out


def test_starts_name_nothing_of_the_concept_and_the_base_model_draws_none_of_it(red_context) -> None:
    context, starts = red_context
    banned = {"red", "crimson", "scarlet"}
    assert [s.prompt for s in starts] == ["a green circle", "a blue square", "a yellow triangle"]
    assert [s.concept_prompt for s in starts] == ["a red circle", "a red square", "a red triangle"]
    assert not banned & set(context.words) and {"green", "circle", "with"} <= set(context.words)
    for start in starts:
        assert context.success_rate(Conditioning(prompt=start.prompt)) == 0.0
        assert context.success_rate(Conditioning(prompt=start.concept_prompt)) == 1.0


def test_text_plumbing_matches_the_pipeline(red_context) -> None:
    """Encoding from the prompt's own token embeddings gives encode_prompt's conditioning, and drawing from
    embeddings gives the images drawing from the prompt gives."""
    context, _ = red_context
    call, prompt = context.call, "a green circle and a blue square"
    ids = call.token_ids([prompt], context.length)
    embeds, pooled, _ = call.encode_token_embeddings(call.token_embedding()(ids), [prompt])
    expected, expected_pooled, _ = call.encode([prompt], context.length)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    from_prompt = context.draw(Conditioning(prompt=prompt), [3])
    from_embeds = context.draw(Conditioning(embeds=embeds, pooled=pooled), [3])
    assert np.abs(from_prompt[0].astype(int) - from_embeds[0].astype(int)).max() <= 1


def test_reference_loss_prefers_the_concept_prompt(red_context) -> None:
    """The white-box objective: the flow-matching loss on rendered red circles is lower under "a red circle" than
    under the start "a green circle" (same noise draws)."""
    context, starts = red_context
    start = starts[0]
    losses = {}
    for prompt in (start.concept_prompt, start.prompt):
        embeds, pooled, text_ids = context.call.encode([prompt], context.length)
        fit = ReferenceFit(context, start, batch=16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            losses[prompt] = float(sum(fit(embeds, pooled, text_ids) for _ in range(4)))
    assert losses["a red circle"] < 0.8 * losses["a green circle"]


def test_prompt_search_steers_the_base_model_with_allowed_words_only(red_context, monkeypatch) -> None:
    context, starts = red_context
    scored = []
    rate = AttackContext.success_rate
    monkeypatch.setattr(AttackContext, "success_rate", lambda self, c, *a: scored.append(c.prompt) or rate(self, c, *a))
    outcome = get_attack("prompt-search").run(context, starts[2], budget=40, seed=0)
    assert outcome.spent <= 40 and outcome.first_success is not None
    assert scored[0] == "a yellow triangle" and len(scored) == outcome.spent // 4 == len(set(scored))
    assert all(set(words_of(p)) <= set(context.words) for p in scored)
    assert outcome.conditioning.prompt in scored
    assert context.success_rate(outcome.conditioning, range(8)) >= 0.5


def test_soft_prompt_brings_red_back_on_the_base_model(red_context) -> None:
    context, starts = red_context
    outcome = get_attack("soft-prompt").run(context, starts[0], budget=40, seed=0)
    assert outcome.conditioning.prompt is None and outcome.optimizer_steps == 40
    assert outcome.first_success is not None
    assert context.success_rate(outcome.conditioning, range(8)) >= 0.5


def test_unlearndiff_returns_a_prompt_of_allowed_words_around_the_start(red_context) -> None:
    context, starts = red_context
    outcome = get_attack("unlearndiff").run(context, starts[1], budget=5, seed=0)
    words = words_of(outcome.conditioning.prompt)
    # three free words in front, the swapped colour free, the rest of the start kept
    assert len(words) == 6 and words[3] == "a" and words[5] == "square"
    assert set(words) <= set(context.words)


def test_textual_inversion_learns_a_word_that_fits_the_references(red_context) -> None:
    context, starts = red_context
    start = starts[0]
    outcome = get_attack("textual-inversion").run(context, start, budget=30, seed=0)
    assert outcome.conditioning.embeds.shape == (1, context.length, context.pipe.transformer.config.joint_attention_dim)

    def loss(embeds, pooled):
        fit = ReferenceFit(context, start, batch=16, generator=torch.Generator().manual_seed(1))
        _, _, text_ids = context.call.encode([start.prompt], context.length)
        with torch.no_grad():
            return float(sum(fit(embeds, pooled, text_ids) for _ in range(4)))

    learned = loss(outcome.conditioning.embeds, outcome.conditioning.pooled)
    untrained = loss(*context.call.encode([start.prompt], context.length)[:2])
    assert learned < untrained


def test_protocol_writes_attack_json_and_resumes(red_lora, tmp_path, monkeypatch) -> None:
    out = tmp_path / "attack"
    calls = []
    original = get_attack("unlearndiff").__class__.run

    def interrupted(self, context, start, budget, seed):
        calls.append(start.prompt)
        if len(calls) == 4:  # the base model's three starts are done, then the erased model's first breaks off
            raise KeyboardInterrupt
        return original(self, context, start, budget, seed)

    monkeypatch.setattr(get_attack("unlearndiff").__class__, "run", interrupted)
    kwargs = {"attacks": ["prompt-search", "unlearndiff"], "budgets": {"prompt-search": 4, "unlearndiff": 1},
              "eval_seeds": 1}
    with pytest.raises(KeyboardInterrupt):
        run_attacks(red_lora, out, **kwargs)
    saved = json.loads((out / "attack.json").read_text())  # whole, as of the last finished attack
    assert saved["complete"] is False
    assert set(saved["results"]["base"]) == {"prompt-search/red", "unlearndiff/red"}
    assert set(saved["results"]["erased"]) == {"prompt-search/red"}
    with pytest.raises(AttackExistsError, match="--resume"):
        run_attacks(red_lora, out, **kwargs)
    with pytest.raises(AttackResumeError, match="budgets"):
        run_attacks(red_lora, out, **{**kwargs, "budgets": {"prompt-search": 8}}, resume=True)
    report = run_attacks(red_lora, out, **kwargs, resume=True)
    assert len(calls) == 4 + 3  # only the erased model's unlearndiff ran again
    assert report["complete"] and set(report["table"]) == {"prompt-search", "unlearndiff"}
    entry = report["results"]["erased"]["unlearndiff/red"]
    assert entry["unit"] == "steps" and entry["optimizer_steps"] == 3 and entry["budget"] == 1
    # per start: one progress check of 4 search images, then 1 evaluation image
    assert entry["images"] == 3 * (4 + 1) and len(entry["starts"]) == 3
    assert report["results"]["base"]["prompt-search/red"]["images"] == 3 * (4 + 1)
    assert report["lora_sha256"] and report["protocol_version"] == 2
    shown = [(m, k, i) for m, r in report["results"].items() for k, e in r.items()
             for i, s in enumerate(e["starts"]) if s["asr"] > 0]
    assert len(list((out / "images").glob("*.png")) if (out / "images").exists() else []) == len(shown)


def test_bad_input_is_one_clear_error(red_lora, tmp_path, lora_folder) -> None:
    with pytest.raises(FileNotFoundError, match="--out folder of `attnscope erase`"):
        run_attacks(tmp_path / "missing")
    with pytest.raises(ValueError, match="'blue' was not erased by .* \\(it erased red\\)"):
        run_attacks(red_lora, tmp_path / "a", concepts=["blue"])
    with pytest.raises(ValueError, match="unknown attack 'prompt-serch'; did you mean 'prompt-search'"):
        run_attacks(red_lora, tmp_path / "a", attacks=["prompt-serch"])
    for budget in (0, -3):
        with pytest.raises(ValueError, match="a budget is a positive whole number of steps"):
            run_attacks(red_lora, tmp_path / "a", attacks=["unlearndiff"], budgets={"unlearndiff": budget})
    with pytest.raises(AttackResumeError, match="nothing to resume"):
        run_attacks(red_lora, tmp_path / "a", attacks=["prompt-search"], resume=True)
    # A corrupt LoRA file, and one made for another model (tiny-flux), are refused before any image is drawn.
    for name, lora in (("corrupt", b"\x00" * 64), ("other", (lora_folder / "pytorch_lora_weights.safetensors"))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "spec.yaml").write_text((red_lora / "spec.yaml").read_text())
        (folder / "run.json").write_text((red_lora / "run.json").read_text())
        weights = lora if isinstance(lora, bytes) else lora.read_bytes()
        (folder / "pytorch_lora_weights.safetensors").write_bytes(weights)
        with pytest.raises(LoraFileError, match="not a readable safetensors" if name == "corrupt" else "another model"):
            run_attacks(folder, tmp_path / f"{name}-attack", attacks=["prompt-search"])
        assert not (tmp_path / f"{name}-attack").exists()


def test_attack_cli(red_lora, tmp_path, monkeypatch, capsys) -> None:
    class EntryPoint:
        def load(self):
            return register

    monkeypatch.setattr(attnscope.cli, "entry_points", lambda group: [EntryPoint()])
    out = tmp_path / "cli"
    argv = ["attack", "--lora", str(red_lora), "--out", str(out), "--attack", "prompt-search", "--budget",
            "prompt-search=4", "--seeds", "1"]
    assert attnscope.cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("prompt-search: ASR red ") and "(base " in printed
    assert json.loads((out / "attack.json").read_text())["complete"]
    for bad, message in (
        (["--budget", "prompt-search=0"], "positive whole number of images"),
        (["--attack", "esd"], "unknown attack 'esd'"),
        (["--concept", "circle"], "'circle' was not erased"),
        ([], "exists: pass --resume"),
    ):
        assert attnscope.cli.main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
