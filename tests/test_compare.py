"""Comparing two models by their explanations: a model against itself, and NCHW against NHWC
copies of the same weights."""

import json

import numpy as np
import pytest
from PIL import Image
import torch
from torch import nn

from conftest import small_cnn
from lrp_onnx.analysis.compare import compare, gini, pearson, spearman
from lrp_onnx.errors import InputError
from lrp_onnx.io.inputs import InputReader, InputSpec, Preprocess, read_inputs
from test_cli import cli
from zennit_reference import export


class ChannelsLast(nn.Module):
    """The same network taking NHWC input."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twins")
    net = small_cnn()
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    nchw = export(net, x, str(folder / "nchw.onnx"), dynamo=False)
    nhwc = export(ChannelsLast(net).eval(), x.permute(0, 2, 3, 1), str(folder / "nhwc.onnx"), dynamo=False)
    return nchw, nhwc, x.numpy()


def test_a_model_against_itself(twins):
    nchw, _, x = twins
    result = compare(nchw, nchw, x, "nchw", "nchw", aopc_steps=8)
    np.testing.assert_allclose(result.pearson, 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.spearman, 1.0, rtol=1e-6)
    np.testing.assert_array_equal(*result.gini)
    assert result.summary()["prediction_agreement"] == 1.0
    assert result.aopc[0] == result.aopc[1]


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat"])
def test_nchw_against_nhwc_copies(twins, composite):
    nchw, nhwc, x = twins
    result = compare(nchw, nhwc, x, "nchw", "nhwc", composite)
    a, b = (np.stack(maps) for maps in list(zip(*result.examples))[1:])
    assert len(a) == len(x)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    assert result.pearson.min() > 0.9999
    np.testing.assert_array_equal(*result.predictions)


def test_streamed_in_batches_as_one_batch(tmp_path, twins):
    """Inputs read from a file two at a time give every measure the whole batch gives; only the
    first ``shown`` maps are kept."""
    nchw, nhwc, x = twins
    whole = compare(nchw, nhwc, x, "nchw", "nhwc", aopc_steps=4)
    np.save(tmp_path / "x.npy", x)
    pending = list(read_inputs([str(tmp_path / "x.npy")], InputSpec([None, 3, 12, 12]), Preprocess()))
    streamed = compare(nchw, nhwc, pending, "nchw", "nhwc", aopc_steps=4, batch_size=2, shown=3,
                       reader=InputReader(InputSpec([None, 3, 12, 12]), Preprocess()))
    np.testing.assert_allclose(streamed.pearson, whole.pearson, rtol=1e-6)
    np.testing.assert_allclose(streamed.spearman, whole.spearman, rtol=1e-6)
    for pair in ("gini", "png_bytes", "predictions"):
        for s, w in zip(getattr(streamed, pair), getattr(whole, pair)):
            np.testing.assert_allclose(s, w, rtol=1e-6)
    np.testing.assert_allclose(streamed.aopc, whole.aopc, rtol=1e-5)
    assert [e[0].name for e in streamed.examples] == streamed.names[:3] and len(streamed.names) == len(x)
    np.testing.assert_allclose(streamed.examples[2][1], whole.examples[2][1], rtol=1e-5, atol=1e-7)


def test_a_generator_is_compared_with_a_few_batches_alive(twins):
    """Inputs are pulled as they are explained: 200 of them, 8 at a time, keep no more than the
    prefetch queue's batches and the grid's examples alive."""
    import weakref
    nchw, nhwc, x = twins
    alive, most_alive = [0], [0]

    def inputs():
        for index in range(200):
            sample = x[index % len(x)].copy()
            alive[0] += 1
            most_alive[0] = max(most_alive[0], alive[0])
            weakref.finalize(sample, lambda: alive.__setitem__(0, alive[0] - 1))
            yield sample

    result = compare(nchw, nhwc, inputs(), "nchw", "nhwc", batch_size=8, shown=2)
    assert len(result.names) == len(result.pearson) == 200 and len(result.examples) == 2
    assert result.pearson.min() > 0.9999
    # queued, being stacked, being explained, and the one before it until its results are recorded (under
    # CPU load the reader runs ahead: 36 were seen against 34 without that last batch); shown
    assert most_alive[0] <= (2 + 1 + 1 + 1) * 8 + 2, most_alive[0]


def test_refusals(twins):
    nchw, nhwc, x = twins
    with pytest.raises(InputError, match="needs at least one input"):
        compare(nchw, nhwc, x[:0], "nchw", "nhwc")
    with pytest.raises(InputError, match="one-pass iterator"):
        compare(nchw, nhwc, iter(list(x)), "nchw", "nhwc", aopc_steps=4)
    with pytest.raises(InputError, match="compare needs inputs of one shape: input 1"):
        compare(nchw, nhwc, [x[0], x[1, :, :8, :8]], "nchw", "nhwc")


def test_measures_against_known_values():
    one_hot, flat = np.zeros((1, 100)), np.ones((1, 100))
    one_hot[0, 37] = 5.0
    np.testing.assert_allclose(gini(np.concatenate([one_hot, flat])), [1 - 1 / 100, 0.0], atol=1e-12)
    from scipy.stats import pearsonr, spearmanr
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, (2, 40)).astype(float)  # ties on purpose
    assert spearman(a[None], b[None])[0] == pytest.approx(spearmanr(a, b).statistic)
    assert pearson(a[None], b[None])[0] == pytest.approx(pearsonr(a, b).statistic)


def test_compare_command(tmp_path, twins):
    nchw, nhwc, x = twins
    data = tmp_path / "x.npy"
    np.save(data, x[:3])
    out = tmp_path / "cmp"
    result = cli("compare", nchw, nhwc, data, "-o", out, "--aopc-steps", "0", "--batch-size", "2", "--grid", "2")
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "compare.json").read_text())
    assert saved["mean"]["prediction_agreement"] == 1.0 and saved["mean"]["pearson"] > 0.9999
    assert [row["input"] for row in saved["inputs"]] == ["x_0", "x_1", "x_2"]
    grid = Image.open(out / "compare.png")
    assert grid.size == (3 * 96, 2 * 96)  # two rows, as --grid asked
