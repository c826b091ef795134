"""The erasure training loop: a :class:`Trainer` (model with LoRA, optimizer, cached base-model data, the
forward/backward machinery its method's steps use) and :func:`train`, which drives it through a run folder.

A step only runs the adapted model on ``batch`` rows per level, and base-model quantities come from the
:class:`~erase.cache.EraseCache` built once at the start. What a step computes is the method's
(:mod:`erase.methods`); a closed-form method skips the loop and edits directly. The run folder's life cycle is
:mod:`erase.run`. ``resume=True`` continues from
``checkpoint.pt`` and ends with the same LoRA an uninterrupted run would have produced (same seed, same thread
count).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import attnscope
from attnscope import atomic
from attnscope.adapters import ModelCall, adapter_for
from attnscope.trace import column_mask

from . import run
from .adversary import Adversary
from .cache import EraseCache, build_cache
from .config import EraseConfig, fill_model_defaults
from .lora import LORA_FILE, add_lora, base_model, save_lora
from .methods import TrainedMethod, method_for
from .methods.rows import point_etas, point_margins, run_etas, run_margins
from .parallel import DataParallel
from .sampling import PromptBank
from .spec import ConceptSpec, SpecError, check_prompts_fit, preservation_prompts
from .worlds import erasure_world

__all__ = ["EraseResult", "NonFiniteLossError", "Trainer", "gradient_shares", "train", "training_call"]

#: Key of a log entry's per-loss gradient norms (weighted losses, over the LoRA parameters).
GRADIENT_NORMS = "grad_norm"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the last good checkpoint is kept. ``loss`` names it, ``step`` says when."""

    def __init__(self, loss: str, step: int, checkpoint: Path | None):
        self.loss, self.step, self.checkpoint = loss, step, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"the {loss} loss became non-finite at step {step}; training stopped without applying that step and "
            f"{kept} (lower --lr, or the loss weight of {loss})"
        )


def training_call(pipe: Any, config: EraseConfig) -> tuple[ModelCall, PromptBank]:
    """The model call and prompt bank a run of ``config`` (defaults filled) trains through: its size, guidance and
    text length, and under true CFG the negative prompt's conditioning. Anything that reads a run's velocities
    again builds them here, so it sees what the run trained on."""
    call = adapter_for(pipe).model_call(
        pipe, config.height, config.width,
        guidance_scale=config.guidance_scale, true_cfg_scale=config.true_cfg_scale or 1.0,
    )
    bank = PromptBank(call, config.max_sequence_length)
    if call.wants_negative:
        call.negative = bank.get([config.negative_prompt or ""])
    return call, bank


@dataclass
class EraseResult:
    """What a finished run produced: the LoRA file, the folder, final losses (mean of the last 10 steps of
    each), wall time in seconds (this process), the per-step log, and ESD's η and margin of each concept (a trained
    run; no margins without one)."""

    lora_path: Path
    out: Path
    final_losses: dict[str, float]
    seconds: float
    log: list[dict[str, Any]]
    etas: dict[str, float] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=dict)


