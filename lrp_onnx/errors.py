"""One exception hierarchy: every error names the file or node it is about.

The CLI maps each class to an exit code (see ``cli.EXIT_CODES`` and the README).
"""

from collections import Counter


class LrpOnnxError(Exception):
    """Base class of every error lrp-onnx raises on purpose."""


class ModelLoadError(LrpOnnxError):
    """The file is missing, not ONNX, truncated, or fails the ONNX checker."""


class UnsupportedModelError(LrpOnnxError):
    """The model is valid ONNX, but lrp-onnx cannot explain it (op, attribute or output form)."""


class UnsupportedOpError(UnsupportedModelError):
    """One or more nodes have no propagator; lists all of them at once."""

    def __init__(self, nodes):
        self.nodes = list(nodes)  # [(node name, op type, reason)]
        counts = Counter(op for _, op, _ in self.nodes)
        by_op = ", ".join(f"{op} ×{n}" for op, n in counts.most_common())
        listed = "; ".join(f"{name!r} ({op}): {why}" for name, op, why in self.nodes)
        super().__init__(f"{len(self.nodes)} unsupported node(s) ({by_op}): {listed}")


class RuleError(LrpOnnxError, ValueError):
    """Rule or composite parameters break their constraints, or a rule does not fit a node."""


class InputError(LrpOnnxError, ValueError):
    """Bad input at explain time: wrong name, dtype, shape or target."""
