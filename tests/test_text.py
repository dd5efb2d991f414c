"""Text classifiers: Hugging Face models that take token ids, explained at their word embeddings
(one relevance per token), through the Python API and ``explain --text``. Parity with LXT on BERT
is in test_lxt.py."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import exporters
import lrp_onnx
from test_cli import assert_bad_input, cli

SENTENCES = ["the film was great and the actors were good", "a dull plot and bad acting",
             "great music but a bad ending", "the actors were dull"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A WordLevel vocabulary trained on four sentences (no download), with [CLS] ... [SEP]; its
    ids stay under the tiny models' 50."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    exporters.hf_text_classifier("bert", str(path))
    return path


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", sorted(exporters.HF_TEXT))
def test_padding_changes_no_token_relevance(tmp_path, name, exporter):
    """Padded tokens get exactly 0, and the padded sample's real tokens get what they get alone."""
    path = str(tmp_path / "model.onnx")
    feeds = exporters.hf_text_classifier(name, path, exporter)
    explainer = lrp_onnx.Explainer(path, composite="attnlrp")
    relevance = explainer.run(feeds, [0, 1])["relevance"]
    assert relevance.shape == feeds["input_ids"].shape and np.isfinite(relevance).all()
    assert np.all(relevance[1, 4:] == 0)
    alone = explainer.run({k: v[1:, :4] for k, v in feeds.items()}, [1])["relevance"]
    np.testing.assert_allclose(relevance[1, :4], alone[0], rtol=1e-4, atol=1e-6 * np.abs(alone).max())


def test_gradient_x_input_on_tokens_is_autograd_at_the_embeddings(tmp_path):
    model, feeds = exporters.hf_text_model("bert"), exporters.padded_tokens()
    path = str(tmp_path / "bert.onnx")
    exporters.export_text(model, feeds, path, "dynamo")
    targets = np.array([1, 2])
    ours = lrp_onnx.Explainer(path, method="gradient-x-input").run(feeds, targets)["relevance"]
    e = model.bert.embeddings.word_embeddings(torch.tensor(feeds["input_ids"])).detach().requires_grad_()
    logits = model(inputs_embeds=e, attention_mask=torch.tensor(feeds["attention_mask"])).logits
    logits[torch.arange(2), torch.tensor(targets)].sum().backward()
    np.testing.assert_allclose(ours, (e * e.grad).sum(-1).detach().numpy(), rtol=1e-4, atol=1e-7)


def test_the_full_embedding_relevance_is_a_layer(bert_path):
    p = lrp_onnx.plan(str(bert_path))
    assert p.explained_input.name == "input_ids" and p.explained is not p.explained_input
    proto = lrp_onnx.convert(str(bert_path), "attnlrp", layers=[p.explained.name])
    explainer = lrp_onnx.Explainer(proto)
    assert explainer.explains_tokens and explainer.metadata["explained_tensor"] == p.explained.name
    run = explainer.run(exporters.padded_tokens(), -1)
    full = run[lrp_onnx.emit.LAYER_PREFIX + p.explained.name]
    assert full.shape == (2, 7, 16)
    np.testing.assert_allclose(full.sum(-1), run["relevance"], rtol=1e-5, atol=1e-9)


def test_explain_text_tokenizes_pads_and_matches_each_text_alone(bert_path, tokenizer_path):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    explainer = lrp_onnx.Explainer(str(bert_path), composite="attnlrp")
    texts = ["the film was great", "a dull plot and bad acting"]
    together = explainer.explain_text(texts, str(tokenizer_path), target=1)
    for text, e in zip(texts, together):
        encoding = tokenizer.encode(text)
        assert e.tokens == encoding.tokens and e.target == 1
        feeds = {"input_ids": np.array([encoding.ids]), "attention_mask": np.ones((1, len(encoding.ids)), np.int64)}
        alone = explainer.run(feeds, 1)["relevance"][0]
        np.testing.assert_allclose(e.relevance, alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())
    top = explainer.explain_text(texts[0], tokenizer, top_k=3)
    assert sorted(e.target for e in top) == [0, 1, 2]


def test_cli_explain_text_prints_tokens_and_writes_html_and_json(bert_path, tokenizer_path, tmp_path):
    out = tmp_path / "out"
    result = cli("explain", bert_path, "--text", "the actors were good", "--text", "bad ending",
                 "--tokenizer", tokenizer_path, "--composite", "attnlrp", "--target", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "actors" in result.stdout and "[SEP]" in result.stdout
    rows = json.loads((out / "text.json").read_text())
    expected = lrp_onnx.Explainer(str(bert_path), composite="attnlrp").explain_text(
        ["the actors were good", "bad ending"], str(tokenizer_path), target=2)
    for row, e in zip(rows, expected):
        assert [t["token"] for t in row["tokens"]] == e.tokens and row["target"] == 2
        np.testing.assert_allclose([t["relevance"] for t in row["tokens"]], e.relevance, rtol=1e-6)
    page = (out / "text.html").read_text()
    assert page.count("<span") == 6 + 4 and "actors" in page


def test_text_requests_that_cannot_work_are_one_line_errors(bert_path, tokenizer_path, cnn_path, tmp_path):
    assert_bad_input(cli("explain", bert_path, "--text", "good"), "--text needs --tokenizer")
    assert_bad_input(cli("explain", bert_path), "nothing to explain")
    assert_bad_input(cli("explain", cnn_path, "--text", "good", "--tokenizer", tokenizer_path), "not token ids")
    assert_bad_input(cli("explain", bert_path, "--text", "good", "--tokenizer", cnn_path), "cannot read the tokenizer")
    assert not (tmp_path / "lrp-out").exists()


def test_integer_input_without_an_embedding_is_refused_by_name(tmp_path):
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("MatMul", ["f", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [3, 2], np.ones(6))])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(lrp_onnx.UnsupportedModelError, match="no float input, nor token ids"):
        lrp_onnx.convert(str(path))
    with pytest.raises(lrp_onnx.UnsupportedModelError, match="'ids' is not a float tensor, nor token ids"):
        lrp_onnx.convert(str(path), input_name="ids")
