"""ONNX files from real exporters, for the coverage table (benchmarks/coverage.py) and the tests.

Each builder writes a model to ``path`` and returns the feeds to explain it on. Random init
everywhere: coverage is about graph idioms, not accuracy.
"""

import glob
import os
import warnings

import numpy as np
import onnx

# torchvision classifiers that torch.onnx exports, and the smallest input each takes here
TORCHVISION = {
    # their fixed 6×6 / 7×7 adaptive pooling exports only from inputs it divides
    **{name: 224 for name in ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
                              "vgg19_bn")},
    **{name: 64 for name in (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
        "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "densenet121", "densenet161", "densenet169",
        "densenet201", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
        "efficientnet_v2_s", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1",
        "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf", "regnet_y_16gf",
        "regnet_y_32gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
        "regnet_x_16gf", "regnet_x_32gf", "convnext_tiny")},
    "inception_v3": 96,  # its stem needs at least 75 pixels
}
# Not attempted: converting a model past 2 GB holds about six copies of its weights at once
# (RELIABILITY.md, "A model past 2 GB"): 16 GB here, next to torch's own copy, on a 24 GB machine.
TOO_LARGE = {"regnet_y_128gf": "not attempted: 2.6 GB of weights, which the torch model, its export and Zennit's "
                               "reference each hold again; converting alone peaks near 1.0× the weights (RELIABILITY.md)"}


def torchvision_classifier(name, path, exporter="torchscript", batch=2, classes=10, seed=0):
    """A random-init torchvision classifier exported with a dynamic batch axis."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, name)(num_classes=classes, **extra).eval()
    size = TORCHVISION[name]
    x = torch.randn(batch, 3, size, size)
    export_torch(model, x, path, exporter)
    return {"x": x.numpy()}


def export_torch(model, x, path, exporter, opset=None):
    """``exporter`` "dynamo" or "torchscript" (at ``opset``, default the exporter's own)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                              **({"opset_version": opset} if opset else {}))


LIGHT_ZOO = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
             "squeezenet", "vgg19", "zfnet512")
# The backend suite's own tolerances (onnx/backend/test/case/model/__init__.py): rtol, atol
LIGHT_ZOO_TOLERANCE = {"densenet121": (2e-3, 1e-7)}


def light_zoo_path(name):
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")


