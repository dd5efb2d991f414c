"""lrp-onnx: Layer-wise Relevance Propagation as a standard ONNX graph.

load.py → plan.py (rules.py, composites.py, registry.py and ops/) → emit.py (builder.py) → runtime.py
"""

from importlib.metadata import version as _version

import onnx_graphsurgeon as _gs

from .composites import COMPOSITES, DEFAULT_COMPOSITE, METHODS, Composite, make_composite
from .emit import convert
from .errors import (
    InputError,
    LrpOnnxError,
    ModelLoadError,
    ModelWarning,
    OutputError,
    RuleError,
    UnsafeModelError,
    UnsupportedModelError,
    UnsupportedOpError,
)
from .explain import explain_images
from .io.heatmap import heatmap
from .io.inputs import Preprocess
from .plan import plan
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, RuleParams, WSquare, ZBox, ZPlus, make_rule
from .runtime import Explainer, save_model

_gs.logger.G_LOGGER.severity = _gs.logger.G_LOGGER.ERROR  # graphsurgeon's folding chatter is not for users

__version__ = _version("lrp-onnx")
__all__ = [
    "convert",
    "plan",
    "Explainer",
    "explain_images",
    "save_model",
    "heatmap",
    "Preprocess",
    "make_composite",
    "make_rule",
    "Composite",
    "COMPOSITES",
    "DEFAULT_COMPOSITE",
    "METHODS",
    "RuleParams",
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "Norm",
    "Pass",
    "WSquare",
    "ZBox",
    "ZPlus",
    "LrpOnnxError",
    "ModelLoadError",
    "UnsafeModelError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "RuleError",
    "InputError",
    "OutputError",
    "ModelWarning",
]
