"""Preference fine-tuning of the shapes model on its own judged samples (``attnscope shapes preferences``, then
``attnscope shapes train --preference``), on a tiny exported model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from attnscope.lab.cli import register
from attnscope.lab.export import export_checkpoint
from attnscope.lab.model import build_t5_tokenizer
from attnscope.lab.preference import (
    PreferenceSet,
    draw_captions,
    model_digest,
    preference_loss,
    sample_preferences,
    sample_seed,
)
from attnscope.lab.train import (
    TrainConfig,
    _velocity_errors,
    load_checkpoint_pipeline,
    load_exported,
    train,
    train_command,
)
from attnscope.shapes.metrics import load_model, score_image
from attnscope.shapes.reader import read_scene
from attnscope.shapes.render import render_scene
from attnscope.shapes.vocabulary import parse_prompt


@pytest.fixture
def tiny_folder(tiny_shapes_folder) -> str:
    return tiny_shapes_folder


def _rendered_pairs(folder: str, prompts: int = 6) -> PreferenceSet:
    """Winners are scenes rendered for their caption (right by construction); losers the same captions' objects
    with one drawn twice more (the model's typical error): a set whose preference a fine-tune can learn."""
    rng = np.random.default_rng(7)
    captions, images = [], []
    while len(captions) < prompts:
        scene = render_scene(rng)
        if len(scene.objects) != 2:
            continue
        asked = parse_prompt(scene.caption)
        crowded = render_scene(rng, objects=[*asked, asked[0]])
        captions.append(scene.caption)
        images.append([scene.image, crowded.image])
    correct = torch.tensor([[True, False]] * prompts)
    return PreferenceSet(captions, torch.from_numpy(np.array(images)), correct, {"guidance_scale": 1.0}, folder,
                         model_digest(folder), seed=0)


def test_captions_and_seeds_stay_away_from_the_eval():
    captions = draw_captions(0, 40)
    assert all(len(score_image(c, [])["expected"]) >= 2 for c in captions)  # no single objects: they give no pairs
    seeds = {sample_seed(0, p, k) for p in range(50) for k in range(4)}
    assert len(seeds) == 200 and min(seeds) > 10_000  # distinct, and far from the protocols' seeds 0–15 and 100–115
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1) != sample_seed(1, 3, 1)


def test_samples_are_judged_by_the_reader_saved_and_continued(tiny_folder, tmp_path):
    pipe = load_model(tiny_folder)
    out = tmp_path / "prefs.pt"
    first = sample_preferences(pipe, tiny_folder, prompts=2, samples=2, seed=3, batch=3, out=out)
    assert first.images.shape == (2, 2, 32, 32, 3) and first.images.dtype == torch.uint8
    assert first.device == "cpu" and "--device" not in first.record(out)["command"]
    for p, caption in enumerate(first.captions):
        for k in range(2):
            judged = score_image(caption, read_scene(first.images[p, k].numpy()))["all_correct"]
            assert bool(first.correct[p, k]) == judged
    # A longer run on the same file continues it: the first captions' images are reused as they are.
    more = sample_preferences(pipe, tiny_folder, prompts=3, samples=2, seed=3, batch=4, out=out)
    assert more.captions[:2] == first.captions and torch.equal(more.images[:2], first.images)
    assert PreferenceSet.load(out).captions == more.captions
    with pytest.raises(ValueError, match="another model, seed"):
        sample_preferences(pipe, tiny_folder, prompts=3, samples=2, seed=4, out=out)
    with pytest.raises(ValueError, match="at least 2"):
        sample_preferences(pipe, tiny_folder, prompts=3, samples=1)
    with pytest.raises(FileNotFoundError, match="shapes preferences"):
        PreferenceSet.load(tmp_path / "none.pt")


