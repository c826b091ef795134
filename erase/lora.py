"""The erasure LoRA: where it goes, the frozen teacher it gives for free, and its diffusers file format.

The adapter is a peft LoRA added through diffusers' ``PeftAdapterMixin`` (``transformer.add_adapter``), by
default on ``add_q_proj`` / ``add_k_proj`` of the dual-stream blocks (the paper's choice; a model profile may add
more, see ``ModelProfile.erase_defaults``, up to the text embedder every text token enters through): these project
the *text* tokens, so the edit changes what image tokens find at the concept's text and nothing about how the image
stream itself is computed. The base model is the same module with the adapter disabled (:func:`base_model`): no
second copy of the weights, and unlike the official code's self-teacher it does not drift while training.

Files: :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with ``FluxPipeline.save_lora_weights``,
so ``pipe.load_lora_weights(folder)`` loads it. :func:`load_lora` is that call plus checks that turn a corrupt
or mismatched file into a :class:`LoraFileError` naming the problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from attnscope.adapters import adapter_for
from attnscope.profiles import PAPER_LORA_TARGETS

__all__ = [
    "ARCHITECTURE_KEY",
    "ADAPTER_NAME",
    "LORA_FILE",
    "LoraFileError",
    "LoraLayers",
    "LoraSettings",
    "add_lora",
    "base_model",
    "check_lora_file",
    "load_lora",
    "lora_parameters",
    "lora_state",
    "save_lora",
    "write_lora",
]

ADAPTER_NAME = "erase"
LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraFileError(ValueError):
    """A LoRA folder/file that cannot be applied to this model (missing, corrupt, or for other modules/shapes)."""


#: Which joint-attention layers a LoRA may sit in: the dual-stream blocks only, or every attention layer.
LoraLayers = Literal["double", "all"]


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale and placement of the erasure LoRA.

    ``targets``: name suffixes of linear modules inside the model's joint-attention modules (peft
    ``target_modules``), and the model's text embedder by its name (``context_embedder``: the one projection every
    text token passes before the first block, so an edit there reaches every token a concept spreads into);
    ``layers``: in the dual-stream (``double``) attention layers only, or in ``all``; ``blocks``: restrict the
    dual-stream layers to these block indices (``None``: all). ``alpha`` defaults to ``rank`` (scale 1, as in the
    official code: r8/α8).
    """

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = PAPER_LORA_TARGETS
    blocks: tuple[int, ...] | None = None
    layers: LoraLayers = "double"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module name")
        if self.layers not in ("double", "all"):
            raise ValueError(f"LoRA layers must be 'double' or 'all', not {self.layers!r}")

    def target_modules(self, transformer: torch.nn.Module) -> list[str]:
        """Full module names in ``transformer`` that get the adapter; ValueError if none match."""
        adapter = adapter_for(transformer)
        layers = [info for info in adapter.layers(transformer) if info.kind == "double" or self.layers == "all"]
        n_blocks = sum(info.kind == "double" for info in layers)
        bad = [b for b in self.blocks or () if not 0 <= b < n_blocks]
        if bad:
            raise ValueError(f"LoRA blocks {bad} do not exist: the model has {n_blocks} double-stream blocks")
        names = []
        for info in layers:
            if info.kind == "double" and self.blocks is not None and info.block not in self.blocks:
                continue
            for sub, module in transformer.get_submodule(info.name).named_modules():
                if (
                    sub
                    and isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
                    and any(sub == t or sub.endswith("." + t) for t in self.targets)
                ):
                    names.append(f"{info.name}.{sub}")
        if adapter.text_embedder in self.targets:
            names.append(adapter.text_embedder)
        if not names:
            where = "double-stream attention" if self.layers == "double" else "attention"
            raise ValueError(f"no linear module of the {where} layers matches the LoRA targets {list(self.targets)}")
        return names


def add_lora(transformer: torch.nn.Module, settings: LoraSettings) -> list[torch.nn.Parameter]:
    """Freeze ``transformer``, add the erasure adapter, return its trainable (float32) parameters.

    The LoRA ``B`` matrices start at zero (peft default), so the adapted model starts equal to the base.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        target_modules=settings.target_modules(transformer),
        init_lora_weights=True,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = lora_parameters(transformer)
    # Train the adapter in float32 even when the base runs in bf16: Adam updates of 1e-3 vanish in bf16.
    for p in params:
        p.data = p.data.float()
    return params


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's parameters, in a fixed (module) order."""
    return [p for n, p in transformer.named_parameters() if f".{ADAPTER_NAME}." in n or n.endswith(f".{ADAPTER_NAME}")]


