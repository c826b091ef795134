"""attnscope: see (and erase) what MMDiT text-to-image transformers attend to.

    import attnscope
    pipe = attnscope.load_pipeline("shapes")
    with attnscope.trace(pipe) as tr:
        image = pipe("a red circle and a blue square").images[0]
    maps = tr.maps()
    maps.word("red").select(layers="double").mean().numpy()     # (h, w) float32 over the image-token grid
"""

from .adapters import LayerInfo, UnsupportedModelError, check_size
from .capture import UnsupportedProcessorError
from .maps import SelectionError, TokenMaps
from .pipelines import load_pipeline
from .profiles import ModelNotFoundError, ModelProfile, profile_for
from .sampling import FlowMatchRenoisingScheduler
from .tokens import EmptyPromptError, PromptTokens, UnknownWordError, Word
from .trace import StopForward, Trace, TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "EmptyPromptError",
    "FlowMatchRenoisingScheduler",
    "LayerInfo",
    "ModelNotFoundError",
    "ModelProfile",
    "PromptTokens",
    "SelectionError",
    "StopForward",
    "TokenMaps",
    "Trace",
    "TraceError",
    "UnknownWordError",
    "UnsupportedModelError",
    "UnsupportedProcessorError",
    "Word",
    "check_size",
    "load_pipeline",
    "profile_for",
    "trace",
]
