"""FlowMatchRenoisingScheduler: Euler below its threshold, re-noised above, reproducible per image, saved and
loaded by diffusers like any scheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from attnscope.lab.model import assemble_pipeline
from attnscope.sampling import FlowMatchRenoisingScheduler
from attnscope.shapes import DEFAULT_CALL_KWARGS

FAST_CALL = DEFAULT_CALL_KWARGS | {"num_inference_steps": 4}


def _run(scheduler: FlowMatchEulerDiscreteScheduler, start: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Sample with a fixed velocity field (a stand-in for a model) from ``start``."""
    scheduler.set_timesteps(steps)
    x = start
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * torch.tanh(x) - 0.2, t, x).prev_sample
    return x


def _start(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, 3, generator=torch.Generator().manual_seed(seed))


def test_threshold_one_is_plain_euler():
    start = _start(0, batch=2)
    euler = _run(FlowMatchEulerDiscreteScheduler(shift=2.0), start)
    assert torch.equal(_run(FlowMatchRenoisingScheduler(shift=2.0, renoise_above=1.0), start), euler)


def test_steps_above_the_threshold_re_noise_and_below_it_are_euler():
    start = _start(1)
    euler = FlowMatchEulerDiscreteScheduler()
    renoising = FlowMatchRenoisingScheduler(renoise_above=0.5)
    for s in (euler, renoising):
        s.set_timesteps(4)  # sigmas 1, 0.75, 0.5, 0.25
    velocity = torch.full_like(start, 0.3)
    fresh = []
    for i, t in enumerate(renoising.timesteps):
        got = renoising.step(velocity, t, start).prev_sample
        want = euler.step(velocity, euler.timesteps[i], start).prev_sample
        if renoising.sigmas[i] > 0.5:
            # (1 − σ') x̂0 + σ' ξ: recover the fresh noise ξ; it is standard normal and not the starting noise.
            sigma, sigma_next = renoising.sigmas[i], renoising.sigmas[i + 1]
            noise = (got - (1 - sigma_next) * (start - sigma * velocity)) / sigma_next
            assert not torch.allclose(got, want)
            assert 0.5 < noise.std() < 1.5 and not torch.allclose(noise, start, atol=0.1)
            fresh.append(noise)
        else:
            torch.testing.assert_close(got, want)
    assert len(fresh) == 2 and not torch.allclose(fresh[0], fresh[1], atol=0.1)  # each step draws anew


def test_a_seed_fixes_the_sample_alone_or_in_a_batch_and_global_rng_is_untouched():
    scheduler = FlowMatchRenoisingScheduler(renoise_above=0.3)
    state = torch.get_rng_state()
    alone = _run(scheduler, _start(7))
    again = _run(scheduler, _start(7))
    batch = _run(scheduler, torch.cat([_start(3), _start(7)]))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(alone, again)
    torch.testing.assert_close(batch[1:], alone)
    assert not torch.allclose(batch[:1], alone)
    assert not torch.allclose(alone, _run(FlowMatchEulerDiscreteScheduler(), _start(7)))


def test_a_generator_given_to_step_draws_the_noise():
    scheduler = FlowMatchRenoisingScheduler(renoise_above=0.0)
    scheduler.set_timesteps(2)
    start, velocity = _start(0), torch.zeros(1, 16, 3)
    t = scheduler.timesteps[0]
    a = scheduler.step(velocity, t, start, generator=torch.Generator().manual_seed(5)).prev_sample
    scheduler.set_timesteps(2)
    b = scheduler.step(velocity, t, start, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(a, b)


def test_threshold_outside_noise_levels_is_refused():
    with pytest.raises(ValueError, match="renoise_above"):
        FlowMatchRenoisingScheduler(renoise_above=1.5)


def test_pipeline_saves_and_loads_the_scheduler_and_a_seed_fixes_its_image(tmp_path, tiny_shapes_config):
    pipe = assemble_pipeline(tiny_shapes_config)
    pipe.scheduler = FlowMatchRenoisingScheduler(shift=2.0, renoise_above=0.6)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = FluxPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, FlowMatchRenoisingScheduler)
    assert (loaded.scheduler.config.shift, loaded.scheduler.config.renoise_above) == (2.0, 0.6)
    assert "stochastic_sampling" not in loaded.scheduler.config

    def sample(seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = loaded(["a red circle"] * len(seeds), generator=generators, output_type="pt", **FAST_CALL).images
        return images

    alone = sample([4])
    torch.testing.assert_close(sample([9, 4])[1:], alone)
    assert torch.equal(sample([4]), alone)
