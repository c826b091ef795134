"""Trainer of the bundled shapes model (``attnscope shapes train``).

Two stages, both on scenes rendered on the fly:

1. VAE (a few hundred steps, < 2 min): the one-level AutoencoderKL learns the identity on rendered images, so
   the latent space is pixel space; ``shift_factor``/``scaling_factor`` normalize it to zero mean, unit variance.
2. Transformer + T5 (rectified flow, until ``--minutes`` or ``--steps`` run out): x_t = (1 − t)·x0 + t·ε with
   t ~ logit-normal(0, 1) (a fraction ``uniform_t`` drawn uniformly instead), target ε − x0, a fraction
   ``caption_dropout`` of captions emptied (for
   classifier-free guidance), AdamW at constant LR after a warm-up and before a cool-down over the
   last 15 % of the time budget, and an EMA of the weights that is what gets exported. Constant LR + EMA keeps
   every intermediate checkpoint usable. With ``grounding`` > 0, the token grounding loss (``grounding.py``) on
   the captured attention of ``grounding_layers`` is added with that weight, on the rows whose noise level is at
   most ``grounding_max_t``.

``--init-from FOLDER`` starts stage 2 from the weights of an exported model (e.g. the bundled one) instead of
training the VAE and a fresh transformer: a fine-tune with a fresh optimizer. ``--distill-from TEACHER`` makes
the fine-tune a guidance distillation (``distill.py``): the target is the teacher's guided velocity instead of
ε − x0, and the student gets a guidance embedding (it starts from the teacher unless ``--init-from`` is given).
``--preference FILE`` makes the fine-tune a preference fine-tune (``preference.py``): the batches are pairs of
the starting model's own samples, one judged right and one wrong, and the loss is Diffusion-DPO against a frozen
copy of the starting model.

Step ``n``'s batch is rendered from its own seed ``(seed, 2, n)``, so the data stream does not depend on where it
is rendered: ``--workers N`` renders batches ahead in N processes (what a GPU run needs to be fed) and gives the
weights an inline run gives. ``--device cuda`` trains on a GPU; the noise draws stay on the CPU generator.

Checkpoints (``OUT/ckpt.pt``: weights, EMA, optimizer, RNG, step, wall time) are written to a temporary file and
renamed, so a kill at any moment leaves the previous checkpoint intact; ``--resume`` continues from it with the
same data stream. Progress goes to a tqdm bar and, one line per ``--log-every`` steps, to ``OUT/train.log``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from tqdm import tqdm
from transformers import T5EncoderModel, T5Tokenizer

import attnscope
from attnscope import atomic
from attnscope.adapters.flux import flux_velocity, latent_image_ids, pack_latents
from attnscope.pipelines import resolve_device
from attnscope.shapes.render import NATIVE_SIZE, Scene, render_scene
from attnscope.tokens import t5_tokens

from .distill import DEFAULT_GUIDANCE_RANGE, GuidanceTeacher
from .grounding import grounding_loss, grounding_targets
from .loop import StepLosses, restore_progress, run_steps
from .model import (
    MAX_SEQUENCE_LENGTH,
    ShapesModelConfig,
    assemble_pipeline,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_text_encoders,
    build_transformer,
    build_vae,
    encode_text,
    grown_double_stream,
    is_attention_positional,
    make_attention_positional,
)
from .preference import DEFAULT_BETA, PreferenceSet, model_digest, preference_loss
from .profile import SD3_ARCHITECTURE, checkpoint_architecture

DEFAULT_CAPTION_DROPOUT = 0.1
#: ``ShapesModelConfig`` fields a new run can set from the command line (``--t5-layers 3`` ...).
SIZE_OPTIONS: tuple[str, ...] = ("hidden_heads", "head_dim", "double_layers", "single_layers", "t5_layers", "t5_d_ff")


@dataclass
class TrainConfig:
    """Hyper-parameters of ``attnscope shapes train``; recorded in every checkpoint."""

    out: str = "runs/shapes-train"
    seed: int = 0
    minutes: float = 120.0
    steps: int = 0  # 0: limited by minutes only
    batch: int = 16
    lr: float = 6e-4
    warmup: int = 200
    cooldown: float = 0.15  # last fraction of the time budget: LR decays linearly to 5 %
    ema_decay: float = 0.999
    vae_steps: int = 500
    checkpoint_minutes: float = 4.0
    log_every: int = 25
    threads: int = 1
    device: str = "cpu"  # where the models train; the data is rendered on the CPU
    workers: int = 0  # processes rendering batches ahead (0: in the training process)
    # Fraction of captions replaced by the empty prompt, so that the model also learns the unconditional velocity
    # that classifier-free guidance needs. None: DEFAULT_CAPTION_DROPOUT for a new run, unchanged on --resume.
    caption_dropout: float | None = None
    # Fraction of noise levels drawn uniformly in [0, 1] instead of logit-normal. Logit-normal(0, 1) puts 1.4 % of
    # its mass above t = 0.9, where the sampler decides the layout (how many objects, where); a tiny model trained
    # on it draws extra objects. None: 0 for a new run, unchanged on --resume.
    uniform_t: float | None = None
    # Weight of the token grounding loss (grounding.py). None: 0 for a new run, unchanged on --resume.
    grounding: float | None = None
    grounding_layers: str = "double"  # a trace layer selector: "double", "single" or "all"
    # Supervise only rows with noise level t ≤ this: at high noise the layout is not yet in x_t, so no map can
    # find the object (the grounding KL rises steeply with t; see benchmarks/RESULTS.md).
    grounding_max_t: float = 1.0
    init_from: str | None = None  # an exported model folder to fine-tune (skips stage 1)
    # Double-stream blocks appended to the fine-tune's parent, starting as the identity (model.grown_double_stream).
    grow_double: int = 0
    # An exported model sampled with true CFG whose guided velocity the run learns (distill.py); None: ε − x0.
    distill_from: str | None = None
    distill_guidance: list[float] = field(default_factory=lambda: list(DEFAULT_GUIDANCE_RANGE))
    # A preference set (preference.py) of the init_from model's own samples: the run learns from its pairs
    # (Diffusion-DPO with weight preference_beta, plus preference_sft × flow matching on the right images).
    preference: str | None = None
    preference_beta: float = DEFAULT_BETA
    preference_sft: float = 0.0
    # Noise levels of the pairs are squeezed into [preference_min_t, 1]: a count is decided at high noise, while
    # at low noise x_t already holds the layout and the pair differs only in details the model draws right.
    preference_min_t: float = 0.0
    # The T5 attention kind asked for (model.py): sets ``model["t5_attention"]`` of a new run, and converts a
    # fine-tune's content-attention parent to "positional". None: ``model``'s for a new run, the parent's for a
    # fine-tune.
    t5_attention: str | None = None
    size: int = NATIVE_SIZE
    model: dict = field(default_factory=lambda: ShapesModelConfig().to_dict())


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 images -> (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def render_batch(rng: np.random.Generator, batch: int, size: int) -> torch.Tensor:
    """(B, 3, size, size) images in [-1, 1] of random scenes, for the VAE stage (its own sequential stream)."""
    return images_to_tensor([render_scene(rng, size=size).image for _ in range(batch)])


def training_batch(
    seed: int, step: int, batch: int, size: int, caption_dropout: float
) -> tuple[list[Scene], list[str]]:
    """Step ``step``'s scenes and captions (a fraction ``caption_dropout`` emptied), from the step's own seed."""
    rng = np.random.default_rng([seed, 2, step])
    scenes = [render_scene(rng, size=size) for _ in range(batch)]
    captions = [s.caption for s in scenes]
    if caption_dropout:
        drop = rng.random(batch) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
    return scenes, captions


class BatchStream:
    """``training_batch`` for steps ``start, start + 1, ...``, rendered ahead by ``workers`` processes (none: in
    this process). A context manager: the processes end on exit."""

    def __init__(self, cfg: TrainConfig, start: int):
        self._args = (cfg.seed, cfg.batch, cfg.size, cfg.caption_dropout or 0.0)
        self._next = start
        self._ahead = 2 * cfg.workers
        self._pending: deque = deque()
        # spawn, not fork: forking a process that already runs torch threads can deadlock the child.
        self._pool = multiprocessing.get_context("spawn").Pool(cfg.workers) if cfg.workers > 0 else None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def _claim_step(self) -> tuple:
        """``training_batch`` arguments of the next step not yet handed out."""
        seed, batch, size, dropout = self._args
        step, self._next = self._next, self._next + 1
        return seed, step, batch, size, dropout

    def next(self) -> tuple[list[Scene], list[str]]:
        if self._pool is None:
            return training_batch(*self._claim_step())
        while len(self._pending) < self._ahead:
            self._pending.append(self._pool.apply_async(training_batch, self._claim_step()))
        return self._pending.popleft().get()


#: State-dict prefix of the guidance embedding of a guidance-distilled transformer.
GUIDANCE_EMBEDDER = "time_text_embed.guidance_embedder."


def load_exported(
    folder: str | Path, mcfg: ShapesModelConfig
) -> tuple[AutoencoderKL, FluxTransformer2DModel, T5EncoderModel]:
    """The VAE, transformer and T5 of an exported model folder, in modules built for ``mcfg`` (so the frozen
    zero pooled path stays frozen)."""
    folder = Path(folder)
    missing = [sub for sub in ("vae", "transformer", "text_encoder_2") if not (folder / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an exported shapes model: no {', '.join(missing)} folder")
    # Fresh modules take the loaded weights, so the folder's loading metadata (``_name_or_path``) stays behind.
    loaded_vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    loaded_t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")
    positional = is_attention_positional(loaded_t5)
    if positional and mcfg.t5_attention == "content":
        raise ValueError(f"{folder} has a positional T5 (zero query/key weights, which never receive a gradient): "
                         "it cannot be fine-tuned into content attention")
    vae = build_vae(mcfg)
    vae.load_state_dict(loaded_vae.state_dict())
    vae.register_to_config(**{k: loaded_vae.config[k] for k in ("shift_factor", "scaling_factor")})
    vae.eval()
    transformer = build_transformer(mcfg)
    _, t5 = build_text_encoders(mcfg, build_t5_tokenizer(), build_clip_tokenizer())
    loaded_transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    for module, sub, loaded in ((transformer, "transformer", loaded_transformer), (t5, "text_encoder_2", loaded_t5)):
        weights = loaded.state_dict()
        if module is transformer and mcfg.double_layers > loaded.config.num_layers:
            weights = grown_double_stream(weights, loaded.config.num_layers, mcfg.double_layers)
        if module is transformer and mcfg.guidance_embeds and not loaded.config.guidance_embeds:
            # A distillation student: its guidance embedding is new and keeps the zero start build_transformer gave it.
            weights |= {k: v for k, v in transformer.state_dict().items() if k.startswith(GUIDANCE_EMBEDDER)}
        try:
            module.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"{folder / sub} does not match the model config {mcfg.to_dict()}: {err}") from None
    if mcfg.t5_attention == "positional" and not positional:
        # Conversion: embeddings, values, outputs and feed-forward carry over; the content attention is replaced.
        make_attention_positional(t5)
    return vae, transformer, t5


def load_teacher(folder: str | Path, guidance_range: tuple[float, float], device: torch.device) -> GuidanceTeacher:
    """The exported model in ``folder`` as a frozen distillation teacher (sizes, and whether it is distilled
    already, from its ``training.json``)."""
    record = Path(folder) / "training.json"
    if not record.is_file():
        raise FileNotFoundError(f"{folder} has no training.json: the teacher's sizes are unknown")
    mcfg = ShapesModelConfig.from_dict(json.loads(record.read_text())["config"]["model"])
    _, transformer, t5 = load_exported(folder, mcfg)
    return GuidanceTeacher(transformer.to(device), t5.to(device), build_t5_tokenizer(), guidance_range)


def train_vae(cfg: TrainConfig, log, device: torch.device | str = "cpu") -> AutoencoderKL:
    """Stage 1: teach the one-level VAE the identity; set shift/scaling factors from latent statistics."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    vae = build_vae(ShapesModelConfig.from_dict(cfg.model)).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in tqdm(range(cfg.vae_steps), desc="vae", mininterval=5):
        x = render_batch(rng, 16, cfg.size).to(device)
        z = vae.encode(x).latent_dist.mode()
        # The decoder also sees slightly perturbed pixels, as generated latents are never exactly clean.
        noisy = x + 0.05 * torch.randn_like(x)
        loss = F.mse_loss(z, x) + F.mse_loss(vae.decode(noisy).sample, x) + F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        x = render_batch(rng, 256, cfg.size).to(device)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"vae done: recon mse {F.mse_loss(recon, x).item():.6f}, shift {shift:.4f}, scale {scale:.4f}")
    return vae


