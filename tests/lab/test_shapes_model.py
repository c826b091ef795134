"""The lab's shapes model plumbing: tokenizers, offline pipeline, LoRA, trainer/resume/export, CLI (tiny configs),
and the bundled weights against the code that builds them."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from attnscope.lab.cli import register
from attnscope.lab.export import MAX_BUNDLE_BYTES, export_checkpoint, folder_bytes
from attnscope.lab.model import (
    MAX_SEQUENCE_LENGTH,
    MULTI_PIECE,
    ShapesModelConfig,
    assemble_pipeline,
    build_clip_tokenizer,
    build_scheduler,
    build_t5_tokenizer,
    build_text_encoders,
    build_transformer,
    grown_double_stream,
)
from attnscope.lab.train import TrainConfig, flow_loss, load_checkpoint_pipeline, load_exported, train, train_command
from attnscope.sampling import FlowMatchRenoisingScheduler
from attnscope.shapes import DEFAULT_CALL_KWARGS, bundled_path, call_kwargs_for
from attnscope.shapes.vocabulary import ALL_WORDS

TINY = ShapesModelConfig(hidden_heads=2, head_dim=16, double_layers=1, single_layers=1, t5_d_ff=32, clip_hidden=16)
FAST_CALL = DEFAULT_CALL_KWARGS | {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def bundled_pipe() -> FluxPipeline:
    return FluxPipeline.from_pretrained(bundled_path())


def test_tokenizers_give_single_pieces_and_round_trip(tmp_path):
    t5, clip = build_t5_tokenizer(), build_clip_tokenizer()
    for w in sorted(ALL_WORDS):
        pieces = t5.tokenize(w)
        assert pieces == (list(MULTI_PIECE[w]) if w in MULTI_PIECE else [f"▁{w}"]), w
        assert clip.tokenize(w) == [f"{w}</w>"], w
    prompt = "a scarlet pyramid, a golden circle and an amber square"
    assert len(t5(prompt).input_ids) <= MAX_SEQUENCE_LENGTH
    assert DEFAULT_CALL_KWARGS["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    t5.save_pretrained(tmp_path / "t5")
    clip.save_pretrained(tmp_path / "clip")
    t5b = type(t5).from_pretrained(tmp_path / "t5")
    clipb = type(clip).from_pretrained(tmp_path / "clip")
    assert t5b(prompt).input_ids == t5(prompt).input_ids
    assert clipb(prompt).input_ids == clip(prompt).input_ids


def test_pipeline_saves_loads_and_generates_offline(tmp_path):
    pipe = assemble_pipeline(TINY)
    # The pooled text path is a frozen constant zero: text reaches the image only through joint attention.
    emb = pipe.transformer.time_text_embed.text_embedder
    assert torch.count_nonzero(emb(torch.randn(3, TINY.clip_hidden))) == 0
    assert not any(p.requires_grad for p in emb.parameters())
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = FluxPipeline.from_pretrained(tmp_path)
    assert loaded.vae_scale_factor == 1
    out = loaded("a red circle and a blue box", generator=torch.Generator().manual_seed(0), output_type="np",
                 **FAST_CALL)
    assert out.images.shape == (1, 32, 32, 3)
    # 32×32 pixels -> 16×16 image tokens.
    assert loaded._pack_latents(torch.zeros(1, 3, 32, 32), 1, 3, 32, 32).shape[1] == 256


def test_lora_on_transformer_trains_only_adapters():
    peft = pytest.importorskip("peft")
    pipe = assemble_pipeline(TINY)
    tr = pipe.transformer
    tr.requires_grad_(False)
    tr.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["add_q_proj", "add_k_proj"], init_lora_weights="gaussian")
    )
    n_img, n_txt = 256, MAX_SEQUENCE_LENGTH
    out = tr(
        hidden_states=torch.randn(1, n_img, 12),
        encoder_hidden_states=torch.randn(1, n_txt, TINY.hidden),
        pooled_projections=torch.zeros(1, TINY.clip_hidden),
        timestep=torch.tensor([0.5]),
        img_ids=pipe._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32),
        txt_ids=torch.zeros(n_txt, 3),
        return_dict=False,
    )[0]
    out.square().mean().backward()
    trained = [n for n, p in tr.named_parameters() if p.grad is not None]
    assert trained and all("lora" in n for n in trained)


def test_train_resume_export(tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "run"), steps=2, vae_steps=2, batch=2, checkpoint_minutes=0.0, log_every=1,
        model=asdict(TINY),
    )
    ckpt = train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")], "staging files left"
    train(TrainConfig(**{**cfg.__dict__, "steps": 3}), resume=True)
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed at step 2" in log and "step 3 loss" in log
    # An option given on --resume changes the run from there and says so; one not given keeps the saved value.
    train(TrainConfig(**{**cfg.__dict__, "steps": 4, "uniform_t": 0.5, "caption_dropout": None}), resume=True)
    state4 = torch.load(ckpt, weights_only=False)
    assert state4["config"]["uniform_t"] == 0.5 and state4["config"]["caption_dropout"] == 0.1
    assert "uniform_t changed from 0.0 to 0.5 at step 3" in (tmp_path / "run" / "train.log").read_text()
    pipe = load_checkpoint_pipeline(ckpt)
    assert pipe.vae.config.shift_factor == state["vae_config"]["shift_factor"]
    bundle = export_checkpoint(ckpt, tmp_path / "weights", extra_info={"command": "test"})
    assert folder_bytes(bundle) < MAX_BUNDLE_BYTES
    assert json.loads((bundle / "training.json").read_text())["step"] == 4
    assert list(bundle.rglob("*.safetensors")) and not list(bundle.rglob("*.bin"))
    loaded = FluxPipeline.from_pretrained(bundle)
    img = loaded("a green triangle", generator=torch.Generator().manual_seed(1), output_type="np", **FAST_CALL).images
    assert np.isfinite(img).all()


def test_a_non_finite_gradient_stops_the_run_with_the_last_good_weights(tmp_path, monkeypatch):
    """A NaN loss at step 3 stops the run before the update: the checkpoint holds step 2's finite weights, the
    error and the log name the step."""
    import attnscope.lab.train as train_module

    calls = []

    def poisoned_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = flow_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "flow_loss", poisoned_at_step_3)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=5, vae_steps=2, batch=2, checkpoint_minutes=0.0,
                      log_every=1, model=asdict(TINY))
    with pytest.raises(FloatingPointError, match="step 3: non-finite gradient"):
        train(cfg)
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in [*state["transformer"].values(), *state["ema"].values()])
    assert "checkpoint keeps step 2" in (tmp_path / "run" / "train.log").read_text()


def _velocity(transformer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 64, MAX_SEQUENCE_LENGTH
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, n_img, 12, generator=g),
            encoder_hidden_states=torch.randn(1, n_txt, transformer.config.joint_attention_dim, generator=g),
            pooled_projections=torch.zeros(1, transformer.config.pooled_projection_dim),
            timestep=torch.tensor([0.7]),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(n_txt, 3),
            return_dict=False,
        )[0]


def test_grown_double_stream_starts_as_its_parent_and_copies_the_last_blocks():
    torch.manual_seed(0)
    parent_cfg = ShapesModelConfig(**{**asdict(TINY), "double_layers": 2})
    parent = build_transformer(parent_cfg)
    for block in parent.transformer_blocks:  # open every gate, as in a trained model
        for norm in (block.norm1, block.norm1_context):
            torch.nn.init.normal_(norm.linear.weight, std=0.2)
            torch.nn.init.normal_(norm.linear.bias, std=0.2)
    for layers in (3, 5):  # 5: more new blocks than the parent has, so the copies cycle
        grown = build_transformer(ShapesModelConfig(**{**asdict(parent_cfg), "double_layers": layers}))
        weights = grown_double_stream(parent.state_dict(), 2, layers)
        grown.load_state_dict(weights)
        torch.testing.assert_close(_velocity(grown), _velocity(parent), atol=1e-6, rtol=0)
        sources = [(index - (layers - 2)) % 2 for index in range(2, layers)]
        for index, source in zip(range(2, layers), sources):
            new, old = grown.transformer_blocks[index], parent.transformer_blocks[source]
            torch.testing.assert_close(new.attn.to_q.weight, old.attn.to_q.weight)
            gates = new.norm1.linear.weight.view(6, -1, new.norm1.linear.weight.shape[1])[[2, 5]]
            assert not gates.any() and new.norm1.linear.weight.view(6, -1, gates.shape[-1])[[0, 1, 3, 4]].any()
            assert not new.norm1_context.linear.bias.view(6, -1)[[2, 5]].any()
    assert sources == [1, 0, 1]
    with pytest.raises(ValueError, match="cannot grow 2 double-stream blocks into 1"):
        grown_double_stream(parent.state_dict(), 2, 1)


def test_fine_tune_grows_the_exported_model_and_records_it(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "parent"), steps=1, vae_steps=2, batch=2, checkpoint_minutes=60.0,
                      model=asdict(TINY))
    folder = export_checkpoint(train(cfg), tmp_path / "export")
    parent = FluxPipeline.from_pretrained(folder).transformer
    grown_cfg = ShapesModelConfig(**{**asdict(TINY), "double_layers": TINY.double_layers + 2})
    _, grown, _ = load_exported(folder, grown_cfg)
    torch.testing.assert_close(_velocity(grown), _velocity(parent), atol=1e-6, rtol=0)

    fine = TrainConfig(out=str(tmp_path / "grown"), steps=1, batch=2, checkpoint_minutes=60.0, init_from=str(folder),
                       grow_double=2)
    state = torch.load(train(fine), weights_only=False)
    assert state["config"]["model"]["double_layers"] == TINY.double_layers + 2
    assert f"--init-from {folder} --grow-double 2" in train_command(state["config"])
    with pytest.raises(ValueError, match="grow_double grows the model a fine-tune starts from"):
        train(TrainConfig(out=str(tmp_path / "new"), steps=1, model=asdict(TINY), grow_double=1))


def test_uniform_t_moves_training_noise_levels_toward_the_ends():
    """Logit-normal(0, 1) rarely trains above t = 0.9 (~1.4 %); a uniform share of 1 puts ~10 % there."""
    tokenizer = build_t5_tokenizer()
    transformer = build_transformer(TINY)
    _, t5 = build_text_encoders(TINY, tokenizer, build_clip_tokenizer())
    seen: list[torch.Tensor] = []
    transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    latents = torch.randn(2000, 3, 2, 2)
    with torch.no_grad():
        for share in (0.0, 1.0):
            flow_loss(transformer, t5, tokenizer, latents, [""] * len(latents), torch.Generator().manual_seed(0), share)
    high = [float((t > 0.9).float().mean()) for t in seen]
    assert high[0] < 0.03 and 0.08 < high[1] < 0.12, high


def test_cli_adds_the_lab_commands_to_the_worlds_shapes_group():
    """The world registers ``shapes eval``, the lab ``train``/``export``/``preferences``: one group, either order."""
    from attnscope.shapes.cli import register as register_world

    for order in ((register_world, register), (register, register_world)):
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers(dest="command")
        for add in order:
            add(subparsers)
        args = parser.parse_args(["shapes", "train", "--minutes", "1", "--resume", "--out", "x"])
        assert args.minutes == 1 and args.resume and args.out == "x" and callable(args.run)
        args = parser.parse_args(["shapes", "eval", "--out", "y"])
        assert args.out == "y" and args.model is None
        assert parser.parse_args(["shapes", "export", "ckpt.pt"]).checkpoint == "ckpt.pt"


def test_the_installed_cli_has_the_lab_commands(capsys):
    """``attnscope shapes train`` reaches the lab through its ``attnscope.commands`` entry point."""
    import subprocess
    import sys

    from attnscope.cli import main

    with pytest.raises(SystemExit):
        main(["shapes", "--help"])
    usage = capsys.readouterr().out
    assert all(command in usage for command in ("eval", "train", "export", "preferences"))
    out = subprocess.run([sys.executable, "-m", "attnscope.cli", "shapes", "train", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--distill-from" in out.stdout and "--preference" in out.stdout


def test_bundled_weights_load_and_generate(bundled_pipe):
    assert folder_bytes(bundled_path()) <= MAX_BUNDLE_BYTES
    # The bundle samples with the scheduler the code builds (the one its figures were measured with).
    assert isinstance(bundled_pipe.scheduler, FlowMatchRenoisingScheduler)

    def public(config) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(bundled_pipe.scheduler.config) == public(build_scheduler().config)
    # The bundle is guidance-distilled (distill.py): its default call passes the guidance scale as an input.
    assert bundled_pipe.transformer.config.guidance_embeds
    assert call_kwargs_for(bundled_pipe) == DEFAULT_CALL_KWARGS
    img = bundled_pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **FAST_CALL).images
    assert img.shape == (1, 32, 32, 3)
    unguided = bundled_pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np",
                            **FAST_CALL | {"guidance_scale": 1.0}).images
    assert np.abs(img - unguided).mean() > 1e-3, "the guidance input must act"


def test_lr_schedule_warmup_constant_cooldown():
    from attnscope.lab.loop import lr_factor

    cfg = TrainConfig(steps=1000, minutes=0, warmup=100, cooldown=0.2)
    assert lr_factor(0, 0.0, 0.0, cfg) == pytest.approx(0.01)
    assert lr_factor(500, 0.0, 0.0, cfg) == 1.0
    assert lr_factor(900, 0.0, 0.0, cfg) == pytest.approx(0.5)
    assert lr_factor(999, 0.0, 0.0, cfg) == pytest.approx(0.05)
    timed = TrainConfig(minutes=10, warmup=1, cooldown=0.1)
    assert lr_factor(50, 570.0, 600.0, timed) == pytest.approx(0.5)


def test_sigterm_stops_after_a_whole_step_and_resumes_the_same_stream(tmp_path):
    """A scheduler's SIGTERM ends training at a step boundary with a checkpoint; resuming gives the weights an
    uninterrupted run of the same length gives."""
    import os
    import signal
    import threading

    base = dict(vae_steps=2, batch=2, checkpoint_minutes=60.0, log_every=1, model=asdict(TINY), minutes=0)
    stopped = TrainConfig(out=str(tmp_path / "stopped"), steps=10_000, **base)
    log = tmp_path / "stopped" / "train.log"
    done = threading.Event()

    def kill_once_training() -> None:  # the handler exists while the step loop runs
        while not done.is_set():
            if log.exists() and " it/s " in log.read_text():  # a transformer-stage step was logged
                os.kill(os.getpid(), signal.SIGTERM)
                return
            done.wait(0.05)

    killer = threading.Thread(target=kill_once_training)
    killer.start()
    try:
        ckpt = train(stopped)
    finally:
        done.set()
        killer.join()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 10_000 and "stopped by a signal" in log.read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after training
    resumed = torch.load(train(TrainConfig(**{**stopped.__dict__, "steps": step + 2}), resume=True), weights_only=False)
    straight = torch.load(train(TrainConfig(out=str(tmp_path / "straight"), steps=step + 2, **base)),
                          weights_only=False)
    for name, value in straight["transformer"].items():
        torch.testing.assert_close(resumed["transformer"][name], value, rtol=0, atol=0)


def test_clip_tokenizer_is_rebuilt_identically_in_another_process():
    """The bundled tokenizer was built by another process; the tokenizers library numbers single characters in
    a per-process hash order, which ``build_clip_tokenizer`` must undo."""
    from transformers import CLIPTokenizer

    bundled = CLIPTokenizer.from_pretrained(bundled_path() / "tokenizer")
    assert build_clip_tokenizer().get_vocab() == bundled.get_vocab()


def test_render_workers_feed_the_inline_data_stream(tmp_path):
    """Batches rendered ahead by worker processes (what a GPU run needs) train exactly the weights an inline run
    trains: every step's batch comes from its own seed, not from where it was rendered."""
    from attnscope.lab.train import training_batch

    scenes, captions = training_batch(0, 5, 4, 32, 0.5)
    again, again_captions = training_batch(0, 5, 4, 32, 0.5)
    assert again_captions == captions and all((a.image == b.image).all() for a, b in zip(scenes, again))
    assert training_batch(0, 6, 4, 32, 0.5)[1] != captions
    base = dict(vae_steps=2, batch=2, steps=3, minutes=0, checkpoint_minutes=60.0, model=asdict(TINY))
    inline = torch.load(train(TrainConfig(out=str(tmp_path / "inline"), **base)), weights_only=False)
    ahead = torch.load(train(TrainConfig(out=str(tmp_path / "ahead"), workers=1, **base)), weights_only=False)
    assert ahead["config"]["workers"] == 1 and ahead["step"] == 3
    for name, value in inline["transformer"].items():
        torch.testing.assert_close(ahead["transformer"][name], value, rtol=0, atol=0)


