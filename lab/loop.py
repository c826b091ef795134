"""The step loop both shapes trainers run (``train.train``, ``sd3_train.train_sd3``).

What a run needs around its losses, once: the learning-rate schedule (warm-up, constant, cool-down), a clipped
optimizer step that refuses a non-finite gradient before it reaches the weights, the EMA that gets exported, a log
line every ``log_every`` steps, a checkpoint every ``checkpoint_minutes``, SIGINT/SIGTERM ending the run after the
current step, and a last checkpoint however the loop ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm


class LoopConfig(Protocol):
    """The fields of a trainer's config the loop reads (``TrainConfig`` and ``SD3TrainConfig`` have them)."""

    minutes: float  # 0: no time limit, ``steps`` only
    steps: int  # 0: limited by minutes only
    lr: float
    warmup: int
    cooldown: float  # last fraction of the budget: LR decays linearly to 5 %
    ema_decay: float
    log_every: int
    checkpoint_minutes: float


@dataclass
class Progress:
    """Where a run is: optimizer steps taken and seconds trained (both checkpointed, so a resume continues the
    schedule where it stopped)."""

    step: int = 0
    elapsed: float = 0.0


def restore_progress(
    state: dict | None, opt: torch.optim.Optimizer, ema: dict[str, torch.Tensor], gen: torch.Generator,
    log: Callable[[str], None],
) -> tuple[Progress, dict[str, torch.Tensor]]:
    """A checkpoint's optimizer, generator, step and time put back (``state`` None: a fresh start); returns the
    progress and the EMA to continue from (on the device of the fresh ``ema``)."""
    if state is None:
        return Progress(), ema
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    progress = Progress(state["step"], state["elapsed"])
    log(f"resumed at step {progress.step}, {progress.elapsed / 60:.1f} min trained")
    device = next(iter(ema.values())).device
    return progress, {k: v.to(device) for k, v in state["ema"].items()}


#: One step's losses: (what is optimized, what is logged as "loss", the second logged number).
StepLosses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def run_steps(
    cfg: LoopConfig,
    progress: Progress,
    *,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    ema: dict[str, torch.Tensor],
    weights: Callable[[], dict[str, torch.Tensor]],
    losses: Callable[[int], StepLosses],
    save: Callable[[], None],
    log: Callable[[str], None],
    desc: str,
    second: str | None = None,
) -> None:
    """Step until the budget, ``cfg.steps`` or a signal ends the run; ``save`` is called every
    ``cfg.checkpoint_minutes`` and once at the end (also when a step raises). ``losses(step)`` computes the next
    step's losses; ``weights()`` is the trained state the EMA ``ema`` follows; ``second`` names the second logged
    number (None: it is not logged)."""
    budget = cfg.minutes * 60
    if budget <= 0 and cfg.steps <= 0:
        raise ValueError("give a time budget (minutes > 0), a step budget (steps > 0), or both")
    device = params[0].device
    # Window sums stay on the device: reading them every step would wait for a GPU every step.
    window_loss, window_second = torch.zeros((), device=device), torch.zeros((), device=device)
    window_n, window_t, last_ckpt = 0, time.time(), time.time()
    bar = tqdm(initial=progress.step, total=cfg.steps or None, desc=desc, mininterval=10)
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            while (not stop.is_set() and (budget <= 0 or progress.elapsed < budget)
                   and (cfg.steps == 0 or progress.step < cfg.steps)):
                t0 = time.time()
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(progress.step, progress.elapsed, budget, cfg)
                loss, logged, other = losses(progress.step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                try:  # a non-finite gradient stops the run before it reaches the weights, so the checkpoint stays good
                    torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
                except RuntimeError:
                    values = f"loss {logged.item():.4g}" + (f", {second} {other.item():.4g}" if second else "")
                    message = (f"step {progress.step + 1}: non-finite gradient ({values}); the weights were not "
                               f"updated and the checkpoint keeps step {progress.step}")
                    log(message)
                    raise FloatingPointError(message) from None
                opt.step()
                progress.step += 1
                # EMA warm-up (as in many diffusion trainers): early averages must not be dominated by the init.
                decay = min(cfg.ema_decay, (1 + progress.step) / (10 + progress.step))
                with torch.no_grad():
                    for name, value in weights().items():
                        ema[name].lerp_(value, 1 - decay)
                progress.elapsed += time.time() - t0
                window_loss += logged.detach()
                window_second += other.detach()
                window_n += 1
                bar.update(1)
                if progress.step % cfg.log_every == 0:
                    rate = window_n / (time.time() - window_t)
                    mean_loss = window_loss.item() / window_n
                    shown = f" {second} {window_second.item() / window_n:.4f}" if second else ""
                    log(f"step {progress.step} loss {mean_loss:.4f}{shown} it/s {rate:.2f} "
                        f"min {progress.elapsed / 60:.1f}")
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    window_loss.zero_()
                    window_second.zero_()
                    window_n, window_t = 0, time.time()
                if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
                    save()
                    last_ckpt = time.time()
    finally:
        bar.close()
        if stop.is_set():
            log(f"stopped by a signal after step {progress.step}")
        save()


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGINT / SIGTERM set ``stop`` (the loop then ends after the current step and the checkpoint is written),
    also for a process started in the background, which inherits SIGINT as ignored. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def lr_factor(step: int, elapsed: float, budget: float, cfg: LoopConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, constant, then a linear cool-down over the last ``cfg.cooldown``
    of the budget (to 5 %), which sharpens the final weights; intermediate checkpoints stay usable. The budget is
    wall time when ``minutes`` > 0 (the schedule then depends on machine speed), else ``steps``."""
    warm = min(1.0, (step + 1) / cfg.warmup)
    if cfg.cooldown <= 0:
        return warm
    if budget > 0:
        left = (budget - elapsed) / (cfg.cooldown * budget)
    else:  # step budget only: a step-based, exactly reproducible schedule
        left = (cfg.steps - step) / (cfg.cooldown * cfg.steps)
    return warm * max(0.05, min(1.0, left))
