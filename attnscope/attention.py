"""Text-key attention probabilities of image queries, without materializing the joint S×S matrix.

All functions here take PyTorch's SDPA layout: ``q``, ``k``, ``v`` are ``(B, H, S, D)`` over the *joint*
sequence (text and image tokens, in whichever order the architecture uses). What they compute is

    P[b, h, i, t] = softmax_j(q_i · k_j · scale)[t]       i ∈ image queries, j ∈ all keys, t ∈ kept text keys

i.e. the probability mass each image patch puts on each prompt token, normalized over **all** keys, exactly the
numbers inside the model's own attention. Two ways to get the softmax denominator (the log-sum-exp over keys):

* :func:`fused_attention_with_text_probs` asks PyTorch's fused kernel, which computes the log-sum-exp anyway, to
  return it together with the attention output. The model's output is then that kernel's output (the same kernel
  SDPA would pick, so bit-identical), and the capture costs one small ``N_img × T`` matmul per head. Under
  autograd on the CPU the probabilities' whole gradient rides in the kernel's own backward
  (:class:`_CpuFlashTextProbs`); elsewhere :func:`fused_attention_with_lse` gives output and log-sum-exp, and
  :func:`text_probs_from_lse` makes the log-sum-exp differentiable with one more SDPA forward and backward.
* :func:`text_probs_chunked` recomputes scores for a chunk of image queries at a time against all keys. Portable
  (any device, any backend, differentiable), peak memory ``B·H·chunk·S`` instead of ``B·H·S²``.

:func:`text_probs_reference` is the naive full-softmax definition, kept as the ground truth for tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

__all__ = [
    "fused_attention_with_lse",
    "fused_attention_with_text_probs",
    "text_probs_from_lse",
    "text_probs_chunked",
    "text_probs_reference",
]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> SDPBackend:
    """The kernel ``F.scaled_dot_product_attention`` would run for these inputs (no mask, no dropout)."""
    return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))


def fused_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention output ``(B, H, S, Dv)`` and log-sum-exp ``(B, H, S)`` from one fused kernel call.

    Returns ``None`` when ``F.scaled_dot_product_attention`` would not run a fused kernel that can also return
    the log-sum-exp for these inputs; calling it directly then could change the output, so the caller must fall
    back to the original attention call. When a result is returned, its output is what SDPA would have returned.
    Under autograd the output is differentiable and the log-sum-exp is not (the kernels' own rule); see
    :func:`text_probs_from_lse` and :func:`fused_attention_with_text_probs` for probabilities with gradient.
    """
    choice = _sdpa_choice(q, k, v, scale)
    if q.device.type == "cpu":
        if choice != SDPBackend.FLASH_ATTENTION:
            return None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    # On CUDA, SDPA pads head dims that are not multiples of 8 before its kernels; only the unpadded case is
    # reproduced exactly by a direct call.
    if q.device.type == "cuda" and q.shape[-1] % 8 == 0:
        if choice == SDPBackend.FLASH_ATTENTION:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse
        if choice == SDPBackend.EFFICIENT_ATTENTION:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, False, scale=scale
            )[:2]
            # The efficient kernel pads the log-sum-exp's query axis up to a multiple of 32.
            return out, lse[..., : q.shape[-2]]
    return None


def fused_attention_with_text_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    rows: slice,
    image: slice,
    text_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention output ``(B, H, S, Dv)`` and text-key probabilities ``(R, H, N, T)`` from one fused kernel call.

    ``rows``: the batch rows to read (``R`` of them), ``image``: the image queries' span of the joint sequence
    (``N``), ``text_index``: the kept text keys' positions (``T``). Returns ``None`` exactly when
    :func:`fused_attention_with_lse` does (the caller must fall back to the original call). The probabilities are
    float32 and differentiable when the inputs are: on the CPU their gradient is computed inside the kernel's own
    backward (:class:`_CpuFlashTextProbs`), elsewhere through :func:`text_probs_from_lse`.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and needs_grad:
        if _sdpa_choice(q, k, v, scale) != SDPBackend.FLASH_ATTENTION:
            return None
        return _CpuFlashTextProbs.apply(q, k, v, scale, rows, image, text_index)
    fused = fused_attention_with_lse(q, k, v, scale)
    if fused is None:
        return None
    out, lse = fused
    k_rows = k[rows]
    probs = text_probs_from_lse(
        q[rows, :, image], k_rows.index_select(-2, text_index), lse[rows, :, image], scale, k_all=k_rows
    )
    return out, probs