def lora_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming without the adapter name (what diffusers' LoRA files hold)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME).items()}


@contextmanager
def base_model(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``transformer`` as the frozen base model (adapter disabled) inside the block; re-enabled on exit."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def save_lora(transformer: torch.nn.Module, folder: str | Path, settings: LoraSettings) -> Path:
    """Write the adapter of ``transformer`` to ``folder/pytorch_lora_weights.safetensors`` in diffusers' format;
    returns the file path."""
    return write_lora(folder, lora_state(transformer), settings, settings.target_modules(transformer),
                      adapter_for(transformer).name)


#: Safetensors metadata key naming the architecture a LoRA was made for (``flux``, ``sd3``): module names alone
#: cannot tell (both have ``transformer_blocks.0.attn.add_q_proj``, of equal size in the bundled shapes models).
ARCHITECTURE_KEY = "attnscope_architecture"


def write_lora(
    folder: str | Path, state: dict[str, torch.Tensor], settings: LoraSettings, target_modules: list[str],
    architecture: str,
) -> Path:
    """Write LoRA matrices (peft naming: ``<module>.lora_A.weight`` / ``lora_B``) to
    ``folder/pytorch_lora_weights.safetensors`` in the transformer-LoRA format that ``FluxPipeline`` and
    ``StableDiffusion3Pipeline`` share (``transformer.<module>.lora_A.weight``), so that
    ``pipe.load_lora_weights(folder)`` loads them, with the ``architecture`` (an adapter name) they were made for in
    the file's metadata; returns the file path."""
    from diffusers import FluxPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "r": settings.rank,
        "lora_alpha": settings.alpha if settings.alpha is not None else settings.rank,
        "target_modules": target_modules,
    }
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    path = folder / LORA_FILE
    with safe_open(str(path), "pt") as written:
        file_metadata = dict(written.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata=file_metadata | {ARCHITECTURE_KEY: architecture})
    return path


def check_lora_file(pipe: Any, folder: str | Path) -> Path:
    """Validate a LoRA folder/file against ``pipe.transformer``; returns the file path.

    Checked: the file exists and is readable safetensors; it was made for this architecture (where its metadata
    says); every key is a LoRA key of a linear module that exists
    in the transformer; every matrix shape fits that module; no NaN/inf. (diffusers itself would warn and skip
    unknown keys -- a silently unmodified model -- or fail deep inside peft.)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / LORA_FILE if folder.is_dir() else folder
    if not path.is_file():
        raise LoraFileError(f"no LoRA at {folder}: expected {LORA_FILE} in that folder (written by `attnscope erase`)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LoraFileError(f"{path} is not a readable safetensors file ({err})") from None
    if not state:
        raise LoraFileError(f"{path} holds no tensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as opened:
        made_for = (opened.metadata() or {}).get(ARCHITECTURE_KEY)
    architecture = adapter_for(pipe).name
    if made_for is not None and made_for != architecture:
        raise LoraFileError(f"{path} is a LoRA for {made_for} models, not for this {architecture} pipeline")
    modules = dict(pipe.transformer.named_modules())
    for key, tensor in state.items():
        found = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not found:
            raise LoraFileError(
                f"{path}: {key!r} is not a transformer LoRA weight (expected transformer.<module>.lora_A/B.weight)"
            )
        module = modules.get(found[1])
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            raise LoraFileError(
                f"{path} does not fit this model: it has no linear module {found[1]!r} (LoRA for another model?)"
            )
        dim = base.in_features if found[2] == "A" else base.out_features
        axis = 1 if found[2] == "A" else 0
        if tensor.ndim != 2 or tensor.shape[axis] != dim:
            raise LoraFileError(
                f"{path} does not fit this model: {key} has shape {tuple(tensor.shape)}, but {found[1]} is "
                f"{base.in_features}->{base.out_features} (LoRA for another model size?)"
            )
        if not torch.isfinite(tensor).all():
            raise LoraFileError(f"{path}: {key} contains NaN or inf values")
    return path


def load_lora(pipe: Any, folder: str | Path, adapter_name: str = ADAPTER_NAME) -> None:
    """``pipe.load_lora_weights(folder)`` after :func:`check_lora_file` (LoraFileError with a clear message)."""
    from diffusers.utils import logging as diffusers_logging

    path = check_lora_file(pipe, folder)
    # diffusers notes, at warning level, that the file has no text-encoder keys: true of every erasure LoRA.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    finally:
        diffusers_logging.set_verbosity(level)
