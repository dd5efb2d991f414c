"""One exception hierarchy: every error names the file or node it is about.

The CLI maps each class to an exit code (``cli.EXIT_CODES``, listed in the README):

    LrpOnnxError
    ├── ModelLoadError          3  missing, empty, truncated, random or malformed file
    │   └── UnsafeModelError    4  the file would make us read outside its folder, or past a file's end
    ├── RelevancePathError      3  relevance from the scores cannot reach the explained input
    ├── UnsupportedModelError   5  valid ONNX that lrp-onnx cannot explain
    │   └── UnsupportedOpError
    ├── InputError              2  bad input at explain time, or bad command-line values
    ├── RuleError               2  rule or composite parameters that break their constraints
    └── OutputError             6  an output that exists (no --force), is the input, or cannot be written

and two warnings (UserWarnings), each shown by the CLI as one line on stderr before it carries on:
``ModelWarning``, a checker complaint that the conversion repairs and does not depend on, and
``RelevanceWarning``, an explanation that came out all zero while its logit is not.
"""

from collections import Counter
from typing import Iterable, Union

# What an error about a dynamic size suggests
SHAPE_HINT = "pin the size with convert --shape NAME=DIMS (Python: input_shapes={NAME: DIMS})"


def first_line(error: Union[BaseException, str]) -> str:
    """An exception's message cut to its first line, for one-line errors that quote another library."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class LrpOnnxError(Exception):
    """Base class of every error lrp-onnx raises on purpose."""


class ModelLoadError(LrpOnnxError):
    """The file is missing, not ONNX, truncated, or malformed (it fails the ONNX checker)."""


class UnsafeModelError(ModelLoadError):
    """The file points outside its folder (external data via ``..``, an absolute path, a symlink,
    a hardlink or a NUL byte), or at bytes past the end of a file. Refused before anything is read."""


class UnsupportedModelError(LrpOnnxError):
    """The model is valid ONNX, but lrp-onnx cannot explain it (op, attribute or output form)."""


class UnsupportedOpError(UnsupportedModelError):
    """One or more nodes have no propagator; lists all of them at once."""

    def __init__(self, nodes: Iterable[tuple[str, str, str]]) -> None:
        self.nodes = list(nodes)  # [(node name, op type, reason)]
        counts = Counter(op for _, op, _ in self.nodes)
        by_op = ", ".join(f"{op} ×{n}" for op, n in counts.most_common())
        listed = "; ".join(f"{name!r} ({op}): {why}" for name, op, why in self.nodes)
        super().__init__(f"{len(self.nodes)} unsupported node(s) ({by_op}): {listed}")


class RelevancePathError(LrpOnnxError):
    """Relevance seeded at the scores cannot reach the explained input: every path between them
    breaks (a tensor that carries no relevance, an op that passes none to it), or there is no path.
    The explainer would return all-zero relevance as if it were an explanation, so none is made."""


class RuleError(LrpOnnxError, ValueError):
    """Rule or composite parameters break their constraints, or a rule does not fit a node."""


class InputError(LrpOnnxError, ValueError):
    """Bad input or arguments: at explain time a wrong input name, dtype, shape, value or target; at
    conversion a requested layer that names no tensor on the explained path."""


class RuntimeMismatchError(LrpOnnxError):
    """Another runtime could not run an explainer, or its outputs differ from ONNX Runtime's
    (``lrp-onnx check``, ``convert --check-runtime``)."""


class OutputError(LrpOnnxError):
    """An output path that exists (without ``force``), is the input model, or cannot be written."""


class RelevanceWarning(UserWarning):
    """A sample whose relevance is exactly zero everywhere while its explained logit is not: no
    decomposition of a nonzero score, so that explanation must not be read as one."""


class ModelWarning(UserWarning):
    """A checker complaint that the conversion does not depend on (a graph output declared without
    a shape): the model converts, and the warning names what was assumed. The CLI shows it as one line."""
