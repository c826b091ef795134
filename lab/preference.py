"""Preference fine-tuning on the model's own samples: Diffusion-DPO (Wallace et al. 2023) in rectified-flow form.

Training on rendered scenes teaches a model what a right image looks like, never what its own wrong ones look like.
A typical error of the shapes model is one that more training on data does not reduce: asked for two objects, it
sometimes draws one of them twice (benchmarks/RESULTS.md). Here the model samples several images per caption
with its default call, the scene reader (``reader.py``) judges each one against the caption, and a fine-tune
(``attnscope shapes train --preference FILE``) raises the likelihood of the right images *relative to* the wrong
ones drawn for the same caption, measured against a frozen copy of the starting model:

    d(x) = ‖v_θ(x_t, t) − (ε − x)‖² − ‖v_ref(x_t, t) − (ε − x)‖²     (same t and ε for both images of a pair)
    loss = −log σ(−β · (d(winner) − d(loser)))  +  sft · ‖v_θ(winner_t, t) − (ε − winner)‖²

The reference term keeps the model near where it started (β sets how near); the optional ``sft`` term is plain
flow matching on the right images, which keeps the likelihood of the winners from falling with the losers'.

The judge is the eval's own reader, so the captions and seeds drawn here are kept apart from the eval's: captions
come from the renderer's training distribution (two and three objects, synonyms and all connectors) and the
sampling seeds from a seed sequence no fixed-seed protocol uses (``sample_seed``). A model fine-tuned this way
is reported on held-out seeds as well as the eval's (benchmarks/RESULTS.md).

A guidance-distilled model samples and learns at the guidance scale of the call that drew the set (recorded in
it): flow matching on samples of the guided distribution teaches exactly that distribution's velocity, which is
what the model's output at that scale is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attnscope import atomic
from attnscope.shapes import call_kwargs_for
from attnscope.shapes.metrics import score_image
from attnscope.shapes.reader import read_scene
from attnscope.shapes.render import render_scene
from attnscope.viz import to_pixels

#: Format of a saved ``PreferenceSet`` (``save``/``load``); change it when the fields change.
FORMAT_VERSION = 1


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """Generator seed of sample ``sample`` of prompt ``prompt``: hashed from (seed, prompt, sample), so it is far
    from the small consecutive seeds of the eval (0–15) and of held-out sweeps (100–115)."""
    return int(np.random.SeedSequence([seed, 4, prompt, sample]).generate_state(1, dtype=np.uint64)[0] >> 1)


def model_digest(folder: str | Path) -> str:
    """SHA-256 of an exported model's transformer and T5 weights: the same model wherever its folder lies."""
    digest = hashlib.sha256()
    for sub in ("transformer", "text_encoder_2"):
        for path in sorted((Path(folder) / sub).glob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def draw_captions(seed: int, count: int, min_objects: int = 2) -> list[str]:
    """``count`` training-distribution captions with at least ``min_objects`` objects (single objects are drawn
    right already: they would give no pairs)."""
    rng = np.random.default_rng([seed, 3])
    captions: list[str] = []
    while len(captions) < count:
        scene = render_scene(rng)
        if len(scene.objects) >= min_objects:
            captions.append(scene.caption)
    return captions


@dataclass
class PreferenceSet:
    """Samples of one model, judged: ``images[p, k]`` is sample k of ``captions[p]``, ``correct[p, k]`` whether
    the reader found exactly the asked objects in it."""

    captions: list[str]
    images: torch.Tensor  # (P, K, H, W, 3) uint8
    correct: torch.Tensor  # (P, K) bool
    call: dict[str, Any]  # the pipeline call that drew them (guidance scale, steps, size)
    model: str  # the model folder that drew them
    model_digest: str  # ``model_digest`` of that folder: a fine-tune checks it starts from the same weights
    seed: int
    device: str = "cpu"  # where the model sampled: a GPU draws nearly, not bit-for-bit, the CPU's images

    @property
    def guidance_scale(self) -> float:
        """The guidance scale the samples were drawn at (the input of a guidance-distilled model)."""
        return float(self.call.get("guidance_scale", 1.0))

    def pairs(self) -> torch.Tensor:
        """Every (prompt, winner sample, loser sample) of the set, ``(M, 3)`` int64."""
        return (self.correct[:, :, None] & ~self.correct[:, None, :]).nonzero()

    def batch(self, seed: int, step: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Step ``step``'s ``size`` pairs, drawn from the step's own seed: (winner images, loser images, captions).

        The winners are the model's own right samples: scenes rendered for the caption, as winners, teach the
        model to tell its own images from rendered ones, not to count (benchmarks/RESULTS.md).
        """
        rng = np.random.default_rng([seed, 5, step])
        pairs = self.pairs()
        if len(pairs) == 0:
            raise ValueError("the preference set has no pair: no caption has both a right and a wrong sample")
        p, winner, loser = pairs[torch.from_numpy(rng.integers(0, len(pairs), size))].unbind(1)
        return self.images[p, winner].numpy(), self.images[p, loser].numpy(), [self.captions[i] for i in p.tolist()]

    def summary(self) -> dict[str, Any]:
        """Share of right samples and how many captions and pairs the set gives."""
        right = self.correct.float()
        mixed = (right.sum(1) > 0) & (right.sum(1) < right.shape[1])
        return {"captions": len(self.captions), "samples_per_caption": int(right.shape[1]),
                "right": round(float(right.mean()), 4), "captions_with_pairs": int(mixed.sum()),
                "pairs": len(self.pairs())}

    def record(self, path: str | Path) -> dict[str, Any]:
        """What a model trained on this set (saved at ``path``) records of it: the command that draws it again
        (samples are reproducible from the seed) and its ``summary``."""
        guidance = self.call.get("true_cfg_scale", self.call.get("guidance_scale"))
        prompts, samples = self.correct.shape
        command = (f"attnscope shapes preferences --model {self.model} --out {path} --prompts {prompts} "
                   f"--samples {samples} --seed {self.seed} --guidance {guidance:g}")
        if self.device != "cpu":
            command += f" --device {self.device}"
        return {"command": command} | self.summary()

    def save(self, path: str | Path) -> None:
        atomic.torch_save({"format": FORMAT_VERSION, **self.__dict__}, path)

    @classmethod
    def load(cls, path: str | Path) -> PreferenceSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no preference set at {path} (make one with `attnscope shapes preferences`)")
        state = torch.load(path, weights_only=False)
        if state.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"{path} is not a preference set of format {FORMAT_VERSION}")
        return cls(**state)


def sample_preferences(
    pipe: Any,
    model: str,
    prompts: int,
    samples: int = 4,
    seed: int = 0,
    batch: int = 32,
    out: str | Path | None = None,
    guidance_scale: float | None = None,
) -> PreferenceSet:
    """Draw ``samples`` images for each of ``prompts`` training captions with ``pipe``'s default call (guidance
    ``guidance_scale`` if given) and judge them with the reader.

    With ``out``, the set so far is saved there (atomically) after every batch, and a set already there for the
    same model, seed, call and sample count is continued: an interrupted run loses at most one batch.
    """
    if samples < 2:
        raise ValueError(f"samples per caption must be at least 2 to form pairs, got {samples}")
    captions = draw_captions(seed, prompts)
    call = call_kwargs_for(pipe, guidance_scale)
    size = call["height"]
    images = torch.zeros(prompts, samples, size, call["width"], 3, dtype=torch.uint8)
    correct = torch.zeros(prompts, samples, dtype=torch.bool)
    digest = model_digest(model)
    device = str(pipe.device)
    done = 0
    if out is not None and Path(out).is_file():
        previous = PreferenceSet.load(out)
        drawn_as = (previous.model_digest, previous.seed, previous.call, previous.images.shape[1], previous.device)
        same = drawn_as == (digest, seed, call, samples, device)
        if not same or previous.captions != captions[: len(previous.captions)]:
            raise ValueError(f"{out} holds samples of another model, seed, call, sample count or device; remove it "
                             "or choose another --out")
        done = len(previous.captions)
        images[:done], correct[:done] = previous.images, previous.correct
    jobs = [(p, k) for p in range(done, prompts) for k in range(samples)]
    bar = tqdm(total=len(jobs), desc="preference samples", mininterval=10)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        gens = [torch.Generator().manual_seed(sample_seed(seed, p, k)) for p, k in chunk]
        drawn = pipe([captions[p] for p, _ in chunk], generator=gens, output_type="np", **call).images
        for (p, k), pixels in zip(chunk, to_pixels(drawn)):
            images[p, k] = torch.from_numpy(pixels)
            correct[p, k] = score_image(captions[p], read_scene(pixels))["all_correct"]
        bar.update(len(chunk))
        finished = chunk[-1][0] + (chunk[-1][1] == samples - 1)  # prompts whose samples are all drawn
        if out is not None:
            so_far = PreferenceSet(captions[:finished], images[:finished], correct[:finished], call, model, digest,
                                   seed, device)
            so_far.save(out)
    bar.close()
    return PreferenceSet(captions, images, correct, call, model, digest, seed, device)


#: Default β: a margin of 1e-3 in per-row mean squared velocity error (small beside errors of 0.1–1) already
#: counts as a clear preference (benchmarks/RESULTS.md has the margins of real runs).
DEFAULT_BETA = 2000.0

#: ``errors(x_t, t, target)`` -> per-row mean squared velocity error of the trained model (with gradient) and of the
#: frozen reference (without), for noisy latents ``x_t (B, C, H, W)``, noise levels ``t (B,)`` and targets like x_t.
VelocityErrors = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def preference_loss(
    errors: VelocityErrors,
    winners: torch.Tensor,
    losers: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    beta: float = DEFAULT_BETA,
    sft: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Diffusion-DPO loss of pairs of latents ``winners``/``losers (B, C, H, W)`` (a pair shares its caption,
    its noise level ``t (B,)`` and its noise ``(B, C, H, W)``) plus ``sft`` × flow matching on the winners (module
    docstring). Returns (loss, share of pairs the model already prefers more than the reference does)."""
    b = len(winners)
    latents = torch.cat([winners, losers])
    t, noise = torch.cat([t, t])[:, None, None, None], torch.cat([noise, noise])
    model_error, reference_error = errors((1 - t) * latents + t * noise, t.flatten(), noise - latents)
    gain = model_error - reference_error  # < 0: the model fits this image better than the reference does
    margin = gain[:b] - gain[b:]
    loss = -F.logsigmoid(-beta * margin).mean()
    if sft:
        loss = loss + sft * model_error[:b].mean()
    return loss, (margin < 0).float().mean().detach()
