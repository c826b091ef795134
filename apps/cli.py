"""``attnscope app``: serve the explorer. Registered through the ``attnscope.commands`` entry-point group."""

from __future__ import annotations

import argparse
from pathlib import Path

from .explorer import Limits


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``app`` subcommand to the ``attnscope`` command line."""
    p = subparsers.add_parser(
        "app",
        help="open the Gradio explorer: click a word of the prompt to see where it looks",
        description=(
            "Serve the attnscope explorer: generate an image, click the prompt's words to overlay their attention "
            "maps, choose layers / steps / heads, draw word × layer and word × step grids, erase a clicked word "
            "with any `attnscope erase` method, and compare the base model with a LoRA."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="shapes", help="'shapes' (bundled Flux), 'shapes-sd3' (bundled SD3), "
                   "'tiny-flux', a hub id or a folder")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="most denoising steps one request may ask")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder of erasure runs: the Compare tab lists "
                   "them, the Erase button adds to them")
    p.set_defaults(run=run_app)


def run_app(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import matplotlib

    matplotlib.use("Agg")  # grids are drawn in server threads, never on a screen

    from .explorer import open_model
    from .ui import build_demo, launch

    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    model = open_model(args.model, device=args.device)
    demo = build_demo(model, Limits(max_steps=args.max_steps), runs=args.runs)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


__all__ = ["register", "run_app"]
