"""Unified Concept Editing (Gandikota et al., WACV 2024) on the text-side key/value projections, in closed form.

A text-side projection ``W`` (``add_k_proj``, ``add_v_proj`` of each dual-stream block) is replaced by the ``W'``
that minimizes

    Σ_edit ‖W' x − W x_anc‖² + λ Σ_keep ‖W' x − W x‖² + μ ‖W' − W‖²_F
    ⇒ W' = (Σ_edit W x_anc xᵀ + λ Σ_keep W x xᵀ + μ W) (Σ_edit x xᵀ + λ Σ_keep x xᵀ + μ I)⁻¹

over token rows ``x`` of the projection's input: *edit* rows are every text position of the concept's prompts
(and of their synonym versions), each mapped to the same position of the anchor prompt (``x_anc``): the concept
is spread over every token by a contextual text encoder, not only its own; *keep* rows are the anchor prompts, the
irrelevant concepts swapped in, and the preservation prompts. Unlike cross-attention in a UNet, whose input is the
text encoder's output, these projections see time-modulated text states that joint attention mixes with the
image: the rows are collected at states of the base model's own trajectories of the concept prompts, over their
timesteps, block after block, each block's rows drawn from the model with the blocks before it already edited.
The ridge ``μ`` (``RIDGE`` × the mean eigenvalue of the system) keeps the solve well-posed however few keep rows
there are; the log records each system's condition number.

The edit ``W' − W`` is written as a LoRA of rank ``--rank`` (its leading singular directions; the log records the
share of its energy kept), so every tool that loads an erasure LoRA loads it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnscope.adapters import adapter_for
from attnscope.tokens import PromptTokens

from ..cache import multi_anchor_prompt, sample_concept_points
from ..lora import LoraSettings, write_lora
from ..sampling import PromptBank
from ..spec import preservation_prompts, replace_word
from .base import ClosedFormMethod

if TYPE_CHECKING:
    from ..config import EraseConfig
    from ..spec import ConceptSpec

__all__ = ["RIDGE", "UCE", "token_alignment"]

#: The ridge μ relative to the mean eigenvalue of the system's input covariance.
RIDGE = 1e-3
#: Weight λ of a keep row against an edit row.
KEEP_WEIGHT = 1.0
#: At most this many trajectory states (evenly spread) feed the rows: the text states change slowly along a
#: trajectory, and the solve takes seconds instead of minutes.
MAX_POINTS = 64
#: Irrelevant concepts swapped in per point (rotating over the spec's list), as keep rows.
IRRELEVANT_PER_POINT = 3


class _Stop(Exception):
    """Raised once the block being edited has seen its inputs: nothing after it is needed."""


class UCE(ClosedFormMethod):
    name = "uce"
    summary = "closed-form edit of the text-side keys and values: concept rows mapped to the anchor's, others kept"
    options = frozenset({"rank", "targets", "sample_steps", "cache_seeds"})
    lora_targets = ("add_k_proj", "add_v_proj")

    def fit(
        self,
        pipe: Any,
        specs: Sequence[ConceptSpec],
        config: EraseConfig,
        out: Path,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        transformer = pipe.transformer
        call = adapter_for(pipe).model_call(
            pipe, config.height, config.width,
            guidance_scale=config.guidance_scale, true_cfg_scale=config.true_cfg_scale or 1.0,
        )
        bank = PromptBank(call, config.max_sequence_length)
        x, sigma, groups = _rows(call, bank, specs, config)
        layers = _layers_to_edit(transformer, config.lora)
        originals = {name: _linear(transformer, name).weight.detach().clone() for _, names in layers
                     for name in names}
        deltas, stats = {}, {}
        try:
            for done, (layer, names) in enumerate(layers):
                systems = _collect(call, bank, transformer, x, sigma, groups, layer, names, config.cache.batch)
                for name in names:
                    weight = _linear(transformer, name).weight
                    delta, stats[name] = _solve(weight.detach().float(), *systems[name])
                    deltas[name] = delta
                    with torch.no_grad():  # later blocks see this one edited, as the final model will
                        weight.add_(delta.to(weight.device, weight.dtype))
                if progress:
                    progress(done + 1, len(layers))
        finally:
            with torch.no_grad():
                for name, weight in originals.items():
                    _linear(transformer, name).weight.copy_(weight)
        short = {n: s["rank"] for n, s in stats.items() if s["rank"] < _linear(transformer, n).in_features}
        if short:
            name, rank = min(short.items(), key=lambda item: item[1])
            warnings.warn(
                f"uce: the rows span only {rank} of the {_linear(transformer, name).in_features} input dimensions of "
                f"{name} (and {len(short) - 1} more projections fall short): the ridge keeps the weights in the "
                "rest; more prompts, preservation prompts or --cache-seeds make the edit better determined",
                stacklevel=2,
            )
        state = {}
        for name, delta in deltas.items():
            down, up, stats[name]["energy_kept"] = _factor(delta, config.lora.rank)
            state[f"{name}.lora_A.weight"] = down.contiguous()
            state[f"{name}.lora_B.weight"] = up.contiguous()
        write_lora(out, state, config.lora, list(deltas), adapter_for(pipe).name)
        return {
            "points": len(x),
            "rows": {"edit": sum(len(g.edit) for g in groups), "keep": sum(1 + len(g.keep) for g in groups)},
            "ridge": RIDGE,
            "keep_weight": KEEP_WEIGHT,
            "modules": stats,
        }


def _rows(
    call: Any, bank: PromptBank, specs: Sequence[ConceptSpec], config: EraseConfig
) -> tuple[torch.Tensor, torch.Tensor, list[_Group]]:
    """States of the base model's trajectories of the concept prompts (at most ``MAX_POINTS``, evenly spread) and
    the group of prompt rows at each."""
    generator = torch.Generator().manual_seed(config.seed)
    points = sample_concept_points(call, bank, specs, config.cache, generator)
    chosen = torch.linspace(0, len(points.x) - 1, min(MAX_POINTS, len(points.x))).round().long().unique()
    preserve = preservation_prompts(specs)
    groups = []
    for i, point in enumerate(chosen.tolist()):
        c, prompt = points.concept[point], points.prompts[point]
        spec = specs[c]
        target = spec.target_in(prompt)
        irrelevant = [spec.irrelevant[(i + j) % len(spec.irrelevant)]
                      for j in range(min(IRRELEVANT_PER_POINT, len(spec.irrelevant)))]
        groups.append(_Group(
            point=i,
            anchor=multi_anchor_prompt(specs, c, prompt),
            edit=[prompt, *(replace_word(prompt, target, s) for s in spec.synonyms)],
            keep=[replace_word(prompt, target, w) for w in irrelevant] + ([preserve[i % len(preserve)]] if preserve
                                                                         else []),
        ))
    return points.x[chosen].cpu(), points.sigma[chosen].cpu(), groups


@dataclass
class _Group:
    """The rows at one trajectory state: the anchor prompt (kept, and the target of the edit rows), the concept's
    prompt and its synonym versions (edited), and other prompts (kept)."""

    point: int
    anchor: str
    edit: list[str]
    keep: list[str]

    @property
    def prompts(self) -> list[str]:
        return [self.anchor, *self.edit, *self.keep]


def _linear(transformer: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The linear module ``name`` (the base layer, where an adapter once wrapped it)."""
    module = transformer.get_submodule(name)
    return getattr(module, "base_layer", module)


