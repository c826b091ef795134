"""The lab's commands: ``attnscope shapes train``, ``train-sd3``, ``export`` and ``preferences``.

``register(subparsers)`` adds them to the ``attnscope shapes`` command group (``attnscope.commands.command_group``),
beside the world's ``eval``; it is the lab's ``attnscope.commands`` entry point, so the product's CLI never
imports the lab (``attnscope shapes train ...`` or ``python -m attnscope.cli shapes train ...``).
"""

from __future__ import annotations

import argparse
import json

from attnscope.commands import command_group
from attnscope.shapes.cli import SHAPES_HELP

from .model import T5_ATTENTION_KINDS, ShapesModelConfig
from .sd3_train import SD3TrainConfig
from .train import SIZE_OPTIONS, TrainConfig

_DEFAULTS = TrainConfig()
_SD3_DEFAULTS = SD3TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``shapes {train,train-sd3,export,preferences}`` to ``subparsers``; returns the ``shapes`` group's
    subcommands."""
    sub = command_group(subparsers, "shapes", help=SHAPES_HELP)

    tr = sub.add_parser("train", help="train the tiny shapes Flux (rectified flow) from rendered scenes")
    tr.add_argument("--out", default=_DEFAULTS.out, help="run folder: ckpt.pt, train.log (default %(default)s)")
    tr.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    tr.add_argument(
        "--minutes", type=float, default=_DEFAULTS.minutes, help="training wall-time budget (0: none, use --steps)"
    )
    tr.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="step limit (0: minutes only)")
    tr.add_argument("--batch", type=int, default=_DEFAULTS.batch)
    tr.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    tr.add_argument("--cooldown", type=float, default=_DEFAULTS.cooldown, help="fraction of the time budget "
                    "over which the LR decays at the end")
    tr.add_argument("--caption-dropout", type=float, default=None, help="fraction of captions emptied, for "
                    "classifier-free guidance (default 0.1 for a new run; on --resume: unchanged unless given)")
    tr.add_argument("--uniform-t", type=float, default=None, help="fraction of noise levels drawn uniformly "
                    "instead of logit-normal, for more training at the high noise where layouts form (default 0 for "
                    "a new run; on --resume: unchanged unless given)")
    tr.add_argument("--grounding", type=float, default=None, help="weight of the token grounding loss on the "
                    "captured attention (0 for a new run; unchanged on --resume; see lab/grounding.py)")
    tr.add_argument("--grounding-layers", default=_DEFAULTS.grounding_layers, help="layers the grounding loss "
                    "supervises: a trace layer selector such as double, single, all (default %(default)s)")
    tr.add_argument("--grounding-max-t", type=float, default=_DEFAULTS.grounding_max_t, help="supervise only "
                    "rows with noise level t at most this (the layout is not in x_t at high noise; default "
                    "%(default)s: all)")
    tr.add_argument("--init-from", default=None, metavar="FOLDER", help="fine-tune an exported model (e.g. "
                    "attnscope/shapes/weights) instead of training from scratch")
    tr.add_argument("--grow-double", type=int, default=0, metavar="N", help="with --init-from: append N "
                    "double-stream blocks, copies of the last ones whose gates start at zero, so the grown model "
                    "starts as the one it fine-tunes (default %(default)s)")
    tr.add_argument("--distill-from", default=None, metavar="TEACHER", help="guidance distillation: learn the "
                    "true-CFG velocity of this exported model; the result takes guidance_scale as FLUX.1-dev does "
                    "and samples with one transformer call per step (starts from TEACHER unless --init-from is given)")
    tr.add_argument("--distill-guidance", type=_guidance_range, default=_DEFAULTS.distill_guidance, metavar="LOW,HIGH",
                    help="guidance scales a distillation learns, drawn uniformly (default %(default)s)")
    tr.add_argument("--preference", default=None, metavar="FILE", help="with --init-from: a preference fine-tune "
                    "on the pairs of FILE (`attnscope shapes preferences`, drawn by the --init-from model): "
                    "Diffusion-DPO against the starting model")
    tr.add_argument("--preference-beta", type=float, default=_DEFAULTS.preference_beta,
                    help="DPO β: how far the model may move from the starting one (default %(default)s)")
    tr.add_argument("--preference-sft", type=float, default=_DEFAULTS.preference_sft,
                    help="weight of plain flow matching on the right samples (default %(default)s)")
    tr.add_argument("--preference-min-t", type=float, default=_DEFAULTS.preference_min_t, metavar="T",
                    help="train the pairs at noise levels in [T, 1] only, where a layout (and so a count) is decided "
                    "(default %(default)s: all)")
    tr.add_argument("--vae-steps", type=int, default=_DEFAULTS.vae_steps)
    tr.add_argument("--checkpoint-minutes", type=float, default=_DEFAULTS.checkpoint_minutes)
    tr.add_argument("--threads", type=int, default=_DEFAULTS.threads, help="torch CPU threads")
    tr.add_argument("--device", default=_DEFAULTS.device, help="where the models train: cpu or cuda[:N] "
                    "(default %(default)s)")
    tr.add_argument("--workers", type=int, default=_DEFAULTS.workers, help="processes rendering batches ahead; "
                    "a GPU run needs several (default %(default)s: render in the training process)")
    sizes = tr.add_argument_group("model size (a new run only; default: the bundled model's)")
    for name in SIZE_OPTIONS:
        sizes.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                           help=f"default {getattr(ShapesModelConfig(), name)}")
    tr.add_argument("--t5-attention", choices=T5_ATTENTION_KINDS, default=None, help="T5 self-attention: "
                    "positional (by relative position only, so word order reaches the model; the default) or content "
                    "(plain T5). With --init-from: converts the parent's encoder (default: keep its kind)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (its config wins)")
    tr.set_defaults(run=_train)

    sd = sub.add_parser("train-sd3", help="train the SD3-form shapes model by distillation from a Flux-form one")
    sd.add_argument("--out", default=_SD3_DEFAULTS.out, help="run folder: ckpt.pt, train.log (default %(default)s)")
    sd.add_argument("--teacher", default=_SD3_DEFAULTS.teacher, help="a guidance-distilled Flux shapes folder, or "
                    "'shapes' for the bundled model (default %(default)s)")
    sd.add_argument("--init-from", default=None, metavar="FOLDER", help="continue from an exported SD3 shapes model "
                    "('shapes-sd3': the bundled one) with a fresh optimizer, instead of the teacher's blocks")
    sd.add_argument("--minutes", type=float, default=_SD3_DEFAULTS.minutes, help="wall-time budget (0: --steps)")
    sd.add_argument("--steps", type=int, default=_SD3_DEFAULTS.steps, help="step limit (0: minutes only)")
    for name in ("seed", "batch"):
        sd.add_argument(f"--{name}", type=int, default=getattr(_SD3_DEFAULTS, name))
    sd.add_argument("--lr", type=float, default=_SD3_DEFAULTS.lr)
    sd.add_argument("--uniform-t", type=float, default=_SD3_DEFAULTS.uniform_t, help="fraction of noise levels "
                    "drawn uniformly (default %(default)s)")
    sd.add_argument("--grounding", type=float, default=_SD3_DEFAULTS.grounding, help="weight of the token "
                    "grounding loss at both SD3 positions of each word (default %(default)s)")
    sd.add_argument("--threads", type=int, default=_SD3_DEFAULTS.threads, help="torch CPU threads")
    sd.add_argument("--device", default=_SD3_DEFAULTS.device, help="cpu or cuda[:N]")
    sd.add_argument("--workers", type=int, default=_SD3_DEFAULTS.workers, help="processes rendering batches ahead")
    sd.add_argument("--checkpoint-minutes", type=float, default=_SD3_DEFAULTS.checkpoint_minutes)
    sd.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (its config wins)")
    sd.set_defaults(run=_train_sd3)

    ex = sub.add_parser("export", help="export a training checkpoint (EMA weights) as a diffusers folder")
    ex.add_argument("checkpoint", help="path to ckpt.pt")
    ex.add_argument("--to", default=None, help="target folder (default: the bundled model of its architecture, "
                    "attnscope/shapes/weights or weights-sd3)")
    ex.set_defaults(run=_export)

    pr = sub.add_parser("preferences", help="sample a model on training captions and judge each image with the "
                        "scene reader: the pairs a --preference fine-tune learns from (lab/preference.py)")
    pr.add_argument("--model", default=None, help="an exported model folder (default: the bundled weights)")
    pr.add_argument("--out", required=True, help="the preference set file (.pt); an interrupted run continues it")
    pr.add_argument("--prompts", type=int, default=1000, help="captions, two or three objects (default %(default)s)")
    pr.add_argument("--samples", type=int, default=4, help="images per caption (default %(default)s)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--guidance", type=float, default=None, help="guidance scale of the samples (default: the "
                    "model's default call)")
    pr.add_argument("--batch", type=int, default=32, help="images per pipeline call (default %(default)s)")
    pr.add_argument("--threads", type=int, default=None)
    pr.add_argument("--device", default="cpu", help="where the model samples: cpu or cuda[:N] (the reader judges "
                    "on the CPU)")
    pr.set_defaults(run=_preferences)
    return sub


def _guidance_range(text: str) -> list[float]:
    """``"1,5"`` -> ``[1.0, 5.0]`` (argparse type of ``--distill-guidance``)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH such as 1,5, got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 0 <= LOW <= HIGH, got {text!r}")
    return [low, high]


