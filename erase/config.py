"""What determines an erasure run: :class:`EraseConfig` and its :class:`LossWeights`, and the model's defaults
for the fields left at ``None`` (from its :class:`~attnscope.profiles.ModelProfile`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from attnscope.adapters import adapter_for
from attnscope.profiles import profile_for

from .cache import CacheConfig
from .lora import LoraSettings

__all__ = ["STEPS_PER_CONCEPT", "EraseConfig", "LossWeights", "fill_model_defaults", "model_defaults"]

#: Default optimizer steps per erased concept (erase and preserve steps count one each): the fewest that left no
#: trace of the concept in the shapes evaluation at 16 seeds (benchmarks/RESULTS.md).
STEPS_PER_CONCEPT = 300


@dataclass(frozen=True)
class LossWeights:
    """Loss weights (official defaults). A zero weight skips that loss entirely (used for ablations).

    ``keep`` is ours: the adapted model's velocity must stay the base model's at states of the base model's own
    preservation-prompt trajectories (and, for models sampled with true classifier-free guidance, for the negative
    prompt at the concept's points, the reference guidance subtracts). A regression on known targets, so much less
    noisy than the flow-matching loss, whose target ``ε − x0`` varies with the noise draw.

    ``implicit`` is ours too: unconditional ESD. At the concept's points, the model prompted with words that name
    nothing (``CacheConfig.implicit_prompts``: the empty prompt, glue words) is pushed from the base model's
    velocity there by ``-η·(v(concept) − v(anchor))``, the direction that separates the concept from its anchor
    (:func:`~erase.losses.implicit_loss`), so that an erased concept is not drawn unasked either: prompt searches
    find glue words that draw it otherwise (benchmarks/RESULTS.md).
    """

    esd: float = 1.0
    attention: float = 1e-3
    flow: float = 0.1
    contrastive: float = 0.1
    keep: float = 20.0
    implicit: float = 1.0


@dataclass
class EraseConfig:
    """Everything that determines a run (recorded in ``run.json``; a resumed run must match it).

    ``batch``: rows per erase step and per preserve step; ``contrastive_rows`` of a preserve step's rows are
    concept points for the contrastive loss (run only up to the last of ``attention_layers``), ``keep_rows`` keep
    points for the keep loss, the rest flow-matching rows. ``height``/``width``/
    ``max_sequence_length``: ``None`` takes the model's defaults. ``attention_layers``: which joint-attention
    layers the attention and contrastive losses read (trace ``layers`` selector). The device is the pipeline's.
    ``threads``: torch CPU threads (results are bit-reproducible only at the same count).
    ``guidance_scale``/``true_cfg_scale``/``negative_prompt``: how the base model is sampled for the cache and
    called in the losses (``None``: the model's default call: the guidance input of a guidance-distilled model
    such as the bundled shapes model or FLUX.1-dev, true CFG for a model without a guidance embedding that is
    sampled with it). ``eta`` (ESD's negative-guidance strength) and ``lora``: ``None`` takes the model profile's
    erasure defaults, as ``attnscope erase`` does.
    """

    model: str = "shapes"
    steps: int = STEPS_PER_CONCEPT
    lr: float = 1e-3
    seed: int = 0
    batch: int = 8
    contrastive_rows: int = 2
    keep_rows: int = 3
    schedule: Literal["alternate", "joint"] = "alternate"
    weights: LossWeights = field(default_factory=LossWeights)
    eta: float | None = None
    tau: float = 0.07
    lora: LoraSettings | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    attention_layers: str = "double"
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in ("alternate", "joint"):
            raise ValueError(f"schedule must be 'alternate' or 'joint', not {self.schedule!r}")
        if self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("batch and checkpoint_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.lora is not None:
            data["lora"]["targets"] = list(self.lora.targets)
        return data


def fill_model_defaults(config: EraseConfig, pipe: Any) -> EraseConfig:
    """Set ``config``'s ``None`` fields to ``config.model``'s defaults (in place; also returned): the call settings
    of :func:`model_defaults`, and the profile's η and LoRA placement."""
    for key, value in model_defaults(config.model, pipe).items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    defaults = profile_for(config.model).erase_defaults
    if config.eta is None:
        config.eta = defaults.eta
    if config.lora is None:
        config.lora = LoraSettings(targets=defaults.lora_targets)
    return config


def model_defaults(model: str, pipe: Any) -> dict[str, Any]:
    """The call settings ``fill_model_defaults`` puts into a config's ``None`` fields: size, text length, guidance
    (``guidance_scale`` stays ``None`` where the model's call leaves it to the architecture's default)."""
    call = profile_for(model).default_call(pipe)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    return {
        "height": call.get("height", size),
        "width": call.get("width", size),
        "max_sequence_length": adapter_for(pipe).text_length(call.get("max_sequence_length")),
        "guidance_scale": call.get("guidance_scale"),
        "true_cfg_scale": call.get("true_cfg_scale", 1.0),
        "negative_prompt": call.get("negative_prompt", ""),
    }
