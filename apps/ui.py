"""The explorer's Gradio layout: components and events wired to the plain functions of :mod:`.explorer`.

Handlers here only translate between widgets and :class:`~.explorer.Request` / :class:`~.explorer.View` and turn
:class:`~.explorer.RequestError` into a visible ``gr.Error``; the work happens in :mod:`.explorer`.

Concurrency: events that run the model share one queue slot (``concurrency_id="model"``, limit 1), so users
wait in line instead of running out of memory; view events (slicing stored maps) run two at a time beside them.
An erasure run takes that slot for its whole training; its Cancel stops it at the next step.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from PIL import Image

from attnscope import atomic

from .erasure import EraseRequest, ErasureCancelled, erase_word, list_runs, method_choices
from .explaining import MAX_SAMPLES, ExplainRequest, explain_image, explained_overlay, rendered_scene
from .explorer import (
    COLORMAPS,
    Limits,
    Model,
    Request,
    RequestError,
    Result,
    View,
    attention_mass,
    compare,
    default_view,
    distinct_words,
    eval_figures,
    export_overlay,
    export_result,
    generate,
    grid_image,
    overlay_image,
)

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: Tiny models make tiny images (32 px): fill the panel, with sharp pixels instead of a blur.
CSS = """
.pixelated img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#words .wrap label { border-radius: 999px; }
"""
MAX_QUEUE = 16  # waiting requests beyond this are turned away at once instead of piling up
#: A session's maps can be large (per-head maps of a real model): idle sessions give them back after this long.
SESSION_TTL_S = 2 * 3600


def _user_errors(fn: F) -> F:
    """Show a refused request as ``gr.Error`` with its message; any other failure as ``gr.Error`` too, logged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RequestError as err:
            raise gr.Error(str(err)) from None
        except gr.Error:
            raise
        except Exception as err:  # the server must keep serving: report, do not crash the session
            log.exception("explorer request failed")
            raise gr.Error(f"Something went wrong: {type(err).__name__}: {err}") from None

    return wrapper  # type: ignore[return-value]


def _request(
    prompt: str, seed: float | None, steps: float | None, height: float | None, width: float | None
) -> Request:
    """A request from widget values (Gradio numbers arrive as floats or ``None``)."""

    def whole(value: float | None, name: str) -> int | None:
        if value is None:
            return None
        if not math.isfinite(value) or float(value) != int(value):
            raise RequestError(f"{name} must be a whole number, not {value}.")
        return int(value)

    return Request(
        prompt=prompt or "",
        seed=whole(seed, "The seed") or 0,
        steps=whole(steps, "Steps"),
        height=whole(height, "Height"),
        width=whole(width, "Width"),
    )


def _view(
    word: str | None, layers: str, blocks: list[str], first: float, last: float, head: str, cmap: str, alpha: float
) -> View:
    """A view from widget values."""
    return View(
        word=word or None,
        layers=layers,  # type: ignore[arg-type]  # validated by the explorer
        blocks=tuple(blocks or ()),
        steps=(int(first), int(last)),
        head="mean" if head in (None, "mean") else int(head),
        cmap=cmap,
        alpha=float(alpha),
    )


def _progress(progress: gr.Progress, what: str) -> Callable[[int, int], None]:
    """An ``on_step`` callback that moves Gradio's progress bar."""
    return lambda done, total: progress((done, total), desc=f"{what}: step {done}/{total}")


