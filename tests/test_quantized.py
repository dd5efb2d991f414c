"""Quantized models from ONNX Runtime's quantizer (QDQ and QOperator, static, per channel; and
dynamic): the explainer's outputs are the quantized model's, bit for bit, and its relevance is
Zennit's on the float network the model stands for (quantized_models.FloatNetwork: dequantized
weights, float ops, each rounding a pass-through), within 1e-5 relative L2 per sample."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import exporters
import lrp_onnx
import quantized_models as qm
from lrp_onnx.emit import EXPLAINED_LOGIT, RELEVANCE
from test_cli import cli

COMPOSITES = ("alpha-beta", "epsilon")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(model, form): path}: the residual CNN and resnet18 (the issue's two silent-zero models),
    each quantized to QDQ and QOperator, with the inputs they are explained on."""
    folder = tmp_path_factory.mktemp("quantized")
    cnn = qm.residual_cnn(folder / "cnn.onnx")
    resnet = str(folder / "resnet18.onnx")
    exporters.torchvision_classifier("resnet18", resnet)  # 64 px, dynamic batch, 10 classes
    paths = {}
    for form in qm.FORMS:
        paths["cnn", form] = qm.quantize(cnn, form, folder / f"cnn-{form}.onnx")
        paths["resnet18", form] = qm.quantize(resnet, form, folder / f"resnet18-{form}.onnx", shape=(3, 64, 64))
    rng = np.random.default_rng(1)
    inputs = {"cnn": rng.standard_normal((3, 3, 16, 16)).astype(np.float32),
              "resnet18": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)}
    return paths, inputs


def run(model, feeds, optimise=True):
    options = ort.SessionOptions()
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else model,
                                   options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("form", qm.FORMS)
@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_outputs_are_the_quantized_models_bit_for_bit(models, name, form):
    """With ONNX Runtime's optimisations on, as deployed: for QDQ that means its integer kernels,
    which run only while the relevance pass reads none of the forward's tensors (the mirror)."""
    paths, inputs = models
    x = inputs[name]
    expected = run(paths[name, form], {"x": x})["logits"]
    explained = run(lrp_onnx.convert(paths[name, form]), {"x": x, "target": np.full(len(x), -1)})
    np.testing.assert_array_equal(explained["logits"], expected)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("form", qm.FORMS)
@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_relevance_is_zennits_on_the_float_network(models, name, form, composite):
    """Both sides run with the activations the quantized model has with optimisations off (the
    explainer session too, so that its float mirror rounds exactly as that run). The reference is
    Zennit in float64: with ε = 1e-6 a deep network's float32 rounding alone moves the relevance,
    by an amount that depends on the CPU's kernels, so the bound is 1e-5 or, where float32 Zennit
    itself lies further from float64, twice its distance."""
    paths, inputs = models
    path, x = paths[name, form], inputs[name]
    logits = run(path, {"x": x})["logits"]
    ranked = np.argsort(logits, axis=1)[:, ::-1]
    targets = ranked[np.arange(len(x)), np.arange(len(x)) % 3]  # sample i explains its (i % 3 + 1)-th class
    observed = qm.observed_activations(path, x)
    single = qm.FloatNetwork(path, observed).eval()
    reference_logits, single_reference = qm.zennit_relevance(single, x, targets, qm.zennit_composite(composite))
    double = qm.FloatNetwork(path, {k: v.astype(np.float64) for k, v in observed.items()}).eval().double()
    _, reference = qm.zennit_relevance(double, x.astype(np.float64), targets, qm.zennit_composite(composite))
    outputs = run(lrp_onnx.convert(path, composite), {"x": x, "target": targets}, optimise=False)
    relevance = outputs[RELEVANCE]
    np.testing.assert_allclose(outputs[EXPLAINED_LOGIT], reference_logits[np.arange(len(x)), targets], rtol=1e-6,
                               atol=1e-6 * np.abs(reference_logits).max())

    def distance(a):
        return np.linalg.norm((a - reference).reshape(len(x), -1), axis=1) / \
            np.linalg.norm(reference.reshape(len(x), -1), axis=1)

    errors, zennit_float32 = distance(relevance), distance(single_reference)
    assert (errors <= np.maximum(1e-5, 2 * zennit_float32)).all(), (errors, zennit_float32)
    assert np.isfinite(relevance).all() and (np.abs(relevance).reshape(len(x), -1).sum(axis=1) > 0).all()


