"""The explorer's logic as plain functions: a request -> a traced generation -> pictures of one view of it.

Nothing here imports Gradio, so every step is unit-testable and reusable from a notebook:

    model = open_model("tiny-flux")
    result = generate(model, Request("a red circle and a blue square", seed=0))
    picture = overlay_image(result, View(word="red", layers="double", head=1))

A :class:`Result` keeps the image and the maps of *every* layer, step and head (when they fit in
:attr:`Limits.head_budget_bytes`), so changing the word, layers, steps, head, colormap or opacity afterwards is a
cheap slice of arrays — only a new prompt, seed, size or step count runs the model again.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

import attnscope
from attnscope import viz
from attnscope.adapters import adapter_for, transformer_of
from attnscope.profiles import ModelProfile, profile_for

LayerMode = Literal["all", "double", "single", "blocks"]
#: ``on_step(done, total)`` reports denoising progress.
StepCallback = Callable[[int, int], None]

#: Colormaps offered in the app: perceptually ordered ones first, ``jet`` because the CLI and papers use it.
COLORMAPS: tuple[str, ...] = ("jet", "viridis", "magma", "inferno", "turbo", "gray")


class RequestError(ValueError):
    """A request or view the app refuses; the message is meant for the user, as is."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask, so that a shared server stays responsive and within memory."""

    max_prompt_chars: int = 300
    max_steps: int = 50
    max_side: int = 1024
    #: Per-head maps are kept when they need at most this many bytes; otherwise heads are averaged at capture.
    head_budget_bytes: int = 1 << 30


@dataclass(frozen=True)
class Request:
    """What to generate. ``None`` fields take the model's defaults."""

    prompt: str
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None


@dataclass
class Model:
    """A loaded pipeline and what the app needs to know about it.

    ``check(prompt, height, width)``: model-specific validation that raises ``ValueError`` for what the model
    cannot do (the shapes model knows only its own words) and returns notes for what it does badly (sizes it was
    not trained at); ``None`` when anything goes. ``lock`` serializes pipeline use: one pipeline cannot be traced
    twice at once, and compare loads a LoRA into it temporarily.
    """

    name: str
    pipe: Any
    call_kwargs: dict[str, Any]
    check: Callable[[str, int, int], list[str]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels (one image token)."""
        return adapter_for(self.pipe).size_multiple(self.pipe)

    @property
    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` used when a request leaves them out."""
        if "height" in self.call_kwargs and "width" in self.call_kwargs:
            return int(self.call_kwargs["height"]), int(self.call_kwargs["width"])
        side = int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)
        return side, side

    @property
    def default_steps(self) -> int:
        """Denoising steps used when a request leaves them out (the pipelines' own default is 28)."""
        return int(self.call_kwargs.get("num_inference_steps", 28))


def open_model(name: str = "shapes", device: str = "cpu") -> Model:
    """Load ``name`` (``"shapes"``, ``"tiny-flux"``, a hub id or a folder) with :func:`attnscope.load_pipeline`, with
    its profile's default call and call check."""
    profile = profile_for(name)
    # The app reports progress itself; tqdm bars would only clutter the server log.
    pipe = attnscope.load_pipeline(name, device=device, progress=False)
    return Model(name=name, pipe=pipe, call_kwargs=profile.default_call(pipe), check=call_check(profile))


