"""The bi-level erasure trainer: erase steps and preserve steps on one LoRA, one AdamW.

Levels (EraseAnything): the *erase* (lower) level makes the model stop drawing the concept — ESD-flow towards
the anchor plus attention attenuation on the concept's text keys; the *preserve* (upper) level keeps everything
else — flow matching on base-model samples of irrelevant prompts plus the reverse self-contrastive loss.
``schedule="alternate"`` alternates them (official code: even steps erase, odd steps preserve);
``schedule="joint"`` takes both levels' weighted sum in every step (gradients of both accumulate).

A step only runs the adapted model on ``batch`` rows per level — the erase rows in one forward/backward; the
flow-matching and keep rows in one, and the contrastive rows in a second that stops after the last layer whose
attention the loss reads (``trace(stop=True)``) — and base-model quantities come from the
:class:`~erase.cache.EraseCache` built once at the start.

Output folder (``out``): ``checkpoint.pt`` (atomic: LoRA, optimizer, step, RNG, log), ``cache.pt``,
``run.json`` (config + specs, fixed at the first start), and at the end ``pytorch_lora_weights.safetensors``,
``spec.yaml`` and ``train_log.json``. ``resume=True`` continues from ``checkpoint.pt`` and ends with the same
LoRA an uninterrupted run would have produced (same seed, same thread count).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

import attnscope
from attnscope import atomic
from attnscope.trace import column_mask

from . import losses
from .cache import CacheConfig, EraseCache, build_cache
from .parallel import DataParallel
from .lora import (
    LORA_FILE,
    LoraSettings,
    add_lora,
    base_model,
    default_targets,
    save_lora,
)
from .sampling import FluxCall, PromptBank
from .spec import ConceptSpec, SpecError, check_known_words, find_word

__all__ = [
    "CHECKPOINT_FILE",
    "EraseConfig",
    "EraseResult",
    "LossWeights",
    "NonFiniteLossError",
    "OutputExistsError",
    "ResumeMismatchError",
    "Trainer",
    "default_eta",
    "fill_model_defaults",
    "model_defaults",
    "train",
]

CHECKPOINT_FILE = "checkpoint.pt"
CACHE_FILE = "cache.pt"
RUN_FILE = "run.json"
LOG_FILE = "train_log.json"
SPEC_FILE = "spec.yaml"
#: Files a run writes; ``overwrite`` deletes exactly these (never anything else in the folder).
RUN_FILES = (CHECKPOINT_FILE, CACHE_FILE, RUN_FILE, LOG_FILE, SPEC_FILE, LORA_FILE, "eval.json", "eval_grid.png")


#: Default optimizer steps per erased concept (erase and preserve steps count one each). 200 left red in 3.8 % of
#: the shapes evaluation's erased-prompt images at 16 seeds; 300 left none (benchmarks/RESULTS.md).
STEPS_PER_CONCEPT = 300

#: ESD's negative-guidance strength η (``losses.esd_target``): the paper's 1 for every model but the bundled shapes
#: model, whose phase-9 weights (three preference rounds that sharpened its colours) kept red in 24 % of the erased
#: prompts' images at η 1 and in none at η 2 (benchmarks/RESULTS.md).
PAPER_ETA = 1.0
SHAPES_ETA = 2.0


class OutputExistsError(FileExistsError):
    """The output folder already holds a run; pass ``overwrite`` (or ``resume``)."""


class ResumeMismatchError(ValueError):
    """``resume`` was asked for a folder whose run has different settings or no checkpoint."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the last good checkpoint is kept. ``loss`` names it, ``step`` says when."""

    def __init__(self, loss: str, step: int, checkpoint: Path | None):
        self.loss, self.step, self.checkpoint = loss, step, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"the {loss} loss became non-finite at step {step}; training stopped without applying that step and "
            f"{kept} (lower --lr, or the loss weight of {loss})"
        )


