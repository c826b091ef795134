"""The capture site and what every capture processor shares: diffusers' own attention processor code with its
attention call routed through attnscope.

Why routing instead of a rewritten processor: the only way to *guarantee* the hooked model computes exactly
what the unhooked one does is to run diffusers' own processor code. Each architecture's capture processor (in
its adapter module) therefore runs the original ``__call__`` code object unchanged (:func:`reroute`), in a
namespace where the one name it uses for the attention kernel (``dispatch_attention_fn`` for Flux,
``F.scaled_dot_product_attention`` for SD3) resolves to :meth:`CaptureSite.attend`. That method sees ``q``,
``k``, ``v`` exactly as the kernel would (after norms and RoPE), returns the same attention output, and records
the text-key probabilities on the side.

The processors subclass the originals (``FluxAttnProcessor``, ``JointAttnProcessor2_0``), so
``set_attention_backend`` and isinstance checks keep working. Nothing global is patched: the rerouted
namespace belongs to one processor instance and disappears with it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from .attention import fused_attention_with_text_probs, text_probs_chunked

if TYPE_CHECKING:
    from .adapters import LayerInfo
    from .trace import Trace


def reroute(func: Callable[..., Any], **names: Any) -> types.FunctionType:
    """A copy of ``func`` (same code object) whose global ``names`` resolve to the given objects."""
    missing = [n for n in names if n not in func.__code__.co_names]
    if missing:
        raise RuntimeError(
            f"{func.__qualname__} no longer refers to {missing}: this diffusers version routes attention "
            "differently and attnscope cannot capture it exactly. Please report the diffusers version."
        )
    routed = types.FunctionType(
        func.__code__, {**func.__globals__, **names}, func.__name__, func.__defaults__, func.__closure__
    )
    routed.__kwdefaults__ = func.__kwdefaults__
    return routed


class UnsupportedProcessorError(TypeError):
    """A layer's processor is not the stock one attnscope knows how to reroute exactly."""


def require_stock(original: Any, stock: type) -> None:
    if type(original) is not stock:
        raise UnsupportedProcessorError(
            f"the layer uses {type(original).__name__}; attnscope captures {stock.__name__} only "
            "(unfuse QKV projections and remove IP-adapters or custom processors first)"
        )


class CaptureProcessor:
    """Base of every capture processor (mixed in before the stock processor class it subclasses): ``original`` is
    the processor it replaced, ``site`` the :class:`CaptureSite` it reports to."""

    original: Any
    site: CaptureSite


@dataclass
class CaptureSite:
    """One captured layer: computes the attention the processor asked for and reports probabilities."""

    layer: LayerInfo
    trace: Trace

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None,
        fused_allowed: Callable[[], bool],
        original: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Attention output for ``q, k, v`` in ``(B, H, S, D)`` layout, identical to ``original()``.

        ``original`` runs the call the processor was about to make; it is used whenever the fused kernel cannot
        reproduce it exactly (masks, other backends, devices without an LSE-returning kernel) and for the chunked
        path. ``fused_allowed()`` says whether the processor's call would have been plain SDPA; it is only asked
        when this call is captured, so layers and steps that are not captured pay nothing for it. With concept
        maps, the call's image keys, values and outputs are handed to the trace's concept stream as well.
        """
        plan = self.trace.plan_layer(self.layer, q, k)
        stream = self.trace.concept_stream
        concepts = stream is not None and stream.wants(self.layer)
        out = original() if plan is None else self._attend_and_record(q, k, v, scale, fused_allowed, original, plan)
        if concepts:
            stream.attended(self.layer, k, v, out, self.trace.image_span(k), self.trace.kept_rows)
        return out

    def _attend_and_record(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None,
        fused_allowed: Callable[[], bool],
        original: Callable[[], torch.Tensor],
        plan: tuple[slice, torch.Tensor, slice],
    ) -> torch.Tensor:
        image, text_index, rows = plan
        if self.trace.path != "chunked" and fused_allowed():
            fused = fused_attention_with_text_probs(q, k, v, scale, rows, image, text_index)
            if fused is not None:
                out, probs = fused
                self.trace.record(self.layer, probs)
                return out
        if self.trace.path == "fused":
            raise RuntimeError(
                f"path='fused' was requested but {self.layer.name} cannot use a fused kernel that returns the "
                "log-sum-exp here (attention mask, non-native backend, or unsupported device/dtype); use path='auto'"
            )
        out = original()
        self.trace.record(
            self.layer, text_probs_chunked(q[rows, :, image], k[rows], text_index, scale, self.trace.chunk_size)
        )
        return out


def uses_native_sdpa(backend: Any) -> bool:
    name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
    return name == AttentionBackendName.NATIVE


__all__ = [
    "CaptureProcessor",
    "CaptureSite",
    "UnsupportedProcessorError",
    "require_stock",
    "reroute",
    "uses_native_sdpa",
]
