"""The erasure losses, each a pure function of tensors (no model calls), so each can be tested on its own.

Notation (rectified flow, as in diffusers' Flux): ``x_t = (1 - t)·x0 + t·ε``, flow target ``u = ε - x0``,
``v`` the adapted model's velocity, ``v*`` the frozen base model's. Latents are ``(B, N, C)``; attention maps
``(B, N, T)`` (image queries × kept text columns, heads averaged) or ``(B, H, N, T)`` per head; ``columns`` is a
``(B, T)`` bool mask of each row's concept columns among the kept text positions.

* erase level: :func:`esd_loss` (negative guidance towards the anchor) and :func:`attention_loss` (attention
  mass of image queries on the concept's text keys, driven to zero) or :func:`localized_attention_loss` (the
  share of the base model's localized concept map left on the concept's keys);
* preserve level: :func:`flow_matching_loss` (base-model samples of irrelevant prompts) and
  :func:`contrastive_loss` (reverse self-contrastive InfoNCE on attention features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LossWeights",
    "attention_features",
    "attention_loss",
    "attention_mass",
    "concept_map",
    "contrastive_loss",
    "esd_loss",
    "esd_progress",
    "esd_target",
    "flow_matching_loss",
    "guided_velocity_loss",
    "implicit_loss",
    "localized_attention_loss",
    "referred_velocity",
    "velocity_matching_loss",
]


@dataclass(frozen=True)
class LossWeights:
    """Loss weights (official defaults). A zero weight skips that loss entirely (used for ablations).

    ``attention`` keeps the official 1e-3, on the mean mass, where a model's profile does not set its own
    (``EraseDefaults.attention_weight``; the shapes models turn it off). benchmarks/RESULTS.md derives the official
    term's scale against ours and measures the weights and the localized form.

    ``keep`` is ours: the adapted model's velocity must stay the base model's at states of the base model's own
    preservation-prompt trajectories. A regression on known targets, so much less noisy than the flow-matching loss,
    whose target ``ε − x0`` varies with the noise draw. Under true CFG at scale ``w`` what is kept is the velocity
    the sampler follows, ``v_∅ + w·(v − v_∅)`` (:func:`guided_velocity_loss`), so the weight is the error's weight
    in the images on every model, and the negative branch may change where the conditional one makes up for it.

    ``ablation`` and ``anchor`` are concept ablation's (``--method ca``): the concept prompt's velocity regressed to
    the base model's velocity for the anchor prompt, and the anchor prompt's own velocity kept.

    ``adversarial``: the method's erase target trained on adversarial conditionings too (only with
    ``EraseConfig.adversarial``; :mod:`erase.adversary`).

    ``implicit`` is ours too: unconditional ESD. At the concept's points, the model prompted with words that name
    nothing (``CacheConfig.implicit_prompts``: the empty prompt, glue words) is pushed from the base model's
    velocity there by ``-η·(v(concept) − v(anchor))``, the direction that separates the concept from its anchor
    (:func:`~erase.losses.implicit_loss`), so that an erased concept is not drawn unasked either: prompt searches
    find glue words that draw it otherwise (benchmarks/RESULTS.md).
    """

    esd: float = 1.0
    attention: float = 1e-3
    flow: float = 0.1
    contrastive: float = 0.1
    keep: float = 20.0
    implicit: float = 1.0
    ablation: float = 0.0
    anchor: float = 0.0
    adversarial: float = 1.0

    @classmethod
    def only(cls, **weights: float) -> LossWeights:
        """Every weight 0 except those given (a method that uses a few of the losses)."""
        return cls(**{name: 0.0 for name in cls.__dataclass_fields__} | weights)

    def used(self) -> tuple[str, ...]:
        """The losses with a non-zero weight."""
        return tuple(name for name, value in asdict(self).items() if value)



def esd_target(
    v_base_concept: torch.Tensor, v_base_anchor: torch.Tensor, eta: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``v*(x_t, c_anc) - eta·(v*(x_t, c) - v*(x_t, c_anc))``, detached: where the erased model should point.
    ``eta``: one number, or one per row ``(B, 1, 1)``.

    Negative guidance: from the anchor's velocity, step *away* from the concept's direction (ESD, Gandikota et
    al. 2023, transcribed from ε-prediction to flow velocity: both are linear in the score).
    """
    return (v_base_anchor - eta * (v_base_concept - v_base_anchor)).detach()


