"""A rectified-flow sampler that re-draws the noise while the layout forms (``FlowMatchRenoisingScheduler``).

Why: a deterministic Euler sampler keeps the initial noise to the end, so the low-frequency bumps of that noise
become where objects go. A small model then tends to grow an object on every bump that matches a word: the
bundled shapes model drew an asked object twice in 26 of 64 two-object images. Above ``renoise_above`` (a noise
level σ) each step instead predicts the clean image x̂0 and re-noises it with fresh noise,

    x_σ' = (1 − σ') · x̂0 + σ' · ξ,    ξ ~ N(0, I)

(the stochastic flow sampler of diffusers' ``stochastic_sampling``, restricted to high noise), so the layout
follows the model's predictions rather than the first draw. Below it, steps are plain Euler, which keeps fine
detail and colour. ``renoise_above=1`` never re-noises: the scheduler is then ``FlowMatchEulerDiscreteScheduler``.

Reproducibility: pipelines do not pass their generator to ``scheduler.step``. The fresh noise of each image is
drawn from a generator seeded by a hash of that image's own starting latents, so a seed still fixes the image,
alone or in a batch, and no global random state is read or advanced. A generator passed to ``step`` is used
instead.

Saved with a pipeline, this scheduler is recorded in ``model_index.json`` as ``attnscope.sampling``; diffusers loads
it once ``attnscope`` has been imported (importing ``attnscope`` imports this module).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

# diffusers loads a component of a non-diffusers module by looking up its loader base classes on that module.
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,  # noqa: F401  (needed by FluxPipeline.from_pretrained, see above)
)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput


def _seed_of(latents: torch.Tensor) -> int:
    """A 63-bit seed from the bytes of one image's latents (same values, same seed, on any device)."""
    data = latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class FlowMatchRenoisingScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` that re-noises its clean-image prediction while σ > ``renoise_above``.

    Args:
        renoise_above: noise level above which a step re-draws the noise (1.0: never, plain Euler; 0.0: every
            step, as diffusers' ``stochastic_sampling``). The other arguments are
            ``FlowMatchEulerDiscreteScheduler``'s, except ``stochastic_sampling``, which this replaces.
    """

    # The parent registers its own ``stochastic_sampling`` (False); this scheduler neither takes nor saves it.
    ignore_for_config = ["stochastic_sampling"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        renoise_above: float = 1.0,
    ):
        if not 0.0 <= renoise_above <= 1.0:
            raise ValueError(f"renoise_above is a noise level in [0, 1], got {renoise_above}")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
        )
        self._noise_generators: list[torch.Generator] | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """As the parent's (pipelines inspect this signature); a new schedule starts a new sampling run, whose
        noise is seeded from its own starting latents."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self._noise_generators = None

    def _fresh_noise(self, sample: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is not None:
            return torch.randn(sample.shape, generator=generator, device=generator.device).to(sample)
        rows = [torch.randn(row.shape, generator=g) for row, g in zip(sample, self._noise_generators)]
        return torch.stack(rows).to(sample)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One step from ``sample`` at the current σ to the next σ (see the module docstring).

        ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise`` are accepted and ignored, as by the parent.
        """
        if per_token_timesteps is not None:
            raise NotImplementedError("FlowMatchRenoisingScheduler does not support per-token timesteps")
        if self.step_index is None:
            self._init_step_index(timestep)
        seeded = self._noise_generators is not None and len(self._noise_generators) == sample.shape[0]
        if self.config.renoise_above < 1.0 and generator is None and not seeded:
            # The first step of a run sees the pipeline's starting latents: one seed per image, whatever the
            # prompt, so two prompts sampled from one seed re-noise alike.
            self._noise_generators = [torch.Generator().manual_seed(_seed_of(row)) for row in sample]
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sample32, velocity = sample.to(torch.float32), model_output.to(torch.float32)
        if sigma > self.config.renoise_above:
            clean = sample32 - sigma * velocity
            prev_sample = (1.0 - sigma_next) * clean + sigma_next * self._fresh_noise(sample32, generator)
        else:
            prev_sample = sample32 + (sigma_next - sigma) * velocity
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


__all__ = ["FlowMatchRenoisingScheduler"]
