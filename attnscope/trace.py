"""``attnscope.trace``: capture token-localized joint attention while a pipeline (or transformer) runs.

    with attnscope.trace(pipe) as tr:
        image = pipe("a red circle and a blue square").images[0]
    maps = tr.maps()                                    # TokenMaps of the last generation, first prompt

Entering installs capture processors on the selected joint-attention layers (from a copy of
``transformer.attn_processors``), a forward pre-hook on the transformer (grid, text length, step) and, for a
pipeline, a wrapper on ``pipe.encode_prompt`` (which prompt is being drawn). Exiting restores all three, also
when the body raises. The model's output is bit-identical to an untraced run.

With ``concepts=[...]`` the trace also keeps output-space concept maps (:mod:`attnscope.concepts`, ConceptAttention):
``tr.concept_maps()`` gives them as ``TokenMaps`` whose words are the concepts.

Retained memory (what stays after the run, on ``store_device``, float32):
``N_img × T_kept × 4`` bytes per captured (layer, step, conditional image); ``× heads`` with per-head capture;
``T_kept`` is the prompt's non-padding tokens, or only the selected ``words``/``positions``; with
``reduce_steps=True`` the step factor becomes 1. ``Trace.retained_bytes`` reports the actual figure.
Transient memory inside a layer: ``B × H × N_img × T_kept`` floats (fused path) or ``B × H × chunk × S``
(chunked path) — never ``S × S``.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from einops import rearrange

from .adapters import Adapter, ForwardContext, LayerInfo, adapter_for, transformer_of
from .capture import CaptureProcessor, CaptureSite
from .concepts import ConceptStream, concept_tokens
from .maps import SelectionError, TokenMaps, _layer_indices
from .tokens import PromptTokens

Branch = Literal["cond", "uncond"]
CapturePath = Literal["auto", "fused", "chunked"]


class TraceError(RuntimeError):
    """A trace was misused (entered twice, nothing captured yet, ...)."""


class StopForward(Exception):
    """Raised inside the model by a ``trace(..., stop=True)`` once the last captured layer of a call is recorded,
    so that nothing after it runs; the trace's ``with`` block swallows it (code that must stay inside the block,
    e.g. for a backward pass, catches it itself)."""


@dataclass
class _Generation:
    """Everything captured for one pipeline call (or, for a bare transformer, for the whole trace)."""

    prompts: list[str] | None = None  # one per conditional batch row
    tokens: list[PromptTokens] | None = None
    keep: tuple[int, ...] | None = None  # text positions kept
    grid: tuple[int, int] | None = None
    forwards: int = 0
    timesteps: list[float] = field(default_factory=list)
    # branch -> step -> layer index -> (rows, [heads,] N_img, T_kept)
    records: dict[str, dict[int, dict[int, torch.Tensor]]] = field(default_factory=lambda: defaultdict(dict))
    # reduce_steps=True: branch -> layer index -> running sum, and the number of steps summed
    sums: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: defaultdict(dict))
    summed_steps: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    # concepts=: the same layout for the concept maps, (rows, N_img, concepts)
    concept_records: dict[str, dict[int, dict[int, torch.Tensor]]] = field(default_factory=lambda: defaultdict(dict))
    concept_sums: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: defaultdict(dict))


class Trace:
    """Context manager returned by :func:`trace`; after the run, :meth:`maps` gives the result."""

    def __init__(
        self,
        pipe_or_transformer: Any,
        *,
        layers: int | str | slice | Sequence[int | str] | None = None,
        steps: int | slice | Sequence[int] | None = None,
        heads: Literal["mean", "all"] | int | Sequence[int] = "mean",
        words: Sequence[str] | None = None,
        positions: Sequence[int] | None = None,
        cfg: Literal["cond", "uncond", "both"] = "cond",
        path: CapturePath = "auto",
        reduce_steps: bool = False,
        include_padding: bool = False,
        chunk_size: int = 256,
        store_device: str | torch.device = "cpu",
        differentiable: bool = False,
        rows: slice | None = None,
        stop: bool = False,
        concepts: Sequence[str] | None = None,
    ):
        self.transformer = transformer_of(pipe_or_transformer)
        self.pipe = None if pipe_or_transformer is self.transformer else pipe_or_transformer
        self.adapter: Adapter = adapter_for(self.transformer)
        all_layers = tuple(self.adapter.layers(self.transformer))
        self._attention_modules = {layer.name: self.transformer.get_submodule(layer.name) for layer in all_layers}
        self.layers: tuple[LayerInfo, ...] = (
            all_layers if layers is None else tuple(all_layers[i] for i in _layer_indices(all_layers, layers))
        )
        if cfg not in ("cond", "uncond", "both"):
            raise ValueError(f"cfg must be 'cond', 'uncond' or 'both', not {cfg!r}")
        if path not in ("auto", "fused", "chunked"):
            raise ValueError(f"path must be 'auto', 'fused' or 'chunked', not {path!r}")
        if not (heads in ("mean", "all") or isinstance(heads, int) or (
            isinstance(heads, Sequence) and not isinstance(heads, str) and all(isinstance(h, int) for h in heads)
        )):
            raise ValueError(f"heads must be 'mean', 'all', a head index or a list of indices, not {heads!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
            raise ValueError(f"rows must be a contiguous slice of batch rows, not {rows!r}")
        self.steps = steps
        self.heads = heads
        self.words = list(words) if words is not None else None
        self.positions = tuple(positions) if positions is not None else None
        self.cfg = cfg
        self.path = path
        self.reduce_steps = reduce_steps
        self.include_padding = include_padding
        self.chunk_size = chunk_size
        self.store_device = torch.device(store_device)
        self.differentiable = differentiable
        self.rows = rows
        self.stop = stop
        self._last_index = max((layer.index for layer in self.layers), default=-1)
        self._raw = {layer.index for layer in self.layers}
        self.concept_stream = self._concept_stream(concepts, all_layers) if concepts is not None else None
        through = self.concept_stream.through if self.concept_stream is not None else ()
        self._installed = tuple(sorted({*self.layers, *through}, key=lambda layer: layer.index))
        self._encoding_concepts = False

        self.generations: list[_Generation] = []
        self._taken: list[dict[str, torch.Tensor]] = []
        self._active = False
        self._saved_processors: dict[str, Any] | None = None  # layer name -> the processor the trace replaced
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._saved_encode_prompt: Callable[..., Any] | None = None
        # per-forward state, set by the pre-hook
        self._ctx: ForwardContext | None = None
        self._step = -1
        self._branch_rows: list[tuple[Branch, slice]] = []
        self._rows = slice(0)
        self._text_index: dict[torch.device, torch.Tensor] = {}

    def _concept_stream(self, concepts: Sequence[str], all_layers: tuple[LayerInfo, ...]) -> ConceptStream:
        if self.pipe is None:
            raise TraceError("concepts= needs the pipeline, whose text encoder encodes them; got a bare transformer")
        if self.differentiable or self.stop:
            raise TraceError("concepts= records maps of a whole forward; it does not combine with differentiable= "
                             "or stop=")
        double = [layer for layer in self.layers if layer.kind == "double"]
        if not double:
            raise SelectionError(
                "concept maps come from dual-stream ('double') layers and the layer selection has none"
            )
        through = [layer for layer in all_layers if layer.kind == "double" and layer.index <= double[-1].index]
        return ConceptStream(self, concepts, double, through)

    # ------------------------------------------------------------------------------------ install
    def __enter__(self) -> Trace:
        if self._active:
            raise TraceError("this trace is already active; enter a trace once at a time")
        # Processors are swapped on the captured attention modules only: diffusers' set_attn_processor walks every
        # module of the model (thousands with LoRA layers), milliseconds per call, paid at every training step.
        if any(isinstance(m.processor, CaptureProcessor) for m in self._attention_modules.values()):
            raise TraceError("this model is already being traced; exit the other trace first")
        self._saved_processors = {}
        try:
            for layer in self._installed:
                module = self._attention_modules[layer.name]
                capture = self.adapter.make_processor(module.processor, CaptureSite(layer, self))
                self._saved_processors[layer.name] = module.processor
                module.set_processor(capture)
            self._hook = self.transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True)
            if self.concept_stream is not None:
                self.concept_stream.install()
            if self.pipe is not None:
                self._wrap_encode_prompt()
        except BaseException:
            self._uninstall()
            raise
        self._active = True
        # Each entry records a new generation (a pipeline call inside also starts one; an empty one is reused).
        if not self.generations or self.generations[-1].forwards:
            self.generations.append(_Generation())
        self._step = -1
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._uninstall()
        self._active = False
        return exc_type is not None and issubclass(exc_type, StopForward)

    def _uninstall(self) -> None:
        if self._saved_processors is not None:
            for name, processor in self._saved_processors.items():
                self._attention_modules[name].set_processor(processor)
            self._saved_processors = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.concept_stream is not None:
            self.concept_stream.uninstall()
        if self.pipe is not None and "encode_prompt" in vars(self.pipe):
            if self._saved_encode_prompt is None:
                del self.pipe.encode_prompt
            else:
                self.pipe.encode_prompt = self._saved_encode_prompt
        self._saved_encode_prompt = None

    def _wrap_encode_prompt(self) -> None:
        pipe = self.pipe
        self._saved_encode_prompt = vars(pipe).get("encode_prompt")
        encode = pipe.encode_prompt
        signature = inspect.signature(encode)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            result = encode(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            self._on_encode_prompt(bound.arguments, result[0])
            return result

        pipe.encode_prompt = encode_prompt

    # ----------------------------------------------------------------------------- hook callbacks
    def _on_encode_prompt(self, arguments: dict[str, Any], prompt_embeds: torch.Tensor) -> None:
        if self._encoding_concepts:  # the trace's own encoding of its concepts, not a generation's prompt
            return
        gen = self.generations[-1]
        if gen.forwards > 0:  # the transformer already ran: this is a new pipeline call
            gen = _Generation()
            self.generations.append(gen)
            self._step = -1
        if gen.prompts is not None:  # a second encode within one call: Flux's negative prompt
            return
        prompt = arguments.get("prompt")
        if prompt is None:
            return
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = prompt_embeds.shape[0]
        per_prompt = max(rows // max(len(prompts), 1), 1)
        gen.prompts = [prompts[r // per_prompt] for r in range(rows)]

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ctx = self.adapter.forward_context(args, kwargs)
        gen = self.generations[-1]
        if gen.forwards == 0:
            self._start_generation(gen, ctx)
        gen.forwards += 1
        repeated = bool(gen.timesteps) and ctx.timestep == gen.timesteps[-1]
        if not repeated:
            self._step += 1
            gen.timesteps.append(ctx.timestep)
        self._ctx = ctx
        self._text_index.clear()
        self._branch_rows = self._plan_rows(ctx, gen, repeated)
        if self.differentiable and self._branch_rows:
            self._taken.append({})
        if self._branch_rows:
            start = min(r.start for _, r in self._branch_rows)
            stop = max(r.stop for _, r in self._branch_rows)
            self._rows = slice(start, stop)
        if self.concept_stream is not None:
            if self._branch_rows:
                self.concept_stream.start(ctx.text_length, self._rows)
            else:
                self.concept_stream.stop()

    def _start_generation(self, gen: _Generation, ctx: ForwardContext) -> None:
        gen.grid = ctx.grid
        if self.pipe is not None and gen.prompts is not None:
            gen.tokens = [self.adapter.prompt_tokens(self.pipe, p, ctx.text_length) for p in gen.prompts]
        if self.positions is not None:
            bad = [p for p in self.positions if not 0 <= p < ctx.text_length]
            if bad:
                raise SelectionError(f"text positions {bad} are outside the text sequence of length {ctx.text_length}")
            gen.keep = tuple(sorted(set(self.positions)))
        elif gen.tokens is None:
            if self.words is not None:
                raise SelectionError(
                    "words= needs the prompt, but the transformer was called without pipe.encode_prompt"
                )
            gen.keep = tuple(range(ctx.text_length))
        else:
            keep: set[int] = set()
            for tokens in gen.tokens:
                if self.words is not None:
                    keep.update(p for w in self.words for p in tokens.positions(w))
                else:
                    keep.update(range(len(tokens)) if self.include_padding else tokens.valid)
            gen.keep = tuple(sorted(keep))

    def _plan_rows(self, ctx: ForwardContext, gen: _Generation, repeated: bool) -> list[tuple[Branch, slice]]:
        if self.steps is not None and not _step_selected(self._step, self.steps):
            return []
        n_prompts = len(gen.prompts) if gen.prompts is not None else None
        cond = self.adapter.conditional_rows(ctx.batch_size, n_prompts)
        uncond = self.adapter.unconditional_rows(ctx.batch_size, n_prompts)
        if uncond is None and repeated and self.pipe is not None:
            # Flux true CFG: a second transformer call at the same timestep is the unconditional one.
            cond, uncond = None, slice(0, ctx.batch_size)
        plan: list[tuple[Branch, slice]] = []
        if uncond is not None and self.cfg in ("uncond", "both"):
            plan.append(("uncond", uncond))
        if cond is not None and self.cfg in ("cond", "both"):
            plan.append(("cond", cond))
        if self.rows is not None:
            start, stop, _ = self.rows.indices(ctx.batch_size)
            plan = [(b, slice(max(r.start, start), min(r.stop, stop))) for b, r in plan]
            plan = [(b, r) for b, r in plan if r.start < r.stop]
        return plan

    # --------------------------------------------------------------------- called by capture sites
    def plan_layer(
        self, layer: LayerInfo, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[slice, torch.Tensor, slice] | None:
        """What a site should compute for this call: image-query span, text-key positions and batch rows."""
        if not self._branch_rows or self._ctx is None or layer.index not in self._raw:
            return None
        if q.device not in self._text_index:
            offset = self.adapter.text_offset(self._ctx)
            self._text_index[q.device] = torch.tensor([offset + p for p in self.generations[-1].keep], device=q.device)
        return self.adapter.image_span(self._ctx, q.shape[-2]), self._text_index[q.device], self._rows

    def image_span(self, k: torch.Tensor) -> slice:
        """The image tokens' span of this call's joint sequence (``k`` is ``(B, H, S, D)``)."""
        return self.adapter.image_span(self._ctx, k.shape[-2])

    @property
    def kept_rows(self) -> slice:
        """The batch rows of this call that the trace keeps (every kept branch)."""
        return self._rows

    def record(self, layer: LayerInfo, probs: torch.Tensor) -> None:
        """Store ``probs`` ``(rows, H, N_img, T_kept)`` from ``layer`` for the current call; with ``stop=True``,
        then end the forward (StopForward) if ``layer`` is the last captured one."""
        # Gradient checkpointing re-runs blocks inside backward(): those recomputations are not new calls, and
        # must run their blocks to the end.
        if torch._C._current_graph_task_id() != -1 and (self.differentiable or self.stop):
            return
        if self.differentiable:
            self._taken[-1][layer.label] = self._select_heads(probs)
        else:
            self._store(layer, self._select_heads(probs))
        if self.stop and layer.index == self._last_index:
            raise StopForward(f"trace(stop=True) ended the forward after {layer.label}")

    def _store(self, layer: LayerInfo, probs: torch.Tensor, concepts: bool = False) -> None:
        """Keep ``probs`` ``(rows, [heads,] N_img, T)`` of this call's kept rows, split by branch."""
        probs = probs.detach().to(self.store_device, torch.float32)
        gen = self.generations[-1]
        records, all_sums = (gen.concept_records, gen.concept_sums) if concepts else (gen.records, gen.sums)
        for branch, rows in self._branch_rows:
            part = probs[rows.start - self._rows.start : rows.stop - self._rows.start]
            if self.reduce_steps:
                sums = all_sums[branch]
                sums[layer.index] = part.clone() if layer.index not in sums else sums[layer.index] + part
                gen.summed_steps[branch].add(self._step)
            else:
                records[branch].setdefault(self._step, {})[layer.index] = part

    def record_concepts(self, layer: LayerInfo, maps: torch.Tensor) -> None:
        """Store the concept maps ``(rows, N_img, concepts)`` of ``layer`` for the current call."""
        self._store(layer, maps, concepts=True)

    def encode_concepts(self, concepts: Sequence[str], text_length: int) -> torch.Tensor:
        """The concepts' text-encoder features ``(C, D)``, each encoded alone (see :mod:`attnscope.concepts`)."""
        self._encoding_concepts = True
        try:
            return self.adapter.encode_concepts(self.pipe, concepts, text_length)
        finally:
            self._encoding_concepts = False

    def _select_heads(self, probs: torch.Tensor) -> torch.Tensor:
        if self.heads == "mean":
            return probs.mean(dim=1)
        if self.heads == "all":
            return probs
        heads = [self.heads] if isinstance(self.heads, int) else list(self.heads)
        bad = [h for h in heads if not 0 <= h < probs.shape[1]]
        if bad:
            raise SelectionError(f"heads {bad} do not exist; this layer has {probs.shape[1]} heads")
        return probs[:, heads]

    # -------------------------------------------------------------------------------- results
    def take(self) -> list[dict[str, torch.Tensor]]:
        """Differentiable mode: per transformer call since the last ``take``, ``{layer label: probs}``.

        ``probs`` is ``(rows, N_img, T_kept)`` (``(rows, H, N_img, T_kept)`` with ``heads="all"``), still attached
        to the autograd graph. Taking clears the buffer so graphs are not kept alive.
        """
        if not self.differentiable:
            raise TraceError("take() is for differentiable traces; use maps() to read a recorded run")
        taken, self._taken = self._taken, []
        return taken

    @property
    def retained_bytes(self) -> int:
        """Bytes held by the recorded maps of all generations."""
        total = 0
        for gen in self.generations:
            for records in (gen.records, gen.concept_records):
                for per_step in records.values():
                    for per_layer in per_step.values():
                        total += sum(t.numel() * t.element_size() for t in per_layer.values())
            for sums in (gen.sums, gen.concept_sums):
                for per_layer in sums.values():
                    total += sum(t.numel() * t.element_size() for t in per_layer.values())
        return total

    def maps(self, index: int = 0, *, branch: Branch = "cond", generation: int = -1) -> TokenMaps:
        """The maps of conditional batch row ``index`` of a generation (default: the last pipeline call).

        ``branch="uncond"`` returns the unconditional (negative-prompt) branch when ``cfg`` recorded it; its
        ``tokens`` are ``None`` (select by position). Steps count denoising steps from 0.
        """
        gen = self._recorded_generation(generation)
        tokens = gen.tokens[index] if gen.tokens is not None and branch == "cond" else None
        return self._token_maps(gen, gen.records, gen.sums, self.layers, index, branch, gen.keep, tokens, self.heads)

    def concept_maps(self, index: int = 0, *, branch: Branch = "cond", generation: int = -1) -> TokenMaps:
        """The output-space concept maps (``trace(..., concepts=[...])``) of batch row ``index`` of a generation.

        A :class:`TokenMaps` over the selected dual-stream layers and the traced steps whose words are the
        concepts (``maps.word("red")``); values are the softmax over concepts at each image patch.
        """
        if self.concept_stream is None:
            raise TraceError("this trace has no concepts; trace(pipe, concepts=['red', 'circle', 'background'])")
        gen = self._recorded_generation(generation)
        stream = self.concept_stream
        positions = tuple(range(len(stream.concepts)))
        return self._token_maps(gen, gen.concept_records, gen.concept_sums, stream.layers, index, branch, positions,
                                concept_tokens(stream.concepts), "mean")

    def _recorded_generation(self, generation: int) -> _Generation:
        if not self.generations or not self.generations[generation].forwards:
            raise TraceError("nothing was captured: run the pipeline inside the `with attnscope.trace(...)` block")
        if self.differentiable:
            raise TraceError("differentiable traces do not keep maps; use take()")
        return self.generations[generation]

    def _token_maps(
        self,
        gen: _Generation,
        records: dict[str, dict[int, dict[int, torch.Tensor]]],
        all_sums: dict[str, dict[int, torch.Tensor]],
        layers: tuple[LayerInfo, ...],
        index: int,
        branch: Branch,
        positions: tuple[int, ...] | None,
        tokens: PromptTokens | None,
        head_mode: Any,
    ) -> TokenMaps:
        if self.reduce_steps:
            sums = all_sums.get(branch, {})
            if not sums:
                raise TraceError(f"no {branch!r} branch was recorded (cfg={self.cfg!r}, steps={self.steps!r})")
            n = len(gen.summed_steps[branch])
            stacked = torch.stack([sums[layer.index] / n for layer in layers])[:, None]  # (layer, step=1, rows, ...)
            steps: tuple[int, ...] = ()
        else:
            recorded = records.get(branch, {})
            if not recorded:
                raise TraceError(f"no {branch!r} branch was recorded (cfg={self.cfg!r}, steps={self.steps!r})")
            steps = tuple(sorted(recorded))
            stacked = torch.stack([torch.stack([recorded[s][layer.index] for s in steps]) for layer in layers])
        rows = stacked.shape[2]
        if not 0 <= index < rows:
            raise IndexError(f"batch index {index} out of range: {rows} image(s) were generated")
        data = stacked[:, :, index]
        if data.dim() == 4:  # heads averaged at capture: add a size-1 head axis
            data = data[:, :, None]
        h, w = gen.grid
        data = rearrange(data, "layer step head (y x) token -> token layer step head y x", y=h, x=w).contiguous()
        present = ["token", "layer"]
        if not self.reduce_steps:
            present.append("step")
        if head_mode != "mean":
            present.append("head")
        heads: tuple[int, ...] = ()
        if head_mode == "all":
            heads = tuple(range(data.shape[3]))
        elif head_mode != "mean":
            heads = (head_mode,) if isinstance(head_mode, int) else tuple(head_mode)
        return TokenMaps(
            data=data,
            present=tuple(present),
            positions=positions,
            layers=layers,
            steps=steps,
            heads=heads,
            tokens=tokens,
            timesteps=tuple(gen.timesteps[s] for s in steps),
        )