class _CpuFlashTextProbs(torch.autograd.Function):
    """CPU flash attention that also returns text-key probabilities, with their gradient in one kernel backward.

    ``P_it = exp(s·q_i·k_t − lse_i)``, so a gradient ``G`` on ``P`` is a score gradient ``G⊙P`` on the kept columns
    (added to ``dq`` and ``dk`` in place, as two small matmuls) plus a log-sum-exp gradient ``g_i = −Σ_t (G⊙P)_it``,
    which adds ``g_i·P_ij`` to every score gradient. The flash backward computes the score gradient as
    ``P_ij·(dP_ij − D_i)`` with ``D_i = Σ_d dO_id·O_id``, and reads the output ``O`` for nothing else. So handing it
    ``O_i − g_i·dO_i / ‖dO_i‖²`` in place of ``O_i`` turns ``D_i`` into ``D_i − g_i``, exactly the missing term, at
    no cost beyond the backward the model's attention needs anyway (each product ``dO_id·δ_id`` has the sign of
    ``−g_i`` and size at most ``|g_i|``, so the float32 sum is accurate). Rows with no output gradient cannot carry
    ``g`` that way; then one extra head-dim column — zero in q, k and v, one in the output, ``−g_i`` in its
    gradient — does the same (a 1/D wider head), for the batch elements that need it.

    The probabilities get no autograd graph of their own: one through slices of ``q`` and ``k`` would zero-fill
    and add full ``(B, H, S, D)`` gradients at every captured layer.
    """

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
        rows: slice, image: slice, text_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        k_text = k[rows].index_select(-2, text_index)
        probs = text_probs_from_lse(q[rows, :, image], k_text, lse[rows, :, image], scale)
        ctx.save_for_backward(q, k, v, out, lse, probs, k_text, text_index)
        ctx.scale, ctx.rows, ctx.image = _scale(q, scale), rows, image
        ctx.set_materialize_grads(False)
        return out, probs

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_probs: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse, probs, k_text, text_index = ctx.saved_tensors
        rows, image, scale = ctx.rows, ctx.image, ctx.scale
        kernel_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_probs is None:
            return (*kernel_backward(grad_out, q, k, v, out, lse, 0.0, False, scale=scale), None, None, None, None)
        grad_scores = grad_probs.float() * probs  # (R, H, N, T): on the kept columns' scores
        grad_lse = torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)
        grad_lse[rows, :, image] = -grad_scores.sum(dim=-1)
        dq, dk, dv = _backward_with_lse_gradient(q, k, v, out, lse, grad_out, grad_lse, scale)
        dq[rows, :, image] += (scale * torch.matmul(grad_scores, k_text.float())).to(dq.dtype)
        grad_k_text = scale * torch.matmul(grad_scores.transpose(-1, -2), q[rows, :, image].float())
        dk[rows].index_add_(-2, text_index, grad_k_text.to(dk.dtype))
        return dq, dk, dv, None, None, None, None


# A squared output-gradient norm below this cannot carry a log-sum-exp gradient g as g·dO/‖dO‖².
_ZERO_OUTPUT_GRADIENT = 1e-30


def _backward_with_lse_gradient(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, grad_lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flash backward for output gradient ``grad_out`` and log-sum-exp gradient ``grad_lse`` (see
    :class:`_CpuFlashTextProbs`): folded into the output, or in an extra column for elements that need one."""
    # Rows whose output gradient is (nearly) zero cannot carry g in the output (g·dO/‖dO‖² would overflow):
    # batch elements with such a row take the extra column instead. Attention is independent per batch
    # element, so the two kinds run as two kernel calls on their own elements.
    norm2 = torch.linalg.vector_norm(grad_out, dim=-1, dtype=torch.float32).square()
    needs_column = ((norm2 < _ZERO_OUTPUT_GRADIENT) & (grad_lse != 0)).flatten(1).any(dim=1)
    if not needs_column.any():
        return _folded_backward(q, k, v, out, lse, grad_out, grad_lse, norm2, scale)
    if needs_column.all():
        return _widened_backward(q, k, v, out, lse, grad_out, grad_lse, scale)
    folded, widened = torch.nonzero(~needs_column).flatten(), torch.nonzero(needs_column).flatten()

    def elements(index: torch.Tensor) -> list[torch.Tensor]:
        return [t.index_select(0, index) for t in (q, k, v, out, lse, grad_out, grad_lse)]

    grads = [torch.empty_like(t) for t in (q, k, v)]
    for index, part in (
        (folded, _folded_backward(*elements(folded), norm2.index_select(0, folded), scale)),
        (widened, _widened_backward(*elements(widened), scale)),
    ):
        for grad, value in zip(grads, part):
            grad.index_copy_(0, index, value)
    return grads[0], grads[1], grads[2]


def _folded_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, grad_lse: torch.Tensor, norm2: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flash backward with the log-sum-exp gradient folded into the output."""
    # Rows here with a (nearly) zero output gradient have a zero log-sum-exp gradient (the others took the extra
    # column); the clamp makes their shift 0 instead of 0/0, which would poison the whole backward with NaN.
    coefficient = grad_lse.float() / norm2.clamp_min(_ZERO_OUTPUT_GRADIENT)
    shifted = torch.addcmul(out.float(), coefficient.unsqueeze(-1), grad_out.float(), value=-1)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, shifted.to(out.dtype), lse, 0.0, False, scale=scale
    )


