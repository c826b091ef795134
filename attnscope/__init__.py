"""attnscope: see (and erase) what MMDiT text-to-image transformers attend to.

    import attnscope
    pipe = attnscope.load_pipeline("shapes")
    with attnscope.trace(pipe) as tr:
        image = pipe("a red circle and a blue square").images[0]
    maps = tr.maps()
    maps.word("red").select(layers="double").mean().numpy()     # (h, w) float32 over the image-token grid
    attnscope.readout_for(pipe).mask(maps.word("red"), image.size)   # (H, W) bool: the model's own read-out

    with attnscope.trace(pipe, concepts=["red", "circle", "square"]) as tr:   # output-space concept maps
        pipe("a red circle and a blue square")
    tr.concept_maps().word("circle")

    attnscope.explain(pipe, "photo.png", "a red circle", concepts=["red", "circle"])   # maps of an existing image
"""

from .adapters import LayerInfo, UnsupportedModelError, check_size
from .capture import UnsupportedProcessorError
from .concepts import ConceptError
from .explain import ExplainError, Explanation, explain
from .maps import SelectionError, TokenMaps
from .pipelines import load_pipeline
from .profiles import ModelNotFoundError, ModelProfile, profile_for
from .readout import Readout, readout_for
from .sampling import FlowMatchRenoisingScheduler
from .tokens import EmptyPromptError, PromptTokens, UnknownWordError, Word
from .trace import StopForward, Trace, TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "ConceptError",
    "EmptyPromptError",
    "ExplainError",
    "Explanation",
    "FlowMatchRenoisingScheduler",
    "LayerInfo",
    "ModelNotFoundError",
    "ModelProfile",
    "PromptTokens",
    "Readout",
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
    "explain",
    "load_pipeline",
    "profile_for",
    "readout_for",
    "trace",
]
