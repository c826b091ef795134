"""Guidance distillation: a student that takes the guidance scale as an input learns its teacher's
classifier-free-guided velocity, so sampling costs one transformer call per step instead of two (FLUX.1-dev is
guidance-distilled the same way, and a distilled shapes model is called as FLUX.1-dev is: ``guidance_scale=w``).

``attnscope shapes train --distill-from TEACHER`` runs the ordinary training loop (``train.py``: rendered scenes,
noise levels, grounding loss, EMA, checkpoints) with another target. For each row it draws a guidance scale w
uniformly in ``guidance_range`` and asks the teacher (an exported model without a guidance embedding) for

    v = v_T(x_t, t, "") + w · (v_T(x_t, t, caption) − v_T(x_t, t, ""))

which is exactly what ``FluxPipeline`` follows with ``true_cfg_scale=w, negative_prompt=""``. The student is the
teacher's weights plus a guidance embedding whose output layer starts at zero (``model.build_transformer``), so it
starts as the teacher's conditional velocity and only has to learn what guidance adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from transformers import T5EncoderModel, T5Tokenizer

from attnscope.adapters.flux import flux_velocity

from .model import encode_text

#: Guidance scales a student learns (uniform): from none (w = 1, the conditional velocity) to beyond the teacher's
#: own sweet spot (3.5; at 5 the teacher drew duplicates), so that ``guidance_scale`` is a working dial.
DEFAULT_GUIDANCE_RANGE: tuple[float, float] = (1.0, 5.0)


@dataclass
class GuidanceTeacher:
    """A frozen model sampled with true CFG against the empty prompt: the target of a guidance-embedded student."""

    transformer: FluxTransformer2DModel
    t5: T5EncoderModel
    tokenizer: T5Tokenizer
    guidance_range: tuple[float, float] = DEFAULT_GUIDANCE_RANGE

    def __post_init__(self) -> None:
        if self.transformer.config.guidance_embeds:
            raise ValueError("the teacher is guidance-distilled already (it takes the guidance scale as an input); "
                             "distill from a model sampled with true classifier-free guidance")
        low, high = self.guidance_range
        if not 0 <= low <= high:
            raise ValueError(f"guidance range must satisfy 0 <= low <= high, got {self.guidance_range}")
        for module in (self.transformer, self.t5):
            module.eval().requires_grad_(False)

    def draw_guidance(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """Guidance scales ``(batch,)``, uniform in ``guidance_range``, from the (CPU) training generator."""
        low, high = self.guidance_range
        return low + (high - low) * torch.rand(batch, generator=gen)

    @torch.no_grad()
    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, captions: list[str], guidance: torch.Tensor, img_ids: torch.Tensor
    ) -> torch.Tensor:
        """Guided velocity ``(B, N, C)`` at packed latents ``x (B, N, C)``, noise levels ``t (B,)`` and guidance
        scales ``guidance (B,)``; the conditional and unconditional halves run as one batch."""
        b = x.shape[0]
        text = encode_text(self.tokenizer, self.t5, [*captions, *[""] * b])
        pooled = torch.zeros(2 * b, self.transformer.config.pooled_projection_dim, device=x.device)
        text_ids = torch.zeros(text.shape[1], 3, device=x.device)
        both = flux_velocity(self.transformer, torch.cat([x, x]), torch.cat([t, t]), text, pooled, text_ids, img_ids)
        conditional, unconditional = both.chunk(2)
        w = guidance.to(x.device, x.dtype)[:, None, None]
        return unconditional + w * (conditional - unconditional)


__all__ = ["DEFAULT_GUIDANCE_RANGE", "GuidanceTeacher"]
