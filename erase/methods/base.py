"""What an erasure method is: a name, the losses and options it takes, and either the steps of a training run
(:class:`TrainedMethod`, driven by :class:`~erase.trainer.Trainer`) or a direct edit (:class:`ClosedFormMethod`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..losses import LossWeights

if TYPE_CHECKING:
    from attnscope.profiles import EraseDefaults

    from ..config import EraseConfig
    from ..spec import ConceptSpec
    from ..trainer import Trainer

__all__ = ["DEFAULT_LR", "STEPS_PER_CONCEPT", "ClosedFormMethod", "Method", "TrainedMethod"]

#: Optimizer steps per erased concept (erase and preserve steps count one each) when a method does not say
#: otherwise: the fewest that left no trace of one concept in the shapes evaluation at 16 seeds
#: (benchmarks/RESULTS.md).
STEPS_PER_CONCEPT = 300
#: AdamW learning rate when a method does not say otherwise.
DEFAULT_LR = 1e-3

#: ``attnscope erase`` options every trained method takes.
TRAINING_OPTIONS = frozenset({
    "steps", "lr", "batch", "rank", "targets", "train", "weights", "sample_steps", "cache_seeds",
    "checkpoint_every", "gradient_checkpointing", "adversarial",
})


class Method(ABC):
    """One erasure method. Subclasses set the class attributes; :func:`erase.methods.method_for` makes them."""

    #: The name ``--method`` takes.
    name: ClassVar[str]
    #: One line for ``--help`` and the docs.
    summary: ClassVar[str]
    #: The loss weights a run of this method starts from (``--weights`` may change the ones in ``losses``).
    default_weights: ClassVar[LossWeights] = LossWeights.only()
    #: The :class:`LossWeights` fields it reads; ``--weights`` may name only these.
    losses: ClassVar[tuple[str, ...]] = ()
    #: The ``attnscope erase`` options it takes beyond the common ones (concept, spec, model, device, seed, out...),
    #: as argparse ``dest`` names; the CLI refuses any other it is given, naming these.
    options: ClassVar[frozenset[str]] = frozenset()
    #: LoRA targets when not told (``None``: the model profile's).
    lora_targets: ClassVar[tuple[str, ...] | None] = None
    #: Whether it trains (resumable, checkpointed steps) or edits in closed form.
    trained: ClassVar[bool] = True
    #: Why it cannot be trained adversarially (``None``: it can), completing "<name> ...".
    adversarial_refusal: ClassVar[str | None] = None
    #: Its attention term's form when ``EraseConfig.attention_form`` is not set (``erase.losses``: ``localized``
    #: is the share of the base model's localized map left, ``mass`` the mean mass on the concept's keys).
    attention_form: ClassVar[str] = "mass"

    def weights_for(self, defaults: EraseDefaults) -> LossWeights:
        """The loss weights a run starts from on a model with these erasure ``defaults`` (its profile's)."""
        return self.default_weights

    def lora_targets_for(self, defaults: EraseDefaults) -> tuple[str, ...]:
        """The LoRA targets a run uses when not told: the method's own, else its model profile's (``defaults``)."""
        return self.lora_targets or defaults.lora_targets

    def default_schedule(self, concepts: int) -> tuple[int, float]:
        """``(steps, lr)`` of a run that erases ``concepts`` concepts together, when ``--steps``/``--lr`` are not
        given (a closed-form edit records them and takes no steps). Each concept gets a share of the erase rows, so
        the steps grow with their number."""
        return STEPS_PER_CONCEPT * concepts, DEFAULT_LR


class TrainedMethod(Method):
    """A method the :class:`~erase.trainer.Trainer` trains: which level each step is, and what a step computes."""

    options = TRAINING_OPTIONS

    def level(self, trainer: Trainer, step: int) -> str:
        """The level of optimizer step ``step`` (a name for the log: ``erase``, ``preserve``, ...)."""
        return "erase"

    @abstractmethod
    def step(self, trainer: Trainer, level: str) -> dict[str, Any]:
        """Compute this level's losses on drawn rows (through :meth:`Trainer.backward_group`, which accumulates
        their weighted gradients); returns the unweighted loss values."""


class ClosedFormMethod(Method):
    """A method that computes its weight edit directly from base-model activations, in seconds."""

    trained = False
    adversarial_refusal = "is a closed-form edit: it has no training steps to put attack steps between"

    @abstractmethod
    def fit(
        self,
        pipe: Any,
        specs: Sequence[ConceptSpec],
        config: EraseConfig,
        out: Path,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Compute the edit, write the LoRA file into ``out`` and return what the run log records about it."""
