"""Trainer of the SD3-form shapes model (``attnscope shapes train-sd3``): distillation from a Flux-form shapes model.

The student (``sd3.py``: an SD3 transformer started from the teacher's blocks, and the CLIP slots' token
embeddings) learns what the teacher draws at the teacher's own inputs: scenes rendered on the fly as in
``train.py`` (same per-step seeds, ``BatchStream``), noised to x_t. SD3 is sampled with true classifier-free
guidance, so per row the student gives a conditional and an unconditional velocity (one batch of two) and learns

    v_u + w·(v_c − v_u) ≈ T(x_t, t, caption, w)     and     v_u ≈ T(x_t, t, "", 1)

for w drawn uniformly in ``guidance`` (``T``: the guidance-distilled teacher, which takes w as an input). The
guided term is divided by w², so that every w weighs as a velocity error does. With ``grounding`` > 0 the lab's
token grounding loss (``grounding.py``) pulls each colour and shape word's attention, at both of its SD3 positions
(CLIP and T5), towards its object. EMA, atomic checkpoints every few minutes, SIGINT/SIGTERM and ``--resume`` as
in ``train.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

import attnscope
from attnscope import atomic
from attnscope.adapters.flux import flux_velocity, pack_latents, unpack_latents
from attnscope.adapters.sd3 import sd3_tokens
from attnscope.pipelines import resolve_device
from attnscope.shapes import MAX_SEQUENCE_LENGTH, NATIVE_SIZE, bundled_path

from .grounding import grounding_loss, grounding_targets
from .loop import StepLosses, restore_progress, run_steps
from .model import ShapesModelConfig, build_clip_tokenizer, build_t5_tokenizer, encode_text
from .profile import SD3_ARCHITECTURE
from .sd3 import (
    SD3ShapesConfig,
    assemble_sd3_pipeline,
    build_clip_encoders,
    build_sd3_transformer,
    transfer_from_flux,
)
from .train import BatchStream, _image_ids, images_to_tensor, load_exported, noise_levels


@dataclass
class SD3TrainConfig:
    """Hyper-parameters of ``attnscope shapes train-sd3``; recorded in every checkpoint."""

    out: str = "runs/shapes-sd3"
    teacher: str = "shapes"  # a guidance-distilled Flux shapes folder; "shapes": the bundled model
    # An exported SD3 shapes folder to continue from ("shapes-sd3": the bundled one) instead of the teacher's blocks.
    init_from: str | None = None
    seed: int = 0
    minutes: float = 60.0
    steps: int = 0  # 0: limited by minutes only
    batch: int = 16
    lr: float = 3e-4
    warmup: int = 100
    cooldown: float = 0.15
    ema_decay: float = 0.998
    guidance: list[float] = field(default_factory=lambda: [1.0, 5.0])
    # A share of noise levels drawn uniformly: the layout forms at high noise, where logit-normal draws little.
    uniform_t: float = 0.5
    grounding: float = 0.1
    checkpoint_minutes: float = 4.0
    log_every: int = 25
    threads: int = 1
    device: str = "cpu"
    workers: int = 0
    caption_dropout: float = 0.0  # every row trains the unconditional velocity already
    size: int = NATIVE_SIZE
    model: dict = field(default_factory=lambda: SD3ShapesConfig().to_dict())


def teacher_folder(teacher: str) -> Path:
    return bundled_path() if teacher == "shapes" else Path(teacher)


def load_flux_teacher(teacher: str):
    """``(vae, transformer, t5, record)`` of a guidance-distilled Flux shapes folder, frozen."""
    folder = teacher_folder(teacher)
    record_path = folder / "training.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{folder} has no training.json: not an exported shapes model")
    record = json.loads(record_path.read_text())
    mcfg = ShapesModelConfig.from_dict(record["config"]["model"])
    if not mcfg.guidance_embeds:
        raise ValueError(f"{folder}: the teacher must be guidance-distilled (take the guidance scale as an input)")
    vae, transformer, t5 = load_exported(folder, mcfg)
    for module in (vae, transformer, t5):
        module.eval().requires_grad_(False)
    return vae, transformer, t5, record


def train_sd3(cfg: SD3TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) the distillation; returns the checkpoint path."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    log_file = open(out / "train.log", "a", buffering=1)

    def log(msg: str) -> None:
        log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}\n")

    state = torch.load(ckpt_path, weights_only=False, map_location="cpu") if resume and ckpt_path.exists() else None
    if state is not None:
        given = {k: getattr(cfg, k) for k in ("out", "minutes", "steps", "threads", "device", "workers")}
        cfg = SD3TrainConfig(**{**state["config"], **given})
    else:
        log(f"start: {json.dumps(cfg.__dict__)}")
    vae, teacher, t5, record = load_flux_teacher(cfg.teacher)
    t5_tokenizer, clip_tokenizer = build_t5_tokenizer(), build_clip_tokenizer()
    if state is None and cfg.init_from:  # a continued model keeps its sizes
        parent_record = exported_sd3_folder(cfg.init_from) / "training.json"
        if parent_record.is_file():
            cfg.model = json.loads(parent_record.read_text())["config"]["model"]
    mcfg = SD3ShapesConfig(**cfg.model)
    torch.manual_seed(cfg.seed)
    student = build_sd3_transformer(mcfg, t5.config.d_model, vae.config.latent_channels)
    clips = build_clip_encoders(mcfg, clip_tokenizer)
    parent = state.get("parent") if state is not None else None
    if state is None and cfg.init_from:
        parent = load_exported_sd3(cfg.init_from, student, clips)
        log(f"initialized from {cfg.init_from}")
    elif state is None:
        transfer_from_flux(student, teacher)
    else:
        student.load_state_dict(state["transformer"])
        for clip, weights in zip(clips, state["clips"]):
            clip.load_state_dict(weights)
    for module in (vae, teacher, t5, student, *clips):
        module.to(device)
    # The student as the pipeline it becomes: its encode_prompt (differentiable in the CLIP slots; the T5 is frozen)
    # and its text layout (sd3_tokens) are what training sees.
    pipe = assemble_sd3_pipeline(mcfg, student, clips, t5, t5_tokenizer, vae)
    text_length = pipe.tokenizer_max_length + MAX_SEQUENCE_LENGTH

    trained = _trained_modules(student, clips)
    params = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in _trainable_state(trained).items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    progress, ema = restore_progress(state, opt, ema, gen, log)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    low, high = cfg.guidance

    def save() -> None:
        atomic.torch_save({
            "architecture": SD3_ARCHITECTURE, "config": cfg.__dict__, "teacher_record": record,
            "transformer": student.state_dict(), "clips": [clip.state_dict() for clip in clips], "ema": ema,
            "opt": opt.state_dict(), "gen": gen.get_state(), "step": progress.step, "elapsed": progress.elapsed,
            "parent": parent,
        }, ckpt_path)
        log(f"checkpoint step {progress.step} ({progress.elapsed / 60:.1f} min)")

    def losses(scenes, captions) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(captions)
        with torch.no_grad():
            latents = (vae.encode(images_to_tensor([s.image for s in scenes]).to(device)).latent_dist.mode()
                       - shift) * scale
        t = noise_levels(b, gen, cfg.uniform_t)
        noise = torch.randn(latents.shape, generator=gen)
        w = low + (high - low) * torch.rand(b, generator=gen)
        t, noise, w = t.to(device), noise.to(device), w.to(device)
        x_t = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
        both_t = torch.cat([t, t])
        with torch.no_grad():
            text = encode_text(t5_tokenizer, t5, [*captions, *[""] * b])
            packed = pack_latents(x_t)
            target = flux_velocity(
                teacher, torch.cat([packed, packed]), both_t, text,
                torch.zeros(2 * b, teacher.config.pooled_projection_dim, device=device),
                torch.zeros(text.shape[1], 3, device=device), _image_ids(x_t), torch.cat([w, torch.ones_like(w)]),
            )
            guided_target, unconditional_target = unpack_latents(target, cfg.size, cfg.size).chunk(2)
        embeds = pipe.encode_prompt([*captions, *[""] * b], None, None, device=device,
                                    do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)[0]
        targets = None
        if cfg.grounding:
            targets = grounding_targets(scenes, [sd3_tokens(pipe, c, text_length) if c else None
                                                 for c in captions])

        def student_velocity() -> torch.Tensor:
            return student(
                hidden_states=torch.cat([x_t, x_t]), encoder_hidden_states=embeds, timestep=both_t * 1000,
                pooled_projections=torch.zeros(2 * b, student.config.pooled_projection_dim, device=device),
            ).sample

        ground = torch.zeros((), device=device)
        if targets is None:
            velocity = student_velocity()
        else:
            with attnscope.trace(student, differentiable=True, positions=targets.positions, layers="double") as tracer:
                velocity = student_velocity()
            ground = grounding_loss(list(tracer.take()[-1].values()), targets)
        conditional, unconditional = velocity.chunk(2)
        guided = unconditional + w[:, None, None, None] * (conditional - unconditional)
        guided_error = (guided - guided_target).pow(2).mean(dim=(1, 2, 3)) / w.pow(2)
        flow = guided_error.mean() + F.mse_loss(unconditional, unconditional_target)
        return flow, ground

    for module in trained.values():
        module.train()

    def step_losses(_: int) -> StepLosses:
        flow, ground = losses(*stream.next())
        return flow + cfg.grounding * ground, flow, ground

    try:
        with BatchStream(cfg, progress.step) as stream:
            run_steps(cfg, progress, opt=opt, params=params, ema=ema, weights=lambda: _trainable_state(trained),
                      losses=step_losses, save=save, log=log, desc="shapes-sd3",
                      second="grounding" if cfg.grounding else None)
    finally:
        log_file.close()
    return ckpt_path


def exported_sd3_folder(folder: str) -> Path:
    path = bundled_path("shapes-sd3") if folder == "shapes-sd3" else Path(folder)
    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"{path} is not an exported SD3 shapes model: no transformer folder")
    return path


def load_exported_sd3(folder: str, student: SD3Transformer2DModel, clips) -> dict | None:
    """Load an exported SD3 shapes folder's transformer and CLIP encoders into modules built for its sizes (so the
    frozen parts stay frozen); returns its record (``training.json``), which travels into the export."""
    from transformers import CLIPTextModelWithProjection

    path = exported_sd3_folder(folder)
    loaded = [SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")]
    loaded += [CLIPTextModelWithProjection.from_pretrained(path, subfolder=sub)
               for sub in ("text_encoder", "text_encoder_2")]
    for module, source in zip((student, *clips), loaded):
        try:
            module.load_state_dict(source.state_dict())
        except RuntimeError as err:
            raise ValueError(f"{path} does not match the SD3 shapes config: {err}") from None
    record = path / "training.json"
    return json.loads(record.read_text()) if record.is_file() else None


def _trained_modules(student: SD3Transformer2DModel, clips) -> dict[str, torch.nn.Module]:
    return {"transformer": student, "clip": clips[0], "clip_2": clips[1]}


def _trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Float weights of the trained modules under their names (live tensors)."""
    state = {}
    for prefix, module in modules.items():
        state |= {f"{prefix}.{k}": v.data for k, v in module.state_dict(keep_vars=True).items()
                  if v.dtype.is_floating_point}
    return state


