"""`attnscope.trace` on real (tiny) diffusers Flux and SD3 pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope
from attnscope.attention import text_probs_reference
from attnscope.capture import CaptureSite
from attnscope.tiny import (
    TINY_FLUX_CALL_KWARGS,
    TINY_SD3_CALL_KWARGS,
    build_tiny_flux_pipeline,
)

PROMPT = "a red circle and a crimson square"




def _run(pipe, call: dict, prompt: str = PROMPT, seed: int = 0, **extra) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="np", **{**call, **extra}).images


def _transformer_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    n_txt, gen = 8, torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 64, transformer.config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(batch, n_txt, transformer.config.joint_attention_dim, generator=gen),
        pooled_projections=torch.zeros(batch, transformer.config.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1
        ).reshape(-1, 3),
        txt_ids=torch.zeros(n_txt, 3),
    )


def _processors(pipe) -> dict:
    return dict(pipe.transformer.attn_processors)


# ------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("path", ["auto", "chunked"])
def test_flux_output_identical_to_unhooked(flux, path: str) -> None:
    plain = _run(flux, TINY_FLUX_CALL_KWARGS)
    with attnscope.trace(flux, path=path) as tr:
        hooked = _run(flux, TINY_FLUX_CALL_KWARGS)
    assert np.array_equal(plain, hooked)
    assert tr.retained_bytes > 0


@pytest.mark.parametrize("path", ["auto", "chunked"])
def test_sd3_output_identical_with_cfg_and_attn2(sd3, path: str) -> None:
    call = {**TINY_SD3_CALL_KWARGS, "guidance_scale": 3.0}
    assert any(getattr(b, "attn2", None) is not None for b in sd3.transformer.transformer_blocks)
    plain = _run(sd3, call)
    with attnscope.trace(sd3, path=path, cfg="both") as tr:
        hooked = _run(sd3, call)
    assert np.array_equal(plain, hooked)
    cond, uncond = tr.maps(branch="cond"), tr.maps(branch="uncond")
    assert cond.tokens is not None and uncond.tokens is None
    assert not torch.allclose(cond.data, uncond.data)
    # attn2 (image-only attention) keeps its own processor
    for name, proc in sd3.transformer.attn_processors.items():
        assert type(proc).__name__ != "SD3CaptureProcessor", name


def test_fused_and_chunked_paths_agree(flux) -> None:
    results = []
    for path in ("fused", "chunked"):
        with attnscope.trace(flux, path=path) as tr:
            _run(flux, TINY_FLUX_CALL_KWARGS)
        results.append(tr.maps().data)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- captured values
@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_captured_maps_equal_full_softmax_reference(which: str, request) -> None:
    """Record q/k at every site and recompute the maps with the naive full softmax."""
    pipe = request.getfixturevalue(which)
    call = TINY_FLUX_CALL_KWARGS if which == "flux" else {**TINY_SD3_CALL_KWARGS, "guidance_scale": 2.0}
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, slice]] = []
    original_attend = CaptureSite.attend

    def spying_attend(site, q, k, v, scale, fused_allowed, original):
        plan = site.trace.plan_layer(site.layer, q, k)
        if plan is not None:
            seen.append((site.layer.index, q.clone(), k.clone(), *plan))
        return original_attend(site, q, k, v, scale, fused_allowed, original)

    mp = pytest.MonkeyPatch()
    mp.setattr(CaptureSite, "attend", spying_attend)
    try:
        with attnscope.trace(pipe, include_padding=False) as tr:
            _run(pipe, call)
    finally:
        mp.undo()
    maps = tr.maps()
    n_layers = len(maps.layers)
    assert len(seen) == n_layers * len(maps.steps)
    for call_index, (layer_index, q, k, image, text_index, rows) in enumerate(seen):
        step = call_index // n_layers
        image_index = torch.arange(image.start, image.stop)
        reference = text_probs_reference(q[rows], k[rows], image_index, text_index).mean(1)[0]  # (N, T), row 0
        h, w = maps.grid
        got = maps.data[:, layer_index, step, 0].reshape(len(maps.positions), h * w).T
        torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)


def test_padding_is_not_stored_unless_asked(flux) -> None:
    with attnscope.trace(flux) as tr:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    maps = tr.maps()
    assert maps.positions == maps.tokens.valid
    assert len(maps.positions) < TINY_FLUX_CALL_KWARGS["max_sequence_length"]
    with attnscope.trace(flux, include_padding=True) as tr:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    assert len(tr.maps().positions) == TINY_FLUX_CALL_KWARGS["max_sequence_length"]


def test_rows_sum_to_one_with_all_text_columns(flux) -> None:
    """With padding kept, text mass + image mass of every image query is 1 (image mass from q/k)."""
    seen = []
    original_attend = CaptureSite.attend

    def spying_attend(site, q, k, v, scale, fused_allowed, original):
        plan = site.trace.plan_layer(site.layer, q, k)
        if plan is not None:
            seen.append((q.clone(), k.clone(), plan[0]))
        return original_attend(site, q, k, v, scale, fused_allowed, original)

    mp = pytest.MonkeyPatch()
    mp.setattr(CaptureSite, "attend", spying_attend)
    try:
        with attnscope.trace(flux, include_padding=True, steps=0, layers=0) as tr:
            _run(flux, TINY_FLUX_CALL_KWARGS)
    finally:
        mp.undo()
    (q, k, image), = seen
    image_index = torch.arange(image.start, image.stop)
    text_mass = torch.from_numpy(tr.maps().numpy()).sum(0).reshape(-1)  # sum over tokens -> (N,)
    image_mass = text_probs_reference(q, k, image_index, image_index).mean(1)[0].sum(-1)
    torch.testing.assert_close(text_mass.double() + image_mass, torch.ones_like(image_mass), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- options
def test_selection_options_bound_memory(flux) -> None:
    call = {**TINY_FLUX_CALL_KWARGS, "num_inference_steps": 3}
    with attnscope.trace(flux) as full:
        _run(flux, call)
    with attnscope.trace(flux, layers="single", steps=[0, 2], words=["red"]) as small:
        _run(flux, call)
    fmaps, smaps = full.maps(), small.maps()
    h, w = fmaps.grid
    n_single = sum(layer.kind == "single" for layer in fmaps.layers)
    assert small.retained_bytes == h * w * len(smaps.positions) * 4 * n_single * 2
    assert full.retained_bytes == h * w * len(fmaps.positions) * 4 * len(fmaps.layers) * 3
    assert smaps.steps == (0, 2)
    torch.testing.assert_close(
        smaps.word("red").numpy(), fmaps.word("red").select(layers="single", steps=[0, 2]).numpy()
    )


def test_heads_and_reduce_steps_are_consistent(flux) -> None:
    with attnscope.trace(flux, heads="all") as per_head:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    with attnscope.trace(flux, reduce_steps=True) as reduced:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    heads = per_head.maps()
    assert heads.present == ("token", "layer", "step", "head")
    averaged = heads.mean("head", "step").numpy()
    np.testing.assert_allclose(reduced.maps().numpy(), averaged, atol=1e-6)
    with attnscope.trace(flux, heads=[1]) as one:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    np.testing.assert_allclose(one.maps().numpy(), heads.select(heads=[1]).numpy(), atol=1e-7)


def test_flux_true_cfg_keeps_branches_apart(flux) -> None:
    call = {**TINY_FLUX_CALL_KWARGS, "true_cfg_scale": 2.0, "negative_prompt": "a blue dog"}
    with attnscope.trace(flux, cfg="both", include_padding=True) as cfg_trace:
        _run(flux, call)
    with attnscope.trace(flux, include_padding=True) as plain_trace:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    cond, uncond = cfg_trace.maps(branch="cond"), cfg_trace.maps(branch="uncond")
    assert cond.steps == uncond.steps == (0, 1)
    # Step 0 starts from the same noise: the conditional branch equals an unguided run's first step.
    torch.testing.assert_close(cond.select(steps=0).data, plain_trace.maps().select(steps=0).data)
    assert not torch.allclose(cond.select(steps=0).data, uncond.select(steps=0).data)


def test_batch_of_prompts_and_generations(flux) -> None:
    with attnscope.trace(flux) as tr:
        flux(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), output_type="np",
             **TINY_FLUX_CALL_KWARGS)
        _run(flux, TINY_FLUX_CALL_KWARGS, prompt="a green triangle")
    assert len(tr.generations) == 2
    assert tr.maps().tokens.prompt == "a green triangle"
    first = tr.maps(1, generation=0)
    assert first.tokens.prompt == "a blue square"
    first.word("square")
    with pytest.raises(attnscope.UnknownWordError, match="red"):
        first.word("red")
    with pytest.raises(IndexError):
        tr.maps(2, generation=0)


def test_works_with_peft_lora(flux) -> None:
    from peft import LoraConfig

    pipe = build_tiny_flux_pipeline(seed=1)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["add_q_proj", "add_k_proj"], init_lora_weights=False)
    )
    plain = _run(pipe, TINY_FLUX_CALL_KWARGS)
    with attnscope.trace(pipe) as tr:
        hooked = _run(pipe, TINY_FLUX_CALL_KWARGS)
    assert np.array_equal(plain, hooked)
    pipe.transformer.disable_adapters()
    with attnscope.trace(pipe) as base:
        _run(pipe, TINY_FLUX_CALL_KWARGS)
    assert not torch.allclose(tr.maps().data, base.maps().data), "the LoRA must change the captured maps"


def test_works_with_offload_hooks() -> None:
    from accelerate import cpu_offload

    pipe = build_tiny_flux_pipeline(seed=2)
    plain = _run(pipe, TINY_FLUX_CALL_KWARGS)
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    with attnscope.trace(pipe) as tr:
        hooked = _run(pipe, TINY_FLUX_CALL_KWARGS)
    assert np.array_equal(plain, hooked)
    assert tr.maps().data.isfinite().all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_differentiable_trace_gives_gradients(checkpointing: bool) -> None:
    transformer = build_tiny_flux_pipeline(seed=3).transformer
    if checkpointing:  # blocks re-run inside backward(): those recomputations must not count as new calls
        transformer.enable_gradient_checkpointing()
    transformer.train()
    with attnscope.trace(transformer, differentiable=True, positions=[1, 2], layers="double") as tr:
        n_img, n_txt = 64, 8
        out = transformer(
            hidden_states=torch.randn(1, n_img, transformer.config.in_channels),
            encoder_hidden_states=torch.randn(1, n_txt, transformer.config.joint_attention_dim),
            pooled_projections=torch.zeros(1, transformer.config.pooled_projection_dim),
            timestep=torch.tensor([0.5]),
            img_ids=torch.stack(
                torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1
            ).reshape(-1, 3),
            txt_ids=torch.zeros(n_txt, 3),
        ).sample
        (call,) = tr.take()
        assert set(call) == {layer.label for layer in tr.layers}
        mass = sum(p.sum() for p in call.values())
        mass.backward()
    grad = transformer.transformer_blocks[0].attn.add_k_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert out.shape == (1, n_img, transformer.config.in_channels)
    assert tr.take() == []


def test_rows_captures_a_subset_of_the_batch_at_the_same_values() -> None:
    """``rows=`` captures only some batch rows (a batch mixing rows that need maps with rows that do not): the
    maps are those rows' maps from an all-rows capture, and the model's output is unchanged."""
    transformer = build_tiny_flux_pipeline(seed=3).transformer
    inputs = _transformer_inputs(transformer, batch=4)
    with torch.no_grad():
        plain = transformer(**inputs).sample
        with attnscope.trace(transformer, differentiable=True, positions=[1, 2]) as everything:
            transformer(**inputs)
        with attnscope.trace(transformer, differentiable=True, positions=[1, 2], rows=slice(2, None)) as tail:
            captured = transformer(**inputs).sample
    (full,), (part,) = everything.take(), tail.take()
    assert torch.equal(captured, plain)
    for label, probs in full.items():
        assert part[label].shape[0] == 2
        torch.testing.assert_close(part[label], probs[2:])
    with pytest.raises(ValueError, match="contiguous slice"):
        attnscope.trace(transformer, rows=[0, 2])


def test_stop_ends_the_forward_after_the_last_captured_layer(flux) -> None:
    """``stop=True``: the maps are those of a full run, nothing after the last captured layer runs, and the
    ``with`` block swallows the StopForward (processors and hooks restored)."""
    transformer = flux.transformer
    inputs = _transformer_inputs(transformer)
    ran: list[str] = []
    hooks = [block.register_forward_pre_hook(lambda module, args, name=f"double.{i}": ran.append(name))
             for i, block in enumerate(transformer.transformer_blocks)]
    hooks += [block.register_forward_pre_hook(lambda module, args, name=f"single.{i}": ran.append(name))
              for i, block in enumerate(transformer.single_transformer_blocks)]
    before = _processors(flux)
    try:
        with torch.no_grad():
            with attnscope.trace(transformer, positions=[1, 2], layers=[0, 1], reduce_steps=True) as full:
                transformer(**inputs)
            ran_full, ran[:] = list(ran), []
            with attnscope.trace(transformer, positions=[1, 2], layers=[0, 1], reduce_steps=True, stop=True) as stopped:
                transformer(**inputs)
                pytest.fail("the forward should have ended at double.1")
    finally:
        for hook in hooks:
            hook.remove()
    assert ran_full[-1].startswith("single") and ran == ["double.0", "double.1"]
    torch.testing.assert_close(stopped.maps().data, full.maps().data, atol=0, rtol=0)
    assert _processors(flux) == before and not transformer._forward_pre_hooks


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stopped_differentiable_trace_has_the_full_runs_gradient(checkpointing: bool) -> None:
    """A loss on the maps has the same parameter gradient whether the forward stops after the last captured
    layer or runs to the end (the output then carries no gradient), with and without gradient checkpointing."""
    transformer = build_tiny_flux_pipeline(seed=4).transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    inputs = _transformer_inputs(transformer, seed=1)
    weight = transformer.transformer_blocks[0].attn.add_k_proj.weight
    grads = []
    for stop in (False, True):
        weight.grad = None
        with attnscope.trace(transformer, differentiable=True, positions=[1, 3], layers="double", stop=stop) as tr:
            try:
                transformer(**inputs)
            except attnscope.StopForward:
                assert stop
            (call,) = tr.take()
            sum((p * (i + 1)).sum() for i, p in enumerate(call.values())).backward()
        grads.append(weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- bad input
def test_trace_restores_processors_when_the_body_raises(flux) -> None:
    before = _processors(flux)
    with pytest.raises(RuntimeError, match="boom"):
        with attnscope.trace(flux):
            raise RuntimeError("boom")
    assert _processors(flux) == before
    assert "encode_prompt" not in vars(flux)
    assert not flux.transformer._forward_pre_hooks


def test_trace_entered_twice_is_an_error_and_leaves_pipeline_unhooked(flux) -> None:
    before = _processors(flux)
    tr = attnscope.trace(flux)
    with tr:
        with pytest.raises(attnscope.TraceError, match="already"):
            with attnscope.trace(flux):
                pass
        with pytest.raises(attnscope.TraceError, match="already active"):
            tr.__enter__()
    assert _processors(flux) == before
    assert not flux.transformer._forward_pre_hooks


def test_unsupported_pipeline_names_what_is_supported() -> None:
    with pytest.raises(attnscope.UnsupportedModelError, match="FluxTransformer2DModel.*SD3Transformer2DModel"):
        attnscope.trace(torch.nn.Linear(2, 2))


def test_unknown_layer_lists_available(flux) -> None:
    with pytest.raises(attnscope.SelectionError, match="double.0"):
        attnscope.trace(flux, layers=["double.7"])


def test_unknown_word_at_capture_names_prompt_words(flux) -> None:
    before = _processors(flux)
    with pytest.raises(attnscope.UnknownWordError, match="circle"):
        with attnscope.trace(flux, words=["purple"]):
            _run(flux, TINY_FLUX_CALL_KWARGS)
    assert _processors(flux) == before


def test_empty_prompt_is_a_clear_error(flux) -> None:
    with pytest.raises(attnscope.EmptyPromptError, match="empty"):
        with attnscope.trace(flux):
            _run(flux, TINY_FLUX_CALL_KWARGS, prompt="   ")


def test_size_not_multiple_of_patch(flux) -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        attnscope.check_size(flux, 30, 32)


def test_maps_before_running_is_an_error(flux) -> None:
    with attnscope.trace(flux) as tr:
        pass
    with pytest.raises(attnscope.TraceError, match="nothing was captured"):
        tr.maps()
