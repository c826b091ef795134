"""Output-space concept maps (ConceptAttention, Helbling et al. 2025): concept tokens that ride along through the
dual-stream blocks without changing the image.

Each concept ("red", "circle", "background") is encoded *alone* by the model's own text encoder, and its
features enter the text stream through the transformer's text embedder (the adapter's ``text_embedder``,
``context_embedder``) like a prompt's would. In every dual-stream block the concept rows go through the block's
text-stream weights (``norm1_context``, ``add_q/k/v_proj``, ``norm_added_q/k``, ``to_add_out``, ``ff_context``) and
attend to ``[concepts; image]``: the image keys and values are the block's own, taken from the traced attention
call. Nothing attends back to the concepts, so the model's output is bit-identical to an untraced run.

The map of concept ``c`` at image token ``i`` is ``softmax_c ⟨o_c, o_i⟩``: the dot product of the concept's and the
image token's attention outputs *before* the output projections (heads concatenated), normalized over the
concepts, so concepts compete for each patch ("background" is a useful competitor).

Multi-piece concepts: the text encoder's features of the concept's pieces are **averaged** (the end-of-text token
and padding left out), one row per concept; a multi-word concept ("red circle") is one row too.

The text stream of a block is re-stated here (:func:`text_stream_block`) from the modules diffusers' dual-stream
blocks share by name (Flux's ``FluxTransformerBlock``, SD3's ``JointTransformerBlock``); a test feeds it a block's
real text input and checks it reproduces the block's own text output, so a diffusers change that breaks the
restatement fails loudly instead of drawing wrong maps. RoPE is not applied to the concept rows: concepts sit at
position zero (as Flux's text tokens do), whose rotation is the identity.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .tokens import PromptTokens, Word

if TYPE_CHECKING:
    from .adapters import LayerInfo
    from .trace import Trace

__all__ = ["ConceptError", "ConceptStream", "concept_tokens", "text_stream_block"]


class ConceptError(ValueError):
    """A concept list that cannot be traced: empty, repeated, or a concept the tokenizer cannot encode."""


def check_concepts(concepts: Sequence[str]) -> tuple[str, ...]:
    """The concepts as a tuple, or :class:`ConceptError` naming what is wrong with them."""
    if isinstance(concepts, str):
        concepts = [concepts]
    out = tuple(str(c).strip() for c in concepts)
    if not out:
        raise ConceptError("concepts= is empty; give at least one concept, e.g. ['red', 'circle', 'background']")
    empty = [c for c in concepts if not str(c).strip()]
    if empty:
        raise ConceptError(f"concepts= contains an empty concept ({empty!r}); each concept is a word or phrase")
    repeated = sorted({c for c in out if out.count(c) > 1})
    if repeated:
        raise ConceptError(f"concepts= names {repeated} more than once; each concept is one row of the softmax")
    return out


def concept_tokens(concepts: Sequence[str]) -> PromptTokens:
    """A token layout whose word ``i`` is concept ``i`` at position ``i``, so ``maps.word("red")`` picks a concept."""
    words = tuple(Word(text=c, index=i, positions=(i,)) for i, c in enumerate(concepts))
    return PromptTokens(
        prompt=", ".join(concepts), pieces=tuple(concepts), valid=tuple(range(len(concepts))), words=words, offset=0
    )


def _content(piece: str) -> str:
    """A piece without its word-boundary marks (T5's ``▁``, CLIP's ``</w>``): empty for a bare boundary."""
    return piece.replace("▁", "").replace("</w>", "").strip()


def pooled_concept_states(states: torch.Tensor, tokens: Sequence[PromptTokens], unknown: set[str]) -> torch.Tensor:
    """``(C, D)``: each concept's text-encoder features ``states (C, L, D)`` averaged over its word pieces.

    ``tokens[c]`` is concept ``c`` tokenized alone; ``unknown`` the tokenizers' unknown pieces (a concept made only
    of unknown pieces carries no meaning and is refused)."""
    rows = []
    for c, layout in enumerate(tokens):
        positions = sorted({p for w in layout.words for p in w.positions})
        if not positions:
            raise ConceptError(f"concept {layout.prompt!r} has no token left after tokenization")
        if all(layout.pieces[p] in unknown or not _content(layout.pieces[p]) for p in positions):
            raise ConceptError(
                f"concept {layout.prompt!r} cannot be encoded: this model's tokenizer has no piece for it "
                f"(every piece is unknown: {sorted(unknown)})"
            )
        rows.append(states[c, positions].float().mean(0))
    return torch.stack(rows)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b s (h d) -> b h s d", h=heads)


def text_stream_block(
    block: torch.nn.Module, stream: torch.Tensor, temb: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One dual-stream block's text stream for extra rows that attend to ``[rows; image]``.

    ``stream (B, C, D)`` the rows' residual stream entering the block, ``temb (B, D)`` the block's conditioning,
    ``k_image``/``v_image (B, H, N, d)`` the block's image keys and values as its attention kernel saw them (after
    norms and RoPE). Returns the rows' attention output before ``to_add_out`` ``(B, C, H·d)`` and their residual
    stream leaving the block ``(B, C, D)`` (``None`` after a block whose text stream ends there, SD3's last).
    """
    attn = block.attn
    pre_only = getattr(block, "context_pre_only", False)
    if pre_only:
        normed = block.norm1_context(stream, temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=temb)
    q = _heads(attn.add_q_proj(normed), attn.heads)
    k = _heads(attn.add_k_proj(normed), attn.heads)
    v = _heads(attn.add_v_proj(normed), attn.heads)
    if attn.norm_added_q is not None:
        q, k = attn.norm_added_q(q), attn.norm_added_k(k)
    out = F.scaled_dot_product_attention(q, torch.cat([k, k_image], dim=2), torch.cat([v, v_image], dim=2))
    out = rearrange(out, "b h c d -> b c (h d)").to(q.dtype)
    if pre_only:
        return out, None
    stream = stream + gate_msa.unsqueeze(1) * attn.to_add_out(out)
    normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    return out, stream