def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path):
    from attnscope.pipelines import resolve_device
    from attnscope.shapes.metrics import load_model

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="device meta: attnscope runs models on cpu or cuda"):
        load_model(None, device="meta")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            train(TrainConfig(out=str(tmp_path / "run"), device="cuda", steps=1, model=asdict(TINY)))
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_model_size_options_reach_the_run_and_its_recorded_command(capsys):
    from attnscope.cli import main

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "train", "--t5-layers", "3", "--hidden-heads", "6", "--device", "cuda"])
    assert (args.t5_layers, args.hidden_heads, args.device, args.double_layers) == (3, 6, "cuda", None)
    cfg = TrainConfig(model=ShapesModelConfig(t5_layers=3).to_dict(), device="cuda").__dict__
    command = train_command(cfg)
    assert command.endswith("--t5-layers 3 --device cuda") and "--hidden-heads" not in command
    assert "--t5-layers" not in train_command(TrainConfig().__dict__)
    # Sizes cannot change under a fine-tune or a resume: said before any training starts.
    assert main(["shapes", "train", "--init-from", "attnscope/shapes/weights", "--t5-layers", "2"]) == 2
    assert "--t5-layers: a resumed run or a fine-tune keeps the sizes" in capsys.readouterr().err


def _encode(t5, tokenizer, prompts: list[str]) -> tuple[list[list[str]], torch.Tensor]:
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        return [tokenizer.convert_ids_to_tokens(row) for row in ids], t5(ids)[0]