def noise_levels(batch: int, gen: torch.Generator, uniform_t: float = 0.0) -> torch.Tensor:
    """Training noise levels ``(batch,)``: logit-normal(0, 1) (most weight on mid noise levels), or with
    probability ``uniform_t`` uniform in [0, 1]."""
    t = torch.sigmoid(torch.randn(batch, generator=gen))
    if uniform_t > 0:  # only then draw more numbers, so that runs without it keep their data stream
        uniform = torch.rand(batch, generator=gen) < uniform_t
        t = torch.where(uniform, torch.rand(batch, generator=gen), t)
    return t


def flow_loss(
    transformer: FluxTransformer2DModel,
    t5: T5EncoderModel,
    tokenizer: T5Tokenizer,
    latents: torch.Tensor,
    captions: list[str],
    gen: torch.Generator,
    uniform_t: float = 0.0,
    t: torch.Tensor | None = None,
    teacher: GuidanceTeacher | None = None,
) -> torch.Tensor:
    """Rectified-flow loss on normalized latents (B, C, H, W): MSE between v_θ(x_t, t) and ε − x0, or with a
    ``teacher``, between v_θ(x_t, t, w) and the teacher's velocity guided by w (drawn per row; ``distill.py``).
    A guidance-distilled transformer trained on data without a teacher gets w = 1 (ε − x0 is the unguided velocity).

    ``t``: the rows' noise levels; drawn by ``noise_levels(B, gen, uniform_t)`` when None. ``gen`` is a CPU
    generator whatever the device, so a run draws the same noise on every device.
    """
    b = latents.shape[0]
    if t is None:
        t = noise_levels(b, gen, uniform_t)
    noise = torch.randn(latents.shape, generator=gen)
    t, noise = t.to(latents.device), noise.to(latents.device)
    x_t = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
    guidance = None
    if teacher is not None:
        guidance = teacher.draw_guidance(b, gen).to(latents.device)
    elif transformer.config.guidance_embeds:
        # A distilled model fine-tuned on data: ε − x0 is the unguided velocity, the one at guidance scale 1.
        guidance = torch.ones(b, device=latents.device)
    pred = predict_velocity(transformer, t5, tokenizer, x_t, t, captions, guidance)
    if teacher is None:
        target = pack_latents(noise - latents)
    else:
        target = teacher.velocity(pack_latents(x_t), t, captions, guidance, _image_ids(x_t))
    return F.mse_loss(pred, target)


