"""lrp-onnx: Layer-wise Relevance Propagation as a standard ONNX graph."""

import onnx_graphsurgeon as _gs

from .composites import COMPOSITES, Composite, make_composite
from .convert import convert, plan
from .errors import (InputError, LrpOnnxError, ModelLoadError, OutputError, RuleError, UnsafeModelError,
                     UnsupportedModelError, UnsupportedOpError)
from .heatmap import heatmap
from .inputs import Preprocess
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus, make_rule
from .runtime import Explainer, save_model

_gs.logger.G_LOGGER.severity = _gs.logger.G_LOGGER.ERROR  # graphsurgeon's folding chatter is not for users

__version__ = "0.1.0"
__all__ = ["convert", "plan", "Explainer", "save_model", "heatmap", "Preprocess", "make_composite", "make_rule", "Composite", "COMPOSITES",
           "AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "Pass", "WSquare", "ZBox", "ZPlus",
           "LrpOnnxError", "ModelLoadError", "UnsafeModelError", "UnsupportedModelError", "UnsupportedOpError", "RuleError",
           "InputError", "OutputError"]