def light_zoo(name):
    """(path, feeds, expected output) of a model-zoo "light" model, fed the suite's own input: the
    ramp arange(n)/n in the input's shape (onnx.backend.test.runner.generate_dummy_data)."""
    path = light_zoo_path(name)
    model = onnx.load(path, load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    data = next(i for i in model.graph.input if i.name not in weights)
    shape = [d.dim_value or 1 for d in data.type.tensor_type.shape.dim]
    x = (np.arange(np.prod(shape)).reshape(shape) / np.prod(shape)).astype(np.float32)
    expected = onnx.numpy_helper.to_array(onnx.load_tensor(path[:-len(".onnx")] + "_output_0.pb"))
    return path, {data.name: x}, expected


def light_zoo_available():
    return sorted(os.path.basename(p)[len("light_"):-len(".onnx")]
                  for p in glob.glob(os.path.dirname(light_zoo_path("x")) + "/light_*.onnx"))


KERAS_MODELS = ("cnn-gap", "cnn-flatten", "mlp", "many-layers")  # built in tests/test_keras.py

SKLEARN = ("mlp-relu", "mlp-tanh", "mlp-logistic", "logistic-regression")


def sklearn_classifier(name, path, zipmap=True, binary=False):
    """An MLPClassifier or LogisticRegression on iris (3 classes) or a two-class problem, by skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer, load_iris
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    x, y = (load_breast_cancer if binary else load_iris)(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    if name == "logistic-regression":
        model = LogisticRegression(max_iter=1000)
    else:
        model = MLPClassifier((16,), activation=name.split("-")[1], max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    options = None if zipmap else {id(model): {"zipmap": False}}
    onnx.save(to_onnx(model, x[:1], options=options, target_opset=17), path)
    return {"X": x[:7]}


def split_gemm_past_2gb(folder, features=280_000, classes=1000):
    """x [N, 2F] → Split → two Gemm(transB) with weights [C, F] of 1.12 GB each → Add: 2.24 GB of
    weights, past protobuf's 2 GiB limit, in one external file written block by block. Writes
    FOLDER/big.onnx and FOLDER/weights.bin; returns the weights, memory-mapped, as [2, C, F]."""
    from onnx import TensorProto, helper
    block = np.random.default_rng(4).standard_normal((classes, 1000)).astype(np.float32) / 30
    with open(os.path.join(folder, "weights.bin"), "wb") as f:
        for _ in range(2 * features // 1000):
            block.tofile(f)
    size = classes * features * 4
    weights = []
    for i in range(2):
        w = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[classes, features],
                        data_location=TensorProto.EXTERNAL)
        for key, value in {"location": "weights.bin", "offset": str(i * size), "length": str(size)}.items():
            w.external_data.add(key=key, value=value)
        weights.append(w)
    nodes = [helper.make_node("Split", ["x", "halves"], ["x0", "x1"], name="split", axis=1),
             helper.make_node("Gemm", ["x0", "w0"], ["z0"], name="fc0", transB=1),
             helper.make_node("Gemm", ["x1", "w1"], ["z1"], name="fc1", transB=1),
             helper.make_node("Add", ["z0", "z1"], ["logits"], name="sum")]
    graph = helper.make_graph(
        nodes, "split_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2 * features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        weights + [helper.make_tensor("halves", TensorProto.INT64, [2], [features, features])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.path.join(folder, "big.onnx"))
    return np.memmap(os.path.join(folder, "weights.bin"), np.float32, "r").reshape(2, classes, features)


# Hugging Face text classifiers with tiny configs (eager attention: an explicit Softmax to explain)
TINY_TEXT = {"vocab_size": 50, "num_labels": 3, "max_position_embeddings": 16, "attn_implementation": "eager"}
HF_TEXT = {
    "bert": ("BertConfig", "BertForSequenceClassification",
             {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32}),
    # RoBERTa numbers positions from padding_idx + 1: two more positions than tokens
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                 "max_position_embeddings": 18}),
}


def hf_text_config(name):
    return {**TINY_TEXT, **HF_TEXT[name][2]}


def hf_text_model(name, seed=0):
    import torch
    import transformers
    config_class, model_class, _ = HF_TEXT[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**hf_text_config(name))).eval()


def padded_tokens(batch=2, length=7, seed=3):
    """Token ids in 3..49 (0-2 are pad and specials in these vocabularies); every sample after the
    first is padded (id 1, mask 0) from position 4 on."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 50, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1:, 4:] = 0
    ids[1:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def export_text(model, feeds, path, exporter, opset=17):
    """Export ``model`` taking ``feeds`` (input_ids, attention_mask), batch and length dynamic;
    ``opset``: TorchScript's."""
    import torch
    names = list(feeds)
    args = tuple(torch.tensor(feeds[k]) for k in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            length = model.config.max_position_embeddings - (2 if model.config.model_type == "roberta" else 0)
            dims = {0: torch.export.Dim("N"), 1: torch.export.Dim("T", max=length)}
            torch.onnx.export(model, args, path, dynamo=True, input_names=names, output_names=["logits"],
                              dynamic_shapes={k: dims for k in names})
        else:
            torch.onnx.export(model, args, path, dynamo=False, opset_version=opset, input_names=names,
                              output_names=["logits"], dynamic_axes={k: {0: "N", 1: "T"} for k in names})


def hf_text_classifier(name, path, exporter="dynamo"):
    feeds = padded_tokens()
    export_text(hf_text_model(name), feeds, path, exporter)
    return feeds


# Vision transformers: torchvision's (random init, the head re-initialised: torchvision zero-
# initialises it, which makes every logit 0), Hugging Face's ViT and timm's DeiT, at these sizes
SMALL_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
VISION_TRANSFORMERS = {"vit (small)": 32, "vit_b_16": 224, "swin_t": 224, "maxvit_t": 224, "hf ViT (tiny)": 32,
                       "timm deit_tiny_patch16_224": 224}


def vision_transformer(name, path, exporter, batch=2, classes=10, seed=0):
    import torch
    import torchvision
    torch.manual_seed(seed)
    if name == "vit (small)":
        model = torchvision.models.VisionTransformer(num_classes=classes, **SMALL_VIT)
    elif name == "hf ViT (tiny)":
        import transformers
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=classes, attn_implementation="eager"))
    elif name.startswith("timm "):
        import timm
        model = timm.create_model(name.split()[1], pretrained=False, num_classes=classes)
    else:
        model = getattr(torchvision.models, name)(num_classes=classes)
    model.eval()
    for module in model.modules():  # zero-initialised heads (torchvision ViT) make every logit 0
        if isinstance(module, torch.nn.Linear) and not module.weight.detach().any():
            torch.nn.init.normal_(module.weight, std=0.02)
    size = VISION_TRANSFORMERS[name]
    x = torch.randn(batch, 3, size, size)
    wrapped = _logits_only(model) if name.startswith("hf ") else model
    export_torch(wrapped, x, path, exporter)
    return {"x": x.numpy()}


def _logits_only(model):
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(pixel_values=x).logits
    return Logits().eval()