def test_pairs_join_each_right_sample_to_each_wrong_one_of_its_caption():
    correct = torch.tensor([[True, False, False], [True, True, True], [False, True, False]])
    prefs = PreferenceSet(["a", "b", "c"], torch.zeros(3, 3, 4, 4, 3, dtype=torch.uint8), correct, {}, "m", "d", 0)
    assert prefs.pairs().tolist() == [[0, 0, 1], [0, 0, 2], [2, 1, 0], [2, 1, 2]]
    assert prefs.summary() == {"captions": 3, "samples_per_caption": 3, "right": 0.5556, "captions_with_pairs": 2,
                               "pairs": 4}
    winners, losers, captions = prefs.batch(seed=0, step=5, size=6)
    assert winners.shape == losers.shape == (6, 4, 4, 3) and set(captions) <= {"a", "c"}
    empty = PreferenceSet(["b"], torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8), torch.ones(1, 2, dtype=torch.bool),
                          {}, "m", "d", 0)
    with pytest.raises(ValueError, match="no pair"):
        empty.batch(0, 0, 2)


def test_preference_loss_rewards_fitting_winners_better_than_the_reference_does():
    winners, losers = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t, noise = torch.rand(3), torch.randn(3, 3, 4, 4)

    def errors_with(gain_winner: float, gain_loser: float):
        def errors(x_t, t_rows, target):
            reference = torch.full((len(x_t),), 0.5)
            return reference + torch.tensor([gain_winner] * 3 + [gain_loser] * 3), reference
        return errors

    neutral, _ = preference_loss(errors_with(0.0, 0.0), winners, losers, t, noise, beta=100.0)
    assert neutral.item() == pytest.approx(np.log(2))
    better, preferred = preference_loss(errors_with(-0.01, 0.01), winners, losers, t, noise, beta=100.0)
    worse, not_preferred = preference_loss(errors_with(0.01, -0.01), winners, losers, t, noise, beta=100.0)
    assert better.item() < np.log(2) < worse.item() and preferred.item() == 1.0 and not_preferred.item() == 0.0
    with_sft, _ = preference_loss(errors_with(-0.01, 0.01), winners, losers, t, noise, beta=100.0, sft=2.0)
    assert with_sft.item() == pytest.approx(better.item() + 2.0 * 0.49)