def _image_ids(latents: torch.Tensor) -> torch.Tensor:
    """The position ids ``(H/2 · W/2, 3)`` of the packed tokens of latents ``(B, C, H, W)``."""
    return latent_image_ids(*latents.shape[-2:], latents.device, latents.dtype)


def predict_velocity(
    transformer: FluxTransformer2DModel,
    t5: T5EncoderModel,
    tokenizer: T5Tokenizer,
    x_t: torch.Tensor,
    t: torch.Tensor,
    captions: list[str],
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's packed velocity ``(B, N, 4C)`` at noisy latents ``x_t (B, C, H, W)`` and noise levels
    ``t (B,)``: the captions encoded by the trained T5, the pooled text at zero (``model.py``), ``guidance (B,)``
    for a guidance-distilled model; one call as ``FluxPipeline`` makes it (``attnscope.adapters.flux``)."""
    text = encode_text(tokenizer, t5, captions)
    pooled = torch.zeros(len(x_t), transformer.config.pooled_projection_dim, device=x_t.device)
    text_ids = torch.zeros(text.shape[1], 3, device=x_t.device)
    return flux_velocity(transformer, pack_latents(x_t), t, text, pooled, text_ids, _image_ids(x_t), guidance)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training; returns the checkpoint path. See the module docstring."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    log_file = open(out / "train.log", "a", buffering=1)

    def log(msg: str) -> None:
        log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}\n")

    tokenizer = build_t5_tokenizer()
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu") if resume and ckpt_path.exists() else None
    if resume and state is None:
        log(f"--resume given but no {ckpt_path}: starting fresh")
    if state is not None:
        # Checkpoints from before these options existed trained without them; given options change them from here.
        saved = {"caption_dropout": 0.0, "uniform_t": 0.0, "grounding": 0.0, **state["config"]}
        changed = {}
        for name in ("caption_dropout", "uniform_t", "grounding"):
            value = getattr(cfg, name)
            changed[name] = saved[name] if value is None else value
            if changed[name] != saved[name]:
                log(f"{name} changed from {saved[name]} to {changed[name]} at step {state['step']}")
        # Budgets and the machine's settings come from this call; everything else from the checkpoint.
        given = {k: getattr(cfg, k) for k in ("out", "minutes", "steps", "threads", "device", "workers")}
        cfg = TrainConfig(**{**saved, **given, **changed})
        vae = AutoencoderKL.from_config(state["vae_config"])
        vae.load_state_dict(state["vae"])
    else:
        if cfg.caption_dropout is None:
            cfg.caption_dropout = DEFAULT_CAPTION_DROPOUT
        if cfg.uniform_t is None:
            cfg.uniform_t = 0.0
        if cfg.grounding is None:
            cfg.grounding = 0.0
        if cfg.distill_from and not cfg.init_from:
            cfg.init_from = cfg.distill_from  # a student starts as its teacher
        if cfg.grow_double and not cfg.init_from:
            raise ValueError("grow_double grows the model a fine-tune starts from (init_from); a new run sets "
                             "double_layers")
        if cfg.preference:
            _check_preference_options(cfg)
        log(f"start: {json.dumps(cfg.__dict__)}")
        vae = None if cfg.init_from else train_vae(cfg, log, device)

    # The record of the model a fine-tune started from travels with its checkpoints into the export.
    parent = state.get("parent") if state is not None else None
    fine_tune = state is None and cfg.init_from
    if fine_tune:
        record = Path(cfg.init_from) / "training.json"
        parent = json.loads(record.read_text()) if record.exists() else None
        if parent is not None:  # a fine-tune keeps the sizes of the model it starts from
            cfg.model = ShapesModelConfig.from_dict(parent["config"]["model"]).to_dict()
        cfg.model["double_layers"] += cfg.grow_double
    if state is None and cfg.t5_attention is not None:
        cfg.model["t5_attention"] = cfg.t5_attention
    if state is None and cfg.distill_from:
        cfg.model["guidance_embeds"] = True
    mcfg = ShapesModelConfig.from_dict(cfg.model)  # after resuming: the checkpoint's model config wins
    torch.manual_seed(cfg.seed)
    if fine_tune:
        vae, transformer, t5 = load_exported(cfg.init_from, mcfg)
        log(f"initialized from {cfg.init_from}")
    else:  # a new run, or a resumed one (its checkpoint's weights are loaded below)
        transformer = build_transformer(mcfg)
        _, t5 = build_text_encoders(mcfg, tokenizer, build_clip_tokenizer())
    if state is not None:  # loaded before the optimizer exists, so its state follows the weights' device
        transformer.load_state_dict(state["transformer"])
        t5.load_state_dict(state["t5"])
    for module in (vae, transformer, t5):
        module.to(device)
    teacher = None
    if cfg.distill_from:
        teacher = load_teacher(cfg.distill_from, tuple(cfg.distill_guidance), device)
        log(f"distilling the guided velocity of {cfg.distill_from} (guidance {cfg.distill_guidance})")
    preferences = reference = None
    if cfg.preference:
        preferences = PreferenceSet.load(cfg.preference)
        if fine_tune and preferences.model_digest != model_digest(cfg.init_from):
            raise ValueError(f"{cfg.preference} holds samples of {preferences.model} (other weights than "
                             f"{cfg.init_from}): a preference fine-tune learns from the starting model's own samples")
        # The reference is the model the run started from, frozen: on --resume it is loaded again from there.
        _, *reference = load_exported(cfg.init_from, mcfg)
        for module in reference:
            module.to(device).eval().requires_grad_(False)
        log(f"preference fine-tune on {cfg.preference}: {json.dumps(preferences.summary())}")
    params = [p for p in [*transformer.parameters(), *t5.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in _trainable_state(transformer, t5).items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    progress, ema = restore_progress(state, opt, ema, gen, log)
    if state is not None and "rng" in state:
        log("checkpoint from before per-step batch seeds: the data stream changes from here")

    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def save() -> None:
        atomic.torch_save(
            {
                "config": cfg.__dict__,
                "vae_config": dict(vae.config),
                "vae": vae.state_dict(),
                "transformer": transformer.state_dict(),
                "t5": t5.state_dict(),
                "ema": ema,
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "step": progress.step,
                "elapsed": progress.elapsed,
                "parent": parent,
            },
            ckpt_path,
        )
        log(f"checkpoint step {progress.step} ({progress.elapsed / 60:.1f} min)")

    def encode(images: list[np.ndarray]) -> torch.Tensor:
        """Normalized latents of (H, W, 3) uint8 images."""
        with torch.no_grad():
            return (vae.encode(images_to_tensor(images).to(device)).latent_dist.mode() - shift) * scale

    def data_losses(scenes: list[Scene], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow (or distillation) loss and grounding loss of a batch of rendered scenes."""
        latents = encode([s.image for s in scenes])
        t = noise_levels(len(captions), gen, cfg.uniform_t)
        targets = None
        if cfg.grounding:
            # Rows with a dropped caption or above grounding_max_t have nothing to supervise.
            tokens = [t5_tokens(tokenizer, c, MAX_SEQUENCE_LENGTH) if c and t_row <= cfg.grounding_max_t
                      else None for c, t_row in zip(captions, t.tolist())]
            targets = grounding_targets(scenes, tokens)
        if targets is None:
            flow = flow_loss(transformer, t5, tokenizer, latents, captions, gen, t=t, teacher=teacher)
            return flow, torch.zeros((), device=device)
        with attnscope.trace(transformer, differentiable=True, positions=targets.positions,
                             layers=cfg.grounding_layers) as tracer:
            flow = flow_loss(transformer, t5, tokenizer, latents, captions, gen, t=t, teacher=teacher)
        return flow, grounding_loss(list(tracer.take()[-1].values()), targets)

    def preference_losses(at_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Preference loss of the step's pairs, and the share of them the model prefers more than the reference."""
        winners, losers, captions = preferences.batch(cfg.seed, at_step, cfg.batch // 2)
        winners, losers = encode(list(winners)), encode(list(losers))
        t = cfg.preference_min_t + (1 - cfg.preference_min_t) * noise_levels(len(captions), gen, cfg.uniform_t)
        noise = torch.randn(winners.shape, generator=gen)
        errors = _velocity_errors(transformer, t5, reference, tokenizer, captions, preferences.guidance_scale)
        return preference_loss(errors, winners, losers, t.to(device), noise.to(device), cfg.preference_beta,
                               cfg.preference_sft)

    def step_losses(at_step: int) -> StepLosses:
        if preferences is None:
            flow, ground = data_losses(*stream.next())
            return flow + cfg.grounding * ground, flow, ground
        loss, preferred = preference_losses(at_step)
        return loss, loss, preferred

    transformer.train()
    t5.train()
    try:
        with BatchStream(cfg, progress.step) as stream:
            run_steps(
                cfg, progress, opt=opt, params=params, ema=ema, weights=lambda: _trainable_state(transformer, t5),
                losses=step_losses, save=save, log=log, desc="shapes",
                # the second number of a log line: the grounding loss, or a preference run's share of preferred pairs
                second="preferred" if preferences is not None else "grounding" if cfg.grounding else None,
            )
    finally:
        log_file.close()
    return ckpt_path


def train_command(cfg: dict) -> str:
    """The ``attnscope shapes train`` command line of a checkpoint's config (options at their defaults omitted)."""
    command = (
        f"attnscope shapes train --out {cfg['out']} --minutes {cfg['minutes']:g} --seed {cfg['seed']} "
        f"--batch {cfg['batch']} --lr {cfg['lr']:g} --threads {cfg['threads']}"
    )
    if cfg.get("steps"):
        command += f" --steps {cfg['steps']}"
    if cfg.get("init_from"):
        if cfg["init_from"] != cfg.get("distill_from"):  # a student starts as its teacher unless told otherwise
            command += f" --init-from {cfg['init_from']}"
        if cfg.get("t5_attention"):
            command += f" --t5-attention {cfg['t5_attention']}"
        if cfg.get("grow_double"):
            command += f" --grow-double {cfg['grow_double']}"
    else:
        command += f" --vae-steps {cfg['vae_steps']}"
        default = ShapesModelConfig().to_dict()
        model = ShapesModelConfig.from_dict(cfg["model"]).to_dict()
        for name in (*SIZE_OPTIONS, "t5_attention"):
            if model[name] != default[name]:
                command += f" --{name.replace('_', '-')} {model[name]}"
    if cfg.get("distill_from"):
        command += f" --distill-from {cfg['distill_from']}"
        low, high = cfg.get("distill_guidance", DEFAULT_GUIDANCE_RANGE)
        if (low, high) != DEFAULT_GUIDANCE_RANGE:
            command += f" --distill-guidance {low:g},{high:g}"
    if cfg.get("preference"):
        command += f" --preference {cfg['preference']}"
        if cfg.get("preference_beta", DEFAULT_BETA) != DEFAULT_BETA:
            command += f" --preference-beta {cfg['preference_beta']:g}"
        if cfg.get("preference_sft"):
            command += f" --preference-sft {cfg['preference_sft']:g}"
        if cfg.get("preference_min_t"):
            command += f" --preference-min-t {cfg['preference_min_t']:g}"
    if cfg.get("device", "cpu") != "cpu":
        command += f" --device {cfg['device']}"
    for name in ("caption_dropout", "uniform_t", "grounding"):
        if cfg.get(name):
            command += f" --{name.replace('_', '-')} {cfg[name]:g}"
    if cfg.get("grounding") and cfg.get("grounding_layers", "double") != "double":
        command += f" --grounding-layers {cfg['grounding_layers']}"
    if cfg.get("grounding") and cfg.get("grounding_max_t", 1.0) < 1.0:
        command += f" --grounding-max-t {cfg['grounding_max_t']:g}"
    return command


def _check_preference_options(cfg: TrainConfig) -> None:
    """A preference run fine-tunes the model that drew its pairs (checked when the set is loaded), and learns from
    the pairs alone."""
    if not cfg.init_from or cfg.distill_from:
        raise ValueError("a preference fine-tune starts from the exported model that drew its samples: give "
                         "--init-from (and no --distill-from)")
    if not 0 <= cfg.preference_min_t < 1:
        raise ValueError(f"preference_min_t must be in [0, 1), got {cfg.preference_min_t}")
    if cfg.grounding or cfg.grow_double:
        raise ValueError("a preference fine-tune learns from its pairs alone: no --grounding, no --grow-double")


def _velocity_errors(
    transformer: FluxTransformer2DModel,
    t5: T5EncoderModel,
    reference: list[torch.nn.Module],
    tokenizer: T5Tokenizer,
    captions: list[str],
    guidance_scale: float,
):
    """``preference.VelocityErrors`` of the trained transformer and T5 and the frozen ``reference`` (its
    transformer and T5) on rows that are the pairs' winners then losers of ``captions``."""
    captions = captions * 2

    def errors(x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((len(x_t),), guidance_scale, device=x_t.device)
        target = pack_latents(target)
        error = (predict_velocity(transformer, t5, tokenizer, x_t, t, captions, guidance) - target).pow(2)
        with torch.no_grad():
            reference_error = (predict_velocity(*reference, tokenizer, x_t, t, captions, guidance) - target).pow(2)
        return error.mean(dim=(1, 2)), reference_error.mean(dim=(1, 2))

    return errors


def _trainable_state(transformer: torch.nn.Module, t5: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float weights of both trained modules under ``transformer.`` / ``t5.`` prefixes (live tensors)."""
    state = {f"transformer.{k}": v for k, v in transformer.state_dict(keep_vars=True).items()}
    state |= {f"t5.{k}": v for k, v in t5.state_dict(keep_vars=True).items()}
    return {k: v.data for k, v in state.items() if v.dtype.is_floating_point}


def load_checkpoint_pipeline(ckpt_path: str | Path, use_ema: bool = True) -> FluxPipeline:
    """The pipeline of a training checkpoint (EMA weights by default): a FluxPipeline, or for a ``train-sd3``
    checkpoint a StableDiffusion3Pipeline (``sd3_train.py``)."""
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    if checkpoint_architecture(state) == SD3_ARCHITECTURE:
        from .sd3_train import load_sd3_checkpoint_pipeline

        return load_sd3_checkpoint_pipeline(ckpt_path, use_ema)
    mcfg = ShapesModelConfig.from_dict(state["config"]["model"])
    transformer = build_transformer(mcfg)
    _, t5 = build_text_encoders(mcfg, build_t5_tokenizer(), build_clip_tokenizer())
    transformer.load_state_dict(state["transformer"])
    t5.load_state_dict(state["t5"])
    if use_ema:
        # EMA holds the float weights only; everything else was loaded above.
        for prefix, module in (("transformer.", transformer), ("t5.", t5)):
            ema = {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}
            module.load_state_dict(ema, strict=False)
    vae = AutoencoderKL.from_config(state["vae_config"])
    vae.load_state_dict(state["vae"])
    return assemble_pipeline(mcfg, transformer=transformer, t5=t5, vae=vae)


def wall_minutes(ckpt_path: str | Path) -> float:
    """Training wall time (minutes, transformer stage) recorded in a checkpoint."""
    return float(torch.load(ckpt_path, weights_only=False, map_location="cpu")["elapsed"]) / 60


__all__ = [
    "BatchStream", "TrainConfig", "train", "train_vae", "training_batch", "flow_loss", "load_checkpoint_pipeline",
    "load_exported", "load_teacher", "noise_levels", "train_command", "wall_minutes",
]
