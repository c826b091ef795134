"""Token grounding loss of the shapes trainer: every colour / shape word should attend to the object it names.

Adapted from TokenCompose (Wang et al., CVPR 2024), which supervises a text-to-image model's cross-attention with
segmentation masks and reports better multi-object composition. Here the renderer gives exact masks for free.
For each colour / shape word occurrence of a caption, its image→text attention column (heads averaged, pieces of a
multi-piece word summed; from ``attnscope.trace(differentiable=True)``, the same capture the toolkit ships) is
normalized over the image tokens into a distribution ``q``, and the loss is ``KL(p ‖ q)`` where ``p`` is the
object's pixel coverage of each image token, normalized. Its minimum puts the word's attention uniformly on its
object and nowhere else — what a thresholded word map can then be scored for — while how much the image attends to
text at all stays free. Averaged over word occurrences and supervised layers.

The supervised layers are a choice of the run (``TrainConfig.grounding_layers``); the shapes eval reports every
layer, so supervised and unsupervised layers can be told apart in its per-layer curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnscope.shapes.render import Scene
from attnscope.tokens import PromptTokens
from attnscope.trace import column_mask


@dataclass(frozen=True)
class GroundingTargets:
    """Word–object pairs of one batch, in the layout of a ``trace(positions=positions)`` capture.

    ``positions``: the kept text positions (union over rows). ``rows (P,)``: batch row of each pair.
    ``columns (P, T_kept)``: 1 where a kept position is one of the pair's word pieces. ``targets (P, N)``: the
    object's coverage of each image token, normalized to sum 1 (tokens in FluxPipeline's packing order).
    """

    positions: tuple[int, ...]
    rows: torch.Tensor
    columns: torch.Tensor
    targets: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.rows.numel())


def token_coverage(mask: np.ndarray, patch: int = 2) -> np.ndarray:
    """``(H, W)`` bool mask -> ``(H/patch · W/patch,)`` fraction of each patch covered, row-major like
    ``FluxPipeline._pack_latents`` (the bundled VAE keeps pixel resolution, so one token is a 2×2 pixel patch)."""
    h, w = mask.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} mask does not split into {patch}x{patch} token patches")
    return mask.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3)).reshape(-1)


def grounding_targets(scenes: Sequence[Scene], tokens: Sequence[PromptTokens | None]) -> GroundingTargets | None:
    """The pairs of a batch (``tokens[b]`` is ``scenes[b]``'s caption tokenized as the model sees it; None for a
    row whose caption was dropped). None when no row names an object."""
    pairs: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for b, (scene, toks) in enumerate(zip(scenes, tokens)):
        if toks is None:
            continue
        for word_index, word, obj in scene.word_objects:
            occurrence = toks.words[word_index]
            if occurrence.text.lower() != word:
                raise ValueError(f"word {word_index} of {scene.caption!r} is {occurrence.text!r}, not {word!r}")
            if occurrence.positions:  # truncated words have no column to supervise
                pairs.append((b, occurrence.positions, token_coverage(scene.objects[obj].mask)))
    if not pairs:
        return None
    positions = tuple(sorted({p for _, pos, _ in pairs for p in pos}))
    columns = column_mask(positions, [pos for _, pos, _ in pairs]).float()
    targets = torch.from_numpy(np.stack([cov / cov.sum() for _, _, cov in pairs])).float()
    return GroundingTargets(positions, torch.tensor([b for b, _, _ in pairs]), columns, targets)


def grounding_loss(maps: Sequence[torch.Tensor], targets: GroundingTargets) -> torch.Tensor:
    """Mean ``KL(target ‖ word map)`` over pairs and layers; ``maps``: one ``(B, N, T_kept)`` capture per layer."""
    stacked = torch.stack(list(maps))[:, targets.rows]  # (L, P, N, T_kept)
    word = torch.einsum("lpnt,pt->lpn", stacked, targets.columns.to(stacked))
    log_q = torch.log(word.clamp_min(1e-12)) - torch.log(word.sum(-1, keepdim=True).clamp_min(1e-12))
    p = targets.targets.to(stacked)
    # KL(p ‖ q) = Σ p log p − Σ p log q; terms with p = 0 contribute nothing.
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return kl.mean()


__all__ = ["GroundingTargets", "grounding_loss", "grounding_targets", "token_coverage"]