def test_positional_t5_attends_by_offset_and_carries_word_order():
    """Flux gives text tokens no positions, so the T5 is the only place word order can enter: a positional T5
    attends by relative offset alone, and a shape word's encoding depends on the colour before it."""
    from attnscope.lab.model import POSITIONAL_OFFSETS

    tokenizer = build_t5_tokenizer()
    _, t5 = build_text_encoders(TINY, tokenizer, build_clip_tokenizer())
    attention = t5.encoder.block[0].layer[0].SelfAttention
    assert not attention.q.weight.any() and not attention.k.weight.any()
    assert not attention.q.weight.requires_grad and not attention.k.weight.requires_grad
    # With zero queries and keys the attention weights are the softmax of the position bias: query 5 of head h
    # looks at 5 + offset_h.
    weights = attention.compute_bias(MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH)[0].softmax(-1)
    for head in range(TINY.hidden_heads):
        assert weights[head, 5, 5 + POSITIONAL_OFFSETS[head]] > 0.9
    tokens, encoded = _encode(t5, tokenizer, ["a red circle and a blue square", "a blue circle and a red square"])
    circle = tokens[0].index("▁circle")
    assert (encoded[0, circle] - encoded[1, circle]).norm() > 0.1 * encoded[0, circle].norm()
    # A content-attention T5 is the plain one (trainable queries and keys).
    _, content = build_text_encoders(ShapesModelConfig(**{**asdict(TINY), "t5_attention": "content"}), tokenizer,
                                     build_clip_tokenizer())
    assert content.encoder.block[0].layer[0].SelfAttention.q.weight.requires_grad