class ConceptStream:
    """The concept rows of one :class:`~attnscope.trace.Trace`: encoded at its first transformer call, carried
    block to block, and turned into maps at the trace's selected dual-stream layers.

    ``layers`` are the dual-stream layers whose maps are recorded; the stream runs through every dual-stream block
    up to the last of them (each block's text stream feeds the next).
    """

    def __init__(
        self, trace: Trace, concepts: Sequence[str], layers: Sequence[LayerInfo], through: Sequence[LayerInfo]
    ):
        self.trace = trace
        self.concepts = check_concepts(concepts)
        self.layers = tuple(layers)
        self.through = tuple(through)  # every dual-stream layer the stream passes, in forward order
        self._recorded = {layer.index: layer for layer in self.layers}
        self._blocks = {
            layer.index: trace.transformer.get_submodule(layer.name.removesuffix(".attn")) for layer in self.through
        }
        self._embedded: torch.Tensor | None = None  # (C, D): the concepts' text features through the context embedder
        self._stream: torch.Tensor | None = None  # (R, C, D): the rows' residual stream between blocks
        self._rows = slice(0)  # the batch rows of the current call the stream rides with
        self._attended: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    # ---------------------------------------------------------------------------------- install
    def install(self) -> None:
        for index, block in self._blocks.items():
            self._hooks.append(block.register_forward_hook(self._after_block(index), with_kwargs=True))

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._stream = None
        self._attended.clear()

    # ------------------------------------------------------------------------------ per forward
    def start(self, text_length: int, rows: slice) -> None:
        """A traced transformer call begins; ``rows`` are its kept batch rows: the concept rows enter the text
        stream beside each of them."""
        transformer = self.trace.transformer
        if self._embedded is None:  # the model does not change inside a trace: encode and embed once
            states = self.trace.encode_concepts(self.concepts, text_length)
            with torch.no_grad():
                embedder = transformer.get_submodule(self.trace.adapter.text_embedder)
                self._embedded = embedder(states.to(transformer.device, transformer.dtype))
        self._stream = repeat(self._embedded, "c d -> r c d", r=rows.stop - rows.start)
        self._rows = rows
        self._attended.clear()

    def stop(self) -> None:
        """The call carries no kept rows (a step or branch not traced): nothing rides along."""
        self._stream = None
        self._attended.clear()

    def wants(self, layer: LayerInfo) -> bool:
        return self._stream is not None and layer.index in self._blocks

    def attended(self, layer: LayerInfo, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, image: slice,
                 rows: slice) -> None:
        """The block's attention call: keep (views of) its image keys, values and outputs ``(R, H, N, d)``."""
        self._attended[layer.index] = (k[rows, :, image], v[rows, :, image], out[rows, :, image])

    def _after_block(self, index: int) -> Any:
        signature = inspect.signature(self._blocks[index].forward)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            seen = self._attended.pop(index, None)
            if self._stream is None or seen is None:
                return
            k_image, v_image, out_image = seen
            # diffusers passes temb by keyword, except under gradient checkpointing (positional)
            temb = kwargs["temb"] if "temb" in kwargs else signature.bind(*args, **kwargs).arguments["temb"]
            temb = temb[self._rows]
            with torch.no_grad():
                out_concepts, self._stream = text_stream_block(module, self._stream, temb, k_image, v_image)
                if index in self._recorded:
                    heads = rearrange(out_concepts, "b c (h d) -> b h c d", h=out_image.shape[1])
                    # ⟨o_c, o_i⟩ over the concatenated heads, as a sum over heads (no copy of the image outputs)
                    scores = torch.einsum("b h c d, b h n d -> b n c", heads.float(), out_image.float())
                    self.trace.record_concepts(self._recorded[index], scores.softmax(dim=-1))
            if self._stream is None or index == self.through[-1].index:
                self._stream = None

        return hook
