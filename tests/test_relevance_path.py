"""Never a silent zero: the plan proves that relevance seeded at the scores reaches the explained
input, and refuses (exit 3, naming the node) a graph where every path breaks; a run that still
gives a sample no relevance while its logit is not 0 warns."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

import lrp_onnx
from lrp_onnx.errors import RelevancePathError, RelevanceWarning
from lrp_onnx.runtimes import check
from test_cli import assert_bad_input, cli

RNG = np.random.default_rng(2)


def text_model(body, inputs="float[N, 4] x", weights=None):
    """``body`` (ONNX text format) between ``inputs`` and a float[N, 3] output y, with ``weights``
    (float arrays as float32, integer ones as int64)."""
    model = parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
        case ({inputs}) => (float[N, 3] y) {{ {body} }}""")
    for name, value in (weights or {}).items():
        value = np.asarray(value)
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32 if value.dtype.kind == "f"
                                                                            else np.int64), name))
    onnx.checker.check_model(model, full_check=True)
    return model


W = {"W": RNG.standard_normal((4, 3)), "B": RNG.standard_normal(3)}

# break kind -> (graph body, the node relevance stops at, what the error says about it)
BREAKS = {
    "an integer tensor": ("best = ArgMax <axis = 1, keepdims = 1> (x)\n f = Cast <to = 1> (best)\n"
                          "wide = Expand (f, four)\n y = Gemm (wide, W, B)", "ArgMax",
                          "'best' is int64, which carries no relevance"),
    "an op that keeps only the shape": ("s = Shape (x)\n f = Cast <to = 1> (s)\n"
                                        "row = Unsqueeze (f, zero)\n y = Gemm (row, W2, B)", "Shape",
                                        "is int64, which carries no relevance"),
    "a mask": ("m = Greater (x, zerof)\n f = Cast <to = 1> (m)\n y = Gemm (f, W, B)", "Greater",
               "'m' is bool, which carries no relevance"),
}
EXTRA = {"four": np.array([1, 4]), "zero": np.array([0]), "zerof": np.array(0.0), "W2": RNG.standard_normal((2, 3))}


def break_model(kind):
    body = BREAKS[kind][0]
    return text_model(body, weights=dict(W, **{k: v for k, v in EXTRA.items() if k in body}))


@pytest.mark.parametrize("kind", BREAKS)
def test_a_broken_path_is_refused_naming_the_node(kind):
    _, op, reason = BREAKS[kind]
    with pytest.raises(RelevancePathError) as caught:
        lrp_onnx.convert(break_model(kind))
    message = str(caught.value)
    assert "relevance from 'y' cannot reach 'x'" in message and f"({op})" in message and reason in message, message
    p = lrp_onnx.plan(break_model(kind))
    assert [b[1] for b in p.path_breaks] == [op]


def test_a_score_that_does_not_depend_on_the_input_is_refused():
    model = text_model("y = Gemm (other, W, B)\n x_out = Identity (x)", inputs="float[N, 4] x, float[N, 4] other",
                       weights=W)
    with pytest.raises(RelevancePathError, match="the output 'y' does not depend on 'x'"):
        lrp_onnx.convert(model, input_name="x")
    assert lrp_onnx.convert(model, input_name="other") is not None  # the other input is explained as before


def test_one_broken_branch_beside_a_working_one_is_not_refused(rng):
    """Relevance that reaches the input along one path is an explanation (the other path's share is
    lost, as a bias's is); only a graph where every path breaks is refused."""
    model = text_model("best = ArgMax <axis = 1, keepdims = 1> (x)\n f = Cast <to = 1> (best)\n"
                       "shifted = Add (x, f)\n y = Gemm (shifted, W, B)", weights=W)
    explainer = lrp_onnx.Explainer(model)
    _, relevance = explainer.explain(rng.standard_normal((2, 4)).astype(np.float32))
    assert np.abs(relevance).sum(axis=1).min() > 0


def test_cli_convert_and_inspect_exit_3_naming_where_relevance_stops(tmp_path):
    path = tmp_path / "argmax.onnx"
    onnx.save(break_model("an integer tensor"), path)
    out = tmp_path / "argmax.lrp.onnx"
    assert_bad_input(cli("convert", path, "-o", out), "cannot reach 'x'", "(ArgMax)", code=3)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["argmax.onnx"]
    result = cli("inspect", path)
    assert result.returncode == 3
    assert "relevance stops at node" in result.stdout and "(ArgMax)" in result.stdout


def zero_input_explainer(tmp_path):
    """A dense layer with a bias: an all-zero input has all-zero relevance under ε, and the bias as its logit."""
    path = tmp_path / "dense.onnx"
    onnx.save(text_model("y = Gemm (x, W, B)", weights={"W": W["W"], "B": np.array([1.0, 2.0, 3.0])}), path)
    explainer = tmp_path / "dense.lrp.onnx"
    lrp_onnx.save_model(lrp_onnx.convert(str(path), "epsilon"), explainer)
    return explainer


def test_zero_relevance_for_a_nonzero_logit_warns(tmp_path):
    explainer = lrp_onnx.Explainer(str(zero_input_explainer(tmp_path)))
    x = np.zeros((3, 4), np.float32)
    x[1] = 1.0
    with pytest.warns(RelevanceWarning, match=r"exactly 0 for 2 of 3 sample\(s\) \(index 0, 2\)"):
        explainer.explain(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer.explain(np.ones((2, 4), np.float32))  # nothing to warn about


def test_check_warns_where_the_reference_run_has_zero_relevance(tmp_path):
    explainer = zero_input_explainer(tmp_path)
    feeds = {"x": np.zeros((2, 4), np.float32), "target": np.array([-1, 2], np.int64)}
    with pytest.warns(RelevanceWarning, match="2 of 2 sample"):
        check(str(explainer), [], feeds)


def test_cli_explain_prints_the_warning_as_one_line(tmp_path):
    explainer = zero_input_explainer(tmp_path)
    data = tmp_path / "zeros.npy"
    np.save(data, np.zeros((2, 4), np.float32))
    result = cli("explain", explainer, data, "-o", tmp_path / "out", "--no-heatmaps")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "exactly 0" in line]
    assert len(warned) == 1 and warned[0].startswith("lrp-onnx: warning: "), result.stderr
