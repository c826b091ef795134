"""Adversarial erasure (AdvUnlearn, Zhang et al., NeurIPS 2024, in this toolkit's terms): an attack inside the
training loop, so that the erasure holds where an attack pushes, not only at the words it was trained on.

The :class:`Adversary` keeps one adversarial text conditioning per training prompt: the ``soft-prompt`` attack's
object (the text encoder's output itself, ``(L, D)``), started, like that attack, from a prompt without the
concept (the prompt's anchor prompt) with that prompt's pooled vector. Before each erase step it takes
``config.adversarial`` attack steps on one prompt's conditioning (the prompts in turn) against the model being
trained: normalized-gradient descent on ``‖v_θ(x_t, e) − v*(x_t, c)‖²`` at the prompt's cached points, i.e. towards
the conditioning under which the erased model draws what the base model drew for the concept. The method then
trains its erase target on that conditioning too (the ``adversarial`` loss). The conditionings persist across
steps (each prompt's attack continues where it stopped, as a long attack would) and in the checkpoint. Under data
parallel every process attacks on its own rows; the checkpoint keeps rank 0's conditionings, so a resumed
multi-process adversarial run starts the others from rank 0's (a single-process resume is exact).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["ADVERSARIAL_STEPS", "RELATIVE_STEP", "Adversary"]

#: Attack steps per erase step with ``attnscope erase --adversarial``.
ADVERSARIAL_STEPS = 2
#: Each attack step moves the conditioning by this share of its start's standard deviation, along the normalized
#: gradient (scale-free across models, as the ``soft-prompt`` attack's step).
RELATIVE_STEP = 0.05


class Adversary:
    """The adversarial conditionings of one run (see the module docstring)."""

    def __init__(self, trainer: Trainer):
        cache = trainer.cache
        self.prompts = list(dict.fromkeys(cache.prompts))
        self.points = {p: torch.tensor([i for i, q in enumerate(cache.prompts) if q == p]) for p in self.prompts}
        anchors = {p: cache.anchors[int(self.points[p][0])] for p in self.prompts}
        embeds, pooled = trainer.bank.get([anchors[p] for p in self.prompts])
        self.embeds = {p: embeds[i].detach().float().clone() for i, p in enumerate(self.prompts)}
        self.pooled = {p: pooled[i].detach().float().clone() for i, p in enumerate(self.prompts)}
        self.step_size = {p: RELATIVE_STEP * float(self.embeds[p].std()) for p in self.prompts}
        self.turn = 0

    def attack(self, trainer: Trainer, steps: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """``steps`` attack steps on the next prompt's conditioning against ``trainer``'s current model; returns
        the prompt and its conditioning ``(embeds (L, D), pooled (P,))``. The model's parameters get no gradient."""
        prompt = self.prompts[self.turn % len(self.prompts)]
        self.turn += 1
        c, call, transformer = trainer.cache, trainer.call, trainer.transformer
        device, dtype = transformer.device, transformer.dtype
        embeds, pooled = self.embeds[prompt].to(device), self.pooled[prompt].to(device, dtype)
        points = self.points[prompt]
        for _ in range(steps):
            rows = points[trainer.draw(len(points), trainer.config.batch)]
            e = embeds.clone().requires_grad_()
            n = len(rows)
            v = call.velocity(
                transformer, c.x[rows].to(device, dtype), c.sigma[rows].to(device), e.to(dtype).expand(n, -1, -1),
                pooled.expand(n, -1), trainer.bank.text_ids,
            )
            (grad,) = torch.autograd.grad(F.mse_loss(v.float(), c.v_concept[rows].to(device)), e)
            embeds = (embeds - self.step_size[prompt] * grad / grad.square().mean().sqrt().clamp_min(1e-12)).detach()
        self.embeds[prompt] = embeds.cpu()
        return prompt, self.embeds[prompt], self.pooled[prompt]

    def state(self) -> dict[str, Any]:
        return {"embeds": self.embeds, "turn": self.turn}

    def load(self, state: dict[str, Any]) -> None:
        self.embeds, self.turn = state["embeds"], state["turn"]
