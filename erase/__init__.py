"""EraseAnything-style concept erasure built on attnscope capture hooks (installed as ``attnscope.erase``).

    import attnscope
    from attnscope.erase import EraseConfig, erasure_world, train
    pipe = attnscope.load_pipeline("shapes", progress=False)
    world = erasure_world("shapes")
    result = train(pipe, [world.spec("red")], EraseConfig(), "runs/erase-red")
    report = world.evaluate(result.out, [world.spec("red")], "shapes", seeds=16, out=result.out / "eval",
                            device="cpu", options={})            # acc_e, acc_g, acc_ir (+ base figures)

Modules, one job each: ``spec`` (concept specs), ``worlds`` (per world: specs, word checks, evaluation),
``config`` (what determines a run, the model's defaults), ``run`` (the run folder), ``lora`` (adapter, teacher,
file format), ``sampling`` (prompt bank, base-model trajectories), ``cache`` (base-model data drawn once),
``losses``, ``methods`` (the erasure methods by name: which losses a step computes, or a closed-form edit),
``adversary`` (adversarial erasure), ``trainer`` (the loop, checkpoints), ``parallel`` (data parallel),
``attacks`` (``attnscope attack``: can the concept be brought back?), ``cli`` (``erase``/``eval``/``attack``
commands).
"""

from .config import EraseConfig, LossWeights
from .lora import LoraFileError, LoraSettings, base_model, check_lora_file, load_lora, save_lora
from .run import OutputExistsError, ResumeMismatchError, read_run
from .spec import ConceptNotInPromptError, ConceptSpec, PromptTooLongError, SpecError, UnknownConceptError, load_spec
from .trainer import EraseResult, NonFiniteLossError, train
from .worlds import ErasureWorld, erasure_world

__all__ = [
    "ConceptNotInPromptError",
    "ConceptSpec",
    "EraseConfig",
    "EraseResult",
    "ErasureWorld",
    "LoraFileError",
    "LoraSettings",
    "LossWeights",
    "NonFiniteLossError",
    "OutputExistsError",
    "PromptTooLongError",
    "ResumeMismatchError",
    "SpecError",
    "UnknownConceptError",
    "base_model",
    "check_lora_file",
    "erasure_world",
    "load_lora",
    "load_spec",
    "read_run",
    "save_lora",
    "train",
]
