"""Train the bundled text classifier: a tiny BERT on generated two-class film reviews.

    python models/train_sentiment_bert.py

Sentences come from templates ("the plot was dull", "a great film", "the music was bad but the
acting was great", whose class is the clause after "but"), seeded, no download. A WordLevel
tokenizer ([CLS] ... [SEP]) is trained on them. Hugging Face BertForSequenceClassification (2
layers, 2 heads, width 32, eager attention) is trained on 80 % of the distinct sentences and
tested on the other 20 % (split()). Writes models/sentiment_bert.onnx (dynamo exporter, batch and length
dynamic, inputs input_ids and attention_mask), models/sentiment_tokenizer.json and
models/sentiment_labels.txt, and prints the held-out accuracy. torch, transformers and tokenizers
are needed here only, never at run time.
"""

import itertools
import os
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
LABELS = ["negative", "positive"]
WORDS = {0: ["bad", "dull", "boring", "awful", "weak", "silly"], 1: ["great", "good", "wonderful", "brilliant",
                                                                  "moving", "funny"]}
NOUNS = ["film", "movie", "plot", "acting", "music", "ending", "story", "cast"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
MAX_TOKENS = 32


def sentences():
    """Every sentence of the templates with its class: one clause, or two joined by "but" (the
    second decides)."""
    out = []
    for label, words in WORDS.items():
        for noun, word in itertools.product(NOUNS, words):
            out += [(f"the {noun} was {word}", label), (f"a {word} {noun}", label)]
    for first, second in itertools.permutations(WORDS, 2):
        for n1, w1, n2, w2 in itertools.product(NOUNS, WORDS[first], NOUNS, WORDS[second]):
            if n1 != n2:
                out.append((f"the {n1} was {w1} but the {n2} was {w2}", second))
    return out


def split():
    """A seeded 80/20 split of the distinct sentences, the mixed ones subsampled to 1,000; the
    192 one-clause sentences are repeated 5 times in training, or the model learns "but" alone."""
    rng = random.Random(SEED)
    simple = [s for s in sentences() if " but " not in s[0]]
    mixed = rng.sample([s for s in sentences() if " but " in s[0]], 1000)
    data = simple + mixed
    rng.shuffle(data)
    cut = int(0.8 * len(data))
    train = [s for s in data[:cut] for _ in range(1 if " but " in s[0] else 5)]
    rng.shuffle(train)
    return train, data[cut:]


def tokenizer():
    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([s for s, _ in sentences()], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    t.enable_padding(pad_id=0, pad_token="[PAD]")
    return t


def encode(t, data):
    encodings = t.encode_batch([s for s, _ in data])
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    return ids, mask, torch.tensor([label for _, label in data])


def main():
    torch.manual_seed(SEED)
    t = tokenizer()
    train, test = split()
    ids, mask, labels = encode(t, train)
    config = BertConfig(vocab_size=t.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_TOKENS, num_labels=2,
                        attn_implementation="eager")
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(12):
        model.train()
        for batch in torch.randperm(len(ids), generator=generator).split(64):
            optimizer.zero_grad()
            model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss.backward()
            optimizer.step()
    model.eval()
    test_ids, test_mask, test_labels = encode(t, test)
    with torch.no_grad():
        predicted = model(input_ids=test_ids, attention_mask=test_mask).logits.argmax(1)
    simple = torch.tensor([" but " not in s for s, _ in test])
    right = predicted == test_labels
    print(f"held-out accuracy: {right.float().mean():.4f} on {len(test)} sentences "
          f"({right[simple].float().mean():.4f} on the {int(simple.sum())} of one clause)")
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=MAX_TOKENS)}
    torch.onnx.export(model, (ids[:2], mask[:2]), os.path.join(HERE, "sentiment_bert.onnx"), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes={"input_ids": dims, "attention_mask": dims}, external_data=False)
    import onnxruntime
    session = onnxruntime.InferenceSession(os.path.join(HERE, "sentiment_bert.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input_ids": test_ids.numpy(), "attention_mask": test_mask.numpy()})[0]
    print(f"held-out accuracy of the ONNX file: {(exported.argmax(1) == test_labels.numpy()).mean():.4f}")
    t.no_padding()  # lrp-onnx pads a batch itself; a saved padding would pad single texts too
    t.save(os.path.join(HERE, "sentiment_tokenizer.json"))
    with open(os.path.join(HERE, "sentiment_labels.txt"), "w") as f:
        f.write("\n".join(LABELS) + "\n")


if __name__ == "__main__":
    main()