def call_check(profile: ModelProfile) -> Callable[[str, int, int], list[str]]:
    """The profile's own checks of a call (``ModelProfile.check_call``): what the model cannot draw raises,
    warnings (untrained sizes) come back as notes."""

    def check(prompt: str, height: int, width: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            profile.check_call(prompt, height, width)
        return [str(w.message) for w in caught]

    return check


def distinct_words(maps: attnscope.TokenMaps) -> list[str]:
    """The distinct words of the maps' prompt in order (case-insensitive): one clickable chip each."""
    seen: dict[str, str] = {}
    for word in maps.words():
        seen.setdefault(word.casefold(), word)
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ generation
@dataclass(frozen=True)
class Result:
    """One traced generation: the image and its maps (``token × layer × step [× head]``)."""

    request: Request
    image: Image.Image
    maps: attnscope.TokenMaps
    notes: tuple[str, ...] = ()  # things the user should know about this result (e.g. an untrained size)

    @property
    def words(self) -> list[str]:
        """The prompt's distinct words in order (case-insensitive), each one a clickable chip."""
        return distinct_words(self.maps)

    @property
    def layer_labels(self) -> list[str]:
        """Labels of the captured layers, in forward order (``double.0`` ... ``single.37``)."""
        return [layer.label for layer in self.maps.layers]

    @property
    def n_steps(self) -> int:
        """Number of captured denoising steps."""
        return len(self.maps.steps)

    @property
    def heads(self) -> tuple[int, ...]:
        """Head indices kept; empty when heads were averaged at capture (over the memory budget)."""
        return self.maps.heads


def call_kwargs(model: Model, request: Request, limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """Validate ``request``: the pipeline keyword arguments for it and notes for the user.

    Raises :class:`RequestError` naming the problem when the request is invalid.
    """
    prompt = request.prompt.strip()
    if not prompt:
        raise RequestError("Type a prompt first.")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"The prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}.")
    if not re.search(r"[^\W_]", prompt):
        raise RequestError("The prompt has no words to look at.")
    if not _whole(request.seed) or request.seed < 0:
        raise RequestError(f"The seed must be a whole number ≥ 0, not {request.seed!r}.")
    steps = model.default_steps if request.steps is None else request.steps
    if not _whole(steps) or not 1 <= steps <= limits.max_steps:
        raise RequestError(f"Steps must be a whole number from 1 to {limits.max_steps}, not {steps!r}.")
    default_height, default_width = model.default_size
    height = default_height if request.height is None else request.height
    width = default_width if request.width is None else request.width
    if not (_whole(height) and _whole(width)):
        raise RequestError(f"Height and width must be whole numbers of pixels, not {height!r}×{width!r}.")
    try:
        attnscope.check_size(model.pipe, height, width)
    except ValueError as err:
        raise RequestError(f"Image size {height}×{width}: {err}.") from None
    if max(height, width) > limits.max_side:
        raise RequestError(
            f"Image size {height}×{width} exceeds this server's limit of {limits.max_side} pixels a side."
        )
    notes: list[str] = []
    if model.check is not None:
        try:
            notes = model.check(prompt, height, width)
        except ValueError as err:
            raise RequestError(str(err)) from None
    return {**model.call_kwargs, "num_inference_steps": steps, "height": height, "width": width}, notes


def _whole(value: object) -> bool:
    """True for an ``int`` (not a ``bool``, which would slip through as 0 or 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _per_head_bytes(model: Model, kwargs: dict[str, Any], prompt: str) -> int:
    """Bytes that per-head maps of this generation would retain (float32, non-padding tokens)."""
    adapter = adapter_for(model.pipe)
    text_length = adapter.text_length(model.pipe, kwargs.get("max_sequence_length"))
    tokens = len(adapter.prompt_tokens(model.pipe, prompt, text_length).valid)
    multiple = adapter.size_multiple(model.pipe)
    image_tokens = (kwargs["height"] // multiple) * (kwargs["width"] // multiple)
    transformer = transformer_of(model.pipe)
    layers = len(adapter.layers(transformer))
    heads = int(transformer.config.num_attention_heads)
    return layers * kwargs["num_inference_steps"] * heads * image_tokens * tokens * 4


def generate(
    model: Model,
    request: Request,
    limits: Limits = Limits(),
    on_step: StepCallback | None = None,
    lora: str | Path | None = None,
) -> Result:
    """Run the pipeline on ``request`` under :func:`attnscope.trace` and return the image and its maps.

    Heads are kept per head (``heads="all"``) unless that would exceed ``limits.head_budget_bytes``. The seed
    drives a CPU generator, so an image is the same on any device. ``lora``: a LoRA folder loaded for this call
    only (see :func:`compare`). Raises :class:`RequestError` for invalid requests or LoRA folders.
    """
    kwargs, notes = call_kwargs(model, request, limits)
    prompt = request.prompt.strip()
    with model.lock:
        per_head = _per_head_bytes(model, kwargs, prompt) <= limits.head_budget_bytes
        total = kwargs["num_inference_steps"]

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, total)
            return tensors

        with _lora_loaded(model, lora):
            generator = torch.Generator("cpu").manual_seed(request.seed)
            with attnscope.trace(model.pipe, heads="all" if per_head else "mean") as tr:
                image = model.pipe(prompt, generator=generator, callback_on_step_end=step_end, **kwargs).images[0]
    return Result(request=request, image=image, maps=tr.maps(), notes=tuple(notes))


@contextmanager
def _lora_loaded(model: Model, folder: str | Path | None) -> Iterator[None]:
    """``folder``'s LoRA is active inside; the pipeline is back to the base model on exit, also on errors."""
    if folder is None:
        yield
        return
    path = check_lora(model, folder)
    model.pipe.load_lora_weights(str(path))
    try:
        yield
    finally:
        model.pipe.unload_lora_weights()


def check_lora(model: Model, folder: str | Path) -> Path:
    """``folder`` as a ``Path`` if it holds a LoRA that fits ``model``; :class:`RequestError` saying why not.

    ``attnscope.erase.check_lora_file`` checks every key and shape against the transformer: diffusers alone
    would skip unknown keys silently (an unmodified model shown as the LoRA's) or fail deep inside peft.
    """
    from attnscope.erase import LoraFileError, check_lora_file

    text = str(folder).strip()
    if not text:
        raise RequestError("Give the folder of a LoRA (e.g. the --out folder of `attnscope erase`).")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise RequestError(f"LoRA folder {str(path)!r} does not exist.")
    try:
        check_lora_file(model.pipe, path)
    except LoraFileError as err:
        raise RequestError(str(err)) from None
    return path


def compare(
    model: Model,
    request: Request,
    lora: str | Path,
    limits: Limits = Limits(),
    on_step: StepCallback | None = None,
) -> tuple[Result, Result]:
    """Generate ``request`` with the base model and with the LoRA in ``lora``: same seed, same settings."""
    check_lora(model, lora)  # fail before spending a base generation
    base = generate(model, request, limits, on_step=_half(on_step, 0))
    erased = generate(model, request, limits, on_step=_half(on_step, 1), lora=lora)
    return base, erased


#: The figures of an ``attnscope eval`` report the Compare tab shows, in order: (key, label, relative key).
EVAL_FIGURES: tuple[tuple[str, str, str | None], ...] = (
    ("acc_e", "Acc_e (erased prompts still show it) ↓", None),
    ("acc_g", "Acc_g (synonyms still show it) ↓", None),
    ("acc_ir", "Acc_ir (other prompts drawn right) ↑", "acc_ir_relative"),
    ("acc_ctx", "Acc_ctx (the rest of an erased prompt drawn) ↑", "acc_ctx_relative"),
    ("acc_implicit", "Acc_implicit (drawn unasked) ↓", None),
)


def eval_figures(folder: str | Path) -> str:
    """The headline figures of the ``attnscope eval`` report in a LoRA folder (``FOLDER/eval/eval.json``) as a
    Markdown table, base beside LoRA; a hint to run the evaluation when there is none."""
    from attnscope.erase.run import EVAL_DIR
    from attnscope.erase.worlds.common import REPORT_FILE

    path = Path(folder).expanduser() / EVAL_DIR / REPORT_FILE
    if not path.is_file():
        return f"No evaluation of this LoRA yet: `attnscope eval --lora {folder}` writes {EVAL_DIR}/{REPORT_FILE}."
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return f"{path} is not a readable report; run `attnscope eval --lora {folder}` again."

    def percent(value: Any) -> str:
        return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "–"

    rows = ["| figure | base | LoRA | LoRA ÷ base |", "|---|---|---|---|"]
    for key, label, relative in EVAL_FIGURES:
        if key in report:
            ratio = percent(report.get(relative)) if relative else ""
            rows.append(f"| {label} | {percent(report['base'].get(key))} | {percent(report[key])} | {ratio} |")
    seeds = report.get("seeds", "?")
    return "\n".join([*rows, "", f"From `{path}` ({seeds} seeds per prompt)."])


def _half(on_step: StepCallback | None, half: int) -> StepCallback | None:
    """Progress of one of two generations, reported as a share of both."""
    if on_step is None:
        return None
    return lambda done, total: on_step(half * total + done, 2 * total)


# ------------------------------------------------------------------------------------------------------ views
@dataclass(frozen=True)
class View:
    """How to look at a :class:`Result`.

    ``word``: the word whose map is shown (``None``: the plain image). ``layers``: every captured layer, the
    double- or single-stream ones, or the labels in ``blocks``. ``steps``: first and last step (inclusive),
    ``None`` for all. ``head``: ``"mean"`` over heads or one head index. ``alpha``: heatmap opacity.
    """

    word: str | None = None
    layers: LayerMode = "all"
    blocks: tuple[str, ...] = ()
    steps: tuple[int, int] | None = None
    head: Literal["mean"] | int = "mean"
    cmap: str = "jet"
    alpha: float = 0.5


def default_view(model: Model, result: Result) -> View:
    """The view a new generation opens with: the model's read-out (:func:`attnscope.readout_for`) — its layers
    (all, double, single, or its blocks) and its late steps."""
    readout = attnscope.readout_for(model.name)
    labels = set(result.layer_labels)
    if readout.layers in ("double", "single"):
        layers, blocks = readout.layers, ()
    elif isinstance(readout.layers, str) and readout.layers in labels:
        layers, blocks = "blocks", (readout.layers,)
    elif isinstance(readout.layers, (list, tuple)) and set(readout.layers) <= labels:
        layers, blocks = "blocks", tuple(readout.layers)
    else:
        layers, blocks = "all", ()
    n = result.n_steps
    keep = max(1, round(n * readout.late_steps))
    return View(layers=layers, blocks=blocks, steps=(n - keep, n - 1))


def _selected(result: Result, view: View, keep: str | None = None) -> attnscope.TokenMaps:
    """The maps restricted to the view's layers, steps and head (all words kept); ``keep`` skips one axis."""
    maps = result.maps
    if view.layers == "blocks" and not view.blocks:
        raise RequestError("Choose at least one block, or switch the layers to all / double / single.")
    if view.layers not in ("all", "double", "single", "blocks"):
        raise RequestError(f"Unknown layer choice {view.layers!r}.")
    if view.cmap not in COLORMAPS:
        raise RequestError(f"Unknown colormap {view.cmap!r}; choose one of {', '.join(COLORMAPS)}.")
    if not 0.0 <= view.alpha <= 1.0:
        raise RequestError(f"Opacity must be between 0 and 1, not {view.alpha}.")
    layers = None if view.layers == "all" else list(view.blocks) if view.layers == "blocks" else view.layers
    if layers == "single" and not any(layer.kind == "single" for layer in maps.layers):
        raise RequestError("This model has no single-stream layers.")
    steps = None
    if view.steps is not None:
        first, last = sorted(view.steps)
        if first < 0 or last >= result.n_steps:
            raise RequestError(f"Steps {first}–{last} are outside the generation's steps 0–{result.n_steps - 1}.")
        steps = slice(first, last + 1)
    heads = None
    if view.head != "mean":
        if view.head not in result.heads:
            available = (
                f"heads 0–{len(result.heads) - 1}"
                if result.heads
                else "only the mean (heads were averaged to fit memory)"
            )
            raise RequestError(f"Head {view.head} is not available: {available}.")
        heads = view.head
    try:
        return maps.select(
            layers=None if keep == "layer" else layers,
            steps=None if keep == "step" else steps,
            heads=heads,
        )
    except attnscope.SelectionError as err:
        raise RequestError(str(err)) from None


def word_map(result: Result, view: View) -> np.ndarray:
    """The ``(h, w)`` map of ``view.word`` on the token grid: mean over the selected layers, steps and heads."""
    if view.word is None:
        raise RequestError("Click a word of the prompt first.")
    maps = _selected(result, view)
    try:
        return maps.word(view.word).mean().numpy()
    except (attnscope.UnknownWordError, attnscope.SelectionError) as err:
        raise RequestError(str(err)) from None


def overlay_image(result: Result, view: View) -> Image.Image:
    """The image with ``view.word``'s heatmap blended over it (the plain RGB image when no word is chosen)."""
    if view.word is None:
        return result.image.convert("RGB")
    return viz.overlay(word_map(result, view), result.image, alpha=view.alpha, cmap=view.cmap)


def attention_mass(result: Result, view: View) -> float:
    """Mean attention probability the image puts on ``view.word`` in this view (compare base vs LoRA)."""
    return float(word_map(result, view).mean())


def grid_image(
    result: Result, view: View, words: list[str], by: Literal["layer", "step"], dpi: int = 80
) -> Image.Image:
    """All ``words`` × every layer (``by="layer"``, over the view's steps) or step (over the view's layers)."""
    import matplotlib.pyplot as plt

    if not words:
        raise RequestError("Choose at least one word for the grid.")
    if by not in ("layer", "step"):
        raise RequestError(f"The grid is by 'layer' or 'step', not {by!r}.")
    maps = _selected(result, view, keep=by)
    try:
        fig = viz.grid_figure(maps, words, by=by, image=result.image, alpha=view.alpha, cmap=view.cmap)
    except (attnscope.UnknownWordError, attnscope.SelectionError) as err:
        raise RequestError(str(err)) from None
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)  # the server draws many grids: pyplot would keep every figure alive otherwise
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# ---------------------------------------------------------------------------------------------------- exports
@dataclass(frozen=True)
class Exports:
    """Files written for download."""

    image: Path
    maps: Path


def export_result(result: Result, folder: Path) -> Exports:
    """Write ``image.png`` and ``maps.safetensors`` (:meth:`TokenMaps.load` reads it) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.png"
    result.image.save(image)
    return Exports(image=image, maps=result.maps.save(folder / "maps.safetensors"))


def export_overlay(result: Result, view: View, folder: Path) -> Path:
    """Write the current overlay as ``overlay_<word>.png`` (``overlay.png`` without a word) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    name = "overlay.png" if view.word is None else f"overlay_{re.sub(r'[^0-9A-Za-z_-]+', '_', view.word)}.png"
    path = folder / name
    overlay_image(result, view).save(path)
    return path


__all__ = [
    "COLORMAPS",
    "Exports",
    "Limits",
    "Model",
    "Request",
    "RequestError",
    "Result",
    "View",
    "attention_mass",
    "call_kwargs",
    "check_lora",
    "eval_figures",
    "compare",
    "export_overlay",
    "export_result",
    "generate",
    "grid_image",
    "open_model",
    "overlay_image",
    "word_map",
]
