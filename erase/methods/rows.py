"""The row groups trained methods are built from: each draws rows from the trainer's cache, runs one forward of
the adapted model on them (:meth:`~erase.trainer.Trainer.backward_group`) and returns its losses.

* :func:`erase_rows` — cached concept points through their own prompts (ESD, attention attenuation) and through
  prompts that name nothing (unconditional ESD);
* :func:`preserve_rows` — noised preservation samples (flow matching), keep points (keep loss; with true CFG
  through the negative prompt too) and concept points for the reverse self-contrastive loss;
* :func:`ablation_rows` — concept points through the concept prompt and the anchor prompt (concept ablation).

With adversarial erasure (:mod:`erase.adversary`) the erase groups also train their target on ``batch // 2``
concept points through the attacked prompt's adversarial conditioning (the ``adversarial`` loss), in the same
forward. A loss with weight 0 draws no rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .. import losses

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..cache import EraseCache
    from ..spec import ConceptSpec
    from ..trainer import Trainer

__all__ = ["ablation_rows", "concept_eta", "concept_margin", "erase_rows", "named_concepts", "point_etas",
           "point_margins", "preserve_rows", "push_sizes", "run_etas", "run_margins"]


def _adversarial_rows(trainer: Trainer) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """After this step's attack steps: ``batch // 2`` cached points of the attacked prompt and their conditioning
    ``(embeds (k, L, D), pooled (k, P))``; no rows without adversarial erasure."""
    if trainer.adversary is None or trainer.config.weights.adversarial == 0:
        return torch.zeros(0, dtype=torch.long), None
    prompt, embeds, pooled = trainer.adversary.attack(trainer, trainer.config.adversarial)
    points = trainer.adversary.points[prompt]
    n = max(trainer.config.batch // 2, 1)
    return points[trainer.draw(len(points), n)], (embeds.expand(n, -1, -1), pooled.expand(n, -1))


def push_sizes(cache: EraseCache, concepts: int, points: torch.Tensor | None = None) -> torch.Tensor:
    """How far ESD's target moves from each concept's base velocity per unit η, ``(S,)``: the mean over its cache
    points (those of ``points``, a ``(P,)`` mask, where given) of ``mean‖v*(x_t, c) − v*(x_t, c_anc)‖²`` per element
    (0 for a concept without points)."""
    size = ((cache.v_concept.float() - cache.v_anchor.float()) ** 2).mean((1, 2))
    use = torch.ones_like(size) if points is None else points.float()
    total = torch.zeros(concepts).index_add_(0, cache.concept, size * use)
    count = torch.zeros(concepts).index_add_(0, cache.concept, use)
    return total / count.clamp(min=1)


def named_concepts(specs: Sequence[ConceptSpec], prompts: Sequence[str]) -> torch.Tensor:
    """Which concepts of a run each prompt names (a target word or a synonym), ``(P, S)`` bool."""
    return torch.tensor([[s.named_in(p) is not None for s in specs] for p in prompts],
                        dtype=torch.bool).view(len(prompts), len(specs))


def run_etas(specs: Sequence[ConceptSpec], cache: EraseCache, eta: float, balance: bool) -> torch.Tensor:
    """ESD's η of each concept in a run, ``(S,)``: its spec's, else the run's ``eta``. With ``balance`` and several
    concepts, each is raised until its push over its own cache points, ``η²·``:func:`push_sizes`, matches the
    strongest concept's: one LoRA trained on them all otherwise goes to the concept whose prompts differ most from
    their anchors and leaves the others drawn (measured on the SD3 shapes model; benchmarks/RESULTS.md). A
    concept's own points are those whose prompt names no other concept of the run (all its points where none
    does): a prompt naming two carries both concepts' push and would hide how weakly the other is pushed."""
    etas = torch.tensor([s.eta if s.eta is not None else eta for s in specs])
    if not balance or len(specs) < 2:
        return etas
    alone = named_concepts(specs, cache.prompts).sum(1) == 1
    own = push_sizes(cache, len(specs), alone)
    push = etas**2 * torch.where(own > 0, own, push_sizes(cache, len(specs)))
    if not bool((push > 0).all()):  # a concept without points (or pushes) has nothing to balance
        return etas
    return etas * (push.max() / push).sqrt()


