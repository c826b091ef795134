"""The ``attnscope`` command line.

``attnscope maps``, ``explain``, ``localize`` and ``attnscope shapes ...`` live in this package. Commands of the
packages built on top (``attnscope erase``/``eval`` from ``attnscope.erase``, ``attnscope app`` from
``attnscope.apps``) register themselves through the ``attnscope.commands`` entry-point group, so the core never
imports them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .adapters import UnsupportedModelError
from .capture import UnsupportedProcessorError
from .commands import CommandError
from .concepts import ConceptError
from .dataset import DatasetError
from .explain import ExplainError
from .maps import SelectionError
from .tokens import EmptyPromptError, UnknownWordError
from .trace import TraceError

#: Errors that are the user's input, printed as one line instead of a traceback.
USER_ERRORS = (
    UnknownWordError,
    EmptyPromptError,
    ConceptError,
    DatasetError,
    ExplainError,
    SelectionError,
    TraceError,
    UnsupportedModelError,
    UnsupportedProcessorError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _layers(text: str) -> list[int | str]:
    return [int(p) if p.lstrip("-").isdigit() else p for p in _csv(text)]


def add_maps_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "maps",
        help="generate an image and save token heatmaps for chosen words",
        description=(
            "Generate one image with the attention capture installed, then write to --out: image.png (as "
            "generated), overlay_<word>.png per word (mean over the chosen layers and all steps; small images "
            "enlarged to a viewable size), grid_layers.png (words × layers), grid_steps.png (words × steps) and "
            "maps.safetensors (TokenMaps.load)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default="shapes", help="'shapes' (bundled), 'tiny-flux', 'tiny-sd3', a hub id or a folder"
    )
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--words", required=True, type=_csv, help="comma-separated words or phrases of the prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="layers to capture: 'double', 'single', labels like double.2, or indices",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--out", type=Path, default=Path("out/maps"), help="output folder")
    p.set_defaults(run=run_maps)


def run_maps(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from .adapters import adapter_for, check_size
    from .pipelines import load_pipeline
    from .profiles import profile_for
    from .trace import trace

    if not args.prompt.strip():
        raise EmptyPromptError("--prompt is empty")
    if not args.words:
        raise CommandError("--words is empty: name at least one word of the prompt")
    started = time.perf_counter()
    profile = profile_for(args.model)
    asked = {"num_inference_steps": args.steps, "height": args.height, "width": args.width}
    call = profile.default_call() | {key: value for key, value in asked.items() if value is not None}
    profile.check_call(args.prompt, call.get("height"), call.get("width"))
    pipe = load_pipeline(args.model, device=args.device)
    call = profile.default_call(pipe) | {key: value for key, value in asked.items() if value is not None}
    if "height" in call and "width" in call:
        check_size(pipe, call["height"], call["width"])
    # Check the words before spending time on generation.
    adapter = adapter_for(pipe)
    tokens = adapter.prompt_tokens(pipe, args.prompt, adapter.text_length(pipe, call.get("max_sequence_length")))
    for word in args.words:
        tokens.positions(word)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with trace(pipe, layers=args.layers, words=args.words) as tr:
        image = pipe(args.prompt, generator=generator, **call).images[0]
    maps = tr.maps()

    args.out.mkdir(parents=True, exist_ok=True)
    image.save(args.out / "image.png")
    maps.save(args.out / "maps.safetensors")
    _write_views(args.out, image, maps, args.words, "overlay_", "", ("layer", "step"))
    print(
        f"{len(args.words)} word(s) × {len(maps.layers)} layer(s) × {len(maps.steps)} step(s) "
        f"in {time.perf_counter() - started:.1f}s → {args.out}/"
    )
    return 0


def _write_views(folder: Path, image: Any, maps: Any, words: Sequence[str], overlay_prefix: str, grid_prefix: str,
                 axes: Sequence[str]) -> None:
    """``<overlay_prefix><word>.png`` per word (its map over all layers and steps, on the enlarged image) and
    ``<grid_prefix>grid_<axis>s.png`` (words × the axis) into ``folder``."""
    import matplotlib.pyplot as plt

    from . import viz

    for word in words:
        overlay = viz.overlay(maps.word(word).mean().numpy(), viz.enlarged(image))
        overlay.save(folder / f"{overlay_prefix}{word.replace(' ', '_')}.png")
    for axis in axes:
        fig = viz.grid_figure(maps, words, by=axis, image=image)
        fig.savefig(folder / f"{grid_prefix}grid_{axis}s.png", dpi=100)
        plt.close(fig)


def add_explain_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        help="explain an existing image: token and concept heatmaps",
        description=(
            "Encode an existing image with the model's VAE, noise it to flow time --t with --samples noise draws, "
            "run the transformer once on them under the attention capture and average the maps. Writes to --out: "
            "image.png, overlay_<word>.png per word (raw joint-attention maps), concept_<concept>.png per concept "
            "(output-space maps), grid_layers.png / concept_grid_layers.png (× layers), maps.safetensors and "
            "concept_maps.safetensors (TokenMaps.load). The folder is filled only when every file is written."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--image", type=Path, required=True, help="the image file (PNG, JPEG, ...; converted to RGB)")
    p.add_argument("--model", default="shapes", help="'shapes' (bundled), 'tiny-flux', a hub id or a folder")
    p.add_argument("--prompt", required=True, help="the prompt that describes the image")
    p.add_argument("--words", type=_csv, default=None, help="comma-separated words of the prompt (default: all)")
    p.add_argument("--concepts", type=_csv, default=None,
                   help="comma-separated concepts for output-space maps, e.g. red,circle,background")
    p.add_argument("--t", type=float, default=None, help="flow time of the noised image, in (0, 1) (default 0.3)")
    p.add_argument("--samples", type=int, default=None, help="noise draws averaged (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--layers", type=_layers, default=None, help="layers to capture (default: all)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--out", type=Path, default=Path("out/explain"), help="output folder")
    p.set_defaults(run=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    from .concepts import check_concepts
    from .explain import DEFAULT_SAMPLES, DEFAULT_T, check_noise, explain, load_image
    from .pipelines import load_pipeline
    from .staging import staged_folder

    if not args.prompt.strip():
        raise EmptyPromptError("--prompt is empty")
    started = time.perf_counter()
    t = DEFAULT_T if args.t is None else args.t
    samples = DEFAULT_SAMPLES if args.samples is None else args.samples
    # Everything that can be checked without the model fails before it loads.
    check_noise(t, samples)
    if args.concepts is not None:
        check_concepts(args.concepts)
    pixels = load_image(args.image)
    pipe = load_pipeline(args.model, device=args.device, progress=False)
    result = explain(pipe, pixels, args.prompt, words=args.words, concepts=args.concepts, t=t, samples=samples,
                     seed=args.seed, layers=args.layers)
    image = Image.fromarray(result.image)
    words = args.words or result.maps.words()
    with staged_folder(args.out) as out:
        image.save(out / "image.png")
        result.maps.save(out / "maps.safetensors")
        _write_views(out, image, result.maps, words, "overlay_", "", ("layer",))
        if result.concept_maps is not None:
            result.concept_maps.save(out / "concept_maps.safetensors")
            concepts = [w.text for w in result.concept_maps.tokens.words]
            _write_views(out, image, result.concept_maps, concepts, "concept_", "concept_", ("layer",))
    print(
        f"{len(words)} word(s), {len(args.concepts or [])} concept(s) × {len(result.maps.layers)} layer(s), "
        f"t={result.t}, {result.samples} draw(s) in {time.perf_counter() - started:.1f}s → {args.out}/"
    )
    return 0


def add_localize_command(subparsers: argparse._SubParsersAction) -> None:
    from .explain import DEFAULT_SAMPLES, DEFAULT_T
    from .localize import DEFAULT_COMPETITORS, DEFAULT_PROMPT_TEMPLATE

    p = subparsers.add_parser(
        "localize",
        help="zero-shot segmentation scores on a folder of (image, mask, class)",
        description=(
            "Explain every image of a segmentation folder (images/ + masks/ + classes.txt, or PascalVOC's "
            "JPEGImages/ + SegmentationClass/) under a prompt naming its class, and score the raw and the "
            "output-space maps against the masks (pixel accuracy, mIoU, mAP, AUROC). Writes OUT/localize.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", type=Path, required=True, help="the segmentation folder")
    p.add_argument("--model", default="shapes", help="'shapes', a hub id such as black-forest-labs/FLUX.1-dev, or a "
                   "folder")
    p.add_argument("--split", default="val", help="PascalVOC: ImageSets/Segmentation/<split>.txt, if present")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE, help="prompt with {} for the class")
    p.add_argument("--competitors", default=",".join(DEFAULT_COMPETITORS),
                   help="comma-separated concepts competing with the class in the output-space softmax")
    p.add_argument("--size", type=int, default=None, help="image side the model sees (default: the model's)")
    p.add_argument("--t", type=float, default=DEFAULT_T, help="flow time of the noised images")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="noise draws per image")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("out/localize"), help="output folder")
    p.set_defaults(run=run_localize)


def run_localize(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from .concepts import check_concepts
    from .dataset import read_folder
    from .explain import check_noise
    from .localize import DEFAULT_COMPETITORS, localize_items
    from .pipelines import load_pipeline
    from .profiles import profile_for
    from .staging import staged_folder

    started = time.perf_counter()
    check_noise(args.t, args.samples)
    competitors = check_concepts(_csv(args.competitors) or DEFAULT_COMPETITORS)
    items = read_folder(args.dataset, args.split)[: args.limit]
    pipe = load_pipeline(args.model, device=args.device, progress=False)
    pipe.set_progress_bar_config(disable=True)
    profile = profile_for(args.model)
    size = args.size or profile.default_call(pipe).get("height") or 1024
    readout = profile.readout
    result = localize_items(pipe, items, size=size, readout=readout, prompt_template=args.prompt_template,
                            competitors=competitors, t=args.t, samples=args.samples)
    record = {"model": args.model, "dataset": str(args.dataset), "items": len(items), "size": size, "t": args.t,
              "samples": args.samples, "prompt_template": args.prompt_template, "competitors": list(competitors),
              "readout": asdict(readout), **result, "seconds": round(time.perf_counter() - started, 1)}
    with staged_folder(args.out) as out:
        (out / "localize.json").write_text(json.dumps(record, indent=1))
    for method in ("raw", "output-space"):
        s = result[method]
        print(f"{method:<13} mIoU {s['miou']:.3f}  pixel acc {s['pixel_acc']:.3f}  mAP {s['map']:.3f}  "
              f"AUROC {s['auroc']:.3f}  ({s['pairs']} items)")
    print(f"in {record['seconds']}s -> {args.out}/localize.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnscope",
        description="Attention maps and concept erasure for Flux / SD3 (MMDiT) text-to-image transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_maps_command(subparsers)
    add_explain_command(subparsers)
    add_localize_command(subparsers)
    from .shapes.cli import register as register_shapes

    register_shapes(subparsers)
    for ep in entry_points(group="attnscope.commands"):
        try:
            register = ep.load()
        except ImportError as err:  # e.g. the app extra (gradio) is not installed
            _add_unavailable_command(subparsers, ep.name, err)
        else:
            register(subparsers)
    return parser


def _add_unavailable_command(subparsers: argparse._SubParsersAction, name: str, err: ImportError) -> None:
    def run(_: argparse.Namespace) -> int:
        raise CommandError(
            f"'attnscope {name}' is unavailable: {err}. Install the extras: pip install 'attnscope[dev]'"
        )

    subparsers.add_parser(name, help=f"(unavailable: {err.name or err})").set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    # transformers warns at import time about image processors (torchvision) that text-to-image never uses.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, *USER_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
