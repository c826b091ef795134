"""EraseAnything-style concept erasure built on attnscope capture hooks (installed as ``attnscope.erase``).

    from attnscope.erase import EraseConfig, shapes_spec, train, evaluate, load_model
    pipe = load_model("shapes")
    result = train(pipe, [shapes_spec("red")], EraseConfig(), "runs/erase-red")
    report = evaluate("runs/erase-red")          # acc_e, acc_g, acc_ir (+ base figures)

Modules: ``spec`` (concept specs), ``lora`` (adapter, teacher, file format), ``sampling`` (direct transformer
calls, sampling with the pipeline's scheduler), ``cache`` (base-model data drawn once), ``losses``, ``trainer`` (bi-level loop,
checkpoints), ``evaluate`` (``attnscope eval`` on the shapes world), ``real_eval`` (CLIP / NudeNet on real models), ``cli`` (``erase``/``eval`` commands).
"""

from .evaluate import EvalReport, evaluate, shapes_prompts
from .lora import (
    LoraFileError,
    LoraSettings,
    base_model,
    check_lora_file,
    load_lora,
    save_lora,
)
from .real_eval import real_eval
from .spec import (
    ConceptNotInPromptError,
    ConceptSpec,
    SpecError,
    UnknownConceptError,
    load_spec,
    resolve_spec,
    shapes_spec,
)
from .trainer import (
    EraseConfig,
    EraseResult,
    LossWeights,
    NonFiniteLossError,
    OutputExistsError,
    ResumeMismatchError,
    load_model,
    train,
)

__all__ = [
    "ConceptNotInPromptError",
    "ConceptSpec",
    "EraseConfig",
    "EraseResult",
    "EvalReport",
    "LoraFileError",
    "LoraSettings",
    "LossWeights",
    "NonFiniteLossError",
    "OutputExistsError",
    "ResumeMismatchError",
    "SpecError",
    "UnknownConceptError",
    "base_model",
    "check_lora_file",
    "evaluate",
    "load_lora",
    "load_model",
    "load_spec",
    "real_eval",
    "resolve_spec",
    "save_lora",
    "shapes_prompts",
    "shapes_spec",
    "train",
]