@pytest.mark.parametrize("form", qm.FORMS)
def test_layer_relevance_is_asked_for_by_the_models_tensor_names(models, form):
    """``layers=`` takes the model's own tensor names, also where the relevance pass reads a mirror
    of the forward (QDQ, dynamic): the relevance there is Zennit's at that tensor."""
    paths, inputs = models
    path, x, layer = paths["cnn", form], inputs["cnn"], "/stem/stem.2/Relu_output_0"
    if form == "qoperator":
        layer = "/stem/stem.0/Conv_output_0_quantized"  # QLinearConv with its Relu folded in
    outputs = run(lrp_onnx.convert(path, "epsilon", layers=[layer]), {"x": x, "target": np.full(len(x), -1)},
                  optimise=False)
    network = qm.FloatNetwork(path, qm.observed_activations(path, x)).eval()
    reference = qm.zennit_relevance_at(network, x, outputs["explained_class"], qm.zennit_composite("epsilon"), [layer])
    ours = outputs["relevance:" + layer]
    assert np.abs(ours).sum() > 0
    np.testing.assert_allclose(ours, reference[layer], rtol=1e-4, atol=1e-5 * np.abs(reference[layer]).max())


@pytest.mark.parametrize("form", qm.FORMS)
def test_the_rounding_of_a_folded_relu_marks_activations_nonnegative(models, form):
    """The static quantizer drops the Relus and folds them into the activations' ranges (int8 with
    zero point −128, uint8 with 0): the plan reads that from the quantization parameters, so the
    rules leave out the x⁻ terms, as for the float model (dynamic quantization keeps the Relus, and
    quantizes what they make). Only the first layer reads a signed input."""
    paths, _ = models
    p = lrp_onnx.plan(paths["cnn", form])
    linear = [u for u in p.units if u.role in ("conv", "dense")]
    assert [u.x_nonnegative for u in linear] == [False, True, True, True, True], [u.name for u in linear]


def test_the_float_network_of_the_float_model_is_the_model(models, tmp_path):
    """The reference's own check: read from the unquantized file, FloatNetwork computes its logits."""
    path = qm.residual_cnn(tmp_path / "cnn.onnx")
    x = models[1]["cnn"]
    with torch.no_grad():
        ours = qm.FloatNetwork(path)(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ours, run(path, {"x": x})["logits"], rtol=1e-5, atol=1e-6)


def test_cli_converts_and_inspects_a_quantized_model(models, tmp_path):
    paths, _ = models
    result = cli("inspect", paths["cnn", "qoperator"])
    assert result.returncode == 0, result.stderr
    assert "QLinearConv" in result.stdout and "QLinearAdd" in result.stdout and "all nodes supported" in result.stdout
    out = tmp_path / "cnn-qdq.lrp.onnx"
    result = cli("convert", paths["cnn", "qdq"], "-o", out)
    assert result.returncode == 0 and out.exists(), result.stderr