def test_a_preference_fine_tune_learns_its_pairs_resumes_and_records_the_command(tiny_folder, tiny_shapes_config,
                                                                                 tmp_path):
    prefs = _rendered_pairs(tiny_folder)
    prefs.save(tmp_path / "prefs.pt")
    run = tmp_path / "run"
    cfg = TrainConfig(out=str(run), steps=30, minutes=0, batch=8, lr=2e-3, warmup=1, checkpoint_minutes=60.0,
                      init_from=tiny_folder, preference=str(tmp_path / "prefs.pt"), preference_beta=500.0)
    ckpt = train(cfg)
    log = (run / "train.log").read_text()
    assert "preference fine-tune" in log and " preferred " in log

    # On the training pairs, at fixed noise, the tuned model fits the winners better than the losers *relative to*
    # the starting model: the DPO loss falls below log 2, where the starting model sits.
    tuned = load_checkpoint_pipeline(ckpt, use_ema=False)
    _, *reference = load_exported(tiny_folder, tiny_shapes_config)
    tokenizer = build_t5_tokenizer()
    winners, losers, captions = prefs.batch(seed=1, step=0, size=12)
    encode = lambda images: (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)  # noqa: E731
    vae = tuned.vae
    latents = [(vae.encode(encode(x)).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
               for x in (winners, losers)]
    gen = torch.Generator().manual_seed(0)
    t, noise = torch.rand(12, generator=gen), torch.randn(latents[0].shape, generator=gen)
    with torch.no_grad():
        for module in (tuned.transformer, tuned.text_encoder_2, *reference):
            module.eval()
        errors = _velocity_errors(tuned.transformer, tuned.text_encoder_2, reference, tokenizer, captions, 1.0)
        loss, preferred = preference_loss(errors, *latents, t, noise, beta=500.0)
        start_errors = _velocity_errors(*reference, reference, tokenizer, captions, 1.0)
        start_loss, _ = preference_loss(start_errors, *latents, t, noise, beta=500.0)
    assert start_loss.item() == pytest.approx(np.log(2), abs=1e-6)
    assert loss.item() < 0.6 and preferred.item() > 0.5

    command = train_command(torch.load(ckpt, weights_only=False)["config"])
    assert f"--init-from {tiny_folder} --preference {tmp_path / 'prefs.pt'} --preference-beta 500" in command
    record = json.loads((export_checkpoint(ckpt, tmp_path / "export") / "training.json").read_text())
    assert record["preference_set"] == {"command": f"attnscope shapes preferences --model {tiny_folder} --out "
                                        f"{tmp_path / 'prefs.pt'} --prompts 6 --samples 2 --seed 0 --guidance 1",
                                        "captions": 6, "samples_per_caption": 2, "right": 0.5,
                                        "captions_with_pairs": 6, "pairs": 6}
    cfg.steps = 32
    train(cfg, resume=True)
    assert "resumed at step 30" in (run / "train.log").read_text()
    # Samples drawn on a GPU say so: they are the CPU's images only up to rounding.
    prefs.device = "cuda"
    assert prefs.record("p.pt")["command"].endswith("--guidance 1 --device cuda")


def test_preference_min_t_keeps_the_pairs_at_high_noise(tiny_folder, tmp_path, monkeypatch):
    import attnscope.lab.train as train_module

    seen = []

    def recording_loss(errors, winners, losers, t, noise, beta, sft):
        seen.append(t)
        return preference_loss(errors, winners, losers, t, noise, beta, sft)

    monkeypatch.setattr(train_module, "preference_loss", recording_loss)
    _rendered_pairs(tiny_folder).save(tmp_path / "prefs.pt")
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=4, minutes=0, batch=8, checkpoint_minutes=60.0,
                      init_from=tiny_folder, preference=str(tmp_path / "prefs.pt"), preference_min_t=0.6,
                      uniform_t=0.5)
    ckpt = train(cfg)
    t = torch.cat(seen)
    assert len(t) == 16 and t.min() >= 0.6 and t.max() <= 1.0 and t.std() > 0.02
    assert "--preference-min-t 0.6" in train_command(torch.load(ckpt, weights_only=False)["config"])
    with pytest.raises(ValueError, match="preference_min_t must be in"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "bad"), "preference_min_t": 1.0}))


def test_a_preference_run_refuses_what_it_cannot_learn_from(tiny_folder, tmp_path):
    prefs = _rendered_pairs(tiny_folder, prompts=1)
    prefs.model_digest = "0" * 64  # drawn by other weights
    prefs.save(tmp_path / "other.pt")
    base = dict(out=str(tmp_path / "run"), steps=1, minutes=0, batch=2, init_from=tiny_folder)
    with pytest.raises(ValueError, match="starting model's own samples"):
        train(TrainConfig(**base, preference=str(tmp_path / "other.pt")))
    _rendered_pairs(tiny_folder, prompts=1).save(tmp_path / "own.pt")
    with pytest.raises(ValueError, match="give --init-from"):
        train(TrainConfig(**{**base, "init_from": None}, preference=str(tmp_path / "own.pt")))
    with pytest.raises(ValueError, match="no --grounding"):
        train(TrainConfig(**base, preference=str(tmp_path / "own.pt"), grounding=0.1))


def test_cli_parses_the_preference_options():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "train", "--init-from", "m", "--preference", "p.pt", "--preference-beta",
                              "1000", "--preference-sft", "0.5"])
    assert (args.preference, args.preference_beta, args.preference_sft) == ("p.pt", 1000.0, 0.5)
    args = parser.parse_args(["shapes", "preferences", "--out", "p.pt", "--prompts", "5", "--samples", "3"])
    assert (args.out, args.prompts, args.samples, args.model, args.device) == ("p.pt", 5, 3, None, "cpu")