def column_mask(keep: Sequence[int], rows: Sequence[Sequence[int]], device: torch.device | None = None) -> torch.Tensor:
    """``(len(rows), len(keep))`` bool: ``[r, j]`` is True when ``keep[j]`` is one of ``rows[r]``'s text positions.

    ``keep`` is the column order of a ``trace(positions=...)`` capture (its positions, sorted and deduplicated), so
    this selects each row's (word's) columns of the ``(B, N_img, T_kept)`` maps that ``take()`` returns.
    """
    index = {p: j for j, p in enumerate(keep)}
    mask = torch.zeros(len(rows), len(keep), dtype=torch.bool, device=device)
    for r, positions in enumerate(rows):
        for p in positions:
            mask[r, index[p]] = True
    return mask


def _step_selected(step: int, selector: int | slice | Sequence[int]) -> bool:
    if isinstance(selector, int):
        return step == selector
    if isinstance(selector, slice):
        return step in range(
            selector.start or 0, selector.stop if selector.stop is not None else step + 1, selector.step or 1
        )
    return step in selector


def trace(pipe_or_transformer: Any, **options: Any) -> Trace:
    """Capture token-localized joint attention of a Flux or SD3 pipeline (or bare transformer).

    Options (all keyword):
        layers: which joint-attention layers to capture — index in forward order, label (``"double.3"``),
            module name, kind (``"double"``/``"single"``), slice or list. Default: all.
        steps: which denoising steps (index from 0): int, slice or list. Default: all.
        heads: ``"mean"`` (default, average over heads), ``"all"``, or head index/indices.
        words: keep only these words' token columns (less memory). Default: all non-padding tokens.
        positions: keep exactly these text-sequence positions (overrides ``words``; no prompt needed).
        cfg: ``"cond"`` (default), ``"uncond"`` or ``"both"`` — which guidance branch to keep.
        path: ``"auto"`` (fused log-sum-exp kernel where it reproduces the model exactly, else chunked),
            ``"fused"`` (error if unavailable) or ``"chunked"``.
        reduce_steps: average over steps on the fly instead of keeping each step.
        include_padding: also keep padding token columns.
        chunk_size: image queries per chunk on the chunked path.
        store_device: where recorded maps live (default CPU, so GPU memory is not held).
        differentiable: keep the autograd graph; results come from :meth:`Trace.take` (used by erasure).
        rows: capture only these batch rows of each transformer call (a contiguous slice; default all rows of
            the kept branch), for a batch where only some rows need maps; the others pay nothing.
        stop: end each transformer call right after the last captured layer (raising :class:`StopForward`, which
            the ``with`` block swallows): for calls whose output is not needed, only their maps — the layers
            after the last captured one never run. A pipeline call is abandoned at its first captured step.
        concepts: output-space concept maps (ConceptAttention) of these words or phrases, read with
            :meth:`Trace.concept_maps`; recorded at the selected dual-stream layers. Needs a pipeline (its text
            encoder encodes each concept alone); the image stays bit-identical.
    """
    return Trace(pipe_or_transformer, **options)


__all__ = ["StopForward", "Trace", "TraceError", "column_mask", "trace"]
