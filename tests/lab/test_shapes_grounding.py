"""The shapes trainer's token grounding loss: targets in the model's token layout, the loss, and the trainer option."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import attnscope
from attnscope.lab.export import export_checkpoint
from attnscope.lab.grounding import grounding_loss, grounding_targets, token_coverage
from attnscope.lab.model import (
    MAX_SEQUENCE_LENGTH,
    ShapesModelConfig,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_text_encoders,
    build_transformer,
)
from attnscope.lab.train import TrainConfig, flow_loss, images_to_tensor, train, train_command
from attnscope.shapes import bundled_path
from attnscope.shapes.render import render_scene
from attnscope.tokens import t5_tokens

TINY = ShapesModelConfig(hidden_heads=2, head_dim=16, double_layers=2, single_layers=1, t5_d_ff=32, clip_hidden=16)


def _tokens(tokenizer, captions):
    return [t5_tokens(tokenizer, c, MAX_SEQUENCE_LENGTH) if c else None for c in captions]


def test_token_coverage_follows_flux_packing_order():
    mask = np.zeros((8, 6), bool)
    mask[1:5, 2:3] = True
    mask[6, 5] = True
    packed = FluxPipeline._pack_latents(torch.from_numpy(mask).float()[None, None], 1, 1, 8, 6)  # (1, 12, 4)
    np.testing.assert_allclose(token_coverage(mask), packed[0].mean(-1).numpy())
    with pytest.raises(ValueError, match="7x6 mask"):
        token_coverage(np.zeros((7, 6), bool))


def test_targets_cover_every_piece_of_each_named_object_and_skip_dropped_captions():
    tokenizer = build_t5_tokenizer()
    scenes = [
        render_scene(
            0, objects=[("red", "circle"), ("blue", "triangle")], caption="a scarlet circle and a blue pyramid"
        ),
        render_scene(1, objects=[("green", "square")], caption="a green square"),
    ]
    targets = grounding_targets(scenes, _tokens(tokenizer, [scenes[0].caption, ""]))
    assert targets.rows.tolist() == [0, 0, 0, 0]  # four words name objects; the dropped row has none
    toks = t5_tokens(tokenizer, scenes[0].caption, MAX_SEQUENCE_LENGTH)
    scarlet, pyramid = toks.positions("scarlet"), toks.positions("pyramid")
    assert len(scarlet) == len(pyramid) == 2
    kept = list(targets.positions)
    by_pair = [{kept[j] for j in torch.nonzero(row).flatten().tolist()} for row in targets.columns]
    assert by_pair == [set(scarlet), set(toks.positions("circle")), set(toks.positions("blue")), set(pyramid)]
    torch.testing.assert_close(targets.targets.sum(-1), torch.ones(4))
    # The colour and shape word of one object share its mask; the two objects' masks are disjoint.
    torch.testing.assert_close(targets.targets[0], targets.targets[1])
    assert float((targets.targets[1] * targets.targets[3]).sum()) == 0.0
    assert grounding_targets(scenes, [None, None]) is None


def test_targets_refuse_tokens_of_another_caption():
    tokenizer = build_t5_tokenizer()
    scene = render_scene(0, objects=[("red", "circle")], caption="a red circle")
    with pytest.raises(ValueError, match="not 'red'"):
        grounding_targets([scene], _tokens(tokenizer, ["a blue circle"]))


def test_loss_is_zero_exactly_when_the_word_map_is_its_object():
    tokenizer = build_t5_tokenizer()
    scene = render_scene(
        0, objects=[("red", "circle"), ("blue", "triangle")], caption="a scarlet circle and a blue pyramid"
    )
    targets = grounding_targets([scene], _tokens(tokenizer, [scene.caption]))
    n, t = targets.targets.shape[1], len(targets.positions)
    maps = torch.full((1, n, t), 1e-3)
    for pair in range(targets.pairs):
        cols = torch.nonzero(targets.columns[pair]).flatten()
        # Split the pair's target over its pieces (any split: pieces are summed) and scale it (only shape counts).
        for share, col in zip(torch.linspace(1, 2, len(cols)) / torch.linspace(1, 2, len(cols)).sum(), cols):
            maps[0, :, col] = 0.3 * share * targets.targets[pair]
    assert float(grounding_loss([maps], targets)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, n, t), 0.01)
    # Against uniform maps the KL is log(n) minus the target's entropy (numpy, independently of the torch code).
    p = targets.targets.numpy().astype(np.float64)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)
    assert float(grounding_loss([uniform, uniform], targets)) == pytest.approx(
        float(np.mean(np.log(n) - entropy)), rel=1e-5
    )


def test_grounding_loss_through_a_real_trace_moves_word_maps_onto_their_objects():
    torch.manual_seed(0)
    tokenizer = build_t5_tokenizer()
    transformer = build_transformer(TINY)
    _, t5 = build_text_encoders(TINY, tokenizer, build_clip_tokenizer())
    scenes = [render_scene(s, n_objects=2, size=16) for s in range(4)]
    captions = [s.caption for s in scenes]
    targets = grounding_targets(scenes, _tokens(tokenizer, captions))
    latents = images_to_tensor([s.image for s in scenes])
    params = [p for p in [*transformer.parameters(), *t5.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses, inside = [], []
    for _ in range(40):
        with attnscope.trace(transformer, differentiable=True, positions=targets.positions, layers="double") as tr:
            flow_loss(transformer, t5, tokenizer, latents, captions, torch.Generator().manual_seed(0))
        maps = list(tr.take()[-1].values())
        assert len(maps) == TINY.double_layers and maps[0].shape == (4, 64, len(targets.positions))
        loss = grounding_loss(maps, targets)
        word = torch.einsum("bnt,pt->pn", maps[-1][targets.rows].detach(), targets.columns)
        inside.append(float(((word / word.sum(-1, keepdim=True)) * (targets.targets > 0)).sum(-1).mean()))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
    assert inside[-1] > inside[0] + 0.15, inside  # attention mass on the named object's tokens


def test_trainer_fine_tunes_an_exported_model_with_grounding(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=2, minutes=0, batch=2, checkpoint_minutes=0.0, log_every=1,
                      init_from=str(bundled_path()), grounding=0.05, caption_dropout=0.0)
    ckpt = train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["config"]["grounding"] == 0.05 and state["config"]["init_from"] == str(bundled_path())
    log = (tmp_path / "run" / "train.log").read_text()
    assert "initialized from" in log
    first = next(line for line in log.splitlines() if " step 1 loss " in line)
    flow, ground = float(first.split(" loss ")[1].split()[0]), float(first.split(" grounding ")[1].split()[0])
    # A fresh model's flow loss is ~1; the bundled one's ~0.04: the weights were loaded, not re-initialized.
    assert flow < 0.2 and ground > 0
    bundled = FluxPipeline.from_pretrained(bundled_path()).vae
    assert state["vae_config"]["shift_factor"] == bundled.config.shift_factor
    assert "_name_or_path" not in state["vae_config"]  # an export must not name the folder it was loaded from
    # Resuming without the option keeps the saved weight.
    train(TrainConfig(**{**cfg.__dict__, "steps": 3, "grounding": None}), resume=True)
    assert torch.load(ckpt, weights_only=False)["config"]["grounding"] == 0.05
    # The export names the fine-tune's command and carries the record of the model it started from.
    info = json.loads((export_checkpoint(ckpt, tmp_path / "weights") / "training.json").read_text())
    assert f"--init-from {bundled_path()}" in info["command"] and "--grounding 0.05" in info["command"]
    assert info["fine_tuned_from"] == json.loads((bundled_path() / "training.json").read_text())


def test_init_from_a_folder_that_is_not_a_model_says_what_is_missing(tmp_path):
    (tmp_path / "vae").mkdir()
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=1, minutes=0, batch=2, init_from=str(tmp_path),
                      model=asdict(TINY))
    with pytest.raises(FileNotFoundError, match="no transformer, text_encoder_2 folder"):
        train(cfg)


def test_grounding_max_t_supervises_only_rows_at_or_below_that_noise_level(tmp_path):
    """With grounding_max_t = 0 no row qualifies (t > 0 always): the run is exactly the ungrounded run, step for
    step; with the default every row with a caption is supervised."""

    def first_steps(name: str, **options) -> list[tuple[float, float]]:
        cfg = TrainConfig(out=str(tmp_path / name), steps=3, minutes=0, batch=4, vae_steps=2, log_every=1,
                          checkpoint_minutes=60.0, model=asdict(TINY), caption_dropout=0.0, **options)
        train(cfg)
        lines = [line for line in (tmp_path / name / "train.log").read_text().splitlines() if " it/s " in line]
        return [(float(ln.split(" loss ")[1].split()[0]),
                 float(ln.split(" grounding ")[1].split()[0]) if " grounding " in ln else 0.0) for ln in lines]

    plain = first_steps("plain")
    none_low_enough = first_steps("max0", grounding=1.0, grounding_max_t=0.0)
    every_row = first_steps("all", grounding=1.0)
    assert none_low_enough == [(flow, 0.0) for flow, _ in plain]
    assert all(ground > 0 for _, ground in every_row)
    command = train_command(TrainConfig(grounding=0.1, grounding_max_t=0.7).__dict__)
    assert command.endswith("--grounding 0.1 --grounding-max-t 0.7")