def _shown(image: Image.Image, folder: Path) -> Path:
    """``image`` as a PNG file in the session's ``folder``, which is what the image components are handed.

    Handed a PIL image, Gradio writes it into its cache in place (truncate, then write) under a name made from the
    image's bytes, so two sessions showing the same image at once (same prompt and seed) can serve each other a
    half-written file. Handed a path, Gradio copies it under a temporary name and renames it into place. Our file is
    written the same way and named by its bytes, so it is never rewritten while it is read.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    data = buffer.getvalue()
    path = folder / "shown" / f"{hashlib.blake2b(data, digest_size=16).hexdigest()}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(data, path)
    return path


def _remove_folder(folder: Path | None) -> None:
    """Delete a session's folder (downloads, shown images) when Gradio drops the session."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def build_demo(
    model: Model,
    limits: Limits = Limits(),
    workdir: Path | None = None,
    runs: Path = Path("runs"),
    erase_config: dict[str, Any] | None = None,
) -> gr.Blocks:
    """The explorer app for ``model``. The files it serves (downloads, shown images) go to ``workdir`` (default: a
    fresh temporary folder), one sub-folder per browser session, removed with the session. Erasure runs started in
    the app go to ``runs``, whose finished runs the Compare tab lists; ``erase_config``: EraseConfig fields they
    use instead of the defaults (e.g. fewer steps on a shared server)."""
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="attnscope-app-"))
    #: Session -> its erasure run's cancel flag (set by Cancel, read by the run after each step).
    cancel_flags: dict[str, threading.Event] = {}

    def _folder(folder: Path | None) -> Path:
        """The session's folder, named on its first use."""
        return folder or workdir / uuid.uuid4().hex

    height, width = model.default_size
    multiple = model.size_multiple

    with gr.Blocks(title="attnscope explorer", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        result_state = gr.State(None, time_to_live=SESSION_TTL_S)
        compare_state = gr.State(None, time_to_live=SESSION_TTL_S)
        explain_state = gr.State(None, time_to_live=SESSION_TTL_S)
        folder_state = gr.State(None, delete_callback=_remove_folder)
        gr.Markdown(f"## attnscope explorer — where does each word look?  \nModel: `{model.name}`")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt", value="a red circle and a blue square", elem_id="prompt", max_lines=3
                )
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(
                        1, limits.max_steps, value=model.default_steps, step=1, label="Denoising steps", elem_id="steps"
                    )
                with gr.Row():
                    height_box = gr.Number(label="Height", value=height, precision=0, step=multiple, elem_id="height")
                    width_box = gr.Number(label="Width", value=width, precision=0, step=multiple, elem_id="width")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                words = gr.Radio([], label="Words — click one to see where it looks", elem_id="words")
                with gr.Accordion("Layers, steps, head, colours", open=True):
                    layer_mode = gr.Radio(
                        ["all", "double", "single", "blocks"], value="all", label="Layers", elem_id="layer-mode"
                    )
                    blocks = gr.CheckboxGroup([], label="Blocks (when layers = blocks)", elem_id="blocks")
                    step_first = gr.Slider(0, 1, value=0, step=1, label="From step", elem_id="step-first")
                    step_last = gr.Slider(0, 1, value=1, step=1, label="To step", elem_id="step-last")
                    head = gr.Dropdown(["mean"], value="mean", label="Head", elem_id="head")
                    with gr.Row():
                        cmap = gr.Dropdown(list(COLORMAPS), value=COLORMAPS[0], label="Colormap", elem_id="cmap")
                        alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity", elem_id="alpha")
            with gr.Column(scale=2), gr.Tabs(selected="explore", elem_id="tabs") as tabs:
                with gr.Tab("Explore", id="explore"):
                    with gr.Row():
                        image = gr.Image(
                            label="Image", format="png", height=320, elem_id="image", elem_classes="pixelated"
                        )
                        overlay = gr.Image(
                            label="Overlay", format="png", height=320, elem_id="overlay", elem_classes="pixelated"
                        )
                    with gr.Row():
                        download_image = gr.DownloadButton("Download image", elem_id="download-image")
                        download_overlay = gr.DownloadButton("Download overlay", elem_id="download-overlay")
                        download_maps = gr.DownloadButton("Download maps (.safetensors)", elem_id="download-maps")
                    with gr.Row():
                        method = gr.Dropdown(method_choices(), value="eraseanything", label="Erasure method",
                                             elem_id="erase-method", scale=3)
                        erase_button = gr.Button("Erase the clicked word", variant="stop", elem_id="erase", scale=1)
                        cancel_button = gr.Button("Cancel", elem_id="erase-cancel", scale=1)
                    erase_status = gr.Markdown(elem_id="erase-status")
                with gr.Tab("Grid", id="grid-tab"):
                    grid_by = gr.Radio(["layer", "step"], value="layer", label="Words ×", elem_id="grid-by")
                    grid_words = gr.CheckboxGroup([], label="Words", elem_id="grid-words")
                    grid_button = gr.Button("Draw grid", elem_id="grid-draw")
                    grid = gr.Image(label="Grid", format="png", elem_id="grid")
                with gr.Tab("Compare", id="compare"):
                    lora = gr.Dropdown(
                        list_runs(runs), value=None, allow_custom_value=True, elem_id="lora",
                        label=f"LoRA: a run in {runs} (newest first), or the folder of another",
                    )
                    compare_button = gr.Button("Compare base vs LoRA (same prompt and seed)", elem_id="compare")
                    with gr.Row():
                        base_image = gr.Image(label="Base", format="png", height=240, elem_classes="pixelated")
                        lora_image = gr.Image(label="With LoRA", format="png", height=240, elem_classes="pixelated")
                    with gr.Row():
                        base_overlay = gr.Image(
                            label="Base: word map", format="png", height=240, elem_classes="pixelated"
                        )
                        lora_overlay = gr.Image(
                            label="With LoRA: word map", format="png", height=240, elem_classes="pixelated"
                        )
                    mass = gr.Markdown(elem_id="mass")
                    figures = gr.Markdown(elem_id="eval-figures")
                with gr.Tab("Explain an image", id="explain-tab"):
                    with gr.Row():
                        explain_input = gr.Image(label="Image to explain (upload, or render a scene)", type="numpy",
                                                 sources=["upload"], format="png", height=240,
                                                 elem_id="explain-image", elem_classes="pixelated")
                        explain_overlay = gr.Image(label="Map", format="png", height=240, elem_id="explain-overlay",
                                                   elem_classes="pixelated")
                    with gr.Row():
                        scene_seed = gr.Number(label="Scene seed", value=0, precision=0, minimum=0,
                                               elem_id="scene-seed")
                        scene_objects = gr.Slider(1, 3, value=2, step=1, label="Objects", elem_id="scene-objects")
                        render_button = gr.Button("Render a scene", elem_id="render-scene")
                    explain_prompt = gr.Textbox(label="Prompt that describes the image", elem_id="explain-prompt",
                                                max_lines=2)
                    explain_concepts = gr.Textbox(label="Concepts for output-space maps (comma-separated, optional)",
                                                  elem_id="explain-concepts", max_lines=1)
                    with gr.Row():
                        explain_t = gr.Slider(0.05, 0.95, value=0.3, step=0.05, label="Noise level t",
                                              elem_id="explain-t")
                        explain_samples = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="Noise draws",
                                                    elem_id="explain-samples")
                    explain_button = gr.Button("Explain", variant="primary", elem_id="explain")
                    explain_words = gr.Radio([], label="Words (raw attention)", elem_id="explain-words")
                    explain_concept_choice = gr.Radio([], label="Concepts (output space)",
                                                      elem_id="explain-concept-choice")

        view_inputs = [words, layer_mode, blocks, step_first, step_last, head, cmap, alpha]

        @_user_errors
        def on_generate(
            prompt_text: str, seed_value: float, steps_value: float, h: float, w: float, folder: Path | None,
            progress: gr.Progress = gr.Progress(),
        ) -> tuple[Any, ...]:  # fmt: skip
            request = _request(prompt_text, seed_value, steps_value, h, w)
            result = generate(model, request, limits, on_step=_progress(progress, "Generating"))
            folder = _folder(folder)  # the files of a new generation replace the old ones
            files = export_result(result, folder)
            for note in result.notes:
                gr.Warning(note)
            if not result.heads:
                gr.Warning("Per-head maps would not fit this server's memory budget: heads are averaged.")
            last = result.n_steps - 1
            opening = default_view(model, result)  # the model's read-out: its layers and late steps
            return (
                result,
                folder,
                _shown(result.image, folder),
                _shown(overlay_image(result, View()), folder),
                gr.update(choices=result.words, value=None),
                gr.update(choices=result.layer_labels, value=list(opening.blocks)),
                gr.update(value=opening.layers),
                gr.update(maximum=max(last, 1), value=opening.steps[0], interactive=last > 0),
                gr.update(maximum=max(last, 1), value=opening.steps[1], interactive=last > 0),
                gr.update(choices=["mean", *map(str, result.heads)], value="mean"),
                gr.update(choices=result.words, value=result.words),
                files.image,
                files.maps,
                None,
            )

        generate_button.click(
            on_generate,
            inputs=[prompt, seed, steps, height_box, width_box, folder_state],
            outputs=[result_state, folder_state, image, overlay, words, blocks, layer_mode, step_first, step_last, head,
                     grid_words, download_image, download_maps, download_overlay],
            api_name="generate",
            concurrency_id="model",
            concurrency_limit=1,
        )  # fmt: skip

        @_user_errors
        def on_view(result: Result | None, folder: Path | None, *values: Any) -> tuple[Any, Any]:
            if result is None or folder is None:
                return gr.skip(), gr.skip()
            view = _view(*values)
            path = export_overlay(result, view, folder) if view.word else None
            return _shown(overlay_image(result, view), folder), path

        gr.on(
            [c.change for c in view_inputs],
            on_view,
            inputs=[result_state, folder_state, *view_inputs],
            outputs=[overlay, download_overlay],
            api_name="view",
            trigger_mode="always_last",
            concurrency_limit=2,
        )

        @_user_errors
        def on_grid(result: Result | None, folder: Path | None, by: str, chosen: list[str], *values: Any) -> Any:
            if result is None or folder is None:
                raise RequestError("Generate an image first.")
            return _shown(grid_image(result, _view(*values), list(chosen or ()), by), folder)  # type: ignore[arg-type]

        grid_button.click(
            on_grid,
            inputs=[result_state, folder_state, grid_by, grid_words, *view_inputs],
            outputs=grid,
            api_name="grid",
            concurrency_limit=2,
        )

        def compared_views(pair: tuple[Result, Result], view: View, folder: Path) -> tuple[Path, Path, str]:
            base, erased = pair
            if view.word is None or view.word.casefold() not in {w.casefold() for w in base.words}:
                # no word yet, or the word of a newer prompt: show the images, not an error
                view, summary = replace(view, word=None), "Click a word of the compared prompt."
            else:
                before, after = attention_mass(base, view), attention_mass(erased, view)
                change = f"{100 * (after - before) / before:+.1f} %" if before > 0 else "n/a"
                summary = f"Mean attention on **{view.word}**: base {before:.4g} → LoRA {after:.4g} ({change})"
            return _shown(overlay_image(base, view), folder), _shown(overlay_image(erased, view), folder), summary

        @_user_errors
        def on_compare(
            lora_folder: str, folder: Path | None, prompt_text: str, seed_value: float, steps_value: float,
            h: float, w: float, *values: Any,
            progress: gr.Progress = gr.Progress(),
        ) -> tuple[Any, ...]:  # fmt: skip
            request = _request(prompt_text, seed_value, steps_value, h, w)
            base, erased = compare(model, request, lora_folder, limits, on_step=_progress(progress, "Base, then LoRA"))
            folder = _folder(folder)
            views = compared_views((base, erased), _view(*values), folder)
            images = _shown(base.image, folder), _shown(erased.image, folder)
            return (base, erased), folder, *images, *views, eval_figures(lora_folder)

        compare_button.click(
            on_compare,
            inputs=[lora, folder_state, prompt, seed, steps, height_box, width_box, *view_inputs],
            outputs=[compare_state, folder_state, base_image, lora_image, base_overlay, lora_overlay, mass, figures],
            api_name="compare",
            concurrency_id="model",
            concurrency_limit=1,
        )

        @_user_errors
        def on_compare_view(pair: tuple[Result, Result] | None, folder: Path | None, *values: Any) -> tuple[Any, ...]:
            if pair is None or folder is None:
                return gr.skip(), gr.skip(), gr.skip()
            return compared_views(pair, _view(*values), folder)

        gr.on(
            [c.change for c in view_inputs],
            on_compare_view,
            inputs=[compare_state, folder_state, *view_inputs],
            outputs=[base_overlay, lora_overlay, mass],
            api_visibility="private",
            trigger_mode="always_last",
            concurrency_limit=2,
        )
        @_user_errors
        def on_erase(
            result: Result | None, chosen_method: str, folder: Path | None, request: gr.Request, *values: Any,
            progress: gr.Progress = gr.Progress(),
        ) -> tuple[Any, ...]:  # fmt: skip
            word = values[0]  # the clicked word, first of the view's inputs
            if result is None or not word:
                raise RequestError("Generate an image and click the word to erase first.")
            flag = cancel_flags.setdefault(request.session_hash or "", threading.Event())
            flag.clear()
            try:
                run = erase_word(model, EraseRequest(word, result.request.prompt, chosen_method), runs,
                                 on_step=_progress(progress, f"Erasing {word!r}"), cancelled=flag.is_set,
                                 config=erase_config)
            except ErasureCancelled as err:
                return (gr.skip(),) * 10 + (str(err),)
            # Compare opens on the new run: the same prompt and seed, base and erased.
            base, erased = compare(model, result.request, run, limits, on_step=_progress(progress, "Base, then LoRA"))
            folder = _folder(folder)
            views = compared_views((base, erased), _view(*values), folder)
            images = _shown(base.image, folder), _shown(erased.image, folder)
            return (
                gr.Tabs(selected="compare"),
                gr.update(choices=list_runs(runs), value=str(run)),
                (base, erased),
                folder,
                *images,
                *views,
                eval_figures(run),
                f"Erased **{word}** with {chosen_method} → `{run}`",
            )

        erase_event = erase_button.click(
            on_erase,
            inputs=[result_state, method, folder_state, *view_inputs],
            outputs=[tabs, lora, compare_state, folder_state, base_image, lora_image, base_overlay, lora_overlay, mass,
                     figures, erase_status],
            api_name="erase",
            concurrency_id="model",
            concurrency_limit=1,
        )  # fmt: skip

        def on_cancel(request: gr.Request) -> str:
            flag = cancel_flags.get(request.session_hash or "")
            if flag is None:
                return "Nothing to cancel."
            flag.set()
            return "Cancelled: the run stops after its current step and keeps its checkpoint."

        @_user_errors
        def on_render(seed_value: float, objects: float) -> tuple[Any, str]:
            return rendered_scene(int(seed_value or 0), int(objects))

        render_button.click(on_render, inputs=[scene_seed, scene_objects], outputs=[explain_input, explain_prompt],
                            api_name="render_scene", concurrency_limit=2)

        @_user_errors
        def on_explain(
            picture: Any, prompt_text: str, concepts_text: str, t: float, samples: float, folder: Path | None,
            progress: gr.Progress = gr.Progress(),
        ) -> tuple[Any, ...]:  # fmt: skip
            progress(0, desc="Explaining")
            concepts = tuple(c.strip() for c in (concepts_text or "").split(",") if c.strip())
            request = ExplainRequest(prompt=prompt_text or "", concepts=concepts, t=float(t), samples=int(samples))
            explanation, notes = explain_image(model, picture, request)
            for note in notes:
                gr.Warning(note)
            folder = _folder(folder)
            return (
                explanation,
                folder,
                _shown(explained_overlay(model, explanation, None, None), folder),
                gr.update(choices=distinct_words(explanation.maps), value=None),
                gr.update(choices=list(concepts), value=None),
            )

        explain_button.click(
            on_explain,
            inputs=[explain_input, explain_prompt, explain_concepts, explain_t, explain_samples, folder_state],
            outputs=[explain_state, folder_state, explain_overlay, explain_words, explain_concept_choice],
            api_name="explain",
            concurrency_id="model",
            concurrency_limit=1,
        )

        @_user_errors
        def on_explain_view(explanation: Any, folder: Path | None, word: str | None, concept: str | None,
                            colormap: str, opacity: float) -> Any:
            if explanation is None or folder is None:
                return gr.skip()
            shown = explained_overlay(model, explanation, word, concept, cmap=colormap, alpha=float(opacity))
            return _shown(shown, folder)

        # One map at a time: picking a word clears the concept and the reverse (user input only, so that the
        # cleared radio's own change does not clear the pick back).
        explain_words.input(lambda: None, outputs=explain_concept_choice, api_visibility="private")
        explain_concept_choice.input(lambda: None, outputs=explain_words, api_visibility="private")
        gr.on(
            [explain_words.change, explain_concept_choice.change, cmap.change, alpha.change],
            on_explain_view,
            inputs=[explain_state, folder_state, explain_words, explain_concept_choice, cmap, alpha],
            outputs=explain_overlay,
            api_name="explain_view",
            trigger_mode="always_last",
            concurrency_limit=2,
        )

        cancel_button.click(on_cancel, outputs=erase_status, cancels=[erase_event], api_name="cancel_erase",
                            concurrency_limit=None)
        demo.load(lambda: gr.update(choices=list_runs(runs)), outputs=lora, api_visibility="private")
    demo.queue(default_concurrency_limit=2, max_size=MAX_QUEUE)
    return demo


def launch(
    demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True
) -> gr.Blocks:
    """Serve ``demo`` (``block=False`` returns at once, for tests). ``share`` opens a public Gradio link."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        css=CSS,
        ssr_mode=False,  # server-side rendering needs Node.js; the plain client works everywhere
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=True,
    )
    return demo


__all__ = ["CSS", "build_demo", "launch"]
