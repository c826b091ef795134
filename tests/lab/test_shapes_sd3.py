"""The SD3-form shapes model's construction and trainer (``lab/sd3.py``, ``attnscope shapes train-sd3``): the
student starts from the bundled Flux model where the architectures agree, trains, resumes, exports and loads as a
``StableDiffusion3Pipeline``."""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import attnscope
from attnscope.adapters.flux import pack_latents, unpack_latents
from attnscope.adapters.sd3 import patchify
from attnscope.lab.cli import register
from attnscope.lab.export import export_checkpoint
from attnscope.lab.model import build_clip_tokenizer, build_t5_tokenizer
from attnscope.lab.sd3 import (
    SD3ShapesConfig,
    build_clip_encoders,
    build_sd3_scheduler,
    build_sd3_transformer,
    guidance_embedding,
    transfer_from_flux,
)
from attnscope.lab.sd3_train import SD3TrainConfig, load_flux_teacher, train_sd3
from attnscope.profiles import profile_for
from attnscope.shapes import MAX_SEQUENCE_LENGTH, call_kwargs_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher():
    _, transformer, t5, _ = load_flux_teacher("shapes")
    return transformer, t5


def test_the_student_starts_from_the_teachers_weights_where_the_architectures_agree(teacher) -> None:
    flux, t5 = teacher
    cfg = SD3ShapesConfig()
    student = build_sd3_transformer(cfg, t5.config.d_model, 3)
    transfer_from_flux(student, flux)
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # The patch embedding is Flux's packed-token embedding (before SD3 adds its positions).
    embedded = student.pos_embed.proj(latents).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embedded, flux.x_embedder(pack_latents(latents)), rtol=1e-5, atol=1e-5)
    # The output layer writes the same pixels through SD3's un-patchify as Flux's through its unpacking.
    hidden = torch.randn(2, 256, cfg.hidden, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(patchify(unpack_latents(flux.proj_out(hidden), 32, 32), 2), student.proj_out(hidden))
    # The conditioning: timestep embedding plus the frozen pooled constant = the teacher's at guidance 1.
    t = torch.tensor([300.0, 900.0])
    student_conditioning = student.time_text_embed(t, torch.randn(2, 2 * cfg.clip_hidden))
    teacher_conditioning = flux.time_text_embed(t, torch.full((2,), 1000.0),  # Flux scales guidance by 1000
                                                torch.zeros(2, flux.config.pooled_projection_dim))
    torch.testing.assert_close(student_conditioning, teacher_conditioning, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.time_text_embed.text_embedder.linear_2.bias, guidance_embedding(flux, 1.0))
    assert not any(p.requires_grad for p in student.time_text_embed.text_embedder.parameters())
    # Copied blocks are the teacher's; the added ones start as identities on the image stream.
    torch.testing.assert_close(student.transformer_blocks[2].attn.add_k_proj.weight,
                               flux.transformer_blocks[2].attn.add_k_proj.weight)
    gates = student.transformer_blocks[5].norm1.linear.weight.reshape(6, cfg.hidden, -1)
    assert not gates[2].any() and not gates[5].any() and gates[0].any()
    with pytest.raises(ValueError, match="more than 4 joint blocks"):
        transfer_from_flux(build_sd3_transformer(SD3ShapesConfig(joint_layers=4), 128, 3), flux)


def test_the_clip_slots_start_silent_and_train_through_the_pipelines_encode_prompt(teacher) -> None:
    _, t5 = teacher
    cfg = SD3ShapesConfig(joint_layers=5)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    clips = build_clip_encoders(cfg, clip_tokenizer)
    pipe = StableDiffusion3Pipeline(
        transformer=build_sd3_transformer(cfg, t5.config.d_model, 3), scheduler=attnscope.load_pipeline(
            "shapes", progress=False).scheduler, vae=None, text_encoder=clips[0], tokenizer=clip_tokenizer,
        text_encoder_2=clips[1], tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    captions = ["a red circle", "a blue square and a green triangle"]
    embeds = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                max_sequence_length=MAX_SEQUENCE_LENGTH)[0]
    assert embeds.shape == (2, clip_tokenizer.model_max_length + MAX_SEQUENCE_LENGTH, t5.config.d_model)
    assert not embeds[:, : clip_tokenizer.model_max_length].any()  # token embeddings start at zero
    embeds.sum().backward()  # the trainer encodes through the pipeline: the CLIP slots must get a gradient
    for clip in clips:
        assert clip.text_model.embeddings.token_embedding.weight.grad.any()
        assert clip.text_model.embeddings.position_embedding.weight.grad is None  # frozen at zero


def test_train_resume_export_and_load(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = SD3TrainConfig(out=str(out), minutes=0, steps=2, batch=2, log_every=1,
                         model=SD3ShapesConfig(joint_layers=5).to_dict())
    train_sd3(cfg)
    log = (out / "train.log").read_text()
    assert "step 2 loss" in log and "grounding" in log
    first = torch.load(out / "ckpt.pt", weights_only=False)
    assert first["architecture"] == "sd3" and first["step"] == 2
    train_sd3(SD3TrainConfig(out=str(out), minutes=0, steps=3), resume=True)
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["step"] == 3 and state["config"]["batch"] == 2  # the checkpoint's config wins
    assert "resumed at step 2" in (out / "train.log").read_text()
    from_checkpoint = attnscope.load_pipeline(str(out / "ckpt.pt"), progress=False)
    assert isinstance(from_checkpoint, StableDiffusion3Pipeline)
    folder = export_checkpoint(out / "ckpt.pt", tmp_path / "exported")
    # The checkpoint and its export get the SD3-form model's facts (its LoRA reaches the text embedder).
    for trained in (out / "ckpt.pt", folder):
        assert profile_for(str(trained)).erase_defaults == profile_for("shapes-sd3").erase_defaults
    assert "context_embedder" in profile_for(str(folder)).erase_defaults.lora_targets
    pipe = attnscope.load_pipeline(str(folder), progress=False)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    kwargs = call_kwargs_for(pipe) | {"num_inference_steps": 2}
    assert kwargs["guidance_scale"] > 1 and "true_cfg_scale" not in kwargs  # SD3's own CFG
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert image.shape == (1, 32, 32, 3)
    record = (folder / "training.json").read_text()
    assert "attnscope shapes train-sd3" in record and "distilled_from" in record
    # A later run continues from the export (fresh optimizer) and records where it started.
    again = tmp_path / "again"
    train_sd3(SD3TrainConfig(out=str(again), init_from=str(folder), minutes=0, steps=1, batch=2))
    continued = torch.load(again / "ckpt.pt", weights_only=False)
    assert continued["config"]["model"]["joint_layers"] == 5 and continued["parent"]["step"] == 3
    assert "--init-from" in export_checkpoint(again / "ckpt.pt", tmp_path / "again-exported").joinpath(
        "training.json").read_text()


def test_cli_parses_train_sd3() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "train-sd3", "--out", "x", "--minutes", "5", "--grounding", "0.2"])
    assert args.out == "x" and args.minutes == 5 and args.grounding == 0.2 and args.teacher == "shapes"


