"""``attnscope shapes eval`` and ``attnscope shapes localize``: the shapes world's benchmarks on the command line.

``register(subparsers)`` adds ``eval`` and ``localize`` to the ``attnscope shapes`` command group
(``attnscope.commands.command_group``); ``attnscope.cli`` calls it. The shapes lab (``attnscope.lab.cli``) adds
``train``, ``export`` and ``preferences`` to the same group through the ``attnscope.commands`` entry point.
"""

from __future__ import annotations

import argparse
import json

from ..commands import command_group

#: Help of the ``shapes`` command group (whichever package creates it).
SHAPES_HELP = "the shapes world: evaluate a shapes model (and, with the lab, train / export one)"


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``shapes eval`` to ``subparsers``; returns the ``shapes`` group's subcommands."""
    sub = command_group(subparsers, "shapes", help=SHAPES_HELP)

    ev = sub.add_parser("eval", help="generation (and localization) metrics on the fixed evaluation set")
    ev.add_argument("--model", default=None, help="shapes (the bundled Flux-form model, default), shapes-sd3 (the "
                    "bundled SD3-form one), a shapes model folder, or a training checkpoint (ckpt.pt) with the lab "
                    "installed")
    ev.add_argument("--out", default=None, help="write OUT/shapes_eval.json (and a sample grid)")
    ev.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default: the published protocol's 4; "
                    "given alone, also for the two-object prompts)")
    ev.add_argument("--two-object-seeds", type=int, default=None,
                    help="seeds per two-object prompt (default: the published protocol's 16)")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--no-localization", action="store_true", help="generation metrics only (no attention capture)")
    ev.set_defaults(run=_eval)

    lo = sub.add_parser("localize", help="the localization benchmark: raw and output-space maps against exact masks")
    lo.add_argument("--model", default="shapes", help="a shapes model (default: the bundled one)")
    lo.add_argument("--out", default=None, help="write OUT/localize.json, per-layer/per-step figures and samples")
    lo.add_argument("--threads", type=int, default=None)
    lo.set_defaults(run=_localize)
    return sub


def _localize(args: argparse.Namespace) -> int:
    from .localize import localize

    result = localize(args.model, out=args.out, threads=args.threads)
    for kind, tables in (("rendered", result["rendered"]), ("generated", result["generated"])):
        for split, table in tables.items():
            for method in ("default", "naive", "raw.best", "output-space"):
                if method in table:
                    s = table[method]
                    print(f"{kind} {split:<11} {method:<16} mIoU {s['miou']:.3f}  pixel acc {s['pixel_acc']:.3f}  "
                          f"mAP {s['map']:.3f}  AUROC {s['auroc']:.3f}  ({s['pairs']} pairs)")
    print(f"in {result['seconds']}s" + (f" -> {args.out}/" if args.out else ""))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .metrics import evaluate

    result = evaluate(
        args.model,
        out_dir=args.out,
        seeds=args.seeds,
        threads=args.threads,
        localization=not args.no_localization,
        two_object_seeds=args.two_object_seeds,
    )
    print(json.dumps(result["summary"], indent=2))
    return 0


__all__ = ["SHAPES_HELP", "register"]