def token_mlp(folder):
    """(quantized_models.TokenMLP, its TorchScript export, an input [3, 7, 64])."""
    import warnings
    torch.manual_seed(0)
    network = qm.TokenMLP().eval()
    x = torch.randn(3, 7, 64)
    path = str(folder / "mlp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return network, path, x


def test_dynamically_quantized_matmuls_keep_the_models_outputs(tmp_path):
    """quantize_dynamic on per-token dense layers: DynamicQuantizeLinear → MatMulInteger → scale,
    which ONNX Runtime's extended optimisations fuse into one kernel that rounds otherwise (on
    swin_t: 0.9 % of the logits) while nothing else reads their tensors. The relevance pass reads
    a mirror, so the explainer's outputs are the optimised model's, bit for bit."""
    import onnx
    _, path, x = token_mlp(tmp_path)
    quantized = qm.quantize(path, "dynamic", tmp_path / "mlp-dynamic.onnx", shape=(7, 64))
    assert "MatMulInteger" in {n.op_type for n in onnx.load(quantized).graph.node}
    explainer = tmp_path / "mlp-dynamic.lrp.onnx"
    onnx.save(lrp_onnx.convert(quantized, "epsilon"), explainer)
    outputs = run(str(explainer), {"x": x.numpy(), "target": np.full(3, -1)})
    np.testing.assert_array_equal(outputs["logits"], run(quantized, {"x": x.numpy()})["logits"])

    def fused_kernels(path):  # the kernels ORT runs for the model's three layers
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(path) + ".optimized.onnx"
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "DynamicQuantizeMatMul" for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused_kernels(quantized) == fused_kernels(explainer) == 3


def test_a_dynamically_quantized_bert_is_explained_at_its_dequantized_embedding(tmp_path):
    """quantize_dynamic keeps a BERT's embedding tables in int8: Gather(int8 table, ids) →
    DequantizeLinear. Quantizing only those (op_types_to_quantize=["Gather"]) leaves the float
    model with dequantized tables, which is the reference: the float model holding the tables
    dequantized in numpy. The whole dynamic form (MatMulInteger too) converts and keeps its outputs."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import quantize_dynamic
    feeds, path = exporters.padded_tokens(), tmp_path / "bert.onnx"
    exporters.export_text(exporters.hf_text_model("bert"), feeds, str(path), "torchscript")
    tables = str(tmp_path / "bert-tables.onnx")
    quantize_dynamic(str(path), tables, op_types_to_quantize=["Gather"])
    quantized = onnx.load(tables)
    values = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    reference = onnx.load(str(path))
    for t in reference.graph.initializer:
        if t.name + "_quantized" in values:  # the quantizer's names: W_quantized, W_scale, W_zero_point
            table = qm.dequantize(values[t.name + "_quantized"], values[t.name + "_scale"],
                                  values[t.name + "_zero_point"], axis=1)
            t.CopyFrom(numpy_helper.from_array(table, t.name))
    assert any(n.op_type == "Gather" and n.input[0].endswith("_quantized") for n in quantized.graph.node)
    targets = np.array([2, 1])
    ours = lrp_onnx.Explainer(tables, composite="attnlrp").run(feeds, targets)
    expected = lrp_onnx.Explainer(reference, composite="attnlrp").run(feeds, targets)
    assert np.abs(expected["relevance"]).sum() > 0
    np.testing.assert_allclose(ours["relevance"], expected["relevance"], rtol=1e-5,
                               atol=1e-6 * np.abs(expected["relevance"]).max())
    whole = qm.quantize(path, "dynamic", tmp_path / "bert-dynamic.onnx", skip_symbolic_shape=True)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in onnx.load(whole).graph.node}
    outputs = lrp_onnx.Explainer(whole, composite="attnlrp").run(feeds, -1)
    own = run(whole, feeds)["logits"]
    np.testing.assert_allclose(outputs["logits"], own, rtol=1e-5, atol=1e-6 * np.abs(own).max())
    assert np.isfinite(outputs["relevance"]).all() and (np.abs(outputs["relevance"]).sum(axis=1) > 0).all()


def test_weight_only_4bit_matmuls_are_their_dequantized_weights(tmp_path):
    """ONNX Runtime's MatMulNBits quantizer (4-bit, blocks of 16): the explainer's outputs are the
    model's, and its relevance is Zennit's on the torch network holding the dequantized weights."""
    import onnx
    from onnx import numpy_helper
    network, path, x = token_mlp(tmp_path)
    quantized = qm.nbits_quantized(path, tmp_path / "mlp-nbits.onnx")
    model = onnx.load(quantized)
    packed = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(packed) == 2
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    with torch.no_grad():
        for layer, node in zip((network.first, network.second), packed):
            layer.weight.copy_(torch.tensor(qm.nbits_dequantized(node, initializers).T))
    outputs = run(lrp_onnx.convert(quantized, "epsilon"), {"x": x.numpy(), "target": np.full(3, -1)})
    np.testing.assert_array_equal(outputs["logits"], run(quantized, {"x": x.numpy()})["logits"])
    composite = qm.LayerMapComposite(qm.layer_map_base() + [(torch.nn.Linear, qm.Epsilon(1e-6))])
    _, reference = qm.zennit_relevance(network, x.numpy(), outputs["explained_class"], composite)
    errors = np.linalg.norm((outputs[RELEVANCE] - reference).reshape(3, -1), axis=1) / \
        np.linalg.norm(reference.reshape(3, -1), axis=1)
    assert errors.max() <= 1e-5, errors