def esd_progress(v: torch.Tensor, v_base_concept: torch.Tensor, v_base_anchor: torch.Tensor) -> torch.Tensor:
    """How far ``v`` has moved from the concept towards and past its anchor, per row ``(B,)``, detached:
    ``⟨v − v*(c_anc), d⟩ / ‖d‖²`` with ``d = v*(c) − v*(c_anc)``: 1 at the base model, 0 at the anchor, ``-eta`` at
    ESD's target."""
    d = v_base_concept.float() - v_base_anchor.float()
    moved = ((v.detach().float() - v_base_anchor.float()) * d).flatten(1).sum(1)
    return moved / (d * d).flatten(1).sum(1).clamp(min=torch.finfo(torch.float32).tiny)


def esd_loss(
    v: torch.Tensor, v_base_concept: torch.Tensor, v_base_anchor: torch.Tensor, eta: float | torch.Tensor = 1.0,
    margin: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """ESD for flow matching: ``‖v(x_t, c) - sg[esd_target]‖²`` (mean over all elements). Shapes ``(B, N, C)``.

    With a ``margin`` a row stops being pushed once :func:`esd_progress` is at or below ``-margin`` (it is that many
    concept lengths past its anchor): the row still counts in the mean, with no error (``None`` or ``math.inf``:
    every row pushed; a ``(B,)`` tensor: each row's own). A large η makes a weak concept move as fast as a strong
    one, and the margin keeps it from then going on towards the far target, which on the SD3 shapes model dropped
    the objects beside the erased one (benchmarks/RESULTS.md)."""
    target = esd_target(v_base_concept.float(), v_base_anchor.float(), eta)
    if margin is None or (not torch.is_tensor(margin) and math.isinf(margin)):
        return F.mse_loss(v.float(), target)
    pushed = esd_progress(v, v_base_concept, v_base_anchor) > -torch.as_tensor(margin, device=v.device)
    return ((v.float() - target) ** 2 * pushed.view(-1, *[1] * (v.dim() - 1))).mean()


def implicit_loss(
    v: torch.Tensor, v_base: torch.Tensor, v_base_concept: torch.Tensor, v_base_anchor: torch.Tensor, eta: float = 1.0
) -> torch.Tensor:
    """Unconditional ESD along the concept's own direction: ``‖v(x_t, c_0) - sg[v*(x_t, c_0) - eta·(v*(x_t, c) -
    v*(x_t, c_anc))]‖²`` for a prompt ``c_0`` that names nothing. The push is the difference between the concept's
    prompt and its anchor, which share everything but the concept, not between the concept's prompt and ``c_0``:
    that would also push away from the concept prompt's other words ("a green circle" for circle), toward their
    opposites, which may be another erased concept. Shapes ``(B, N, C)``."""
    target = v_base.float() - eta * (v_base_concept.float() - v_base_anchor.float())
    return F.mse_loss(v.float(), target.detach())


def attention_mass(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Per-row attention mass on the concept: sum over its columns, mean over image queries (and heads).

    probs ``(B, N, T)`` or ``(B, H, N, T)``; columns ``(B, T)`` bool -> ``(B,)`` in [0, 1] (softmax over all keys,
    so the mass on a subset of keys is at most 1).
    """
    mask = columns.to(probs.dtype)
    if probs.dim() == 4:
        return torch.einsum("bhnt,bt->b", probs, mask) / (probs.shape[1] * probs.shape[2])
    return torch.einsum("bnt,bt->b", probs, mask) / probs.shape[1]


def attention_loss(maps: Sequence[torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
    """Mean concept attention mass over layers and rows (to be minimized). ``maps``: one tensor per layer."""
    if not maps:
        raise ValueError("attention_loss needs the maps of at least one layer")
    return torch.stack([attention_mass(p, columns) for p in maps]).mean()


def concept_map(maps: Sequence[torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
    """Each row's concept map: per image query, the attention probability on the concept's columns (summed), mean
    over layers (and heads): ``(B, N)``, not normalized (what :func:`attention_features` normalizes)."""
    per_layer = []
    for probs in maps:
        p = probs.mean(dim=1) if probs.dim() == 4 else probs
        per_layer.append(torch.einsum("bnt,bt->bn", p.float(), columns.float()))
    return torch.stack(per_layer).mean(dim=0)


def localized_attention_loss(
    maps: Sequence[torch.Tensor], columns: torch.Tensor, base_map: torch.Tensor
) -> torch.Tensor:
    """The attention left on the concept where the base model put it, relative to the base model's own:
    ``Σ_n m*(n)·m(n) / Σ_n m*(n)²`` per row, mean over rows, with ``m`` the adapted model's :func:`concept_map` and
    ``m* (B, N)`` the base model's at the same state. 1 before any edit, 0 once no image query that looked at the
    concept still does; queries the base model did not point at the concept weigh nothing. Dimensionless, so one
    weight means the same on any model size (a sum of probabilities grows with the number of image tokens)."""
    base = base_map.float().detach()
    return ((base * concept_map(maps, columns)).sum(dim=1) / base.square().sum(dim=1).clamp_min(1e-12)).mean()


def flow_matching_loss(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss ``‖v(x_t) - (ε - x0)‖²``; ``x_t`` must have been built from these ``x0``, ``noise``."""
    return F.mse_loss(v.float(), (noise - x0).float())


def velocity_matching_loss(v: torch.Tensor, v_base: torch.Tensor) -> torch.Tensor:
    """``‖v(x_t, c) - sg[v*(x_t, c)]‖²``: keep the adapted model's velocity where the base model's is known."""
    return F.mse_loss(v.float(), v_base.float().detach())


def guided_velocity_loss(
    v: torch.Tensor, v_negative: torch.Tensor, v_base: torch.Tensor, v_negative_base: torch.Tensor, scale: float
) -> torch.Tensor:
    """``‖w·(v − v*) − (w − 1)·(v_∅ − v*_∅)‖²``: keep the velocity a true-CFG sampler follows at scale ``w``,
    ``v_∅ + w·(v − v_∅)``, at the base model's. Both branches are free to move as long as the guided sum stays, so
    the negative branch (every guided prompt's, and the empty prompt's image) can give up the concept while the
    conditional branch makes up for it."""
    error = scale * (v.float() - v_base.float().detach()) - (scale - 1) * (
        v_negative.float() - v_negative_base.float().detach())
    return error.square().mean()


def referred_velocity(
    v: torch.Tensor, v_negative: torch.Tensor, v_negative_base: torch.Tensor, scale: float
) -> torch.Tensor:
    """``v − (w − 1)/w · sg[v_∅ − v*_∅]``: the conditional velocity referred to the base model's negative branch.
    A true-CFG sampler at scale ``w`` follows ``v_∅ + w·(v − v_∅) = v*_∅ + w·(that − v*_∅)`` exactly, so a loss on it
    is a loss on the image that keeps the conditional velocity's target and scale. The negative branch's move is
    held: letting a conditional row's error reach it would pull every guided prompt's negative branch, and the empty
    prompt's image, back towards the concept (benchmarks/RESULTS.md). Shapes ``(B, N, C)``."""
    return v.float() - (scale - 1) / scale * (v_negative.float() - v_negative_base.float()).detach()


def attention_features(maps: Sequence[torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
    """Unit-norm spatial attention feature of each row's concept: ``(B, N)``.

    The concept's columns are summed (a multi-piece word is one concept), the map averaged over layers (and
    heads), then L2-normalized so that a dot product is a cosine similarity.
    """
    return F.normalize(concept_map(maps, columns), dim=-1, eps=1e-12)


def contrastive_loss(
    anchor: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    tau: float = 0.07,
    positive_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse self-contrastive InfoNCE: pull ``anchor`` towards ``positives``, push it from ``negatives``.

    anchor ``(B, N)`` unit features of the erased concept (with gradient); positives ``(B, K, N)`` features of
    irrelevant concepts; negatives ``(B, S, N)`` features of its synonyms (both treated as fixed targets:
    detached here). Masks ``(B, K)`` / ``(B, S)`` mark valid entries. Multi-positive InfoNCE:
    ``-log Σ_pos exp(s/τ) / (Σ_pos exp(s/τ) + Σ_neg exp(s/τ))`` with ``s`` the cosine similarity, mean over rows.
    """
    b, k = positives.shape[:2]
    s = negatives.shape[1]
    positive_mask = torch.ones(b, k, dtype=torch.bool, device=anchor.device) if positive_mask is None else positive_mask
    negative_mask = torch.ones(b, s, dtype=torch.bool, device=anchor.device) if negative_mask is None else negative_mask
    if not positive_mask.any(dim=1).all():
        raise ValueError("every row of the contrastive loss needs at least one positive (irrelevant concept)")
    sim_pos = torch.einsum("bn,bkn->bk", anchor.float(), positives.detach().float()) / tau
    sim_neg = torch.einsum("bn,bsn->bs", anchor.float(), negatives.detach().float()) / tau
    neg_inf = torch.finfo(sim_pos.dtype).min
    sim_pos = sim_pos.masked_fill(~positive_mask, neg_inf)
    sim_neg = sim_neg.masked_fill(~negative_mask, neg_inf)
    log_pos = torch.logsumexp(sim_pos, dim=1)
    log_all = torch.logsumexp(torch.cat([sim_pos, sim_neg], dim=1), dim=1)
    return (log_all - log_pos).mean()