def point_etas(specs: Sequence[ConceptSpec], cache: EraseCache, etas: torch.Tensor, balance: bool) -> torch.Tensor:
    """ESD's η at each cache point, ``(P,)``: its concept's of ``etas`` (:func:`run_etas`); balanced, the smallest
    over the concepts its prompt names, its own among them. Such a prompt's anchor replaces all of them, so it
    already carries the strongest concept's push; the others' raised η would push it further than any concept's
    own points (on the SD3 shapes model that cost context; benchmarks/RESULTS.md)."""
    if not balance:
        return etas[cache.concept]
    named = named_concepts(specs, cache.prompts)
    named[torch.arange(len(cache.prompts)), cache.concept] = True
    return torch.where(named, etas, torch.inf).amin(1)


def point_margins(
    specs: Sequence[ConceptSpec], cache: EraseCache, eta: float, margin: float | None, point_eta: torch.Tensor
) -> torch.Tensor | None:
    """ESD's margin at each cache point, ``(P,)`` (:func:`~erase.losses.esd_loss`; ``None``: no margin): ``margin``
    divided by how far the balance raised the point's η (``point_eta``, :func:`point_etas`) above its concept's own
    (the spec's, else the run's ``eta``). A raised η moves a point further per step, and Adam's momentum carries it
    past its stopping point in proportion; the raise is there to make a weak concept move as fast as a strong one,
    not further (on the SD3 shapes model the raised concept went furthest past a shared margin, and the objects
    beside it were dropped; benchmarks/RESULTS.md)."""
    unraised = _unraised_margins(specs, cache, eta, margin)
    return None if unraised is None else unraised[cache.concept] / point_eta


def run_margins(
    specs: Sequence[ConceptSpec], cache: EraseCache, eta: float, margin: float | None, etas: torch.Tensor
) -> torch.Tensor | None:
    """ESD's margin of each concept in a run at the points naming it alone, ``(S,)`` (``None``: no margin): as
    :func:`point_margins`, ``margin`` divided by how far the balance raised the concept's η (``etas``,
    :func:`run_etas`) above its own. What a run reports; the steps use :func:`point_margins`."""
    unraised = _unraised_margins(specs, cache, eta, margin)
    return None if unraised is None else unraised / etas


def _unraised_margins(
    specs: Sequence[ConceptSpec], cache: EraseCache, eta: float, margin: float | None
) -> torch.Tensor | None:
    """``margin`` times each concept's own η, ``(S,)``: the numerator both margin rules divide by a raised η
    (``None``: no margin)."""
    if margin is None or math.isinf(margin):
        return None
    return margin * run_etas(specs, cache, eta, balance=False)


def concept_eta(trainer: Trainer, points: torch.Tensor) -> torch.Tensor:
    """ESD's η at each of the cache's concept ``points``, ``(B, 1, 1)`` on the model's device (``trainer.point_etas``,
    :func:`point_etas`)."""
    return trainer.point_etas[points].view(-1, 1, 1).to(trainer.transformer.device)


def concept_margin(trainer: Trainer, points: torch.Tensor) -> torch.Tensor | None:
    """ESD's margin at each of the cache's concept ``points``, ``(B,)`` on the model's device (``None``: no margin;
    :func:`point_margins`)."""
    if trainer.point_margins is None:
        return None
    return trainer.point_margins[points].to(trainer.transformer.device)