@dataclass(frozen=True)
class LossWeights:
    """Loss weights (official defaults). A zero weight skips that loss entirely (used for ablations).

    ``keep`` is ours: the adapted model's velocity must stay the base model's at states of the base model's own
    preservation-prompt trajectories (and, for models sampled with true classifier-free guidance, for the negative
    prompt at the concept's points, the reference guidance subtracts). A regression on known targets, so much less
    noisy than the flow-matching loss, whose target ``ε − x0`` varies with the noise draw.
    """

    esd: float = 1.0
    attention: float = 1e-3
    flow: float = 0.1
    contrastive: float = 0.1
    keep: float = 20.0


@dataclass
class EraseConfig:
    """Everything that determines a run (recorded in ``run.json``; a resumed run must match it).

    ``batch``: rows per erase step and per preserve step; ``contrastive_rows`` of a preserve step's rows are
    concept points for the contrastive loss (run only up to the last of ``attention_layers``), ``keep_rows`` keep
    points for the keep loss, the rest flow-matching rows. ``height``/``width``/
    ``max_sequence_length``: ``None`` takes the model's defaults. ``attention_layers``: which joint-attention
    layers the attention and contrastive losses read (trace ``layers`` selector). The device is the pipeline's.
    ``threads``: torch CPU threads (results are bit-reproducible only at the same count).
    ``guidance_scale``/``true_cfg_scale``/``negative_prompt``: how the base model is sampled for the cache and
    called in the losses (``None``: the model's defaults: the guidance input of a guidance-distilled model such as
    the bundled shapes model or FLUX.1-dev, true CFG for a shapes model trained on data). ``eta`` (ESD's
    negative-guidance strength) and ``lora``: ``None`` takes the model's, as ``attnscope erase`` does
    (``default_eta``; ``LoraSettings`` on ``lora.default_targets``).
    """

    model: str = "shapes"
    steps: int = STEPS_PER_CONCEPT
    lr: float = 1e-3
    seed: int = 0
    batch: int = 8
    contrastive_rows: int = 2
    keep_rows: int = 3
    schedule: Literal["alternate", "joint"] = "alternate"
    weights: LossWeights = field(default_factory=LossWeights)
    eta: float | None = None
    tau: float = 0.07
    lora: LoraSettings | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    attention_layers: str = "double"
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in ("alternate", "joint"):
            raise ValueError(f"schedule must be 'alternate' or 'joint', not {self.schedule!r}")
        if self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("batch and checkpoint_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.lora is not None:
            data["lora"]["targets"] = list(self.lora.targets)
        return data


@dataclass
class EraseResult:
    """What a finished run produced: the LoRA file, the folder, final losses (mean of the last 10 steps of
    each), wall time in seconds (this process) and the per-step log."""

    lora_path: Path
    out: Path
    final_losses: dict[str, float]
    seconds: float
    log: list[dict[str, Any]]


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that cannot be used (read-only: every process checks before any writes)."""
    if resume:
        if not (out / CHECKPOINT_FILE).is_file():
            raise ResumeMismatchError(f"nothing to resume in {out}: no {CHECKPOINT_FILE} (start without --resume)")
        return
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out} already exists and is not empty; pass --overwrite to replace the run in it, or --resume to continue it"
        )


def _clear_out(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def fill_model_defaults(config: EraseConfig, pipe: Any) -> EraseConfig:
    """Set ``config``'s ``None`` fields to ``config.model``'s defaults (in place; also returned): the call settings
    of ``model_defaults``, ``default_eta`` and a LoRA on ``default_targets``."""
    for key, value in model_defaults(config.model, pipe).items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if config.eta is None:
        config.eta = default_eta(config.model)
    if config.lora is None:
        config.lora = LoraSettings(targets=default_targets(config.model))
    return config


def model_defaults(model: str, pipe: Any) -> dict[str, Any]:
    """The call settings ``fill_model_defaults`` puts into a config's ``None`` fields: size, text length, guidance."""
    from attnscope.pipelines import default_call_kwargs
    from attnscope.shapes import call_kwargs_for

    # A shapes checkpoint may predate guidance distillation: its guidance form comes from its own transformer.
    defaults = call_kwargs_for(pipe) if is_shapes_model(model) else default_call_kwargs(model)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    return {
        "height": defaults.get("height", size),
        "width": defaults.get("width", size),
        "max_sequence_length": defaults.get("max_sequence_length", 512),
        "guidance_scale": defaults.get("guidance_scale", FluxCall.guidance_scale),
        "true_cfg_scale": defaults.get("true_cfg_scale", 1.0),
        "negative_prompt": defaults.get("negative_prompt", ""),
    }


def default_eta(model: str) -> float:
    """The η ``attnscope erase`` (and an ``EraseConfig`` with ``eta=None``) uses for ``model``."""
    return SHAPES_ETA if is_shapes_model(model) else PAPER_ETA


def is_shapes_model(model: str) -> bool:
    """The bundled shapes model or one of its training checkpoints (``*.pt``)."""
    return model == "shapes" or str(model).endswith(".pt")


def load_model(model: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A Flux pipeline for ``model``: ``shapes``, ``tiny-flux``, a shapes training checkpoint ``*.pt``, hub id or folder."""
    import attnscope

    if str(model).endswith(".pt"):
        from attnscope.shapes.train import load_checkpoint_pipeline

        pipe = load_checkpoint_pipeline(model).to(device)
    else:
        pipe = attnscope.load_pipeline(model, device=device, dtype=dtype)
    if type(pipe.transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"erasure supports Flux models; {model!r} has a {type(pipe.transformer).__name__}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def preservation_prompts(specs: Sequence[ConceptSpec]) -> list[str]:
    """Union of the specs' preservation prompts without any that name an erased word (multi-concept runs)."""
    erased = [w for s in specs for w in (*s.targets, *s.synonyms)]
    prompts = [p for s in specs for p in s.preserve_prompts if not any(find_word(p, w) for w in erased)]
    return list(dict.fromkeys(prompts))


class Trainer:
    """One run's state (model with LoRA, optimizer, cache, step, RNG); :func:`train` drives it.

    Used directly by ``benchmarks/erase_step.py`` to time single steps.
    """

    def __init__(
        self, pipe: Any, specs: Sequence[ConceptSpec], config: EraseConfig, out: Path, parallel: DataParallel | None = None
    ):
        self.pipe, self.specs, self.config, self.out = pipe, list(specs), fill_model_defaults(config, pipe), out
        self.parallel = parallel or DataParallel.for_device(pipe.transformer.device)
        self.transformer = pipe.transformer
        self.bank = PromptBank(pipe, config.max_sequence_length)
        guided = config.true_cfg_scale is not None and config.true_cfg_scale > 1
        self.call = FluxCall(
            pipe, config.height, config.width,
            guidance_scale=FluxCall.guidance_scale if config.guidance_scale is None else config.guidance_scale,
            true_cfg_scale=config.true_cfg_scale or 1.0,
            negative=self.bank.get([config.negative_prompt or ""]) if guided else None,
        )
        self.params = add_lora(self.transformer, config.lora)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        # Each process draws its own rows; rank 0's stream is the single-process one.
        self.generator = torch.Generator().manual_seed(config.seed + 1 + 7919 * self.parallel.rank)
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self.cache: EraseCache | None = None

    # ------------------------------------------------------------------------------ data
    def prepare_cache(self, progress: Callable[[int, int], None] | None) -> None:
        path = self.out / CACHE_FILE
        if self.parallel.is_main and not path.is_file():
            with base_model(self.transformer):
                cache = build_cache(
                    self.call, self.bank, self.specs, preservation_prompts(self.specs), self.config.cache,
                    self.config.attention_layers, progress, self.config.negative_prompt or "",
                )
            cache.save(path)
        self.parallel.barrier()  # the other processes load what rank 0 built
        self.cache = EraseCache.load(path)
        self.contrastive_points = torch.nonzero(self.cache.positive_mask.any(dim=1)).flatten()
        if self.config.weights.contrastive > 0 and len(self.contrastive_points) == 0:
            raise SpecError("the contrastive loss needs irrelevant concepts in the spec; add some or set its weight to 0")
        if self.config.weights.flow > 0 and len(self.cache.preserve_prompts) == 0:
            raise SpecError("the preservation loss needs preservation prompts in the spec; add some or set its weight to 0")

    def _positions(self, prompts: Sequence[str], words: Sequence[str]) -> list[tuple[int, ...]]:
        return [self.bank.positions(p, w) for p, w in zip(prompts, words)]

    # ------------------------------------------------------------------------------ one step
    def _backward_group(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        prompts: list[str],
        losses_of: Callable[[torch.Tensor | None, list[torch.Tensor] | None, torch.Tensor | None], dict[str, torch.Tensor]],
        concept_words: list[str] | None = None,
        maps_only: bool = False,
    ) -> dict[str, float]:
        """One forward of the adapted model on cached rows, its losses, and their weighted backward.

        With ``concept_words`` (one per row) the forward runs inside a differentiable trace of each row's concept
        columns and ``losses_of(v, maps, columns)`` gets their maps ``(B, N, T)`` per layer and the ``(B, T)``
        column mask; with ``maps_only`` as well, the forward ends after the last traced layer (``v`` is None):
        rows that feed only map losses never run the layers after it. The backward runs *inside* the trace: with
        gradient checkpointing the blocks are recomputed during backward and must see the same capture processors
        as in the forward. Raises NonFiniteLossError before the backward of a bad loss.
        """
        device, dtype = self.transformer.device, self.transformer.dtype
        x, sigma = x.to(device, dtype), sigma.to(device)
        embeds, pooled = self.bank.get(prompts)
        with contextlib.ExitStack() as stack:
            maps = columns = v = None
            if concept_words:
                rows = self._positions(prompts, concept_words)
                keep = tuple(sorted({q for r in rows for q in r}))
                tracer = stack.enter_context(attnscope.trace(
                    self.transformer, differentiable=True, positions=keep, layers=self.config.attention_layers,
                    stop=maps_only,
                ))
            try:
                v = self.call.velocity(self.transformer, x, sigma, embeds, pooled, self.bank.text_ids)
            except attnscope.StopForward:
                pass
            if concept_words:
                maps = list(tracer.take()[-1].values())
                columns = column_mask(keep, rows, device)
            values = losses_of(v, maps, columns)
            weights = asdict(self.config.weights)
            bad = [name for name, value in values.items() if not torch.isfinite(value)]
            if not self.parallel.all_true(not bad):  # every process stops, not only the one that saw it
                raise NonFiniteLossError(bad[0] if bad else "(another process's)", self.step, self.last_checkpoint)
            sum(weights[name] * value for name, value in values.items()).backward()
        return {name: float(value.detach()) for name, value in values.items()}

    def _draw(self, pool: int, n: int) -> torch.Tensor:
        """``n`` random indices into ``pool`` items (none, and no RNG used, when ``n`` is 0)."""
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.randint(pool, (n,), generator=self.generator)

    def _erase_step(self) -> dict[str, float]:
        """ESD and attention attenuation on ``batch`` cached concept points (one captured forward)."""
        c, w, device = self.cache, self.config.weights, self.transformer.device
        idx = torch.randint(len(c.prompts), (self.config.batch,), generator=self.generator)

        def erase_losses(v, maps, columns):
            out = {}
            if w.esd > 0:
                out["esd"] = losses.esd_loss(v, c.v_concept[idx].to(device), c.v_anchor[idx].to(device), self.config.eta)
            if w.attention > 0:
                out["attention"] = losses.attention_loss(maps, columns)
            return out

        words = [c.words[i] for i in idx] if w.attention > 0 else None
        return self._backward_group(c.x[idx], c.sigma[idx], [c.prompts[i] for i in idx], erase_losses, words)

    def _preserve_step(self) -> dict[str, float]:
        """Flow matching on noised preservation samples and the keep loss on ``keep_rows`` keep points (one
        forward), and the contrastive loss on ``contrastive_rows`` concept points (a second forward that stops after
        the last layer whose maps it reads): ``batch`` rows in all."""
        c, w, device = self.cache, self.config.weights, self.transformer.device
        n_contrastive = self.config.contrastive_rows if w.contrastive > 0 else 0
        room = max(self.config.batch - n_contrastive - (1 if w.flow > 0 else 0), 0)  # one flow row at least
        n_keep = min(self.config.keep_rows, room) if w.keep > 0 and len(c.keep_x) else 0
        n_flow = max(self.config.batch - n_contrastive - n_keep, 1) if w.flow > 0 else 0
        if not (n_flow or n_keep or n_contrastive):
            return {}
        idx = self._draw(len(c.preserve_prompts), n_flow)
        x0 = c.x0[idx]
        # Logit-normal t (as the shapes model was trained): most weight on mid noise levels.
        t = torch.sigmoid(torch.randn(n_flow, generator=self.generator))
        noise = torch.randn(x0.shape, generator=self.generator)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        keep = self._draw(len(c.keep_x), n_keep)
        concept = self.contrastive_points[self._draw(len(self.contrastive_points), n_contrastive)]

        def preserve_losses(v, maps, columns):
            values = {}
            if n_flow:
                values["flow"] = losses.flow_matching_loss(v[:n_flow], x0.to(device), noise.to(device))
            if n_keep:
                values["keep"] = losses.velocity_matching_loss(v[n_flow:], c.keep_v[keep].to(device))
            return values

        def contrastive_losses(v, maps, columns):
            return {"contrastive": losses.contrastive_loss(
                losses.attention_features(maps, columns),
                c.positives[concept].to(device),
                c.negatives[concept].to(device),
                self.config.tau,
                c.positive_mask[concept].to(device),
                c.negative_mask[concept].to(device),
            )}

        values: dict[str, float] = {}
        if n_flow or n_keep:
            values |= self._backward_group(
                torch.cat([x_t, c.keep_x[keep]]),
                torch.cat([t, c.keep_sigma[keep]]),
                [c.preserve_prompts[i] for i in idx] + [c.keep_prompts[i] for i in keep],
                preserve_losses,
            )
        if n_contrastive:
            values |= self._backward_group(
                c.x[concept], c.sigma[concept], [c.prompts[i] for i in concept], contrastive_losses,
                [c.words[i] for i in concept], maps_only=True,
            )
        return values

    def level(self, step: int) -> str:
        if self.config.schedule == "joint":
            return "joint"
        return "erase" if step % 2 == 0 else "preserve"

    def train_step(self) -> dict[str, float]:
        """One optimizer step of this step's level; returns the unweighted losses. Gradients of the level's
        forward groups accumulate; nothing is applied if any loss is non-finite."""
        level, w = self.level(self.step), self.config.weights
        self.optimizer.zero_grad(set_to_none=True)
        values: dict[str, float] = {}
        if level in ("erase", "joint") and (w.esd > 0 or w.attention > 0):
            values |= self._erase_step()
        if level in ("preserve", "joint") and (w.flow > 0 or w.contrastive > 0 or w.keep > 0):
            values |= self._preserve_step()
        if values:
            self.parallel.average_gradients(self.params)
            self.optimizer.step()
        self.step += 1
        return values

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        names = [n for n, p in self.transformer.named_parameters() if any(p is q for q in self.params)]
        return {
            "lora": {n: p.detach().clone() for n, p in zip(names, self.params)},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generators": self.parallel.gather(self.generator.get_state()),  # one per process, by rank
            "torch_rng": torch.get_rng_state(),
            "log": self.log,
        }

    def save_checkpoint(self) -> None:
        path = self.out / CHECKPOINT_FILE
        state = self.state()  # collective: every process takes part
        if self.parallel.is_main:
            atomic.torch_save(state, path)
        self.parallel.barrier()
        self.last_checkpoint = path

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT_FILE
        state = torch.load(path, weights_only=False, map_location="cpu")
        named = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if len(state["generators"]) != self.parallel.world:
            raise ResumeMismatchError(
                f"{path} was written by {len(state['generators'])} process(es); resume with the same number "
                f"(this run has {self.parallel.world})"
            )
        self.generator.set_state(state["generators"][self.parallel.rank])
        torch.set_rng_state(state["torch_rng"])
        self.log = state["log"]
        self.last_checkpoint = path


def _run_record(config: EraseConfig, specs: Sequence[ConceptSpec]) -> dict[str, Any]:
    return {"config": config.to_dict(), "specs": [s.to_dict() for s in specs]}


def train(
    pipe: Any,
    specs: Sequence[ConceptSpec],
    config: EraseConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> EraseResult:
    """Train an erasure LoRA for ``specs`` on ``pipe`` (a Flux pipeline; the LoRA is added to its transformer).

    Validates the specs against the model first (unknown words, prompts without the concept). With
    ``resume``, ``run.json`` in ``out`` must describe the same run (``steps`` may differ: continue further).
    ``on_step(step, losses)`` is called after every optimizer step (tests use it to simulate a kill).
    Under ``accelerate launch`` the processes train data-parallel (:mod:`erase.parallel`); rank 0 writes the
    files and its own rows' losses go to the log. Raises OutputExistsError, ResumeMismatchError, UnknownConceptError, ConceptNotInPromptError,
    NonFiniteLossError.
    """
    started = time.perf_counter()
    out = Path(out)
    if not specs:
        raise SpecError("nothing to erase: give at least one concept")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"concept given twice: {names}")
    fill_model_defaults(config, pipe)
    for spec in specs:
        spec.check_prompts()
        check_known_words(pipe, [*spec.targets, *spec.synonyms, *spec.irrelevant], "shapes" if is_shapes_model(config.model) else config.model)
    parallel = DataParallel.for_device(pipe.transformer.device)
    _check_out(out, resume, overwrite)
    parallel.barrier()  # every process has looked before rank 0 clears or writes anything
    record = _run_record(config, specs)
    if resume:
        saved = json.loads((out / RUN_FILE).read_text())
        mine = json.loads(json.dumps(record))
        for part in (saved, mine):
            part["config"].pop("steps")
            part["config"].pop("threads")
        if saved != mine:
            raise ResumeMismatchError(
                f"{out} holds a run with other settings or concepts; resume with the same flags (see {out / RUN_FILE})"
            )
    elif parallel.is_main:
        _clear_out(out)
        (out / RUN_FILE).write_text(json.dumps(record, indent=2))
    parallel.barrier()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    trainer = Trainer(pipe, specs, config, out, parallel)
    progress = progress and parallel.is_main
    bar = tqdm(total=config.steps, desc="erase", mininterval=1.0, dynamic_ncols=True, disable=not progress)
    try:
        with tqdm(desc="base samples", mininterval=1.0, leave=False, disable=not progress) as cache_bar:

            def cache_progress(done: int, total: int) -> None:
                cache_bar.total = total
                cache_bar.update(done - cache_bar.n)

            trainer.prepare_cache(cache_progress)
        if resume:
            trainer.load_checkpoint()
        bar.update(trainer.step)
        while trainer.step < config.steps:
            t0 = time.perf_counter()
            values = trainer.train_step()
            trainer.log.append({"step": trainer.step, "level": trainer.level(trainer.step - 1), **values,
                                "seconds": round(time.perf_counter() - t0, 4)})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
                trainer.save_checkpoint()
            if on_step is not None:
                on_step(trainer.step, values)
    finally:
        bar.close()
    trainer.transformer.eval()
    parallel.check_in_sync(trainer.params)
    lora_path = out / LORA_FILE
    final = _final_losses(trainer.log)
    seconds = time.perf_counter() - started
    if parallel.is_main:
        save_lora(trainer.transformer, out, config.lora)
        (out / SPEC_FILE).write_text(yaml.safe_dump([s.to_dict() for s in specs], sort_keys=False, allow_unicode=True))
        (out / LOG_FILE).write_text(json.dumps({
            **_run_record(config, specs),
            "processes": parallel.world,
            "seconds": round(seconds, 2),
            "final_losses": final,
            "steps": trainer.log,
        }, indent=1))
    parallel.barrier()
    return EraseResult(lora_path=lora_path, out=out, final_losses=final, seconds=seconds, log=trainer.log)


def _final_losses(log: Sequence[dict[str, Any]], window: int = 10) -> dict[str, float]:
    names = sorted({k for entry in log for k in entry} - {"step", "level", "seconds"})
    final = {}
    for name in names:
        values = [e[name] for e in log if name in e][-window:]
        final[name] = float(sum(values) / len(values)) if values else math.nan
    return final
