"""Perturbation analysis (AOPC): a hand-computed value on a linear model, LRP above random on the
bundled digits classifier, and the evaluate command's files."""

import functools
import json
import os
import re

import numpy as np
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx.analysis.evaluate import RANDOM, evaluate, region_order
from test_cli import ROOT, assert_bad_input, cli
from test_stream import noisy_digits as seeded_digits

DIGITS_CNN = os.path.join(ROOT, "models", "digits_cnn.onnx")
noisy_digits = functools.partial(seeded_digits, seed=1)

WEIGHTS = [4.0, 3.0, 2.0, 1.0]


@pytest.fixture
def linear_model(tmp_path):
    """f₀(x) = 4x₁ + 3x₂ + 2x₃ + x₄ on a 1×2×2 image; class 1 is far below, so class 0 is explained."""
    w = np.array([WEIGHTS, [0.0] * 4], np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [2, 4], w.ravel()),
                               helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0, -100.0])])
    path = tmp_path / "linear.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return str(path)


@pytest.mark.parametrize("method", ["lrp:epsilon", "gradient", "sensitivity", "gradient-x-input"])
def test_aopc_by_hand(linear_model, method):
    """x = 1 everywhere, noise fixed at 0 (low = high = 0), one pixel per region: every method ranks
    the pixels by weight, so the score goes 10, 6, 3, 1, 0. The drops are 0, 4, 7, 9, 10 and
    AOPC = (0 + 4 + 7 + 9 + 10) / 5 = 6."""
    x = np.ones((2, 1, 2, 2), np.float32)
    results = evaluate(linear_model, x, [method], steps=4, region=1, low=0.0, high=0.0)
    assert [r.method for r in results] == [method, RANDOM]
    np.testing.assert_allclose(results[0].drops, [0, 4, 7, 9, 10], rtol=1e-6)
    assert results[0].aopc == pytest.approx(6.0)
    np.testing.assert_allclose(results[0].per_sample, [6.0, 6.0], rtol=1e-6)
    assert results[0].standard_error == pytest.approx(0.0, abs=1e-6)
    assert results[1].aopc <= 6.0  # no order beats the best one


def test_region_order_sums_blocks_across_channels():
    relevance = np.zeros((1, 2, 4, 4), np.float32)
    relevance[0, 0, 3, 3], relevance[0, 1, 2, 2] = 1.0, 2.0   # both in the bottom-right 2×2 block
    relevance[0, 1, 0, 3] = 2.5                               # top-right block
    assert list(region_order(relevance, 2, "nchw")[0][:2]) == [3, 1]
    nhwc = relevance.transpose(0, 2, 3, 1)
    assert list(region_order(nhwc, 2, "nhwc")[0][:2]) == [3, 1]


def test_lrp_beats_random_on_the_digits_classifier():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    _, held_out = train_test_split(x, test_size=0.25, random_state=0, stratify=digits.target)
    results = {r.method: r.aopc for r in evaluate(DIGITS_CNN, held_out[:150], ["lrp:alpha-beta"],
                                                  steps=16, seed=3)}
    assert results["lrp:alpha-beta"] > 1.5 * results[RANDOM], results


def test_evaluate_command_writes_json_and_plot(tmp_path):
    data = tmp_path / "digits.npy"
    np.save(data, np.load(os.path.join(ROOT, "models", "digits_samples.npy")))
    out = tmp_path / "eval"
    result = cli("evaluate", DIGITS_CNN, data, "-o", out, "--method", "lrp:zplus", "--method",
                 "sensitivity", "--steps", "8")
    assert result.returncode == 0, result.stderr
    assert "| lrp:zplus |" in result.stdout and "| random |" in result.stdout
    saved = json.loads((out / "evaluate.json").read_text())
    assert [m["method"] for m in saved["methods"]] == ["lrp:zplus", "sensitivity", "random"]
    assert all(len(m["mean_drop_per_step"]) == 9 for m in saved["methods"])
    assert (out / "aopc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad"
    assert_bad_input(cli("evaluate", DIGITS_CNN, data, "-o", bad, "--method", "saliency"),
                     "unknown method 'saliency'")
    assert not bad.exists()


def test_localisation_on_synthetic_relevance():
    from lrp_onnx.analysis.evaluate import GroundTruth, localisation, outside_inside_ratio
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1], maps[0, 3, 3], maps[0, 0, 3] = 3.0, 1.0, -5.0   # negative relevance does not count
    maps[1, 0, 0] = 2.0                                            # all outside
    masks = GroundTruth(boxes=[(0, 0, 2, 2), (2, 2, 4, 4)]).masks(0, 2, (4, 4))  # x0, y0, x1, y1
    inside, outside, rank, pointing = localisation(maps, masks)
    np.testing.assert_allclose(inside, [0.75, 0.0])
    np.testing.assert_allclose(outside, [0.25, 1.0])
    ratio = outside_inside_ratio(inside, outside)
    assert ratio[0] == pytest.approx(1 / 3) and ratio[1] == np.inf
    # the 4 most relevant pixels: sample 0 has (1,1) inside, (3,3) and two zero pixels outside, in
    # row-major order among ties: (0,0) and (0,1), both inside
    np.testing.assert_allclose(rank, [0.75, 0.0])
    np.testing.assert_array_equal(pointing, [1.0, 0.0])


