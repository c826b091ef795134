"""The text-key probability math: both capture paths against the naive full-softmax definition."""

import pytest
import torch
import torch.nn.functional as F

from attnscope.attention import (
    fused_attention_with_lse,
    fused_attention_with_text_probs,
    text_probs_chunked,
    text_probs_from_lse,
    text_probs_reference,
)


def _qkv(seed: int, b: int = 2, h: int = 3, s: int = 70, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # (B, S, H, D) permuted to (B, H, S, D), as diffusers hands tensors to SDPA (non-contiguous views)
    return tuple(torch.randn(b, s, h, d, generator=g).mul(2.0).permute(0, 2, 1, 3) for _ in range(3))


@pytest.mark.parametrize("text_first", [True, False])
def test_both_paths_match_reference(text_first: bool) -> None:
    q, k, v = _qkv(0)
    n_text = 9
    s = q.shape[-2]
    text = torch.arange(0, n_text) if text_first else torch.arange(s - n_text, s)
    image = torch.arange(n_text, s) if text_first else torch.arange(0, s - n_text)
    kept_text = text[[0, 2, 3, 8]]  # a subset, as when padding or unselected words are dropped
    reference = text_probs_reference(q, k, image, kept_text)

    fused = fused_attention_with_lse(q, k, v)
    assert fused is not None, "CPU float32 without mask must take the fused flash kernel"
    out, lse = fused
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)), "fused output must be SDPA's, bit for bit"
    from_lse = text_probs_from_lse(q.index_select(2, image), k.index_select(2, kept_text), lse.index_select(2, image))
    chunked = text_probs_chunked(q.index_select(2, image), k, kept_text, chunk_size=16)

    assert from_lse.shape == chunked.shape == (2, 3, s - n_text, 4)
    torch.testing.assert_close(from_lse.double(), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.double(), reference, atol=1e-5, rtol=0)


def test_rows_sum_to_one_with_image_part() -> None:
    q, k, v = _qkv(1)
    n_text = 12
    s = q.shape[-2]
    text, image = torch.arange(n_text), torch.arange(n_text, s)
    probs = text_probs_chunked(q.index_select(2, image), k, text, chunk_size=7)
    image_part = text_probs_reference(q, k, image, image)
    total = probs.double().sum(-1) + image_part.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_fused_declines_what_it_cannot_reproduce() -> None:
    q, k, v = _qkv(2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert fused_attention_with_lse(q, k, v) is None


def test_chunked_is_differentiable_and_matches_full_gradient() -> None:
    q, k, _ = _qkv(3, b=1, h=2, s=40, d=8)
    q = q.double().requires_grad_()
    k = k.double().requires_grad_()
    text, image = torch.arange(5), torch.arange(5, 40)
    loss = text_probs_chunked(q.index_select(2, image), k, text[:2], chunk_size=8).sum()
    loss.backward()
    grad_q, grad_k = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    text_probs_reference(q, k, image, text[:2]).sum().backward()
    torch.testing.assert_close(grad_q, q.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_k, k.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("route", ["kernel", "sdpa"])
@pytest.mark.parametrize("use_output", ["all_rows", "some_rows", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "diffusers"])
@pytest.mark.parametrize("supervised", ["both", "second"])
def test_fused_path_gradient_matches_full_softmax(route: str, use_output: str, layout: str, supervised: str) -> None:
    """The fused path's probabilities are differentiable — inside the CPU kernel's own backward ("kernel"), or
    through one more SDPA forward and backward from a log-sum-exp without gradient ("sdpa", the CUDA route) —
    with the definition's gradients. The output's gradient reaches every query row (the log-sum-exp's gradient
    folds into the output), only some rows of the second batch element (that element takes the extra column, the
    first folds), or none (as when a trace stops the forward after this layer)."""
    q, k, v = (x.contiguous() if layout == "contiguous" else x for x in _qkv(4, b=2, h=2, s=48, d=8))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    image = torch.arange(6, 48)  # after the 6 text positions
    kept = torch.tensor([0, 2, 5])
    weights = torch.randn(2, 2, 42, 3, generator=torch.Generator().manual_seed(0))
    if supervised == "second":
        weights[0] = 0
    out_weights = torch.randn(2, 2, 48, 8, generator=torch.Generator().manual_seed(1))
    if use_output == "some_rows":
        out_weights[1, :, 20:] = 0
    if layout == "diffusers":
        out_weights = out_weights.transpose(1, 2).contiguous().transpose(1, 2)

    def output_term(out: torch.Tensor) -> torch.Tensor | int:
        return (out * out_weights).sum() if use_output != "none" else 0

    if route == "kernel":
        out, probs = fused_attention_with_text_probs(q, k, v, None, slice(0, 2), slice(6, 48), kept)
    else:
        out, lse = fused_attention_with_lse(q, k, v)
        assert not lse.requires_grad
        probs = text_probs_from_lse(q[:, :, 6:], k.index_select(2, kept), lse[:, :, 6:], k_all=k)
    assert probs.requires_grad
    ((probs * weights).sum() + output_term(out)).backward()
    grads = q.grad.clone(), k.grad.clone(), v.grad.clone() if v.grad is not None else torch.zeros_like(v)
    q.grad = k.grad = v.grad = None
    reference = text_probs_reference(q, k, image, kept).float()
    ((reference * weights).sum() + output_term(F.scaled_dot_product_attention(q, k, v))).backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad if v.grad is not None else torch.zeros_like(v))):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_fused_text_probs_read_the_asked_rows_and_keep_the_output() -> None:
    """Probabilities of a batch-row subset equal that subset of the all-rows result; the output is SDPA's."""
    q, k, v = (x.detach().requires_grad_() for x in _qkv(5, b=3, h=2, s=40, d=8))
    kept = torch.tensor([1, 3])
    out, every = fused_attention_with_text_probs(q, k, v, None, slice(0, 3), slice(5, 40), kept)
    _, tail = fused_attention_with_text_probs(q, k, v, None, slice(1, 3), slice(5, 40), kept)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert tail.shape == (2, 2, 35, 2)
    torch.testing.assert_close(tail, every[1:])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert fused_attention_with_text_probs(q, k, v, None, slice(0, 3), slice(5, 40), kept) is None
