import importlib
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from zennit_reference import export  # noqa: E402


def small_cnn(softmax=False):
    """A small CNN classifier with the layers the converter handles (BN merged into conv, max and average
    pooling, dense head), optionally ending in Softmax."""
    torch.manual_seed(3)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
              nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
              nn.Linear(8, 5)]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def extra_module(name):
    """A module of the test extra, for a test module that needs it: imported, or outside CI the test
    module is skipped. In CI (CI set) the test command has installed it, so a broken install fails
    instead of hiding as skipped tests."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="session")
def cnn_path(tmp_path_factory):
    """A small CNN exported by torch.onnx (TorchScript), symbolic batch; shared read-only by tests."""
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    return str(export(small_cnn(), torch.randn(2, 3, 12, 12), str(path), dynamo=False))


@pytest.fixture
def rng(request):
    """A generator seeded by the test's own id: its data do not depend on which tests ran before it."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def images():
    return np.random.default_rng(5).standard_normal((3, 3, 12, 12)).astype(np.float32)