def erase_rows(trainer: Trainer) -> dict[str, float]:
    """ESD and attention attenuation on ``batch`` concept points and unconditional ESD on ``batch // 2`` implicit
    rows, in one forward: a second forward would cost its fixed per-call overhead again, which on a small model is a
    large share of a step. Only the concept rows have concept columns in the captured maps. With attention alone
    (Forget-Me-Not) the forward stops after the last layer whose maps the loss reads. ESD pushes each concept point
    with its concept's η (:func:`concept_eta`); the implicit rows, which name no concept, with the run's.

    A guided erase (:attr:`~erase.trainer.Trainer.guided_erase`) runs each concept point through the negative
    prompt too and draws the implicit rows at the first of those points: ESD and the implicit rows' loss then hold
    the velocity the sampler follows (:func:`~erase.losses.referred_velocity`), and the negative prompt's own rows,
    which every guided image starts from, are one more prompt that names nothing."""
    c, w, config, device = trainer.cache, trainer.config.weights, trainer.config, trainer.transformer.device
    guided = trainer.guided_erase  # the concept points are drawn for their negative-prompt rows
    n = config.batch if w.esd > 0 or w.attention > 0 or guided else 0
    idx = trainer.draw(len(c.prompts), n)
    if guided:
        n_implicit = config.batch // 2 if w.implicit > 0 and c.implicit_prompt_count else 0
        point = idx[:n_implicit]
        rows = c.implicit_rows(point, trainer.draw(c.implicit_prompt_count, n_implicit))
    else:
        n_implicit = config.batch // 2 if w.implicit > 0 and len(c.implicit_point) else 0
        rows = trainer.draw(len(c.implicit_point), n_implicit)
        point = c.implicit_point[rows]
    if not (n or n_implicit):
        return {}
    negative = idx if guided else idx[:0]
    adversarial, attacked = _adversarial_rows(trainer)
    conditioning = _conditioning(
        tuple(e.expand(len(negative), *e.shape[1:]) for e in trainer.call.negative) if guided else None, attacked)
    a = n + n_implicit  # the conditioning rows come last: the negative prompt's, then the adversarial ones
    b = a + len(negative)

    def erase_losses(v, maps, columns):
        def followed(v_rows: torch.Tensor) -> torch.Tensor:
            """The velocity the losses hold of the rows at this step's first ``len(v_rows)`` concept points."""
            if not guided:
                return v_rows
            k = len(v_rows)
            return losses.referred_velocity(v_rows, v[a : a + k], c.v_negative[idx[:k]].to(device),
                                            trainer.call.guidance_gain)

        out = {}
        if w.esd > 0:
            out["esd"] = losses.esd_loss(followed(v[:n]), c.v_concept[idx].to(device), c.v_anchor[idx].to(device),
                                         concept_eta(trainer, idx), concept_margin(trainer, idx))
        if w.attention > 0 and config.attention_form == "localized":
            out["attention"] = losses.localized_attention_loss(
                [m[:n] for m in maps], columns[:n], c.concept_maps[idx].to(device))
        elif w.attention > 0:
            out["attention"] = losses.attention_loss([m[:n] for m in maps], columns[:n])
        if n_implicit:
            v_here, v_concept, v_anchor = (t.to(device) for t in (c.v_implicit[rows], c.v_concept[point],
                                                                  c.v_anchor[point]))
            out["implicit"] = losses.implicit_loss(followed(v[n:a]), v_here, v_concept, v_anchor, config.eta)
        if guided and w.implicit > 0:
            # The negative prompt is one more of the prompts that name nothing, weighted as one of them.
            alone = losses.implicit_loss(v[a:b], c.v_negative[idx].to(device), c.v_concept[idx].to(device),
                                         c.v_anchor[idx].to(device), config.eta)
            glue = c.implicit_prompt_count if n_implicit else 0
            out["implicit"] = (glue * out.get("implicit", 0.0) + alone) / (glue + 1)
        if attacked is not None:
            out["adversarial"] = losses.esd_loss(v[b:], c.v_concept[adversarial].to(device),
                                                 c.v_anchor[adversarial].to(device),
                                                 concept_eta(trainer, adversarial))
        return out

    words = [c.words[i] for i in idx] + [None] * n_implicit if w.attention > 0 else None
    return trainer.backward_group(
        torch.cat([c.x[idx], c.x[point], c.x[negative], c.x[adversarial]]),
        torch.cat([c.sigma[idx], c.sigma[point], c.sigma[negative], c.sigma[adversarial]]),
        [c.prompts[i] for i in idx] + [c.implicit_prompts[i] for i in rows], erase_losses, words,
        maps_only=w.esd == 0 and n_implicit == 0 and conditioning is None, conditioning=conditioning,
    )


