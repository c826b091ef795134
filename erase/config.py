"""What determines an erasure run: :class:`EraseConfig` and its :class:`LossWeights`, and the model's defaults
for the fields left at ``None`` (from its :class:`~attnscope.profiles.ModelProfile`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from attnscope.adapters import adapter_for
from attnscope.profiles import EraseDefaults, EraseVelocity, LoraPlacement, profile_for

from .cache import CacheConfig
from .lora import LoraSettings
from .losses import LossWeights
from .methods import method_for
from .methods.base import Method

__all__ = ["EraseConfig", "LossWeights", "fill_model_defaults", "lora_settings_for", "model_defaults", "schedule_for"]


@dataclass
class EraseConfig:
    """Everything that determines a run (recorded in ``run.json``; a resumed run must match it).

    ``batch``: rows per erase step and per preserve step; ``contrastive_rows`` of a preserve step's rows are
    concept points for the contrastive loss (run only up to the last of ``attention_layers``), up to ``keep_rows``
    keep points for the keep loss (two rows each under true CFG), the rest flow-matching rows. ``height``/``width``/
    ``max_sequence_length``: ``None`` takes the model's defaults. ``attention_layers``: which joint-attention
    layers the attention and contrastive losses read (trace ``layers`` selector); ``attention_form``: the
    attention term as the mean mass on the concept's keys (``mass``, :func:`~erase.losses.attention_loss`) or as
    the share of the base model's localized map still on them (``localized``,
    :func:`~erase.losses.localized_attention_loss`); ``None`` takes the method's. The device is the pipeline's.
    ``log_gradients_every``: every that many steps (a pair: both levels) the log records each weighted loss's
    gradient norm (on those steps one extra backward per loss of non-zero weight, less one; 0: never).
    ``threads``: torch CPU threads (results are bit-reproducible only at the same count).
    ``guidance_scale``/``true_cfg_scale``/``negative_prompt``: how the base model is sampled for the cache and
    called in the losses (``None``: the model's default call: the guidance input of a guidance-distilled model
    such as the bundled shapes model or FLUX.1-dev, true CFG for a model without a guidance embedding that is
    sampled with it). ``eta`` (ESD's negative-guidance strength: the unasked path's, and the concepts' whose spec
    sets no ``eta`` of its own), ``lora`` (:func:`lora_settings_for`), ``steps`` and ``lr`` (:func:`schedule_for`):
    ``None`` takes the model profile's erasure defaults and the method's schedule, as ``attnscope erase`` does;
    so does ``balance_eta`` (several concepts pushed equally hard, :func:`~erase.methods.rows.run_etas`).
    ``esd_margin``: a concept point stops being pushed by ESD once its velocity is that many concept lengths past
    its anchor (:func:`~erase.losses.esd_loss`; ``math.inf``: pushed towards ESD's target throughout; ``None``: the
    model profile's, for a method that takes it). ``erase_velocity``: under true CFG, whether ESD and the implicit
    loss hold each row's ``conditional`` velocity or the ``guided`` one the sampler follows
    (:func:`~erase.losses.referred_velocity`; each concept point then brings its negative-prompt row, and the implicit
    rows are drawn at the same points); ``None``: the model profile's, for a method that takes it.
    ``method``: a name in :mod:`erase.methods` (which losses a step computes, or a closed-form edit); ``weights``:
    ``None`` takes the method's own. ``adversarial``: attack steps on an adversarial conditioning
    before each erase step (:mod:`erase.adversary`; 0: none).
    """

    model: str = "shapes"
    method: str = "eraseanything"
    steps: int | None = None
    lr: float | None = None
    seed: int = 0
    batch: int = 8
    contrastive_rows: int = 2
    keep_rows: int = 3
    schedule: Literal["alternate", "joint"] = "alternate"
    weights: LossWeights | None = None
    eta: float | None = None
    balance_eta: bool | None = None
    esd_margin: float | None = None
    erase_velocity: EraseVelocity | None = None
    tau: float = 0.07
    lora: LoraSettings | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    attention_layers: str = "double"
    attention_form: Literal["mass", "localized"] | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    checkpoint_every: int = 50
    log_gradients_every: int = 50
    adversarial: int = 0
    gradient_checkpointing: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.attention_form not in (None, "mass", "localized"):
            raise ValueError(f"attention_form must be 'mass' or 'localized', not {self.attention_form!r}")
        if self.schedule not in ("alternate", "joint"):
            raise ValueError(f"schedule must be 'alternate' or 'joint', not {self.schedule!r}")
        if self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("batch and checkpoint_every must be >= 1")
        method = method_for(self.method)  # an unknown name fails here, naming the known ones
        if self.esd_margin is not None and not self.esd_margin >= 0:
            raise ValueError(f"esd_margin must be >= 0 concept lengths past the anchor, got {self.esd_margin}")
        if self.erase_velocity not in (None, "conditional", "guided"):
            raise ValueError(f"erase_velocity must be 'conditional' or 'guided', not {self.erase_velocity!r}")
        if self.adversarial < 0:
            raise ValueError(f"adversarial must be >= 0 attack steps, got {self.adversarial}")
        if self.adversarial and method.adversarial_refusal:
            raise ValueError(f"adversarial erasure needs a method that can train on an attack's embeddings: "
                             f"{method.name} {method.adversarial_refusal}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.lora is not None:
            data["lora"]["targets"] = list(self.lora.targets)
        return data


def fill_model_defaults(config: EraseConfig, pipe: Any, concepts: int = 1) -> EraseConfig:
    """Set ``config``'s ``None`` fields to their defaults (in place; also returned): the call settings of
    :func:`model_defaults`, the profile's η (and whether several concepts' are balanced) and LoRA placement, the
    method's loss weights on that model (and LoRA targets, for a method that edits other projections than the
    profile's), and the method's schedule for ``concepts`` concepts erased together on that model."""
    for key, value in model_defaults(config.model, pipe).items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    defaults = profile_for(config.model).erase_defaults
    method = method_for(config.method)
    if config.eta is None:
        config.eta = defaults.eta
    if config.balance_eta is None:
        config.balance_eta = defaults.balance_eta
    if config.esd_margin is None and "esd_margin" in method.options:
        config.esd_margin = defaults.esd_margin
    if config.erase_velocity is None and "erase_velocity" in method.options:
        config.erase_velocity = defaults.erase_velocity if concepts == 1 else defaults.erase_velocity_several
    if config.lora is None:
        config.lora = lora_settings_for(method, defaults, pipe)
    steps, lr = schedule_for(method, defaults, concepts)
    if config.steps is None:
        config.steps = steps
    if config.lr is None:
        config.lr = lr
    if config.weights is None:
        config.weights = method.weights_for(defaults)
    if config.attention_form is None:
        config.attention_form = method.attention_form
    return config


def lora_settings_for(
    method: Method, defaults: EraseDefaults, pipe: Any, *, placement: LoraPlacement | None = None,
    targets: tuple[str, ...] | None = None, rank: int = 8,
) -> LoraSettings:
    """The LoRA of a run of ``method`` on the model whose profile's erasure defaults are ``defaults``: ``placement``
    (``None``: the profile's; ``text`` when ``targets`` are given or the method names its own projections, as a
    closed-form edit of particular ones does) and the text-side ``targets`` (``None``: the method's, else the
    profile's)."""
    if targets is not None and placement not in (None, "text"):
        raise ValueError(f"--targets chooses the text-side projections; --train {placement} trains every attention "
                         "projection there is")
    placement = placement or ("text" if targets is not None or method.lora_targets else defaults.placement)
    text_side = targets or method.lora_targets_for(defaults)
    if placement == "text":
        return LoraSettings(rank=rank, targets=text_side)
    # A wider placement widens it inside the attention; the text embedder that the method or the profile trains
    # stays, since on a model whose profile trains it, it is what reaches a concept that spread into other tokens.
    adapter = adapter_for(pipe)
    embedder = (adapter.text_embedder,) if adapter.text_embedder in text_side else ()
    return LoraSettings(rank=rank, targets=adapter.attention_projections + embedder,
                        layers="double" if placement == "joint" else "all")


def schedule_for(method: Method, defaults: EraseDefaults, concepts: int) -> tuple[int, float]:
    """``(steps, lr)`` of a run of ``method`` erasing ``concepts`` concepts together on the model whose profile's
    erasure defaults are ``defaults``: the method's schedule, its steps scaled as the profile says. A rate above the
    profile's ``max_lr`` is lowered to it and the steps raised in proportion: the run takes the same steps × rate,
    the update budget the faster schedule was chosen for."""
    steps, lr = method.default_schedule(concepts)
    if defaults.max_lr is not None and lr > defaults.max_lr:
        steps, lr = steps * lr / defaults.max_lr, defaults.max_lr
    return max(1, round(steps * defaults.steps_scale)), lr


def model_defaults(model: str, pipe: Any) -> dict[str, Any]:
    """The call settings ``fill_model_defaults`` puts into a config's ``None`` fields: size, text length, guidance
    (``guidance_scale`` stays ``None`` where the model's call leaves it to the architecture's default)."""
    call = profile_for(model).default_call(pipe)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    return {
        "height": call.get("height", size),
        "width": call.get("width", size),
        "max_sequence_length": adapter_for(pipe).text_length(pipe, call.get("max_sequence_length")),
        "guidance_scale": call.get("guidance_scale"),
        "true_cfg_scale": call.get("true_cfg_scale", 1.0),
        "negative_prompt": call.get("negative_prompt", ""),
    }
