"""The plan: every check that can be made before emitting is made there, so ``inspect`` and
``convert`` agree; rule parameters reach every rule that takes them; the registry and the
propagator contract (issue 12's findings, one test or more each)."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from lrp_onnx.emit import read_metadata
from lrp_onnx.registry import PROPAGATORS, lookup, routing
from lrp_onnx.rules import NAMED_RULES
from test_cli import assert_bad_input, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(11)


def mixed_model():
    """x [N, 4, 6] → MatMul+Add → Relu → LayerNorm → Add(·, Sigmoid(·)) → Mul by a constant →
    ReduceMean → Gemm → y [N, 3]: a linear layer, an activation, a norm, a sum of activations, a
    product with a constant, an average and a dense head, each of which takes a rule."""
    weights = {"w": RNG.standard_normal((6, 6)), "b": RNG.standard_normal(6), "gamma": RNG.uniform(0.5, 2, 6),
               "beta": RNG.standard_normal(6), "c": RNG.uniform(0.5, 2, 6), "v": RNG.standard_normal((6, 3)),
               "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], name="norm", axis=-1),
             helper.make_node("Sigmoid", ["n"], ["s"], name="sigmoid"),
             helper.make_node("Add", ["n", "s"], ["t"], name="residual"),
             helper.make_node("Mul", ["t", "c"], ["u"], name="scale"),
             helper.make_node("ReduceMean", ["u", "axes"], ["p"], name="mean", keepdims=0),
             helper.make_node("Gemm", ["p", "v"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else np.int64), k)
                               for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


MIXED = mixed_model()
X = RNG.standard_normal((2, 4, 6)).astype(np.float32)
OPS = sorted({n.op_type for n in MIXED.graph.node})


@pytest.mark.parametrize("rule", sorted(NAMED_RULES))
@pytest.mark.parametrize("op", OPS)
def test_convert_succeeds_exactly_where_the_plan_has_no_problem(op, rule):
    """Every rule on every op: the plan lists a problem, and convert raises, for the same cases. What
    the plan accepts gets the rule on every node of that op, and its relevance moves exactly where
    the rule does: it differs from the default composite's wherever the override changes a rule's
    formula, and is the same where it does not (the default's rule, or an ε-rule with the same ε:
    norm is epsilon with ε = the stabilizer)."""
    rules = {op: rule}
    p = lrp_onnx.plan(MIXED, rules=rules)
    if p.problems or p.rule_problems:
        with pytest.raises((lrp_onnx.RuleError, lrp_onnx.UnsupportedOpError)) as error:
            lrp_onnx.convert(MIXED, rules=rules)
        for name, _, reason in p.problems + p.rule_problems:
            assert name in str(error.value) and reason in str(error.value)
        return
    explainer = lrp_onnx.convert(MIXED, rules=rules)
    _, relevance = lrp_onnx.Explainer(explainer).explain(X)
    assert np.isfinite(relevance).all()
    default = lrp_onnx.plan(MIXED)
    # the nodes of that op that take a rule (an Add that is a MatMul's bias is part of that layer)
    nodes = [n.name for n in MIXED.graph.node if n.op_type == op and n.name in p.rules]
    assert nodes and all(p.rules[n].name == rule for n in nodes)

    def same_formula(a, b):
        both_epsilon = isinstance(a, lrp_onnx.Epsilon) and isinstance(b, lrp_onnx.Epsilon)
        return a == b or (both_epsilon and a.epsilon == b.epsilon)

    _, default_relevance = lrp_onnx.Explainer(lrp_onnx.convert(MIXED)).explain(X)
    moved = not np.allclose(relevance, default_relevance, rtol=1e-6, atol=1e-9)
    assert moved == any(not same_formula(p.rules[n], default.rules[n]) for n in nodes)


@pytest.mark.parametrize("method", lrp_onnx.METHODS)
def test_every_method_agrees_with_its_plan(method):
    """The mixed model's every op, LayerNorm included, has a gradient and an LRP rule: each method
    plans it without problems, and convert makes it. (A gate, whose gradient is not implemented, is
    refused by both: test_methods.py.)"""
    p = lrp_onnx.plan(MIXED, method=method)
    assert not p.problems and not p.rule_problems
    lrp_onnx.convert(MIXED, method=method)


def test_a_rule_that_does_not_fit_is_found_by_the_plan_and_inspect(tmp_path, cnn_path):
    """Before, plan(m, rules={"Relu": "epsilon"}) reported nothing and convert raised RuleError."""
    p = lrp_onnx.plan(cnn_path, rules={"Relu": "epsilon"})
    assert {op for _, op, _ in p.rule_problems} == {"Relu"} and len(p.rule_problems) == 2
    assert all("it takes pass" in reason for _, _, reason in p.rule_problems)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"Relu": "epsilon"}))
    result = cli("inspect", cnn_path, "--rules", rules)
    assert result.returncode == 2
    assert result.stdout.count("RULE DOES NOT FIT") == 2 and "all nodes supported" not in result.stdout
    with pytest.raises(lrp_onnx.RuleError, match="2 node\\(s\\) with a rule that does not fit"):
        lrp_onnx.convert(cnn_path, rules={"Relu": "epsilon"})


def test_global_parameters_fill_rules_named_by_overrides(cnn_path):
    """Before, a rule named in --rules was built with its defaults: ε = 1e-6 despite epsilon=0.5."""
    p = lrp_onnx.plan(cnn_path, "epsilon-plus", rules={"Gemm": "epsilon", "/0/Conv": {"rule": "epsilon",
                                                                                      "epsilon": 0.1}}, epsilon=0.5)
    gemm = next(u for u in p.units if u.op == "Gemm")
    assert p.rules[gemm.name] == lrp_onnx.Epsilon(0.5)
    assert p.rules["/0/Conv"] == lrp_onnx.Epsilon(0.1)  # an override's own value wins
    # norm reads --stabilizer as its ε, as Zennit's Norm; --zero-bias reaches overrides too
    p = lrp_onnx.plan(cnn_path, rules={"GlobalAveragePool": "norm", "Gemm": "zplus"}, stabilizer=0.25,
                      zero_params=["bias"])
    rules = {u.op: p.rules.get(u.name) for u in p.units}
    assert rules["GlobalAveragePool"] == lrp_onnx.Norm(0.25, zero_params=("bias",))
    assert rules["Gemm"] == lrp_onnx.ZPlus(0.25, zero_params=("bias",))


def test_sums_and_layer_norm_take_the_rule_parameters(tmp_path):
    """A sum or LayerNorm named "epsilon" in the rules gets --epsilon (before: only defaults); the
    base map's norm for them reads --stabilizer, as Zennit's layer_map_base."""
    p = lrp_onnx.plan(MIXED, "epsilon", rules={"Add": "epsilon", "LayerNormalization": "epsilon"}, epsilon=0.5)
    assert p.rules["residual"] == p.rules["norm"] == lrp_onnx.Epsilon(0.5)
    p = lrp_onnx.plan(MIXED, "epsilon", epsilon=0.5, stabilizer=0.01)
    assert p.rules["residual"] == p.rules["norm"] == p.rules["mean"] == lrp_onnx.Norm(0.01)
    assert p.rules["head"] == lrp_onnx.Epsilon(0.5)
    # and the parameter changes the numbers: the sum's split with ε = 0.5 is not the one with 1e-6
    _, small = lrp_onnx.Explainer(MIXED, composite="epsilon", rules={"Add": "epsilon"}).explain(X)
    _, large = lrp_onnx.Explainer(MIXED, composite="epsilon", rules={"Add": "epsilon"}, epsilon=0.5).explain(X)
    assert not np.allclose(small, large)


def test_a_parameter_no_rule_takes_is_refused(cnn_path):
    with pytest.raises(lrp_onnx.RuleError, match="does not use gamma"):
        lrp_onnx.plan(cnn_path, "epsilon-plus", gamma=0.5)
    # ... unless an override names a rule that takes it
    p = lrp_onnx.plan(cnn_path, "epsilon-plus", rules={"Gemm": "gamma"}, gamma=0.5)
    assert p.rules[next(u.name for u in p.units if u.op == "Gemm")] == lrp_onnx.Gamma(0.5)
    with pytest.raises(lrp_onnx.RuleError, match="unknown rule parameter"):
        lrp_onnx.plan(cnn_path, epsillon=0.5)


def test_norm_is_the_epsilon_rule_named_by_its_stabilizer():
    """Zennit's Norm is the ε-rule, one body; it only names its ε as the flag that sets it does
    (inspect showed a GlobalAveragePool's norm as epsilon(epsilon=1e-06), which --epsilon does not change)."""
    norm = lrp_onnx.make_rule("norm", stabilizer=0.1)
    assert isinstance(norm, lrp_onnx.Epsilon) and type(norm).propagate is lrp_onnx.Epsilon.propagate
    assert norm.epsilon == 0.1 and norm.describe() == "norm(stabilizer=0.1)"
    assert norm.as_dict() == {"rule": "norm", "stabilizer": 0.1, "zero_params": ()}
    assert lrp_onnx.make_rule(norm.as_dict().pop("rule"), stabilizer=0.1) == norm


def test_ops_do_not_test_rule_classes():
    """Rules own their maths and ops their maps: no op switches on a rule's class."""
    for name in os.listdir(os.path.join(ROOT, "lrp_onnx", "ops")):
        if name.endswith(".py"):
            source = open(os.path.join(ROOT, "lrp_onnx", "ops", name)).read()
            assert "isinstance(rule" not in source and "from ..rules" not in source, name


def test_the_registry_is_filled_on_import_and_keyed_by_domain(cnn_path):
    """Before, PROPAGATORS was empty until the first lookup, and keyed by op type alone."""
    code = "import lrp_onnx.registry as r; print(len(r.PROPAGATORS), sorted(r.PROPAGATORS)[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == len(PROPAGATORS) > 40
    assert all(isinstance(k, tuple) and len(k) == 2 for k in PROPAGATORS)
    unit = lrp_onnx.plan(cnn_path).units[1]
    assert lookup(unit) is PROPAGATORS[("", "Relu")]
    unit.head.domain = "com.example"
    assert lookup(unit) is None
    unit.head.domain = "ai.onnx"
    assert lookup(unit) is PROPAGATORS[("", "Relu")]


def test_a_propagator_that_drops_relevance_is_an_error(monkeypatch, cnn_path):
    """Before, the walk zipped a short result with the inputs and dropped relevance silently."""
    monkeypatch.delitem(PROPAGATORS, ("", "Flatten"))
    routing("Flatten")(lambda b, unit, relevance_out: [])
    with pytest.raises(lrp_onnx.UnsupportedModelError, match=r"returned 0 relevance\(s\) for 1 input\(s\)"):
        lrp_onnx.convert(cnn_path)


def test_the_modules_keep_to_one_job():
    """Planning emits nothing, the ORT wrapper runs no image pipeline, analysis imports no pipeline."""
    import lrp_onnx.analysis.evaluate as evaluate
    import lrp_onnx.plan as plan
    import lrp_onnx.runtime as runtime
    assert not hasattr(plan, "Builder") and not hasattr(plan, "reverse_walk")
    assert not hasattr(runtime.Explainer, "explain_images") and not hasattr(runtime, "load_samples")
    assert "lrp_onnx.explain" not in open(evaluate.__file__).read() and "from ..explain" not in \
        open(evaluate.__file__).read()


def test_one_default_composite_and_one_list_of_methods():
    package = os.path.join(ROOT, "lrp_onnx")
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name not in ("composites.py", "rules.py"):
                source = open(path).read()
                assert not re.search(r'=\s*"alpha-beta"', source), path
                assert '"gradient", "sensitivity"' not in source, path
    from lrp_onnx.analysis.evaluate import parse_method
    assert [parse_method(m) for m in lrp_onnx.METHODS[1:]] == [{"method": m} for m in lrp_onnx.METHODS[1:]]


def test_the_explainer_records_how_it_was_made(tmp_path, cnn_path):
    explainer = lrp_onnx.convert(cnn_path, "epsilon-gamma-box", rules={"Gemm": {"rule": "epsilon", "epsilon": 0.1}},
                                 gamma=0.5, low=-2.0, high=2.0)
    meta = read_metadata(explainer)
    assert meta["method"] == "lrp" and meta["composite"] == "epsilon-gamma-box"
    assert meta["version"] == lrp_onnx.__version__
    assert meta["source_sha256"] == hashlib.sha256(open(cnn_path, "rb").read()).hexdigest()
    assert meta["parameters"] == {"gamma": 0.5, "low": -2.0, "high": 2.0}
    assert meta["rules"]["conv"] == {"rule": "gamma", "gamma": 0.5, "stabilizer": 1e-6, "zero_params": []}
    assert meta["rules"]["first"] == {"rule": "zbox", "low": -2.0, "high": 2.0, "stabilizer": 1e-6,
                                      "zero_params": []}
    assert meta["overrides"] == {"Gemm": {"rule": "epsilon", "epsilon": 0.1, "zero_params": []}}
    # the metadata is enough to make the same explainer again
    again = lrp_onnx.convert(cnn_path, meta["composite"], rules=meta["overrides"], **meta["parameters"])
    assert again.graph == explainer.graph
    path = tmp_path / "e.onnx"
    lrp_onnx.save_model(explainer, str(path))
    result = cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "an lrp-onnx explainer graph" in result.stdout and "source_sha256: " + meta["source_sha256"] in result.stdout
    assert "composite: epsilon-gamma-box" in result.stdout and "'gamma': 0.5" in result.stdout


def test_every_registered_op_has_a_row_in_the_per_op_tables():
    from test_ops import CASES, LINEAR_CASES
    covered = {n.op_type for case in CASES for n in case.nodes} | \
        {n.op_type for case, _, _ in LINEAR_CASES for n in case.nodes}
    missing = sorted(op for _, op in PROPAGATORS if op not in covered)
    assert not missing, f"ops without a row in tests/test_ops.py: {missing}"


def test_cli_method_lrp_means_the_default_composite(tmp_path):
    """--method lrp is the composite auto chooses for the model (a CNN: alpha-beta), reported by name."""
    digits = os.path.join(ROOT, "models", "digits_cnn.onnx")
    data = os.path.join(ROOT, "models", "digits_samples.npy")
    result = cli("evaluate", digits, data, "-o", tmp_path / "e", "--method", "lrp", "--steps", "2",
                 "--noise-low", "0", "--noise-high", "1")
    assert result.returncode == 0, result.stderr
    assert "| lrp:alpha-beta |" in result.stdout and result.stderr == ""
    assert json.load(open(tmp_path / "e" / "evaluate.json"))["methods"][0]["method"] == "lrp:alpha-beta"


def test_cli_evaluate_old_noise_flags_are_refused_not_reread(tmp_path):
    """evaluate's --low/--high set the noise until 0.1.0 (deprecated, with a note); they are refused
    now, naming the flags to use, rather than taken as zbox bounds as everywhere else."""
    digits = os.path.join(ROOT, "models", "digits_cnn.onnx")
    data = os.path.join(ROOT, "models", "digits_samples.npy")
    args = (digits, data, "--method", "lrp:zplus", "--steps", "3", "--seed", "1")
    old = cli("evaluate", *args, "-o", tmp_path / "old", "--low", "0", "--high", "0.5")
    assert_bad_input(old, "use --noise-low/--noise-high", "--zbox-low/--zbox-high")
    assert not (tmp_path / "old").exists()
    new = cli("evaluate", *args, "-o", tmp_path / "new", "--noise-low", "0", "--noise-high", "0.5")
    assert new.returncode == 0 and new.stderr == "", new.stderr


def test_cli_evaluate_and_compare_take_the_rule_flags(tmp_path):
    digits = os.path.join(ROOT, "models", "digits_cnn.onnx")
    data = os.path.join(ROOT, "models", "digits_samples.npy")
    # the flag reaches the rules: a value the rule refuses, or one no rule takes, is an error
    assert_bad_input(cli("evaluate", digits, data, "-o", tmp_path / "a", "--method", "lrp:epsilon", "--epsilon", "-1"),
                     "epsilon must be")
    assert_bad_input(cli("compare", digits, digits, data, "-o", tmp_path / "b", "--alpha", "3", "--beta", "1"),
                     "alpha - beta = 1")


def test_the_epsilon_flag_reaches_the_rules_as_a_numpy_re_derivation_says(tmp_path):
    """``explain --composite epsilon --epsilon 0.1`` on the bundled scikit-learn MLP (three dense
    layers): the relevance the CLI writes is the ε-rule's with ε = 0.1, re-derived in numpy from the
    model's own weights, and differs from the default ε's by far more than the tolerance."""
    import numpy_reference as ref

    model = os.path.join(ROOT, "models", "digits_mlp.onnx")
    x = np.load(os.path.join(ROOT, "models", "digits_samples.npy")).reshape(10, 64)
    np.save(tmp_path / "x.npy", x)
    result = cli("explain", model, tmp_path / "x.npy", "--composite", "epsilon", "--epsilon", "0.1", "--no-heatmaps",
                 "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    written = np.load(tmp_path / "out" / "relevance" / "part-00000.npy")
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(model).graph.initializer}
    layers = [(weights[f"coefficient{k}"], weights[f"intercepts{k}"].ravel()) for k in ("", "1", "2")]

    def relevance(sample, epsilon):
        activations = [sample.astype(np.float64)]
        for k, (w, b) in enumerate(layers):
            z = activations[-1] @ w + b
            activations.append(z if k == len(layers) - 1 else np.maximum(z, 0))
        logits = activations[-1]  # relevance starts below the Softmax, at the predicted class's logit
        r = np.where(np.arange(len(logits)) == logits.argmax(), logits, 0)
        for (w, b), a in zip(layers[::-1], activations[-2::-1]):
            r = ref.lrp("epsilon", {"epsilon": epsilon}, w.T, a, b, r)
        return r

    expected = np.stack([relevance(s, 0.1) for s in x])
    default = np.stack([relevance(s, 1e-6) for s in x])
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected - default).max() > 100 * 1e-5 * np.abs(expected).max()


def test_cli_float_lists_are_parsed_once_with_a_clear_error(tmp_path, cnn_path):
    result = cli("explain", cnn_path, os.path.join(ROOT, "models", "samples"), "--mean", "0.5,x")
    assert result.returncode == 2 and "comma-separated numbers" in result.stderr


def test_an_explainer_runs_on_ort_with_the_mixed_ops():
    """The mixed model's forward output is untouched by the conversion."""
    explainer = lrp_onnx.convert(MIXED)
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(MIXED.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["y"], {"x": X, "target": np.array([-1, 1])})[0],
                               original.run(None, {"x": X})[0], rtol=1e-6)
    onnx.checker.check_model(explainer, full_check=True)
