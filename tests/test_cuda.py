"""CUDA agrees with CPU (runs only where onnxruntime has the CUDA provider; CI has no GPU)."""

import os

import numpy as np
import onnxruntime as ort
import pytest

import lrp_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="this onnxruntime has no CUDA provider")


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat", "epsilon-gamma-box"])
def test_cuda_relevance_matches_cpu(composite):
    model = lrp_onnx.convert(os.path.join(ROOT, "models", "digits_cnn.onnx"), composite)
    x = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))
    _, cpu = lrp_onnx.Explainer(model, providers="cpu").explain(x)
    _, cuda = lrp_onnx.Explainer(model, providers="cuda").explain(x)
    assert np.linalg.norm(cuda - cpu) <= 1e-4 * np.linalg.norm(cpu)