def _widened_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, grad_lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flash backward with the log-sum-exp gradient in an extra head-dim column."""

    def widen(t: torch.Tensor, column: torch.Tensor | float) -> torch.Tensor:
        extra = column.unsqueeze(-1) if isinstance(column, torch.Tensor) else torch.full_like(t[..., :1], column)
        return torch.cat([t, extra.to(t.dtype)], dim=-1)

    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        widen(grad_out, -grad_lse), widen(q, 0.0), widen(k, 0.0), widen(v, 0.0), widen(out, 1.0), lse,
        0.0, False, scale=scale,
    )
    return dq[..., :-1], dk[..., :-1], dv[..., :-1]


class _KernelLogSumExp(torch.autograd.Function):
    """The log-sum-exp a fused kernel returned, made differentiable without materializing scores.

    ``lse_i = log Σ_j exp(s·q_i·k_j)`` has gradients ``∂/∂q_i = s·(P K)_i`` and ``∂/∂k_j = s·(Pᵀ(g⊙Q))_j``: the
    first is an attention output with ``V = K``, the second is exactly SDPA's value-gradient for ``dO = g⊙Q``.
    So the backward pass is one fused SDPA forward and backward, never ``S × S`` in memory.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        q, k = ctx.saved_tensors
        with torch.enable_grad():
            values = k.detach().requires_grad_()
            attended = F.scaled_dot_product_attention(q.detach(), k.detach(), values, scale=ctx.scale)
            weighted_q = grad.unsqueeze(-1).to(q.dtype) * q
            (grad_values,) = torch.autograd.grad(attended, values, grad_outputs=weighted_q)
        grad_q = ctx.scale * grad.unsqueeze(-1).to(q.dtype) * attended.detach()
        return grad_q, ctx.scale * grad_values, None, None


def text_probs_from_lse(
    q_img: torch.Tensor,
    k_text: torch.Tensor,
    lse_img: torch.Tensor,
    scale: float | None = None,
    k_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """``exp(q_img · k_textᵀ · scale − lse)``: text-key probabilities given the full softmax's log-sum-exp.

    q_img ``(B, H, N, D)``, k_text ``(B, H, T, D)``, lse_img ``(B, H, N)`` → ``(B, H, N, T)``. Computed in
    float32 whatever the input dtype: the subtraction of two large numbers is where low precision would hurt.
    Pass ``k_all`` (all keys, ``(B, H, S, D)``) to make the result differentiable through a log-sum-exp that
    carries no gradient of its own (what :func:`fused_attention_with_lse` returns).
    """
    needs_grad = q_img.requires_grad or k_all is not None and k_all.requires_grad
    if k_all is not None and torch.is_grad_enabled() and needs_grad and not lse_img.requires_grad:
        lse_img = _KernelLogSumExp.apply(q_img, k_all, lse_img, _scale(q_img, scale))
    scores = torch.matmul(q_img.float(), k_text.float().transpose(-1, -2)) * _scale(q_img, scale)
    return torch.exp(scores - lse_img.float().unsqueeze(-1))


def _chunk_probs(q_chunk: torch.Tensor, k: torch.Tensor, text_index: torch.Tensor, scale: float) -> torch.Tensor:
    scores = torch.matmul(q_chunk.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores.index_select(-1, text_index) - lse)


def text_probs_chunked(
    q_img: torch.Tensor,
    k: torch.Tensor,
    text_index: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Text-key probabilities by recomputing scores for ``chunk_size`` image queries at a time.

    q_img ``(B, H, N, D)``; k ``(B, H, S, D)`` over all keys; text_index ``(T,)`` long positions of the kept text
    keys within ``k`` → ``(B, H, N, T)`` float32. Under autograd each chunk is checkpointed, so the backward pass
    also never holds more than one chunk's ``(B, H, chunk, S)`` scores.
    """
    s = _scale(q_img, scale)
    track_grad = torch.is_grad_enabled() and (q_img.requires_grad or k.requires_grad)
    chunks = []
    for start in range(0, q_img.shape[-2], chunk_size):
        q_chunk = q_img[..., start : start + chunk_size, :]
        if track_grad:
            chunks.append(checkpoint(_chunk_probs, q_chunk, k, text_index, s, use_reentrant=False))
        else:
            chunks.append(_chunk_probs(q_chunk, k, text_index, s))
    return torch.cat(chunks, dim=-2)


def text_probs_reference(
    q: torch.Tensor, k: torch.Tensor, image_index: torch.Tensor, text_index: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The definition, with the full ``(S, S)`` softmax (float64): for tests and small inputs only."""
    probs = torch.softmax(torch.matmul(q.double(), k.double().transpose(-1, -2)) * _scale(q, scale), dim=-1)
    return probs.index_select(-2, image_index).index_select(-1, text_index)