def train_sd3_command(cfg: dict) -> str:
    """The command line of a checkpoint's config (options at their defaults omitted)."""
    default = SD3TrainConfig().__dict__
    command = f"attnscope shapes train-sd3 --out {cfg['out']} --minutes {cfg['minutes']:g}"
    for name in ("teacher", "init_from", "seed", "steps", "batch", "lr", "uniform_t", "grounding", "threads"):
        if cfg.get(name) != default[name]:
            command += f" --{name.replace('_', '-')} {cfg[name]:g}" if isinstance(cfg[name], float) else \
                f" --{name.replace('_', '-')} {cfg[name]}"
    return command


def load_sd3_checkpoint_pipeline(ckpt_path: str | Path, use_ema: bool = True) -> StableDiffusion3Pipeline:
    """The StableDiffusion3Pipeline of a ``train-sd3`` checkpoint (EMA weights by default)."""
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    cfg = SD3TrainConfig(**state["config"])
    vae, _, t5, _ = load_flux_teacher(cfg.teacher)
    mcfg = SD3ShapesConfig(**cfg.model)
    student = build_sd3_transformer(mcfg, t5.config.d_model, vae.config.latent_channels)
    clips = build_clip_encoders(mcfg, build_clip_tokenizer())
    student.load_state_dict(state["transformer"])
    for clip, weights in zip(clips, state["clips"]):
        clip.load_state_dict(weights)
    if use_ema:
        for prefix, module in _trained_modules(student, clips).items():
            ema = {k[len(prefix) + 1:]: v for k, v in state["ema"].items() if k.startswith(prefix + ".")}
            module.load_state_dict(ema, strict=False)
    return assemble_sd3_pipeline(mcfg, student, clips, t5, build_t5_tokenizer(), vae)


__all__ = ["SD3TrainConfig", "load_sd3_checkpoint_pipeline", "train_sd3", "train_sd3_command"]
