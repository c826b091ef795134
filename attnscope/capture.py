"""Capture processors: diffusers' own attention processors with their attention call routed through attnscope.

Why routing instead of a rewritten processor: the only way to *guarantee* the hooked model computes exactly
what the unhooked one does is to run diffusers' own processor code. Each capture processor therefore runs the
original ``__call__`` code object unchanged, in a namespace where the one name it uses for the attention
kernel (``dispatch_attention_fn`` for Flux, ``F.scaled_dot_product_attention`` for SD3) resolves to
:meth:`CaptureSite.attend`. That method sees ``q``, ``k``, ``v`` exactly as the kernel would (after norms and
RoPE), returns the same attention output, and records the text-key probabilities on the side.

The processors subclass the originals (``FluxAttnProcessor``, ``JointAttnProcessor2_0``), so
``set_attention_backend`` and isinstance checks keep working. Nothing global is patched: the rerouted
namespace belongs to one processor instance and disappears with it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .attention import fused_attention_with_text_probs, text_probs_chunked

if TYPE_CHECKING:
    from .adapters import LayerInfo
    from .trace import Trace


def _reroute(func: Callable[..., Any], **names: Any) -> types.FunctionType:
    """A copy of ``func`` (same code object) whose global ``names`` resolve to the given objects."""
    missing = [n for n in names if n not in func.__code__.co_names]
    if missing:
        raise RuntimeError(
            f"{func.__qualname__} no longer refers to {missing}: this diffusers version routes attention "
            "differently and attnscope cannot capture it exactly. Please report the diffusers version."
        )
    routed = types.FunctionType(func.__code__, {**func.__globals__, **names}, func.__name__, func.__defaults__, func.__closure__)
    routed.__kwdefaults__ = func.__kwdefaults__
    return routed


class UnsupportedProcessorError(TypeError):
    """A layer's processor is not the stock one attnscope knows how to reroute exactly."""


def _require_stock(original: Any, stock: type) -> None:
    if type(original) is not stock:
        raise UnsupportedProcessorError(
            f"the layer uses {type(original).__name__}; attnscope captures {stock.__name__} only "
            "(unfuse QKV projections and remove IP-adapters or custom processors first)"
        )


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
        when this call is captured, so layers and steps that are not captured pay nothing for it.
        """
        plan = self.trace.plan_layer(self.layer, q, k)
        if plan is None:
            return original()
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
        self.trace.record(self.layer, text_probs_chunked(q[rows, :, image], k[rows], text_index, scale, self.trace.chunk_size))
        return out


def _uses_native_sdpa(backend: Any) -> bool:
    name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
    return name == AttentionBackendName.NATIVE


class FluxCaptureProcessor(FluxAttnProcessor):
    """``FluxAttnProcessor`` whose ``dispatch_attention_fn`` call goes through a :class:`CaptureSite`.

    Flux hands the kernel ``(B, S, H, D)`` tensors; the site works in ``(B, H, S, D)`` (transposed views).
    """

    def __init__(self, original: FluxAttnProcessor, site: CaptureSite):
        _require_stock(original, FluxAttnProcessor)
        super().__init__()
        self._attention_backend = original._attention_backend
        self._parallel_config = original._parallel_config
        self.original = original
        self.site = site
        self._routed_call = _reroute(FluxAttnProcessor.__call__, dispatch_attention_fn=self._dispatch)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._routed_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _dispatch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        def original() -> torch.Tensor:
            return dispatch_attention_fn(query, key, value, **kwargs).transpose(1, 2)

        def plain() -> bool:
            return (
                kwargs.get("attn_mask") is None
                and not kwargs.get("dropout_p")
                and not kwargs.get("is_causal")
                and not kwargs.get("enable_gqa")
                and kwargs.get("parallel_config") is None
                and not kwargs.get("attention_kwargs")
                and _uses_native_sdpa(kwargs.get("backend"))
            )

        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return self.site.attend(q, k, v, kwargs.get("scale"), plain, original).transpose(1, 2)


class _RoutedFunctional:
    """``torch.nn.functional`` as seen by one SD3 processor: SDPA replaced, everything else passed through."""

    def __init__(self, sdpa: Callable[..., torch.Tensor]):
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


class SD3CaptureProcessor(JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` whose ``F.scaled_dot_product_attention`` call goes through a site.

    Calls without text (SD3.5's ``attn2`` never gets here: it keeps its own processor) pass straight through.
    """

    def __init__(self, original: JointAttnProcessor2_0, site: CaptureSite):
        _require_stock(original, JointAttnProcessor2_0)
        super().__init__()
        self.original = original
        self.site = site
        self._routed_call = _reroute(JointAttnProcessor2_0.__call__, F=_RoutedFunctional(self._sdpa))
        self._has_text = False

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.FloatTensor | tuple[torch.FloatTensor, torch.FloatTensor]:
        self._has_text = encoder_hidden_states is not None
        return self._routed_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        def original() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)

        if not self._has_text:
            return original()
        def plain() -> bool:
            return not args and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and not kwargs.get("is_causal")

        return self.site.attend(query, key, value, kwargs.get("scale"), plain, original)


__all__ = ["CaptureSite", "FluxCaptureProcessor", "SD3CaptureProcessor", "UnsupportedProcessorError"]
