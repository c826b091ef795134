"""What attnscope needs to know about one MMDiT architecture, and nothing about what to record.

An :class:`Adapter` is the *locator* (where the joint attention lives, how its sequence is laid out, which
capture processor reroutes its kernel call) and the *call plumbing* (a :class:`ModelCall`: packed noise, image
ids, one velocity call) that training code uses instead of ``pipe(...)``; the capture site and the trace are the
*recorder*. Keeping them apart means a new architecture is one module of this package and touches nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ..tokens import PromptTokens

LayerKind = Literal["double", "single"]


@dataclass(frozen=True)
class LayerInfo:
    """One joint-attention module that can be captured.

    ``index`` is the position in forward order over all captured layers (double-stream blocks first);
    ``name`` is the attention module's path inside the transformer (diffusers' own naming, stable across
    versions: ``transformer_blocks.3.attn``); ``label`` is the short name used in plots and selections
    (``double.3``, ``single.10``).
    """

    index: int
    name: str
    kind: LayerKind
    block: int

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.block}"


@dataclass(frozen=True)
class ForwardContext:
    """Facts about one transformer forward call, read from its arguments before the blocks run.

    ``grid`` is the image-token grid ``(h, w)``; ``text_length`` the number of text tokens in the joint
    sequence; ``batch_size`` the batch of this call; ``timestep`` the scalar timestep (identifies the step).
    """

    grid: tuple[int, int]
    text_length: int
    batch_size: int
    timestep: float


def clean_latents(pipe: Any, images: Sequence[Any]) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` of uint8 RGB images ``(H, W, 3)``, on the transformer's device and dtype, as a
    sampler's final state would be before the pipeline decodes it: the VAE's mode, shifted and scaled."""
    vae = pipe.vae
    pixels = torch.stack([torch.as_tensor(im).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    return z.to(pipe.transformer.device, pipe.transformer.dtype)


class ModelCall(Protocol):
    """A direct transformer call at a chosen state, for one image size (what training and erasure need).

    Shapes: ``N`` image tokens, ``C`` transformer input channels, ``L`` text positions, ``D`` text width;
    states are ``(B, N, C)``, ``sigma`` is ``(B,)`` in [0, 1].
    """

    pipe: Any
    n_tokens: int
    channels: int
    #: The negative prompt's ``(embeds (1, L, D), pooled (1, P))`` for true classifier-free guidance, or ``None``.
    negative: tuple[torch.Tensor, torch.Tensor] | None

    def sigmas(self, steps: int) -> torch.Tensor:
        """Set the pipeline's scheduler for ``steps`` steps as its pipeline's ``__call__`` does; its sigmas
        ``(steps + 1,)``, from ~1 down to 0."""

    def encode(
        self, prompts: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeds (B, L, D), pooled (B, P), text_ids)`` as the pipeline's ``encode_prompt`` gives them
        (``text_ids``: Flux's text position ids; ``None`` for an architecture without them)."""

    #: Text position of the first row that :meth:`token_embedding`'s encoder feeds (its rows run to the end).
    embedding_offset: int

    @property
    def embedding_tokenizer(self) -> Any:
        """The tokenizer of :meth:`token_ids`."""

    def token_ids(self, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        """Token ids ``(B, L_e)`` of the text encoder whose word embeddings white-box attacks edit, padded and
        truncated to ``max_sequence_length`` of its positions (text positions ``embedding_offset`` on)."""

    def token_embedding(self) -> torch.nn.Embedding:
        """That encoder's input-embedding table ``(V, E)``."""

    def encode_token_embeddings(
        self, inputs: torch.Tensor, pooled_prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode`` from input embeddings ``(B, L, E)``, differentiable in them (pooled from ``pooled_prompts``)."""

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Clean latents ``(B, N, C)`` of uint8 RGB images at this call's size."""

    def noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Starting noise ``(B, N, C)`` drawn as the pipeline draws it."""

    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
        pooled: torch.Tensor, text_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The transformer's velocity ``(B, N, C)`` at ``x``."""

    def sampling_velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
        pooled: torch.Tensor, text_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(velocity the sampler follows, conditional velocity, negative-prompt velocity or None)``."""

    @property
    def wants_negative(self) -> bool:
        """Whether sampling guides against a negative prompt (set :attr:`negative` before sampling)."""

    @property
    def guided(self) -> bool:
        """Whether sampling uses true classifier-free guidance (two calls per step)."""

    @property
    def guidance_gain(self) -> float:
        """How many times a change of the conditional velocity reaches the velocity the sampler follows: the true
        CFG scale ``w`` of ``v_neg + w·(v − v_neg)``, 1 without true CFG."""


class Adapter(ABC):
    """Per-architecture facts: joint-attention modules, token order, grid, text layout, CFG batch layout."""

    #: Human-readable architecture name used in messages.
    name: str
    #: True when the joint sequence is ``[text; image]`` (Flux), False for ``[image; text]`` (SD3).
    text_first: bool
    #: Whether :meth:`model_call` is implemented (training and erasure need it).
    has_model_call: bool = False
    #: Name suffixes of every linear projection inside a joint-attention module (:meth:`layers`): what a LoRA on
    #: "all attention" trains. A module that lacks some (Flux's single-stream attention has no output projection of
    #: its own) simply matches fewer.
    attention_projections: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    #: The transformer's linear module that brings the text encoders' states to its width: every text token passes
    #: it once, before any block (Flux and SD3 both call it ``context_embedder``).
    text_embedder: str = "context_embedder"

    @classmethod
    def for_transformer(cls, transformer: torch.nn.Module) -> Adapter:
        """The adapter of one transformer instance (override to read its config)."""
        return cls()

    @abstractmethod
    def layers(self, transformer: torch.nn.Module) -> list[LayerInfo]:
        """Every capturable joint-attention module, in forward order."""

    @abstractmethod
    def forward_context(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardContext:
        """Read grid, text length, batch and timestep from a transformer forward call's arguments."""

    @abstractmethod
    def prompt_tokens(self, pipe: Any, prompt: str, text_length: int) -> PromptTokens:
        """Tokenize ``prompt`` the way ``pipe`` feeds it to the transformer's text stream."""

    @abstractmethod
    def encode_text(self, pipe: Any, prompts: Sequence[str], text_length: int) -> torch.Tensor:
        """The text features ``(B, L, D)`` the pipeline feeds the transformer's text stream for ``prompts``, with a
        text sequence of ``text_length`` positions."""

    def unknown_pieces(self, pipe: Any) -> set[str]:
        """The tokenizers' unknown pieces (a word made only of them carries no meaning)."""
        return {t.unk_token for t in (getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3"))
                if t is not None and t.unk_token is not None}

    def encode_concepts(self, pipe: Any, concepts: Sequence[str], text_length: int) -> torch.Tensor:
        """Each concept encoded alone, its pieces' features averaged: ``(C, D)`` (see :mod:`attnscope.concepts`)."""
        from ..concepts import pooled_concept_states

        with torch.no_grad():
            states = self.encode_text(pipe, concepts, text_length)
        layouts = [self.prompt_tokens(pipe, c, text_length) for c in concepts]
        return pooled_concept_states(states, layouts, self.unknown_pieces(pipe))

    @abstractmethod
    def text_length(self, pipe: Any, max_sequence_length: int | None) -> int:
        """Length of the transformer's text stream for a call of ``pipe`` with this ``max_sequence_length``."""

    @abstractmethod
    def size_multiple(self, pipe: Any) -> int:
        """Image height and width must be multiples of this many pixels."""

    @abstractmethod
    def make_processor(self, original: Any, site: Any) -> Any:
        """A capture processor that behaves exactly like ``original`` and reports to ``site``."""

    def model_call(
        self,
        pipe: Any,
        height: int,
        width: int,
        *,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ModelCall:
        """The direct-call plumbing for images of ``height`` × ``width`` pixels (training, erasure)."""
        raise NotImplementedError(
            f"direct transformer calls (training, erasure) are not implemented for {self.name} models yet"
        )

    def image_span(self, ctx: ForwardContext, seq_len: int) -> slice:
        """Positions of the image tokens in a joint sequence of ``seq_len`` tokens (always contiguous)."""
        n_image = seq_len - ctx.text_length
        start = ctx.text_length if self.text_first else 0
        return slice(start, start + n_image)

    def text_offset(self, ctx: ForwardContext) -> int:
        """Joint-sequence position of text token 0."""
        if self.text_first:
            return 0
        return ctx.grid[0] * ctx.grid[1]

    def conditional_rows(self, batch_size: int, n_prompts: int | None) -> slice:
        """Rows of the transformer batch that carry the conditional (prompted) branch.

        The default is "all rows": architectures that batch CFG override this.
        """
        return slice(0, batch_size)

    def unconditional_rows(self, batch_size: int, n_prompts: int | None) -> slice | None:
        return None