def test_the_bundled_sd3_model_loads_and_draws_with_sd3s_own_guidance() -> None:
    from attnscope.lab.export import MAX_BUNDLE_BYTES, folder_bytes
    from attnscope.sampling import FlowMatchRenoisingScheduler
    from attnscope.shapes import bundled_path
    from attnscope.shapes.reader import read_scene

    assert folder_bytes(bundled_path("shapes-sd3")) <= MAX_BUNDLE_BYTES
    pipe = attnscope.load_pipeline("shapes-sd3", progress=False)
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchRenoisingScheduler)
    def public(config) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    # It samples with the sampler the lab builds for it (the one its figures were measured with), not its teacher's.
    assert public(pipe.scheduler.config) == public(build_sd3_scheduler().config)
    assert pipe.scheduler.config.shift != attnscope.load_pipeline("shapes", progress=False).scheduler.config.shift
    kwargs = attnscope.profiles.profile_for("shapes-sd3").default_call(pipe)
    assert kwargs == call_kwargs_for(pipe) and kwargs["guidance_scale"] == 4.5
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    unguided = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs | {"guidance_scale": 1.0}).images
    assert abs(image - unguided).mean() > 1e-3, "guidance must act"
    objects = read_scene((image[0] * 255).round().astype("uint8"))
    assert [o.color for o in objects] == ["red"]