@pytest.mark.parametrize("seed", range(3))
def test_localisation_against_a_slow_rederivation(seed):
    """Mass accuracy, rank accuracy and the pointing game, pixel by pixel in plain Python."""
    from lrp_onnx.analysis.evaluate import localisation
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(3, 6, 5)).round(1)  # rounded: ties, resolved in row-major order
    masks = rng.random((3, 6, 5)) < 0.3
    masks[:, 0, 0] = True
    inside, outside, rank, pointing = localisation(maps, masks)
    for n in range(3):
        pixels = [(maps[n][y][x], (y, x)) for y in range(6) for x in range(5)]
        positive = sum(max(v, 0) for v, _ in pixels)
        assert inside[n] == pytest.approx(sum(max(v, 0) for v, p in pixels if masks[n][p]) / positive)
        assert outside[n] == pytest.approx(1 - inside[n])
        k = int(masks[n].sum())
        ordered = sorted(range(len(pixels)), key=lambda i: (-pixels[i][0], i))
        assert rank[n] == pytest.approx(sum(masks[n][pixels[i][1]] for i in ordered[:k]) / k)
        assert pointing[n] == float(masks[n][pixels[ordered[0]][1]])


def test_evaluate_command_with_masks(tmp_path):
    """--masks reads one mask image per input; every method, random too, gets the three measures,
    and the measures follow from the relevance that explain writes."""
    from PIL import Image
    samples = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))[:3]
    data, masks = tmp_path / "images", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    for i, x in enumerate(samples):
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8)).save(data / f"d{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 2:6] = 255
        Image.fromarray(mask).save(masks / f"d{i}.png")
    out = tmp_path / "eval"
    result = cli("evaluate", DIGITS_CNN, data, "-o", out, "--method", "lrp:zplus", "--steps", "4", "--masks", masks)
    assert result.returncode == 0, result.stderr
    assert "| mass accuracy | rank accuracy | pointing game |" in result.stdout
    saved = {m["method"]: m for m in json.loads((out / "evaluate.json").read_text())["methods"]}
    assert set(saved) == {"lrp:zplus", "random"}
    for m in saved.values():
        assert 0 <= m["mass_accuracy"] <= 1 and 0 <= m["rank_accuracy"] <= 1 and m["pointing_game"] in (0, 1 / 3, 2 / 3, 1)
    # the same measure from the explainer's own relevance
    x = np.stack([np.asarray(Image.open(data / f"d{i}.png"), np.float32)[None] / 255 for i in range(3)])
    _, relevance = lrp_onnx.Explainer(DIGITS_CNN, composite="zplus").explain(x)
    positive = np.maximum(relevance[:, 0], 0)
    expected = (positive[:, :, 2:6].sum((1, 2)) / positive.sum((1, 2))).mean()
    assert saved["lrp:zplus"]["mass_accuracy"] == pytest.approx(expected, rel=1e-5)
    (masks / "d2.png").unlink()
    assert_bad_input(cli("evaluate", DIGITS_CNN, data, "-o", tmp_path / "e2", "--masks", masks), "no mask for 1 input(s)")
    assert_bad_input(cli("evaluate", DIGITS_CNN, data, "-o", tmp_path / "e3", "--masks", masks, "--boxes", masks),
                     "not both")
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


def test_evaluate_command_with_boxes(tmp_path):
    data = tmp_path / "digits.npy"
    np.save(data, np.load(os.path.join(ROOT, "models", "digits_samples.npy"))[:4])
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("input,x0,y0,x1,y1\n" + "".join(f"digits_{i},2,0,6,8\n" for i in range(4)))
    out = tmp_path / "eval"
    result = cli("evaluate", DIGITS_CNN, data, "-o", out, "--method", "lrp:zplus", "--steps", "4", "--boxes", boxes)
    assert result.returncode == 0, result.stderr
    context = json.loads((out / "evaluate.json").read_text())["context"]["lrp:zplus"]
    assert len(context["per_input"]) == 4 and context["inside"] + context["outside"] == pytest.approx(1.0)
    boxes.write_text("input,x0,y0,x1,y1\ndigits_0,2,0,6,8\n")
    assert_bad_input(cli("evaluate", DIGITS_CNN, data, "-o", tmp_path / "e2", "--boxes", boxes), "no box for 3 input(s)")
    assert not (tmp_path / "e2").exists()


def test_boxes_are_read_as_x_then_y(tmp_path):
    """Asymmetric boxes (columns x0..x1, rows y0..y1, different per input) against a numpy
    re-derivation from the explainer's own relevance map: the share of positive relevance inside.
    Reading x and y swapped, or an end inclusive, moves every figure."""
    x = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))[:3]
    data = tmp_path / "digits.npy"
    np.save(data, x)
    boxes = [(1, 0, 4, 6), (0, 3, 8, 5), (5, 1, 7, 8)]  # x0, y0, x1, y1: none equals its transpose
    (tmp_path / "boxes.csv").write_text("".join(f"digits_{i},{','.join(map(str, b))}\n" for i, b in enumerate(boxes)))
    out = tmp_path / "eval"
    result = cli("evaluate", DIGITS_CNN, data, "-o", out, "--method", "lrp:zplus", "--steps", "2",
                 "--boxes", tmp_path / "boxes.csv")
    assert result.returncode == 0, result.stderr
    per_input = json.loads((out / "evaluate.json").read_text())["context"]["lrp:zplus"]["per_input"]
    _, relevance = lrp_onnx.Explainer(DIGITS_CNN, composite="zplus").explain(x)
    positive = np.maximum(relevance.sum(1), 0)  # [N, H, W]
    expected = [positive[i, y0:y1, x0:x1].sum() / positive[i].sum() for i, (x0, y0, x1, y1) in enumerate(boxes)]
    np.testing.assert_allclose([row["inside"] for row in per_input], expected, rtol=1e-5)
    assert len(set(np.round(expected, 3))) == 3 and 0 < min(expected) and max(expected) < 1


