"""Output-space concept maps (``trace(..., concepts=[...])``) on real (tiny) diffusers Flux and SD3 pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope
from attnscope.concepts import ConceptError, text_stream_block
from attnscope.tiny import (
    TINY_FLUX_CALL_KWARGS,
    TINY_SD3_CALL_KWARGS,
)

CONCEPTS = ["red", "circle", "square", "background"]




def _run(pipe, call: dict, prompt: str = "a red circle and a blue square", seed: int = 0) -> np.ndarray:
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **call).images


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_concepts_leave_the_image_bit_identical(which: str, request) -> None:
    pipe = request.getfixturevalue(which)
    call = TINY_FLUX_CALL_KWARGS if which == "flux" else {**TINY_SD3_CALL_KWARGS, "guidance_scale": 3.0}
    plain = _run(pipe, call)
    with attnscope.trace(pipe, concepts=CONCEPTS) as tr:
        traced = _run(pipe, call)
    assert torch.equal(torch.as_tensor(plain), torch.as_tensor(traced))
    maps = tr.concept_maps()
    double = [layer for layer in tr.layers if layer.kind == "double"]
    assert maps.present == ("token", "layer", "step")
    assert [layer.label for layer in maps.layers] == [layer.label for layer in double]
    assert maps.shape[:3] == (len(CONCEPTS), len(double), call["num_inference_steps"])
    # a softmax over the concepts at every patch, and concepts that differ
    assert torch.allclose(maps.data.sum(0), torch.ones(()), atol=1e-5)
    assert not torch.allclose(maps.word("red").data, maps.word("circle").data)
    assert maps.word("background").mean().numpy().shape == maps.grid
    # the trace unhooked everything it installed
    for block in pipe.transformer.transformer_blocks:
        assert not block._forward_hooks


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_text_stream_restatement_reproduces_each_blocks_own_text_output(which: str, request) -> None:
    """Fed a block's real text input, attending to the block's own image keys, the restated text stream must give
    the block's own text output: the check that it still matches this diffusers version's blocks."""
    pipe = request.getfixturevalue(which)
    call = TINY_FLUX_CALL_KWARGS if which == "flux" else TINY_SD3_CALL_KWARGS
    blocks = pipe.transformer.transformer_blocks
    seen, calls = {}, {}
    with attnscope.trace(pipe, concepts=["red"]) as tr:
        keep = tr.concept_stream.attended

        def attended(layer, k, v, out, image, rows):
            seen[layer.block] = (k[:, :, image], v[:, :, image])
            keep(layer, k, v, out, image, rows)

        tr.concept_stream.attended = attended
        hooks = [b.register_forward_hook(lambda m, a, kw, out, i=i: calls.__setitem__(i, (kw, out)), with_kwargs=True)
                 for i, b in enumerate(blocks)]
        try:
            _run(pipe, {**call, "num_inference_steps": 1})
        finally:
            for hook in hooks:
                hook.remove()
    checked = 0
    for i, block in enumerate(blocks):
        kwargs, (text_out, _) = calls[i]
        k_image, v_image = seen[i]
        _, restated = text_stream_block(block, kwargs["encoder_hidden_states"], kwargs["temb"], k_image, v_image)
        if text_out is None:  # SD3's last block: its text stream ends in the attention
            assert restated is None
            continue
        torch.testing.assert_close(restated, text_out, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked >= 1


def test_recorded_layers_do_not_change_the_stream(flux) -> None:
    """Recording one late layer still carries the concepts through every earlier block."""
    with attnscope.trace(flux, concepts=CONCEPTS) as every:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    with attnscope.trace(flux, concepts=CONCEPTS, layers="double.1", steps=[1]) as one:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    only = one.concept_maps()
    assert [layer.label for layer in only.layers] == ["double.1"] and only.steps == (1,)
    torch.testing.assert_close(only.data, every.concept_maps().select(layers="double.1", steps=[1]).data)
    # raw maps of the same trace cover only the selected layer too
    assert [layer.label for layer in one.maps().layers] == ["double.1"]


def test_concept_maps_are_kept_per_batch_row_and_reduced_over_steps(flux) -> None:
    with attnscope.trace(flux, concepts=CONCEPTS, reduce_steps=True) as tr:
        flux(["a red circle", "a blue square"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
             output_type="np", **TINY_FLUX_CALL_KWARGS)
    first, second = tr.concept_maps(0), tr.concept_maps(1)
    assert first.present == ("token", "layer")
    assert not torch.allclose(first.data, second.data)
    with pytest.raises(IndexError, match="out of range"):
        tr.concept_maps(2)


@pytest.mark.parametrize(
    ("concepts", "message"),
    [([], "empty"), (["red", "red"], "more than once"), (["red", "  "], "empty concept"), (["€"], "no token"),
     (["☃"], "no token"), (["日本"], "cannot be encoded")],
)
def test_bad_concepts_are_one_clear_error(flux, concepts, message) -> None:
    with pytest.raises(ConceptError, match=message):
        with attnscope.trace(flux, concepts=concepts):
            _run(flux, TINY_FLUX_CALL_KWARGS)
    assert not any(type(p).__name__.endswith("CaptureProcessor") for p in flux.transformer.attn_processors.values())


def test_concepts_need_a_pipeline_and_a_dual_stream_layer(flux) -> None:
    with pytest.raises(attnscope.TraceError, match="needs the pipeline"):
        attnscope.trace(flux.transformer, concepts=["red"])
    with pytest.raises(attnscope.SelectionError, match="dual-stream"):
        attnscope.trace(flux, concepts=["red"], layers="single")
    with pytest.raises(attnscope.TraceError, match="differentiable"):
        attnscope.trace(flux, concepts=["red"], differentiable=True)
    with attnscope.trace(flux) as tr:
        _run(flux, TINY_FLUX_CALL_KWARGS)
    with pytest.raises(attnscope.TraceError, match="no concepts"):
        tr.concept_maps()
