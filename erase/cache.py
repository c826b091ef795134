"""Training data drawn once from the frozen base model, so that a training step is one forward/backward.

The official EraseAnything code samples the base model for 28 steps in every training step to get ``x_t``.
Here the base model's few-step trajectories (the pipeline scheduler's own steps) on the concept prompts are
sampled once, and every state on them is a training point ``x_t``. What the losses need from the base model at
that point is computed once too:

* ``v*(x_t, c)`` (the sampler's own velocity there) and ``v*(x_t, c_anc)`` (one extra forward) for ESD;
* the base model's attention features of irrelevant concepts and synonyms at ``x_t`` (the prompt with the
  target word swapped for each of them) as the fixed targets of the contrastive loss;
* the final samples of the preservation prompts, for the preservation flow-matching loss;
* *keep points* for the keep loss, whose base velocities the samplers computed anyway: every state on the
  preservation trajectories with its prompt's velocity and, with true CFG, the negative prompt's velocity
  ``v*(x_t, ∅)`` there too (the keep loss holds the guided pair, the velocity the sampler follows). The concept's
  points are no keep points: under CFG ``v(x_t, ∅)`` there is the empty prompt's image, which the implicit loss
  erases.

All of it is deterministic for a seed and saved beside the checkpoint (``cache.pt``) so a resumed run trains
on exactly the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from attnscope import atomic
from attnscope.adapters import ModelCall
from attnscope.trace import column_mask

from .losses import attention_features, concept_map
from .run import ResumeMismatchError
from .sampling import PromptBank, sample_trajectory
from .spec import ConceptSpec, find_word, replace_word

__all__ = [
    "CacheConfig",
    "ConceptPoints",
    "EraseCache",
    "build_cache",
    "maps_forward",
    "multi_anchor_prompt",
    "sample_concept_points",
]


@dataclass(frozen=True)
class CacheConfig:
    """How much base-model data to draw: ``seeds`` trajectories of ``sample_steps`` sampler steps per concept
    prompt (every state is a training point, so few steps suffice), ``preserve_steps`` steps per
    preservation sample (these are the flow-matching targets, so they should look like the model's images),
    ``k_irrelevant`` contrastive positives per point for at most ``contrastive_points`` evenly spread points
    (each costs ``k_irrelevant`` + #synonyms base rows), ``batch`` rows per base-model forward;
    ``implicit_prompts``: prompts that name nothing, through which every concept point is also seen for the
    unconditional ESD loss (one base forward per point and prompt); ``concept_maps``: also store the base model's
    map of the concept word at every concept point (the localized attention term's target);
    ``negative_velocities``: under true CFG, also store the negative prompt's base velocity at every concept point
    (what ESD and the implicit loss on the guided velocity are referred to)."""

    sample_steps: int = 8
    preserve_steps: int = 20
    seeds: int = 4
    k_irrelevant: int = 3
    contrastive_points: int = 48
    batch: int = 32
    seed: int = 0
    implicit_prompts: tuple[str, ...] = ("", "and", "the", "a")
    concept_maps: bool = False
    negative_velocities: bool = False


@dataclass
class EraseCache:
    """Erase points ``P`` (concept prompts × seeds × steps) and preservation samples ``Q``.

    ``x (P, N, C)`` states, ``sigma (P,)``, ``prompts`` / ``words`` (the target word in it) / ``concept (P,)``
    index into the specs, ``anchors`` (P) the anchor prompts, ``v_concept``/``v_anchor (P, N, C)`` base velocities
    through the concept and the anchor prompt, ``positives (P, K, N)`` /
    ``negatives (P, S, N)`` base attention features with ``positive_mask (P, K)``/``negative_mask (P, S)``;
    ``x0 (Q, N, C)`` preservation samples of ``preserve_prompts`` (Q); keep points ``keep_x (R, N, C)``,
    ``keep_sigma (R,)``, ``keep_prompts`` (R) with base velocities ``keep_v (R, N, C)`` and, with true CFG, the
    negative prompt's ``keep_v_negative (R, N, C)`` (0 rows without); implicit rows
    ``implicit_point (U,)`` (index of a concept point), ``implicit_prompts`` (U) and the base velocity there through
    that prompt, ``v_implicit (U, N, C)``, prompt-major (every point through the first prompt, then through the
    next: :meth:`implicit_rows`); ``v_negative (P, N, C)`` the negative prompt's base velocity at each concept point
    under true CFG (0 rows unless asked for); ``concept_maps (P, N)`` the base model's concept map at each concept
    point (:func:`~erase.losses.concept_map`; empty unless asked for).
    """

    x: torch.Tensor
    sigma: torch.Tensor
    prompts: list[str]
    words: list[str]
    concept: torch.Tensor
    v_concept: torch.Tensor
    v_anchor: torch.Tensor
    positives: torch.Tensor
    positive_mask: torch.Tensor
    negatives: torch.Tensor
    negative_mask: torch.Tensor
    x0: torch.Tensor
    preserve_prompts: list[str]
    keep_x: torch.Tensor
    keep_sigma: torch.Tensor
    keep_v: torch.Tensor
    keep_v_negative: torch.Tensor
    keep_prompts: list[str]
    implicit_point: torch.Tensor
    implicit_prompts: list[str]
    v_implicit: torch.Tensor
    v_negative: torch.Tensor
    anchors: list[str]
    concept_maps: torch.Tensor

    def save(self, path: str | Path) -> None:
        atomic.torch_save({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @property
    def implicit_prompt_count(self) -> int:
        """How many prompts that name nothing each concept point is seen through."""
        return len(self.implicit_point) // max(len(self.prompts), 1)

    def implicit_rows(self, points: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The implicit rows of concept ``points`` through the ``prompts``-th prompt that names nothing, ``(B,)``
        each."""
        return prompts * len(self.prompts) + points

    @classmethod
    def load(cls, path: str | Path) -> EraseCache:
        data = torch.load(path, weights_only=False, map_location="cpu")
        missing = sorted({f.name for f in fields(cls)} - data.keys())
        if missing:
            raise ResumeMismatchError(
                f"{path} was drawn by an earlier attnscope (it has no {', '.join(missing)}): "
                "start the run again with --overwrite"
            )
        return cls(**data)


def maps_forward(
    call: ModelCall,
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor,
    positions: Sequence[int],
    layers: Any = "double",
) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The image→text attention maps of ``positions`` in ``layers``, differentiable; the forward stops after the
    last of ``layers`` (nothing after it is needed).

    Returns one ``(B, N, T)`` map per layer (heads averaged, softmax over all keys) and the kept positions
    (sorted, ``T`` of them). Under ``torch.no_grad()`` the maps simply carry no graph.
    """
    import attnscope

    keep = tuple(sorted(set(positions)))
    with attnscope.trace(transformer, differentiable=True, positions=keep, layers=layers, stop=True) as tr:
        call.velocity(transformer, x, sigma, embeds, pooled, text_ids)
    return list(tr.take()[-1].values()), keep


def multi_anchor_prompt(specs: Sequence[ConceptSpec], concept: int, prompt: str) -> str:
    """The anchor prompt of ``prompt`` for ``specs[concept]``: its target replaced by the spec's first anchor that
    the prompt does not already name ("green" in "a red circle and a green square": the base model draws two objects
    that share a word as two of one kind, and the erased object would learn to copy its neighbour). One anchor per
    context, not anchors in turn: ESD's targets at a prompt's points then agree, and the erased word learns one
    replacement there instead of their blend, which draws like no word and copies the neighbour too
    (benchmarks/RESULTS.md). With several concepts erased at once, the others' targets are replaced by their
    anchors too, and no anchor that names another erased concept is used, so that no ESD target points towards
    another erased concept."""

    def anchor_of(spec: ConceptSpec) -> str:
        return spec.anchor_for(prompt, avoid=[t for other in specs if other is not spec for t in other.targets])

    anchor = replace_word(prompt, specs[concept].target_in(prompt), anchor_of(specs[concept]))
    for i, other in enumerate(specs):
        for target in other.targets if i != concept else ():
            if find_word(anchor, target):
                anchor = replace_word(anchor, target, anchor_of(other), every=True)
    return anchor


def _target_rows(
    spec: ConceptSpec, prompt: str, offset: int, k: int
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Prompts/words with the target swapped for ``k`` irrelevant concepts (rotating) and for every synonym."""
    target = spec.target_in(prompt)
    irrelevant = [spec.irrelevant[(offset + j) % len(spec.irrelevant)] for j in range(min(k, len(spec.irrelevant)))]
    pos_prompts = [replace_word(prompt, target, w) for w in irrelevant]
    neg_prompts = [replace_word(prompt, target, w) for w in spec.synonyms]
    return pos_prompts, irrelevant, neg_prompts, list(spec.synonyms)


@dataclass
class ConceptPoints:
    """States of the base model's own trajectories of the concept prompts: ``x (P, N, C)`` at ``sigma (P,)``, step
    by step for each chunk of (prompt, seed) jobs; ``v_concept (P, N, C)`` the conditional velocity there;
    ``prompts``/``words`` (the target word in it)/``concept`` (index into the specs) per point."""

    x: torch.Tensor
    sigma: torch.Tensor
    v_concept: torch.Tensor
    prompts: list[str]
    words: list[str]
    concept: list[int]


@torch.no_grad()
def sample_concept_points(
    call: ModelCall,
    bank: PromptBank,
    specs: Sequence[ConceptSpec],
    config: CacheConfig,
    generator: torch.Generator,
    on_chunk: Callable[[int], None] | None = None,
) -> ConceptPoints:
    """``config.seeds`` trajectories of ``config.sample_steps`` sampler steps per concept prompt, ``config.batch``
    at a time (start noise drawn from ``generator``); every state is a point. ``on_chunk(jobs_done)`` after each
    chunk."""
    transformer = call.pipe.transformer
    jobs = [(ci, p) for ci, spec in enumerate(specs) for p in spec.prompts for _ in range(config.seeds)]
    x, sigma, v, prompts, words, concept = [], [], [], [], [], []
    for start in range(0, len(jobs), config.batch):
        chunk = jobs[start : start + config.batch]
        chunk_prompts = [p for _, p in chunk]
        embeds, pooled = bank.get(chunk_prompts)
        x1 = call.noise(len(chunk), generator)
        trajectory = sample_trajectory(call, transformer, x1, config.sample_steps, embeds, pooled, bank.text_ids)
        for k in range(config.sample_steps):
            x.append(trajectory.states[k])
            v.append(trajectory.velocities[k])
            sigma.append(trajectory.sigmas[k].expand(len(chunk)))
            prompts += chunk_prompts
            words += [specs[ci].target_in(p) for ci, p in chunk]
            concept += [ci for ci, _ in chunk]
        if on_chunk:
            on_chunk(start + len(chunk))
    return ConceptPoints(
        x=torch.cat(x), sigma=torch.cat(sigma).float(), v_concept=torch.cat(v),
        prompts=prompts, words=words, concept=concept,
    )


@torch.no_grad()
def _velocities_at(
    call: ModelCall,
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    conditioning: tuple[torch.Tensor, torch.Tensor],
    text_ids: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """The base velocity at every state ``x (P, N, C)`` through one text ``conditioning`` (``embeds (1, L, D)``,
    ``pooled (1, P')``), ``(P, N, C)`` on the CPU, ``batch`` rows per forward."""
    device, dtype = transformer.device, transformer.dtype
    out = []
    for start in range(0, len(x), batch):
        stop = min(start + batch, len(x))
        embeds, pooled = (t.to(device, dtype).expand(stop - start, *t.shape[1:]) for t in conditioning)
        xb, sb = x[start:stop].to(device, dtype), sigma[start:stop].to(device)
        out.append(call.velocity(transformer, xb, sb, embeds, pooled, text_ids).float().cpu())
    return torch.cat(out)


def build_cache(
    call: ModelCall,
    bank: PromptBank,
    specs: Sequence[ConceptSpec],
    preserve_prompts: Sequence[str],
    config: CacheConfig,
    layers: Any = "double",
    progress: Any = None,
) -> EraseCache:
    """Sample the base model (call inside :func:`erase.lora.base_model` once a LoRA exists) and fill the cache.

    What a run does not use is not drawn: no contrastive features with ``contrastive_points`` 0, no implicit rows
    without ``implicit_prompts``, no preservation samples or keep points without ``preserve_prompts``.
    ``progress``: optional callable ``(done, total)`` for a progress bar.
    """
    transformer = call.pipe.transformer
    generator = torch.Generator().manual_seed(config.seed)
    total = sum(len(spec.prompts) for spec in specs) * config.seeds + len(preserve_prompts) * config.seeds
    points = sample_concept_points(
        call, bank, specs, config, generator, on_chunk=(lambda done: progress(done, total)) if progress else None
    )
    done = total - len(preserve_prompts) * config.seeds
    x, sigma, v_concept, prompts, words, concept = (
        points.x, points.sigma, points.v_concept, points.prompts, points.words, points.concept
    )
    concept_t = torch.tensor(concept)

    # Anchor velocities and contrastive targets at every point.
    anchors = [multi_anchor_prompt(specs, c, p) for c, p in zip(concept, prompts)]
    v_anchor, positives, pos_mask, negatives, neg_mask, concept_maps = [], [], [], [], [], []
    k = config.k_irrelevant
    stride = max(1, -(-len(prompts) // max(config.contrastive_points, 1)))
    with_features = set(range(0, len(prompts), stride)) if config.contrastive_points > 0 else set()
    s_max = max(len(spec.synonyms) for spec in specs)
    device, dtype = transformer.device, transformer.dtype
    for start in range(0, len(prompts), config.batch):
        idx = range(start, min(start + config.batch, len(prompts)))
        xb = x[start : idx.stop].to(device, dtype)
        sb = sigma[start : idx.stop].to(device)
        embeds, pooled = bank.get([anchors[i] for i in idx])
        v_anchor.append(call.velocity(transformer, xb, sb, embeds, pooled, bank.text_ids).float().cpu())
        if config.concept_maps:
            positions = [bank.positions(prompts[i], words[i]) for i in idx]
            embeds, pooled = bank.get([prompts[i] for i in idx])
            maps, keep = maps_forward(call, transformer, xb, sb, embeds, pooled, bank.text_ids,
                                      [q for ps in positions for q in ps], layers)
            concept_maps.append(concept_map(maps, column_mask(keep, positions, device)).cpu())
        # One forward over all swapped prompts of the chunk (each row repeats its point's x_t).
        rows, row_words, owner, slot = [], [], [], []
        for i in (i for i in idx if i in with_features):
            pos_p, pos_w, neg_p, neg_w = _target_rows(specs[concept[i]], prompts[i], i, k)
            for j, (p, w) in enumerate(zip(pos_p + neg_p, pos_w + neg_w)):
                rows.append(p)
                row_words.append(w)
                owner.append(i - start)
                slot.append(("pos", j) if j < len(pos_p) else ("neg", j - len(pos_p)))
        feats = torch.zeros(0, call.n_tokens)
        if rows:
            positions = [bank.positions(p, w) for p, w in zip(rows, row_words)]
            embeds, pooled = bank.get(rows)
            owner_t = torch.tensor(owner)
            maps, keep = maps_forward(
                call, transformer, xb[owner_t], sb[owner_t], embeds, pooled, bank.text_ids,
                [p for ps in positions for p in ps], layers,
            )
            feats = attention_features(maps, column_mask(keep, positions, device)).float().cpu()
        pos = torch.zeros(len(idx), k, call.n_tokens)
        neg = torch.zeros(len(idx), s_max, call.n_tokens)
        pm = torch.zeros(len(idx), k, dtype=torch.bool)
        nm = torch.zeros(len(idx), s_max, dtype=torch.bool)
        for r, (o, (kind, j)) in enumerate(zip(owner, slot)):
            (pos if kind == "pos" else neg)[o, j] = feats[r]
            (pm if kind == "pos" else nm)[o, j] = True
        positives.append(pos)
        negatives.append(neg)
        pos_mask.append(pm)
        neg_mask.append(nm)

    # The concept's points seen through prompts that name nothing (unconditional ESD).
    implicit_point, implicit_prompts, v_implicit = [], [], []
    for prompt in config.implicit_prompts:
        v_implicit.append(_velocities_at(call, transformer, x, sigma, bank.get([prompt]), bank.text_ids, config.batch))
        implicit_point += range(len(prompts))
        implicit_prompts += [prompt] * len(prompts)

    # The negative prompt at every concept point: what a guided erase refers each row's velocity to.
    v_negative = []
    if config.negative_velocities and call.guided:
        v_negative.append(_velocities_at(call, transformer, x, sigma, call.negative, bank.text_ids, config.batch))

    # Preservation samples: the end of each trajectory.
    x0_list, q_prompts = [], []
    keep_x, keep_sigma, keep_v, keep_v_negative, keep_prompts = [], [], [], [], []
    pjobs = [p for p in preserve_prompts for _ in range(config.seeds)]
    for start in range(0, len(pjobs), config.batch):
        chunk = pjobs[start : start + config.batch]
        embeds, pooled = bank.get(chunk)
        x1 = call.noise(len(chunk), generator)
        trajectory = sample_trajectory(call, transformer, x1, config.preserve_steps, embeds, pooled, bank.text_ids)
        x0_list.append(trajectory.states[-1].cpu())
        q_prompts += chunk
        keep_x.append(trajectory.states[:-1].flatten(0, 1).cpu())  # (steps·B, N, C), step-major
        keep_sigma.append(trajectory.sigmas[:-1].repeat_interleave(len(chunk)))
        keep_v.append(trajectory.velocities.flatten(0, 1).cpu())
        if trajectory.negative_velocities is not None:
            keep_v_negative.append(trajectory.negative_velocities.flatten(0, 1).cpu())
        keep_prompts += chunk * config.preserve_steps
        done += len(chunk)
        if progress:
            progress(done, total)
    empty = torch.zeros(0, call.n_tokens, call.channels)
    return EraseCache(
        x=x.cpu(),
        sigma=sigma.cpu(),
        prompts=prompts,
        words=words,
        concept=concept_t,
        v_concept=v_concept.cpu(),
        v_anchor=torch.cat(v_anchor),
        positives=torch.cat(positives),
        positive_mask=torch.cat(pos_mask),
        negatives=torch.cat(negatives),
        negative_mask=torch.cat(neg_mask),
        x0=torch.cat(x0_list) if x0_list else empty,
        preserve_prompts=q_prompts,
        keep_x=torch.cat(keep_x).cpu() if keep_x else empty,
        keep_sigma=torch.cat(keep_sigma).float() if keep_sigma else torch.zeros(0),
        keep_v=torch.cat(keep_v).cpu() if keep_v else empty,
        keep_v_negative=torch.cat(keep_v_negative) if keep_v_negative else empty,
        keep_prompts=keep_prompts,
        implicit_point=torch.tensor(implicit_point, dtype=torch.long),
        implicit_prompts=implicit_prompts,
        v_implicit=torch.cat(v_implicit) if v_implicit else empty,
        v_negative=torch.cat(v_negative) if v_negative else empty,
        anchors=anchors,
        concept_maps=torch.cat(concept_maps) if concept_maps else torch.zeros(0, call.n_tokens),
    )