def _train(args: argparse.Namespace) -> int:
    from .train import train

    sizes = {name: getattr(args, name) for name in SIZE_OPTIONS if getattr(args, name) is not None}
    if sizes and (args.resume or args.init_from):
        given = ", ".join(f"--{n.replace('_', '-')}" for n in sizes)
        raise ValueError(f"{given}: a resumed run or a fine-tune keeps the sizes of the model it continues "
                         "(a fine-tune may add double-stream blocks: --grow-double)")
    if args.grow_double and args.resume:
        raise ValueError("--grow-double: a resumed run keeps the sizes of its checkpoint")
    if args.t5_attention and args.resume:
        raise ValueError("--t5-attention: a resumed run keeps the text encoder of its checkpoint")
    cfg = TrainConfig(
        out=args.out,
        seed=args.seed,
        minutes=args.minutes,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        cooldown=args.cooldown,
        caption_dropout=args.caption_dropout,
        uniform_t=args.uniform_t,
        grounding=args.grounding,
        grounding_layers=args.grounding_layers,
        grounding_max_t=args.grounding_max_t,
        init_from=args.init_from,
        grow_double=args.grow_double,
        distill_from=args.distill_from,
        distill_guidance=args.distill_guidance,
        preference=args.preference,
        preference_beta=args.preference_beta,
        preference_sft=args.preference_sft,
        preference_min_t=args.preference_min_t,
        vae_steps=args.vae_steps,
        checkpoint_minutes=args.checkpoint_minutes,
        threads=args.threads,
        device=args.device,
        workers=args.workers,
        t5_attention=args.t5_attention,
        model=ShapesModelConfig(**sizes).to_dict(),
    )
    path = train(cfg, resume=args.resume)
    print(f"checkpoint: {path}")
    return 0


def _train_sd3(args: argparse.Namespace) -> int:
    from .sd3_train import SD3TrainConfig, train_sd3

    options = ("out", "teacher", "init_from", "minutes", "steps", "seed", "batch", "lr", "uniform_t", "grounding",
               "threads", "device", "workers", "checkpoint_minutes")
    path = train_sd3(SD3TrainConfig(**{name: getattr(args, name) for name in options}), resume=args.resume)
    print(f"checkpoint: {path}")
    return 0


def _preferences(args: argparse.Namespace) -> int:
    import torch

    from attnscope.shapes import bundled_path
    from attnscope.shapes.metrics import load_model

    from .preference import sample_preferences

    if args.threads:
        torch.set_num_threads(args.threads)
    model = str(args.model or bundled_path())
    preferences = sample_preferences(load_model(model, args.device), model, args.prompts, args.samples, args.seed,
                                     args.batch, out=args.out, guidance_scale=args.guidance)
    print(json.dumps(preferences.summary()))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.to)
    print(f"exported to {path}")
    return 0


__all__ = ["register"]
