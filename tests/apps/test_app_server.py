"""End-to-end tests of the served explorer: a real headless Chromium, and several API clients at once.

The app runs in this process on 127.0.0.1 (a free port) with the tiny random Flux. The browser test saves a
screenshot to ``test-artifacts/app_explorer.png``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")

import attnscope  # noqa: E402
from attnscope import viz  # noqa: E402
from attnscope.apps.explorer import open_model  # noqa: E402
from attnscope.apps.ui import build_demo, launch  # noqa: E402
from attnscope.profiles import profile_for  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PROMPT = "a red circle and a blue square"
SEED = 7
TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def erase_config(steps: int) -> dict:
    """A short erasure run on the tiny pipeline, checkpointed every step."""
    from attnscope.erase.cache import CacheConfig

    return {"steps": steps, "batch": 2, "contrastive_rows": 1, "keep_rows": 1, "checkpoint_every": 1,
            "cache": CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=2)}


@contextlib.contextmanager
def serve(folder: Path, steps: int) -> Iterator[tuple[str, Path]]:
    runs = folder / "runs"
    demo = build_demo(open_model("tiny-flux"), workdir=folder / "app", runs=runs, erase_config=erase_config(steps))
    launch(demo, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield demo.local_url, runs
    finally:
        demo.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with serve(tmp_path_factory.mktemp("served"), steps=4) as app:
        yield app


@pytest.fixture(scope="module")
def app_url(served: tuple[str, Path]) -> str:
    return served[0]


def expected_overlay(word: str) -> tuple[np.ndarray, np.ndarray]:
    """Image and overlay of ``word`` through the public API alone, with the app's default settings: the model's
    read-out layers and late steps."""
    pipe = attnscope.load_pipeline("tiny-flux")
    with attnscope.trace(pipe) as tr:
        image = pipe(
            PROMPT, generator=torch.Generator().manual_seed(SEED), **profile_for("tiny-flux").default_call()
        ).images[0]
    grid = attnscope.readout_for("tiny-flux").reduce(tr.maps().word(word)).numpy()
    overlay = viz.overlay(grid, image, alpha=0.5, cmap="jet")
    return np.asarray(image.convert("RGB"), dtype=int), np.asarray(overlay, dtype=int)


def _fetch(page, src: str | None) -> np.ndarray:
    """The RGB pixels of an image the page shows, fetched from the app like the browser does."""
    assert src
    response = page.request.get(src)
    assert response.ok, f"{src}: HTTP {response.status}"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"), dtype=int)


def _page(browser, url: str):
    """A page of the app at a desktop size, with the tests' timeout."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def _browser(p):
    """Headless Chromium as every browser test here launches it."""
    return p.chromium.launch(
        executable_path=str(CHROMIUM),
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update"],
    )


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_browser_generate_then_click_a_word(app_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = _page(browser, app_url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill(str(SEED))
            page.locator("#generate").click()

            chip = page.locator("#words label").filter(has_text="red")
            expect(chip).to_be_visible()
            overlay = page.locator("#overlay img")
            expect(overlay).to_have_count(1)
            before = overlay.get_attribute("src")
            chip.click()
            expect(overlay).not_to_have_attribute("src", before or "")
            after = overlay.get_attribute("src")

            shown_image = _fetch(page, page.locator("#image img").get_attribute("src"))
            shown_before, shown_after = _fetch(page, before), _fetch(page, after)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app_explorer.png"), full_page=True)
        finally:
            browser.close()

    image, overlay_expected = expected_overlay("red")
    assert np.array_equal(shown_image, image), "the displayed image differs from the API's image for the same seed"
    assert np.array_equal(shown_before, image), "before a click, the overlay panel shows the plain image"
    assert not np.array_equal(shown_after, shown_before), "clicking a word did not change the overlay"
    # PNG is lossless; allow 1 level for float rounding of the map (per-head capture averaged vs averaged at capture)
    assert np.abs(shown_after - overlay_expected).max() <= 1


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_browser_explain_a_rendered_scene_then_click_a_word_and_a_concept(app_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    from attnscope.apps.explaining import rendered_scene

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = _page(browser, app_url)
            page.get_by_role("tab", name="Explain an image").click()
            page.locator("#scene-seed input").fill("4")
            page.locator("#render-scene").click()
            prompt = page.locator("#explain-prompt textarea")
            expect(prompt).not_to_have_value("")
            caption = prompt.input_value()
            page.locator("#explain-concepts textarea, #explain-concepts input").first.fill("red, circle, square")
            page.locator("#explain").click()
            word = [w for w in caption.split() if w not in ("a", "an", "and", "with", "next", "to")][0]
            chip = page.locator("#explain-words label").filter(has_text=word).first
            expect(chip).to_be_visible()
            overlay = page.locator("#explain-overlay img")
            expect(overlay).to_have_count(1)
            plain = overlay.get_attribute("src")
            chip.click()
            expect(overlay).not_to_have_attribute("src", plain or "")
            word_src = overlay.get_attribute("src")
            page.locator("#explain-concept-choice label").filter(has_text="circle").click()
            expect(overlay).not_to_have_attribute("src", word_src or "")
            concept_src = overlay.get_attribute("src")

            shown_plain, shown_word, shown_concept = (_fetch(page, src) for src in (plain, word_src, concept_src))
            page.screenshot(path=str(ARTIFACTS / "app_explain.png"), full_page=True)
        finally:
            browser.close()

    image, rendered_caption = rendered_scene(4, 2)
    assert caption == rendered_caption
    explanation = attnscope.explain(attnscope.load_pipeline("tiny-flux"), image, caption,
                                    concepts=["red", "circle", "square"])
    readout = attnscope.readout_for("tiny-flux")
    pairs = ((shown_word, explanation.maps.word(word)), (shown_concept, explanation.concept_maps.word("circle")))
    for shown, maps in pairs:
        expected = viz.overlay(readout.reduce(maps).numpy(), Image.fromarray(image), alpha=0.5, cmap="jet")
        assert np.abs(shown - np.asarray(expected, dtype=int)).max() <= 1
    assert np.array_equal(shown_plain, image)


@pytest.mark.slow
def test_several_clients_at_once_are_queued_not_crashed(app_url: str) -> None:
    from gradio_client import Client

    seeds = [1, 2, 1]
    invalid = {"prompt": "", "seed": 1}

    def ask(seed: int, prompt: str = PROMPT) -> tuple[str, ...]:
        client = Client(app_url, verbose=False)  # a client per user: separate sessions
        job = client.submit(prompt, seed, 2, 32, 32, api_name="/generate")
        return job.result(timeout=60)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(seeds) + 1) as pool:
        futures = [pool.submit(ask, seed) for seed in seeds]
        refused = pool.submit(ask, invalid["seed"], invalid["prompt"])
        outputs = [f.result(timeout=90) for f in futures]
        with pytest.raises(Exception, match="Type a prompt first"):
            refused.result(timeout=90)
    assert time.perf_counter() - started < 90

    images = [np.asarray(Image.open(out[0])) for out in outputs]
    assert np.array_equal(images[0], images[2]), "the same seed must give the same image, whatever ran beside it"
    assert not np.array_equal(images[0], images[1])
    for out in outputs:
        words = [value for _, value in out[2]["choices"]]
        assert words == ["a", "red", "circle", "and", "blue", "square"]


@pytest.mark.slow
def test_views_grid_and_compare_through_the_api(app_url: str, lora_folder: Path) -> None:
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    # word, layers, blocks, first and last step, head, colormap, opacity
    view = ("red", "double", [], 0, 1, "1", "magma", 0.7)
    with pytest.raises(Exception, match="Generate an image first"):
        client.predict("layer", [], None, "all", [], 0, 1, "mean", "jet", 0.5, api_name="/grid")
    client.predict(PROMPT, SEED, 2, 32, 32, api_name="/generate")
    overlay, download = client.predict(*view, api_name="/view")
    assert np.array_equal(np.asarray(Image.open(overlay)), np.asarray(Image.open(download)))
    assert Path(download).name == "overlay_red.png"
    grid = Image.open(client.predict("step", ["red", "blue"], *view, api_name="/grid"))
    assert grid.width > 0 and grid.height > 0

    base, erased, base_map, erased_map, summary, figures = client.predict(
        str(lora_folder), PROMPT, SEED, 2, 32, 32, *view, api_name="/compare"
    )
    assert figures.startswith("No evaluation of this LoRA yet")
    assert not np.array_equal(np.asarray(Image.open(base)), np.asarray(Image.open(erased)))
    assert not np.array_equal(np.asarray(Image.open(base_map)), np.asarray(Image.open(erased_map)))
    assert summary.startswith("Mean attention on **red**")
    with pytest.raises(Exception, match="does not exist"):
        client.predict("/no/such/lora", PROMPT, SEED, 2, 32, 32, *view, api_name="/compare")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_browser_erase_the_clicked_word_then_compare_opens_on_it(served: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, runs = served
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = _page(browser, url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill(str(SEED))
            page.locator("#generate").click()
            chip = page.locator("#words label").filter(has_text="blue")
            expect(chip).to_be_visible()
            chip.click()
            page.locator("#erase").click()
            expect(page.locator("#erase-status")).to_contain_text("Erased blue with eraseanything", timeout=90_000)
            expect(page.get_by_role("tab", name="Compare")).to_have_attribute("aria-selected", "true")
            (run,) = (r for r in runs.iterdir() if r.name.startswith("blue-eraseanything-"))
            expect(page.locator("#lora input")).to_have_value(str(run))
            expect(page.locator("#mass")).to_contain_text("Mean attention on blue")
            page.locator("#lora input").click()  # earlier runs are offered in the dropdown
            expect(page.get_by_role("option", name=str(run))).to_be_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app_erase.png"), full_page=True)
        finally:
            browser.close()
    assert (run / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_cancel_stops_a_running_erasure_and_frees_the_model(tmp_path: Path) -> None:
    from gradio_client import Client

    def step(run: Path) -> int:
        return torch.load(run / "checkpoint.pt", weights_only=False)["step"]

    with serve(tmp_path, steps=100_000) as (url, runs):
        client = Client(url, verbose=False)
        client.predict(PROMPT, SEED, 2, 32, 32, api_name="/generate")
        view = ("red", "all", [], 0, 1, "mean", "jet", 0.5)
        job = client.submit("esd", *view, api_name="/erase")
        deadline = time.monotonic() + 60
        while not any((r / "checkpoint.pt").is_file() for r in runs.glob("*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.predict(api_name="/cancel_erase").startswith("Cancelled")
        (run,) = runs.iterdir()
        # The model is free again within a step: a generation goes through.
        image = client.predict(PROMPT, SEED, 2, 32, 32, api_name="/generate")[0]
        assert Image.open(image).size == (32, 32)
        stopped = step(run)
        time.sleep(1.0)
        assert step(run) == stopped < 100_000 and not (run / "pytorch_lora_weights.safetensors").exists()
        assert job.done()