def test_model_config_reads_old_records_as_content_attention_and_refuses_unknown_kinds():
    old_record = {k: v for k, v in asdict(TINY).items() if k != "t5_attention"}
    assert ShapesModelConfig.from_dict(old_record).t5_attention == "content"
    assert ShapesModelConfig.from_dict(asdict(TINY)).t5_attention == "positional"
    with pytest.raises(ValueError, match="t5_attention must be one of"):
        ShapesModelConfig(t5_attention="rotary")


def test_fine_tune_converts_a_content_t5_to_positional_and_refuses_the_reverse(tmp_path):
    content_cfg = ShapesModelConfig(**{**asdict(TINY), "t5_attention": "content"})
    parent = assemble_pipeline(content_cfg)
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=1, minutes=0, batch=2, checkpoint_minutes=60.0,
                      init_from=str(tmp_path / "parent"), t5_attention="positional", model=asdict(content_cfg))
    state = torch.load(train(cfg), weights_only=False)
    assert state["config"]["model"]["t5_attention"] == "positional"
    assert not state["t5"]["encoder.block.0.layer.0.SelfAttention.q.weight"].any()
    # Everything but the attention's queries, keys and position bias carried over (one step at lr 6e-4 moves
    # each weight by ~lr at most).
    parent_t5 = parent.text_encoder_2.state_dict()
    assert torch.allclose(state["t5"]["shared.weight"], parent_t5["shared.weight"], atol=1e-2)
    assert "--t5-attention positional" in train_command(state["config"])
    pipe = load_checkpoint_pipeline(tmp_path / "run" / "ckpt.pt")
    export_checkpoint(tmp_path / "run" / "ckpt.pt", tmp_path / "positional")
    assert not pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.k.weight.any()
    back = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "back"), "t5_attention": "content",
                          "init_from": str(tmp_path / "positional")})
    with pytest.raises(ValueError, match="cannot be fine-tuned into content attention"):
        train(back)


def test_bundled_model_tells_apart_prompts_that_bind_attributes_differently(bundled_pipe):
    """The same words bound differently are different prompts: the first bundled model (content-attention T5,
    no text positions) drew "a red circle and a blue square" and "a blue circle and a red square" bit-identically."""
    prompts = ["a red circle and a blue square", "a blue circle and a red square"]
    images = []
    for p in prompts:  # the same noise for both: a fresh generator per prompt
        images.append(bundled_pipe(p, generator=torch.Generator().manual_seed(0), output_type="np", **FAST_CALL).images)
    assert np.abs(images[0] - images[1]).mean() > 0.01