def _conditioning(
    *groups: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(embeds, pooled)`` of the rows no prompt expresses, group after group (``None``: no such rows)."""
    present = [g for g in groups if g is not None]
    if not present:
        return None
    return torch.cat([g[0] for g in present]), torch.cat([g[1] for g in present])


def preserve_rows(trainer: Trainer) -> dict[str, float]:
    """Flow matching on noised preservation samples and the keep loss on ``keep_rows`` keep points (one forward),
    and the contrastive loss on ``contrastive_rows`` concept points (a second forward that stops after the last
    layer whose maps it reads): ``batch`` rows in all, or more where ``batch`` cannot hold a row of each. Under true
    CFG a keep point is two rows, its prompt and the negative prompt, and the loss holds their guided sum
    (:func:`~erase.losses.guided_velocity_loss`); flow matching gets what the keep points leave."""
    c, w, config, device = trainer.cache, trainer.config.weights, trainer.config, trainer.transformer.device
    guided = trainer.call.guided
    rows_per_keep = 2 if guided else 1
    n_contrastive = config.contrastive_rows if w.contrastive > 0 else 0
    room = max(config.batch - n_contrastive - (1 if w.flow > 0 else 0), 0)  # one flow row at least
    # One keep point at least, even where it overfills a small batch: a weighted loss is never silently dropped.
    n_keep = min(config.keep_rows, max(room // rows_per_keep, 1)) if w.keep > 0 and len(c.keep_x) else 0
    n_flow = max(config.batch - n_contrastive - rows_per_keep * n_keep, 1) if w.flow > 0 else 0
    if not (n_flow or n_keep or n_contrastive):
        return {}
    idx = trainer.draw(len(c.preserve_prompts), n_flow)
    x0 = c.x0[idx]
    # Logit-normal t (as the shapes model was trained): most weight on mid noise levels.
    t = torch.sigmoid(torch.randn(n_flow, generator=trainer.generator))
    noise = torch.randn(x0.shape, generator=trainer.generator)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    keep = trainer.draw(len(c.keep_x), n_keep)
    concept = trainer.contrastive_points[trainer.draw(len(trainer.contrastive_points), n_contrastive)]

    def preserve_losses(v, maps, columns):
        values = {}
        if n_flow:
            values["flow"] = losses.flow_matching_loss(v[:n_flow], x0.to(device), noise.to(device))
        if n_keep and guided:
            values["keep"] = losses.guided_velocity_loss(
                v[n_flow : n_flow + n_keep], v[n_flow + n_keep :], c.keep_v[keep].to(device),
                c.keep_v_negative[keep].to(device), trainer.call.guidance_gain)
        elif n_keep:
            values["keep"] = losses.velocity_matching_loss(v[n_flow:], c.keep_v[keep].to(device))
        return values

    def contrastive_losses(v, maps, columns):
        return {"contrastive": losses.contrastive_loss(
            losses.attention_features(maps, columns),
            c.positives[concept].to(device),
            c.negatives[concept].to(device),
            config.tau,
            c.positive_mask[concept].to(device),
            c.negative_mask[concept].to(device),
        )}

    values: dict[str, float] = {}
    if n_flow or n_keep:
        # Under true CFG the keep points come twice: through their prompts, then through the negative prompt.
        again = keep if guided else keep[:0]
        negative = tuple(e.expand(n_keep, *e.shape[1:]) for e in trainer.call.negative) if len(again) else None
        values |= trainer.backward_group(
            torch.cat([x_t, c.keep_x[keep], c.keep_x[again]]),
            torch.cat([t, c.keep_sigma[keep], c.keep_sigma[again]]),
            [c.preserve_prompts[i] for i in idx] + [c.keep_prompts[i] for i in keep],
            preserve_losses,
            conditioning=negative,
        )
    if n_contrastive:
        values |= trainer.backward_group(
            c.x[concept], c.sigma[concept], [c.prompts[i] for i in concept], contrastive_losses,
            [c.words[i] for i in concept], maps_only=True,
        )
    return values


def ablation_rows(trainer: Trainer) -> dict[str, float]:
    """Concept ablation's two regressions on ``batch`` concept points, in one forward: through the concept prompt
    towards the base model's velocity for the anchor prompt (``ablation``), and through the anchor prompt itself
    keeping that velocity (``anchor``), both targets ``v*(x_t, c_anc)`` from the cache."""
    c, w, device = trainer.cache, trainer.config.weights, trainer.transformer.device
    n = trainer.config.batch
    idx = trainer.draw(len(c.prompts), n)
    v_anchor = c.v_anchor[idx].to(device)
    n_anchor = n if w.anchor > 0 else 0
    adversarial, conditioning = _adversarial_rows(trainer)

    def ablation_losses(v, maps, columns):
        values = {"ablation": losses.velocity_matching_loss(v[:n], v_anchor)}
        if n_anchor:
            values["anchor"] = losses.velocity_matching_loss(v[n : n + n_anchor], v_anchor)
        if conditioning is not None:
            values["adversarial"] = losses.velocity_matching_loss(v[n + n_anchor :], c.v_anchor[adversarial].to(device))
        return values

    rows = torch.cat([idx, idx[:n_anchor], adversarial])
    prompts = [c.prompts[i] for i in idx] + [c.anchors[i] for i in idx[:n_anchor]]
    return trainer.backward_group(c.x[rows], c.sigma[rows], prompts, ablation_losses, conditioning=conditioning)