def _layers_to_edit(transformer: torch.nn.Module, settings: LoraSettings) -> list[tuple[str, list[str]]]:
    """``(attention layer, its edited projections)`` in forward order."""
    names = settings.target_modules(transformer)
    layers = []
    for info in adapter_for(transformer).layers(transformer):
        members = [n for n in names if n.startswith(info.name + ".")]
        if members:
            layers.append((info.name, members))
    return layers


@torch.no_grad()
def _collect(
    call: Any,
    bank: PromptBank,
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    groups: list[_Group],
    layer: str,
    names: list[str],
    batch: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per projection in ``names`` (of attention ``layer``), the system ``(Σ w x xᵀ, Σ w W t xᵀ)`` of its edit and
    keep rows (``t`` the input whose output the row should give: the aligned anchor input for an edit row, its own
    for a keep row), from forwards of whole groups that stop after ``layer``."""
    device, dtype = transformer.device, transformer.dtype
    weights = {name: _linear(transformer, name).weight.detach().float() for name in names}
    systems = {name: (0.0, 0.0) for name in names}
    inputs: dict[str, torch.Tensor] = {}

    def grab(module, args, name):
        inputs[name] = args[0].float()

    def stop(module, args, output):
        raise _Stop

    with ExitStack() as stack:
        for name in names:
            hook = transformer.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: grab(m, a, name))
            stack.callback(hook.remove)
        stack.callback(transformer.get_submodule(layer).register_forward_hook(stop).remove)
        start = 0
        while start < len(groups):
            chunk, rows = [], 0
            while start < len(groups) and (not chunk or rows + len(groups[start].prompts) <= batch):
                chunk.append(groups[start])
                rows += len(groups[start].prompts)
                start += 1
            prompts = [p for g in chunk for p in g.prompts]
            points = torch.tensor([g.point for g in chunk for _ in g.prompts])
            embeds, pooled = bank.get(prompts)
            try:
                call.velocity(transformer, x[points].to(device, dtype), sigma[points].to(device), embeds, pooled,
                              bank.text_ids)
            except _Stop:
                pass
            for name in names:
                x_rows, t_rows, w_rows, row = [], [], [], 0
                for g in chunk:
                    states = inputs[name][row : row + len(g.prompts)]  # (rows, L, D) in g.prompts' order
                    anchor, kept = states[0], states[1 + len(g.edit) :]
                    x_rows.append(states.flatten(0, 1))
                    t_rows += [anchor, *(anchor[token_alignment(bank.tokens(e), bank.tokens(g.anchor))]
                                         for e in g.edit), *kept]
                    w_rows += [KEEP_WEIGHT] + [1.0] * len(g.edit) + [KEEP_WEIGHT] * len(g.keep)
                    row += len(g.prompts)
                x_all, t_all = torch.cat(x_rows), torch.cat(t_rows)
                w_all = torch.tensor(w_rows, device=x_all.device).repeat_interleave(len(anchor))[:, None]
                covariance, cross = systems[name]
                systems[name] = (covariance + (x_all * w_all).T @ x_all,
                                 cross + ((t_all @ weights[name].T) * w_all).T @ x_all)
    return systems


def _solve(weight: torch.Tensor, covariance: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``W' − W`` for the system (see the module docstring), its condition number and how many input dimensions
    the rows span (``rank``; where it is below the input width the ridge alone decides, keeping ``W`` there)."""
    weight = weight.cpu().double()
    covariance, cross = covariance.cpu().double(), cross.cpu().double()
    ridge = RIDGE * float(covariance.diagonal().mean())
    system = covariance + ridge * torch.eye(len(covariance), dtype=torch.float64)
    edited = torch.linalg.solve(system, (cross + ridge * weight).T).T  # (out, D) = (cross + μW) system⁻¹
    rank = int(torch.linalg.matrix_rank(covariance, rtol=1e-9))
    return (edited - weight).float(), {"condition": float(torch.linalg.cond(system)), "rank": rank}


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors ``(A (r, in), B (out, r))`` of ``delta``'s best rank-``rank`` approximation, and the share of
    its squared Frobenius norm they keep."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, len(s))
    total = float(s.square().sum())
    kept = float(s[:r].square().sum()) / total if total > 0 else 1.0
    return vh[:r].clone(), (u[:, :r] * s[:r]).clone(), round(kept, 6)


def token_alignment(source: PromptTokens, target: PromptTokens) -> list[int]:
    """For each text position of ``source``, the position of ``target`` that plays its part, for two prompts that
    differ in some words ("a red circle" / "a green circle"): word for word when they have as many words (pieces
    of a word spread proportionally over the other's pieces), the positions between words (specials, padding)
    at the same offset from the last word before them; position for position otherwise."""
    length = len(target)
    if len(source.words) != len(target.words):
        return [min(p, length - 1) for p in range(len(source))]
    mapping: dict[int, int] = {}
    for a, b in zip(source.words, target.words):
        for j, p in enumerate(a.positions):
            mapping[p] = b.positions[min(math.floor(j * len(b.positions) / len(a.positions)), len(b.positions) - 1)] \
                if b.positions else p
    out, offset = [], 0
    for p in range(len(source)):
        if p in mapping:
            offset = mapping[p] - p
            out.append(mapping[p])
        else:
            out.append(min(max(p + offset, 0), length - 1))
    return out
