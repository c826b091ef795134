"""Guidance distillation of the shapes model (``attnscope shapes train --distill-from``), on tiny configs."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import pytest
import torch
from diffusers import FluxPipeline

from attnscope.lab.cli import register
from attnscope.lab.export import export_checkpoint
from attnscope.lab.model import MAX_SEQUENCE_LENGTH, ShapesModelConfig, build_t5_tokenizer, encode_text
from attnscope.lab.train import TrainConfig, load_exported, load_teacher, train, train_command
from attnscope.shapes import TRUE_CFG_SCALE, call_kwargs_for

PROMPT = "a red circle and a blue square"


@pytest.fixture
def teacher_folder(tiny_shapes_folder) -> str:
    """An exported tiny model trained on data (no guidance embedding), as a distillation teacher."""
    return tiny_shapes_folder


def _velocity(transformer, x, t, text, guidance=None) -> torch.Tensor:
    b = x.shape[0]
    with torch.no_grad():
        return transformer(
            hidden_states=x, encoder_hidden_states=text, timestep=t, guidance=guidance,
            pooled_projections=torch.zeros(b, transformer.config.pooled_projection_dim),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, 16, 16, x.device, x.dtype),
            txt_ids=torch.zeros(text.shape[1], 3), return_dict=False,
        )[0]


def test_teacher_target_is_true_cfg_and_the_student_starts_as_the_conditional_velocity(teacher_folder,
                                                                                       tiny_shapes_config):
    teacher = load_teacher(teacher_folder, (1.0, 5.0), torch.device("cpu"))
    tokenizer = build_t5_tokenizer()
    x, t = torch.randn(2, 256, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.3])
    captions, w = [PROMPT, "a green box"], torch.tensor([3.5, 1.5])
    with torch.no_grad():
        text, empty = encode_text(tokenizer, teacher.t5, captions), encode_text(tokenizer, teacher.t5, ["", ""])
    conditional = _velocity(teacher.transformer, x, t, text)
    unconditional = _velocity(teacher.transformer, x, t, empty)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 16, 16, x.device, x.dtype)
    target = teacher.velocity(x, t, captions, w, img_ids)
    # Exactly FluxPipeline's true CFG: v("") + w·(v(caption) − v("")), row by row.
    expected = unconditional + w[:, None, None] * (conditional - unconditional)
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(target, conditional, atol=1e-3), "guidance must change the target"

    # The student is the teacher's weights plus a zero guidance embedding: at any guidance scale it starts as the
    # teacher's conditional velocity, so distillation only has to learn what guidance adds.
    student_config = ShapesModelConfig(**{**asdict(tiny_shapes_config), "guidance_embeds": True})
    _, student, _ = load_exported(teacher_folder, student_config)
    assert student.config.guidance_embeds
    for scale in (1.0, 4.0):
        torch.testing.assert_close(_velocity(student, x, t, text, torch.full((2,), scale)), conditional)


def test_distillation_trains_a_guidance_input_that_exports_and_loads(teacher_folder, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "student"), steps=3, minutes=0, batch=2, lr=1e-2, warmup=1,
                      checkpoint_minutes=60.0, distill_from=teacher_folder, distill_guidance=[2.0, 4.0])
    state = torch.load(train(cfg), weights_only=False)
    assert state["config"]["init_from"] == teacher_folder, "a student starts from its teacher"
    assert state["config"]["model"]["guidance_embeds"]
    assert state["parent"]["step"] == 2, "the teacher's record travels with the student"
    assert "distilling the guided velocity" in (tmp_path / "student" / "train.log").read_text()
    command = train_command(state["config"])
    assert f"--distill-from {teacher_folder} --distill-guidance 2,4" in command
    assert "--init-from" not in command and "--vae-steps" not in command, "a student starts from its teacher"

    folder = export_checkpoint(tmp_path / "student" / "ckpt.pt", tmp_path / "export")
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.transformer.config.guidance_embeds
    call = call_kwargs_for(pipe) | {"num_inference_steps": 2}
    assert "true_cfg_scale" not in call, "a distilled model needs one transformer call per step"

    def image(scale: float) -> torch.Tensor:
        kwargs = call | {"guidance_scale": scale}
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images

    # The guidance embedding learned something: the scale now changes the image (it did nothing at the start).
    assert (image(1.0) - image(5.0)).abs().max() > 1e-4
    # A distilled model is no teacher.
    with pytest.raises(ValueError, match="guidance-distilled already"):
        load_teacher(folder, (1.0, 5.0), torch.device("cpu"))


def test_call_kwargs_guide_a_model_without_guidance_embedding_by_true_cfg(teacher_folder):
    pipe = FluxPipeline.from_pretrained(teacher_folder)
    call = call_kwargs_for(pipe, guidance_scale=2.5)
    assert call["true_cfg_scale"] == 2.5 and call["negative_prompt"] == "" and call["guidance_scale"] == 1.0
    assert call_kwargs_for(pipe)["true_cfg_scale"] == TRUE_CFG_SCALE
    assert call["max_sequence_length"] == MAX_SEQUENCE_LENGTH


def test_teacher_refuses_a_bad_guidance_range_and_a_folder_without_record(teacher_folder, tmp_path):
    with pytest.raises(ValueError, match="guidance range"):
        load_teacher(teacher_folder, (4.0, 2.0), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="no training.json"):
        load_teacher(tmp_path, (1.0, 5.0), torch.device("cpu"))


def test_cli_parses_the_distillation_options():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "train", "--distill-from", "teacher", "--distill-guidance", "1.5,4"])
    assert (args.distill_from, args.distill_guidance) == ("teacher", [1.5, 4.0])
    assert parser.parse_args(["shapes", "train"]).distill_guidance == [1.0, 5.0]
    for bad in ("3", "5,1", "a,b"):
        with pytest.raises(SystemExit):
            parser.parse_args(["shapes", "train", "--distill-guidance", bad])
