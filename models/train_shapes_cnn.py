"""Train the synthetic-shapes CNNs of issue 17: one on clean data and one whose training data carry
the Clever-Hans watermark (models/synthetic_shapes.py), with the same images, seed and schedule.

    python models/train_shapes_cnn.py

Writes models/shapes_cnn.onnx and models/shapes_cnn_shortcut.onnx (TorchScript exporter, symbolic
batch, input [N, 3, 64, 64] in 0..1), models/shapes_labels.txt and models/shapes_accuracy.json:
each model's accuracy on the clean test split and on the swapped one (the watermark on every
class but the shortcut class). Settings are fixed here, before any explanation is evaluated.
models/train_shapes_vit.py trains the transformers the same way. torch is needed here only.
"""

import json
import os
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synthetic_shapes as shapes  # noqa: E402

SEED = 0
TRAIN_SEED, TEST_SEED = 100, 200
TRAIN_COUNT, TEST_COUNT = 6000, 1000
EPOCHS = 8


def as_input(images):
    """uint8 [N, 64, 64, 3] -> float32 [N, 3, 64, 64] in 0..1, as the ONNX models take them."""
    return (images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()


def network():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, len(shapes.CLASSES)))


def train(images, labels):
    torch.manual_seed(SEED)
    model = network()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(as_input(images)), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model, split):
    with torch.no_grad():
        predicted = model(torch.from_numpy(as_input(split.images))).argmax(1).numpy()
    return float((predicted == split.labels).mean())


def train_both(prefix, train_fn, dynamo=False):
    """Train ``prefix`` on clean data and ``prefix``_shortcut on watermarked data (same images, seed
    and schedule), export both, and record their test accuracies in shapes_accuracy.json (keeping
    the other models' entries)."""
    test = {"clean": shapes.generate(TEST_COUNT, TEST_SEED),
            "swapped": shapes.generate(TEST_COUNT, TEST_SEED, watermark="swapped")}
    path = os.path.join(HERE, "shapes_accuracy.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    for name, watermark in ((prefix, None), (f"{prefix}_shortcut", "train")):
        data = shapes.generate(TRAIN_COUNT, TRAIN_SEED, watermark=watermark)
        model = train_fn(data.images, data.labels)
        report[name] = {split: accuracy(model, test[split]) for split in test}
        print(f"{name}: " + ", ".join(f"{split} test accuracy {v:.4f}" for split, v in report[name].items()))
        example = (torch.from_numpy(as_input(test["clean"].images[:2])),)
        if dynamo:
            torch.onnx.export(model, example, os.path.join(HERE, f"{name}.onnx"), dynamo=True, input_names=["image"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              external_data=False)
        else:
            torch.onnx.export(model, example, os.path.join(HERE, f"{name}.onnx"), dynamo=False, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    report["data"] = {"train": [TRAIN_COUNT, TRAIN_SEED], "test": [TEST_COUNT, TEST_SEED],
                      "shortcut_class": shapes.CLASSES[shapes.SHORTCUT_CLASS], "shortcut_rate": shapes.SHORTCUT_RATE}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(HERE, "shapes_labels.txt"), "w") as f:
        f.write("\n".join(shapes.CLASSES) + "\n")


def main():
    train_both("shapes_cnn", train)


if __name__ == "__main__":
    main()