class Trainer:
    """One run's state (model with LoRA, optimizer, cache, step, RNG) and the machinery its method's steps use
    (:meth:`backward_group`, :meth:`draw`); :func:`train` drives it. ``benchmarks/erase_step.py`` times its steps."""

    def __init__(
        self,
        pipe: Any,
        specs: Sequence[ConceptSpec],
        config: EraseConfig,
        out: Path,
        parallel: DataParallel | None = None,
    ):
        self.pipe, self.specs, self.out = pipe, list(specs), out
        self.config = fill_model_defaults(config, pipe, len(self.specs))
        method = method_for(config.method)
        if not isinstance(method, TrainedMethod):
            raise ValueError(f"{config.method} is a closed-form edit: it has no training steps")
        self.method = method
        self.parallel = parallel or DataParallel.for_device(pipe.transformer.device)
        self.transformer = pipe.transformer
        self.call, self.bank = training_call(pipe, self.config)
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
        self.etas: torch.Tensor | None = None
        self.point_etas: torch.Tensor | None = None
        self.margins: torch.Tensor | None = None
        self.point_margins: torch.Tensor | None = None
        self.adversary: Adversary | None = None
        #: Set by :func:`train` on the steps whose per-loss gradient norms are logged; filled by backward_group.
        self.log_gradients = False
        self.gradient_norms: dict[str, float] = {}

    # ------------------------------------------------------------------------------ data
    def prepare_cache(self, progress: Callable[[int, int], None] | None) -> None:
        path = self.out / run.CACHE_FILE
        if self.parallel.is_main and not path.is_file():
            w = self.config.weights
            implicit = self.config.cache.implicit_prompts if w.implicit > 0 else ()
            if self.guided_erase:  # the negative prompt's rows are drawn at every concept point anyway
                implicit = tuple(p for p in implicit if p != (self.config.negative_prompt or ""))
            cache_config = replace(  # what no loss of this run draws is not sampled
                self.config.cache,
                implicit_prompts=implicit,
                contrastive_points=self.config.cache.contrastive_points if w.contrastive > 0 else 0,
                concept_maps=w.attention > 0 and self.config.attention_form == "localized",
                negative_velocities=self.guided_erase,
            )
            preserve = preservation_prompts(self.specs) if w.flow > 0 or w.keep > 0 else []
            with base_model(self.transformer):
                cache = build_cache(
                    self.call, self.bank, self.specs, preserve, cache_config,
                    self.config.attention_layers, progress,
                )
            cache.save(path)
        self.parallel.barrier()  # the other processes load what rank 0 built
        self.cache = EraseCache.load(path)
        #: ESD's η of each concept, ``(S,)``.
        self.etas = run_etas(self.specs, self.cache, self.config.eta, self.config.balance_eta)
        #: ESD's η at each cache point, ``(P,)``.
        self.point_etas = point_etas(self.specs, self.cache, self.etas, self.config.balance_eta)
        #: ESD's margin of each concept, ``(S,)``, what the run reports; ``None``: every point pushed throughout.
        self.margins = run_margins(self.specs, self.cache, self.config.eta, self.config.esd_margin, self.etas)
        #: ESD's margin at each cache point, ``(P,)``; ``None``: every point pushed throughout.
        self.point_margins = point_margins(self.specs, self.cache, self.config.eta, self.config.esd_margin,
                                           self.point_etas)
        self.adversary = Adversary(self) if self.config.adversarial else None
        self.contrastive_points = torch.nonzero(self.cache.positive_mask.any(dim=1)).flatten()
        if self.config.weights.contrastive > 0 and len(self.contrastive_points) == 0:
            raise SpecError(
                "the contrastive loss needs irrelevant concepts in the spec; add some or set its weight to 0"
            )
        if self.config.weights.flow > 0 and len(self.cache.preserve_prompts) == 0:
            raise SpecError(
                "the preservation loss needs preservation prompts in the spec; add some or set its weight to 0"
            )

    @property
    def guided_erase(self) -> bool:
        """Whether ESD and the implicit loss hold the velocity a true-CFG sampler follows (``erase_velocity``
        ``guided`` on a call with a negative prompt), which takes each concept point's negative-prompt row."""
        w = self.config.weights
        return self.config.erase_velocity == "guided" and self.call.guided and (w.esd > 0 or w.implicit > 0)

    def _positions(self, prompts: Sequence[str], words: Sequence[str | None]) -> list[tuple[int, ...]]:
        return [self.bank.positions(p, w) if w is not None else () for p, w in zip(prompts, words)]

    # ------------------------------------------------------------------------------ one step
    def backward_group(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        prompts: list[str],
        losses_of: Callable[
            [torch.Tensor | None, list[torch.Tensor] | None, torch.Tensor | None], dict[str, torch.Tensor]
        ],
        concept_words: list[str | None] | None = None,
        maps_only: bool = False,
        conditioning: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One forward of the adapted model on cached rows, its losses, and their weighted backward.

        Row ``i`` is ``x[i]`` at ``sigma[i]`` through ``prompts[i]``; ``conditioning`` (``embeds (k, L, D)``,
        ``pooled (k, P)``) is the text conditioning of ``k`` more rows after them (adversarial embeddings, which no
        prompt expresses; they have no concept columns).

        With ``concept_words`` (one per row; None for a row without concept columns) the forward runs inside a
        differentiable trace of each row's concept columns and ``losses_of(v, maps, columns)`` gets their maps ``(B, N,
        T)`` per layer and the ``(B, T)`` column mask; with ``maps_only`` as well, the forward ends after the last
        traced layer (``v`` is None): rows that feed only map losses never run the layers after it. The backward runs
        *inside* the trace: with gradient checkpointing the blocks are recomputed during backward and must see the same
        capture processors as in the forward. With ``log_gradients`` set, each weighted loss's gradient norm over the
        LoRA parameters is added to ``gradient_norms`` first (one extra backward per loss, so only on logged steps).
        Raises NonFiniteLossError before the backward of a bad loss.
        """
        device, dtype = self.transformer.device, self.transformer.dtype
        x, sigma = x.to(device, dtype), sigma.to(device)
        embeds, pooled = self.bank.get(prompts)
        if conditioning is not None:
            embeds = torch.cat([embeds, conditioning[0].to(device, dtype)])
            pooled = torch.cat([pooled, conditioning[1].to(device, dtype)])
        with contextlib.ExitStack() as stack:
            maps = columns = v = None
            if concept_words:
                rows = self._positions(prompts, concept_words) + [()] * (len(x) - len(prompts))
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
            weighted = {name: weights[name] * value for name, value in values.items()}
            if self.log_gradients:
                self._backward_logging_norms(weighted, [name for name in values if weights[name] != 0])
            else:
                sum(weighted.values()).backward()
        return {name: float(value.detach()) for name, value in values.items()}

    def _backward_logging_norms(self, weighted: dict[str, torch.Tensor], moving: list[str]) -> None:
        """The summed backward of ``weighted``, recording each weighted loss's gradient norm over the LoRA
        parameters in ``gradient_norms``. Every ``moving`` loss but the last takes a backward of its own (graph
        kept); the last one's gradient is what the summed backward added beyond theirs. So a logged step costs one
        backward per moving loss, not one more, a loss of weight 0 costs none, and the update is bit-identical to an
        unlogged step's (the same summed backward writes the gradients)."""
        # What the gradients hold before the summed backward, plus every moving loss's own but the last.
        expected = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params]
        for name in moving[:-1]:
            grads = torch.autograd.grad(weighted[name], self.params, retain_graph=True, allow_unused=True)
            self.gradient_norms[name] = _norm([g for g in grads if g is not None])
            expected = [e if g is None else e + g for e, g in zip(expected, grads)]
        sum(weighted.values()).backward()
        if moving:
            self.gradient_norms[moving[-1]] = _norm(
                [p.grad - e for p, e in zip(self.params, expected) if p.grad is not None]
            )
        self.gradient_norms.update({name: 0.0 for name in weighted if name not in moving})

    def draw(self, pool: int, n: int) -> torch.Tensor:
        """``n`` random indices into ``pool`` items (none, and no RNG used, when ``n`` is 0)."""
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.randint(pool, (n,), generator=self.generator)

    def level(self, step: int) -> str:
        return self.method.level(self, step)

    def train_step(self) -> dict[str, float]:
        """One optimizer step of this step's level; returns the unweighted losses. Gradients of the level's
        forward groups accumulate; nothing is applied if any loss is non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        self.gradient_norms = {}
        values = self.method.step(self, self.level(self.step))
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
            "adversary": self.adversary.state() if self.adversary else None,
        }

    def save_checkpoint(self) -> None:
        path = self.out / run.CHECKPOINT_FILE
        state = self.state()  # collective: every process takes part
        if self.parallel.is_main:
            atomic.torch_save(state, path)
        self.parallel.barrier()
        self.last_checkpoint = path

    def load_checkpoint(self) -> None:
        path = self.out / run.CHECKPOINT_FILE
        state = torch.load(path, weights_only=False, map_location="cpu")
        named = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if len(state["generators"]) != self.parallel.world:
            raise run.ResumeMismatchError(
                f"{path} was written by {len(state['generators'])} process(es); resume with the same number "
                f"(this run has {self.parallel.world})"
            )
        self.generator.set_state(state["generators"][self.parallel.rank])
        torch.set_rng_state(state["torch_rng"])
        self.log = state["log"]
        if self.adversary is not None:
            self.adversary.load(state["adversary"])
        self.last_checkpoint = path


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
    """Train an erasure LoRA for ``specs`` on ``pipe`` (a Flux pipeline; the LoRA is added to its transformer) with
    ``config.method``; a closed-form method computes its edit instead and writes it in the same LoRA format.

    Validates the specs against the model before anything is written (unknown words, prompts without the concept,
    prompts longer than the model's text length). With
    ``resume``, ``run.json`` in ``out`` must describe the same run (``steps`` may differ: continue further).
    ``on_step(step, losses)`` is called after every optimizer step (tests use it to simulate a kill).
    Under ``accelerate launch`` the processes train data-parallel (:mod:`erase.parallel`); rank 0 writes the
    files and its own rows' losses go to the log. Raises OutputExistsError, ResumeMismatchError, UnknownConceptError,
    ConceptNotInPromptError, NonFiniteLossError.
    """
    started = time.perf_counter()
    out = Path(out)
    if not specs:
        raise SpecError("nothing to erase: give at least one concept")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"concept given twice: {names}")
    adapter = adapter_for(pipe)
    if not adapter.has_model_call:
        raise ValueError(
            f"erasure calls the transformer directly, which attnscope cannot do for {adapter.name} models yet"
        )
    fill_model_defaults(config, pipe, len(specs))
    method = method_for(config.method)
    if resume and not method.trained:
        raise run.ResumeMismatchError(
            f"{method.name} is a closed-form edit with nothing to resume: run it again with --overwrite"
        )
    world = erasure_world(config.model)
    for spec in specs:
        spec.check_prompts()
        world.check_words(pipe, [*spec.erased_words, *spec.irrelevant])
    check_prompts_fit(pipe, specs, config.max_sequence_length)
    parallel = DataParallel.for_device(pipe.transformer.device)
    run.check_out(out, resume, overwrite)
    parallel.barrier()  # every process has looked before rank 0 clears or writes anything
    if resume:
        run.check_resume(out, config, specs)
    elif parallel.is_main:
        run.start(out, config, specs)
    parallel.barrier()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if not method.trained:
        return _closed_form(method, pipe, specs, config, out, started, progress and parallel.is_main)

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
            every = config.log_gradients_every  # a pair of steps: both levels of an alternating method
            trainer.log_gradients = bool(every) and trainer.step % every < 2
            values = trainer.train_step()
            entry = {"step": trainer.step, "level": trainer.level(trainer.step - 1), **values,
                     "seconds": round(time.perf_counter() - t0, 4)}
            if trainer.gradient_norms:
                entry[GRADIENT_NORMS] = {k: round(v, 6) for k, v in trainer.gradient_norms.items()}
            trainer.log.append(entry)
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
    etas = dict(zip(names, trainer.etas.tolist()))
    margins = {} if trainer.margins is None else dict(zip(names, trainer.margins.tolist()))
    seconds = time.perf_counter() - started
    if parallel.is_main:
        save_lora(trainer.transformer, out, config.lora)
        run.write_results(out, config, specs, {
            "processes": parallel.world, "seconds": round(seconds, 2), "final_losses": final,
            "etas": etas, "esd_margins": margins,
            "gradient_shares": gradient_shares(trainer.log), "steps": trainer.log,
        })
    parallel.barrier()
    return EraseResult(lora_path=lora_path, out=out, final_losses=final, seconds=seconds, log=trainer.log, etas=etas,
                       margins=margins)


def _closed_form(
    method: Any, pipe: Any, specs: Sequence[ConceptSpec], config: EraseConfig, out: Path, started: float,
    progress: bool,
) -> EraseResult:
    with tqdm(desc=method.name, mininterval=1.0, leave=False, disable=not progress) as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        record = method.fit(pipe, specs, config, out, report)
    seconds = time.perf_counter() - started
    run.write_results(out, config, specs, {"processes": 1, "seconds": round(seconds, 2), "edit": record})
    return EraseResult(lora_path=out / LORA_FILE, out=out, final_losses={}, seconds=seconds, log=[])


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in tensors))


def gradient_shares(log: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per level, each loss's mean share of the summed gradient norms of that step's weighted losses (over the
    logged steps): which loss actually moves the LoRA, whatever its value."""
    shares: dict[str, dict[str, list[float]]] = {}
    for entry in log:
        norms = entry.get(GRADIENT_NORMS)
        total = sum(norms.values()) if norms else 0.0
        for name, norm in (norms or {}).items():
            shares.setdefault(entry["level"], {}).setdefault(name, []).append(norm / total if total else 0.0)
    return {level: {name: round(sum(v) / len(v), 4) for name, v in per.items()} for level, per in shares.items()}


def _final_losses(log: Sequence[dict[str, Any]], window: int = 10) -> dict[str, float]:
    names = sorted({k for entry in log for k in entry} - {"step", "level", "seconds", GRADIENT_NORMS})
    final = {}
    for name in names:
        values = [e[name] for e in log if name in e][-window:]
        final[name] = float(sum(values) / len(values)) if values else math.nan
    return final
