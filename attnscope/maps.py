"""``TokenMaps``: token-localized attention maps with named axes, and the operations users chain on them.

A ``TokenMaps`` holds one float32 tensor of shape ``(token, layer, step, head, y, x)``. Axes that have been
reduced (by ``word()``, ``mean()``, or at capture time) stay in the tensor with size 1 but are no longer
*present*: ``numpy()`` drops them, so ``maps.word("red").select(layers="double").mean().numpy()`` is an
``(h, w)`` grid, and a map with layer/step/head axes left returns them first, in that order.

Values are attention probabilities: the mass an image patch (query) puts on a prompt token (key), normalized
over all keys of the joint sequence. A multi-piece word is the **mean** of its pieces' maps by default
(``merge="sum"`` gives the total mass on the word instead).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce

from .adapters.base import LayerInfo
from .tokens import PromptTokens, UnknownWordError, Word

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from PIL import Image

AXES: tuple[str, ...] = ("token", "layer", "step", "head")
LayerSelector = int | str | slice | Sequence[int | str] | None
IndexSelector = int | slice | Sequence[int] | None
#: Where a normalized map is cut into a mask: a fixed τ in [0, 1], each map's own mean, or its Otsu threshold.
ThresholdRule = float | Literal["mean", "otsu"]


class SelectionError(ValueError):
    """A selection names something the maps do not contain (a layer, step, head or word)."""


@dataclass(frozen=True)
class TokenMaps:
    """Attention maps of prompt tokens over the image-token grid.

    Attributes:
        data: ``(token, layer, step, head, y, x)`` float32 tensor on the CPU.
        present: the non-spatial axes still present, a subset of ``AXES`` in that order.
        positions: text-sequence position of each token entry (``token`` axis).
        layers: the captured layer of each ``layer`` entry.
        steps: denoising-step index of each ``step`` entry.
        heads: head index of each ``head`` entry (empty when heads were averaged at capture).
        tokens: the prompt's tokenization, used to find words; ``None`` when the prompt was not seen.
        timesteps: scheduler timestep of each step entry.
        label: what this map shows (a word, after ``word()``), used in titles.
    """

    data: torch.Tensor
    present: tuple[str, ...]
    positions: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    steps: tuple[int, ...]
    heads: tuple[int, ...]
    tokens: PromptTokens | None
    timesteps: tuple[float, ...] = ()
    label: str | None = None

    # ----------------------------------------------------------------------------------------------- shape
    @property
    def grid(self) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the maps (image-token grid, or pixels after ``upsample``)."""
        return int(self.data.shape[-2]), int(self.data.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :meth:`numpy`'s result."""
        dims = [self.data.shape[AXES.index(a)] for a in self.present]
        return (*dims, *self.grid)

    def words(self) -> list[str]:
        """Words of the prompt whose tokens are all in these maps."""
        if self.tokens is None:
            return []
        kept = set(self.positions)
        return [w.text for w in self.tokens.words if w.positions and set(w.positions) <= kept]

    def __repr__(self) -> str:
        axes = ", ".join(f"{a}={self.data.shape[AXES.index(a)]}" for a in self.present)
        label = f" {self.label!r}" if self.label else ""
        return f"TokenMaps{label}({axes}{', ' if axes else ''}grid={self.grid})"

    # ------------------------------------------------------------------------------------------ selection
    def _require(self, axis: str) -> None:
        if axis not in self.present:
            raise SelectionError(f"these maps have no {axis} axis left (present: {', '.join(self.present) or 'none'})")

    def _take(self, axis: str, idx: list[int], **fields: Any) -> TokenMaps:
        index = torch.tensor(idx, dtype=torch.long)
        return replace(self, data=self.data.index_select(AXES.index(axis), index), **fields)

    def _merge_tokens(self, want: Iterable[int], label: str, merge: Literal["mean", "sum"]) -> TokenMaps:
        self._require("token")
        columns = [i for i, p in enumerate(self.positions) if p in set(want)]
        sub = self.data.index_select(0, torch.tensor(columns, dtype=torch.long))
        merged = sub.mean(0, keepdim=True) if merge == "mean" else sub.sum(0, keepdim=True)
        present = tuple(a for a in self.present if a != "token")
        return replace(self, data=merged, present=present, positions=tuple(want), label=label)

    def word(self, query: str | Word, merge: Literal["mean", "sum"] = "mean") -> TokenMaps:
        """The map of a word or phrase of the prompt (``"red"``, ``"red circle"``); its pieces merged.

        Raises :class:`~attnscope.tokens.UnknownWordError` naming the prompt's words when the word is not in
        the prompt, and :class:`SelectionError` when its tokens were not kept at capture time.
        """
        if self.tokens is None:
            raise SelectionError("the prompt was not seen during capture: select tokens by position with token()")
        if isinstance(query, Word):
            positions, label = query.positions, query.text
        else:
            positions, label = self.tokens.positions(query), query
        missing = sorted(set(positions) - set(self.positions))
        if missing:
            raise SelectionError(
                f"{label!r} is in the prompt but its token positions {missing} were not captured "
                f"(captured words: {', '.join(self.words()) or 'none'})"
            )
        return self._merge_tokens(positions, label, merge)

    def token(self, position: int) -> TokenMaps:
        """The map of one text-sequence position (e.g. the end-of-text token)."""
        if position not in self.positions:
            raise SelectionError(f"token position {position} was not captured; captured: {list(self.positions)}")
        piece = self.tokens.pieces[position] if self.tokens is not None else str(position)
        return self._merge_tokens([position], piece, "mean")

    def select(
        self,
        layers: LayerSelector = None,
        steps: IndexSelector = None,
        heads: IndexSelector = None,
    ) -> TokenMaps:
        """Keep some layers / steps / heads.

        ``layers``: an index in forward order over captured layers, a label (``"double.3"``), a module name
        (``"transformer_blocks.3.attn"``), a kind (``"double"``, ``"single"``), a slice over forward order, or a
        list of these. ``steps``: a denoising-step index, a slice of step indices (``slice(5, 15)``) or a list.
        ``heads``: a head index, slice or list (only when heads were kept at capture).
        """
        out = self
        if layers is not None:
            out._require("layer")
            idx = _layer_indices(out.layers, layers)
            out = out._take("layer", idx, layers=tuple(out.layers[i] for i in idx))
        if steps is not None:
            out._require("step")
            idx = _value_indices(out.steps, steps, "step")
            out = out._take(
                "step",
                idx,
                steps=tuple(out.steps[i] for i in idx),
                timesteps=tuple(out.timesteps[i] for i in idx) if out.timesteps else (),
            )
        if heads is not None:
            out._require("head")
            idx = _value_indices(out.heads, heads, "head")
            out = out._take("head", idx, heads=tuple(out.heads[i] for i in idx))
        return out

    # -------------------------------------------------------------------------------------- aggregation
    def _reduce(self, axes: tuple[str, ...], how: Literal["mean", "sum"]) -> TokenMaps:
        axes = axes or tuple(a for a in ("layer", "step", "head") if a in self.present)
        for a in axes:
            if a not in AXES:
                raise SelectionError(f"unknown axis {a!r}; axes are {AXES}")
            self._require(a)
        pattern_in = "token layer step head y x"
        # einops with named axes keeps the reduction readable: reduced axes stay as size-1 dims.
        pattern_out = " ".join("1" if a in axes else a for a in pattern_in.split())
        data = reduce(self.data, f"{pattern_in} -> {pattern_out}", how)
        return replace(self, data=data, present=tuple(a for a in self.present if a not in axes))

    def mean(self, *axes: str) -> TokenMaps:
        """Average over the given axes (default: every layer/step/head axis still present)."""
        return self._reduce(axes, "mean")

    def sum(self, *axes: str) -> TokenMaps:
        """Sum over the given axes (default: every layer/step/head axis still present)."""
        return self._reduce(axes, "sum")

    # ------------------------------------------------------------------------------------ spatial ops
    def normalize(self) -> TokenMaps:
        """Min-max normalize each spatial map to ``[0, 1]`` (a constant map becomes all zeros)."""
        lo = self.data.amin(dim=(-2, -1), keepdim=True)
        hi = self.data.amax(dim=(-2, -1), keepdim=True)
        return replace(self, data=(self.data - lo) / (hi - lo).clamp_min(1e-12))

    def upsample(
        self, size: tuple[int, int], mode: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    ) -> TokenMaps:
        """Resize every map to ``size`` given as ``(width, height)`` — PIL's ``image.size`` order."""
        width, height = size
        lead = self.data.shape[:-2]
        flat = self.data.reshape(-1, 1, *self.grid)
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        resized = F.interpolate(flat, size=(height, width), mode=mode, **kwargs)
        return replace(self, data=resized.reshape(*lead, height, width))

    def threshold(self, rule: ThresholdRule | None = None) -> np.ndarray:
        """Boolean masks of the min-max-normalized maps: above ``rule`` — a fixed τ in [0, 1], ``"mean"`` (each
        map's own mean; the default) or ``"otsu"`` (each map's Otsu threshold: the cut that best separates its
        values into two classes)."""
        norm = self.normalize().numpy()
        if rule is None or rule == "mean":
            cut = norm.mean(axis=(-2, -1), keepdims=True)
        elif rule == "otsu":
            cut = otsu_threshold(norm)
        elif isinstance(rule, (int, float)) and 0.0 <= rule <= 1.0:
            cut = float(rule)
        else:
            raise ValueError(f"threshold rule must be 'mean', 'otsu' or a number in [0, 1], not {rule!r}")
        return norm > cut

    def iou(self, mask: np.ndarray | torch.Tensor, rule: ThresholdRule | None = None) -> np.ndarray | float:
        """Intersection over union of :meth:`threshold` with a boolean ground-truth ``mask`` of the same size."""
        target = np.asarray(mask, dtype=bool)
        if target.shape != self.grid:
            raise ValueError(f"mask has shape {target.shape} but the maps are {self.grid}; upsample() them first")
        pred = self.threshold(rule)
        inter = np.logical_and(pred, target).sum(axis=(-2, -1))
        union = np.logical_or(pred, target).sum(axis=(-2, -1))
        value = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        return float(value) if value.ndim == 0 else value

    # --------------------------------------------------------------------------------------- export
    def numpy(self) -> np.ndarray:
        """float32 array: the present axes among (token, layer, step, head), in that order, then ``(h, w)``."""
        keep = [AXES.index(a) for a in self.present]
        dims = [i for i in range(4) if i not in keep]
        data = self.data
        for d in reversed(dims):
            data = data.squeeze(d)
        return data.numpy().astype(np.float32, copy=False)

    def plot_overlay(self, image: Image.Image, ax: Axes | None = None, **kwargs: Any) -> Any:
        """Overlay this (fully reduced) map on ``image``; see :func:`attnscope.viz.overlay`."""
        from . import viz

        if ax is None:
            return viz.overlay(self.numpy(), image, **kwargs)
        return viz.show_overlay(self.numpy(), image, ax=ax, title=self.label, **kwargs)

    def save(self, path: str | Path) -> Path:
        """Write a single ``.safetensors`` file: the tensor plus JSON metadata (axes, layers, tokens)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "present": list(self.present),
            "positions": list(self.positions),
            "layers": [vars(layer) for layer in self.layers],
            "steps": list(self.steps),
            "heads": list(self.heads),
            "timesteps": list(self.timesteps),
            "label": self.label,
            "tokens": _tokens_to_dict(self.tokens) if self.tokens is not None else None,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"data": self.data.contiguous()}, str(path), metadata={"attnscope": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenMaps:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("attnscope")
            if meta_raw is None:
                raise ValueError(f"{path} is not an attnscope maps file (no 'attnscope' metadata)")
            data = f.get_tensor("data")
        meta = json.loads(meta_raw)
        return cls(
            data=data,
            present=tuple(meta["present"]),
            positions=tuple(meta["positions"]),
            layers=tuple(LayerInfo(**layer) for layer in meta["layers"]),
            steps=tuple(meta["steps"]),
            heads=tuple(meta["heads"]),
            timesteps=tuple(meta["timesteps"]),
            label=meta["label"],
            tokens=_tokens_from_dict(meta["tokens"]) if meta["tokens"] is not None else None,
        )


#: Histogram bins of :func:`otsu_threshold`: finer than any map's distinct values matter at 16×16 tokens.
OTSU_BINS = 256


def otsu_threshold(maps: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each map ``(..., H, W)`` with values in [0, 1]: the cut maximizing the between-class
    variance of the values below and above it. Returns ``(..., 1, 1)``."""
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    edges = np.linspace(0.0, 1.0, OTSU_BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    cuts = np.empty(len(flat))
    for i, values in enumerate(flat):
        weights = np.histogram(values, bins=edges)[0] / values.size
        below = np.cumsum(weights)
        mass_below = np.cumsum(weights * centers)
        between = (mass_below[-1] * below - mass_below) ** 2 / np.maximum(below * (1 - below), 1e-12)
        cuts[i] = edges[1:][int(np.argmax(between))]
    return cuts.reshape(*maps.shape[:-2], 1, 1)


def _tokens_to_dict(tokens: PromptTokens) -> dict[str, Any]:
    return {
        "prompt": tokens.prompt,
        "pieces": list(tokens.pieces),
        "valid": list(tokens.valid),
        "words": [{"text": w.text, "index": w.index, "positions": list(w.positions)} for w in tokens.words],
        "offset": tokens.offset,
    }


def _tokens_from_dict(d: dict[str, Any]) -> PromptTokens:
    words = tuple(Word(text=w["text"], index=w["index"], positions=tuple(w["positions"])) for w in d["words"])
    return PromptTokens(
        prompt=d["prompt"], pieces=tuple(d["pieces"]), valid=tuple(d["valid"]), words=words, offset=d["offset"]
    )


def _layer_indices(layers: tuple[LayerInfo, ...], selector: LayerSelector) -> list[int]:
    if isinstance(selector, slice):
        chosen = list(range(len(layers)))[selector]
    elif isinstance(selector, (int, str)):
        chosen = _match_layer(layers, selector)
    else:
        chosen = [i for s in selector for i in _match_layer(layers, s)]
    if not chosen:
        raise SelectionError(f"layer selection {selector!r} matches no captured layer")
    return chosen


def _match_layer(layers: tuple[LayerInfo, ...], one: int | str) -> list[int]:
    if isinstance(one, int):
        hits = [i for i, layer in enumerate(layers) if layer.index == one]
    elif one in ("double", "single"):
        hits = [i for i, layer in enumerate(layers) if layer.kind == one]
    else:
        hits = [
            i
            for i, layer in enumerate(layers)
            if one in (layer.label, layer.name, layer.name.removesuffix(".attn"))
        ]
    if not hits and one not in ("double", "single"):
        available = ", ".join(layer.label for layer in layers)
        raise SelectionError(f"no layer {one!r} here; available layers: {available}")
    return hits


def _value_indices(values: tuple[int, ...], selector: int | slice | Sequence[int], axis: str) -> list[int]:
    if isinstance(selector, slice):
        start = selector.start if selector.start is not None else -(10**9)
        stop = selector.stop if selector.stop is not None else 10**9
        wanted = [v for v in values if start <= v < stop][:: selector.step or 1]
    elif isinstance(selector, int):
        wanted = [selector]
    else:
        wanted = list(selector)
    missing = [v for v in wanted if v not in values]
    if missing or not wanted:
        raise SelectionError(f"no captured {axis} {missing or selector!r}; captured {axis}s: {list(values)}")
    return [values.index(v) for v in wanted]


__all__ = ["AXES", "SelectionError", "ThresholdRule", "TokenMaps", "UnknownWordError", "otsu_threshold"]