def test_evaluate_streams_a_generator_with_a_few_chunks_alive():
    """Samples are pulled as they are scored, and each sample's noise is its own: a generator of
    400 inputs gives the batch's figures with no more than the prefetch queue's chunks alive."""
    import weakref
    x = noisy_digits(400)
    alive, most_alive = [0], [0]

    def inputs():
        for sample in x:
            sample = sample.copy()
            alive[0] += 1
            most_alive[0] = max(most_alive[0], alive[0])
            weakref.finalize(sample, lambda: alive.__setitem__(0, alive[0] - 1))
            yield sample

    settings = dict(steps=4, region=2, low=0.0, high=1.0, batch_size=40, seed=5)  # 8 samples per chunk
    streamed = evaluate(DIGITS_CNN, inputs(), ["lrp:zplus"], **settings)
    batched = evaluate(DIGITS_CNN, x, ["lrp:zplus"], **settings)
    for s, b in zip(streamed, batched):
        np.testing.assert_allclose(s.drops, b.drops, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s.classes, b.classes)
        assert s.per_sample.shape == (400,) and s.per_sample.mean() == pytest.approx(s.aopc, rel=1e-9)
    assert most_alive[0] <= (2 + 2 + 1) * 8, most_alive[0]  # queued, being stacked, being scored


def test_evaluate_figures_do_not_depend_on_the_batch_size_or_the_other_methods():
    x = noisy_digits(30)
    one = evaluate(DIGITS_CNN, x, ["sensitivity"], steps=6, seed=2, batch_size=7)
    two = evaluate(DIGITS_CNN, x, ["lrp:zplus", "sensitivity"], steps=6, seed=2, batch_size=500)
    np.testing.assert_allclose(one[0].drops, two[1].drops, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one[-1].drops, two[-1].drops, rtol=1e-5, atol=1e-6)  # random
    other_seed = evaluate(DIGITS_CNN, x, ["sensitivity"], steps=6, seed=3, batch_size=7)
    assert not np.allclose(one[-1].drops, other_seed[-1].drops)


@pytest.mark.parametrize("inputs, settings, message", [
    (lambda x: iter(x), {}, "give low and high when the inputs are a one-pass iterator"),
    (lambda x: [x[0], x[1, :, :4]], {"low": 0.0, "high": 1.0}, "input 1 is [1, 4, 8], the first is [1, 8, 8]"),
    (lambda x: [], {"low": 0.0, "high": 1.0}, "at least one input"),
    (lambda x: x, {"seed": -1}, "the seed must be 0 or more"),
])
def test_evaluate_refuses_what_it_cannot_stream(inputs, settings, message):
    from lrp_onnx.errors import InputError
    with pytest.raises(InputError, match=re.escape(message)):
        evaluate(DIGITS_CNN, inputs(noisy_digits(2)), ["lrp:zplus"], steps=2, **settings)


def test_the_paired_difference_is_the_difference_of_the_aopcs():
    from lrp_onnx.analysis.evaluate import paired_difference
    lrp, random = evaluate(DIGITS_CNN, noisy_digits(40), ["lrp:alpha-beta"], steps=6, seed=4)
    gain, error = paired_difference(lrp, random)
    assert gain == pytest.approx(lrp.aopc - random.aopc, rel=1e-9)
    d = lrp.per_sample - random.per_sample
    assert error == pytest.approx(np.sqrt(np.sum((d - d.mean()) ** 2) / (len(d) - 1) / len(d)), rel=1e-9) and error > 0
