"""Train the bundled example classifier: a small CNN on scikit-learn's handwritten digits.

    python models/train_digits_cnn.py                  # train, export, write labels and samples
    python models/train_digits_cnn.py --samples-only   # rewrite the samples only

8×8 grey images (values 0..16, scaled to 0..1), 10 classes, a seeded 75/25 stratified split. Writes
models/digits_cnn.onnx (TorchScript exporter, symbolic batch), models/digits_labels.txt and a few
held-out samples under models/samples/, and prints the held-out accuracy. torch and scikit-learn are
needed here only, never at run time.
"""

import os

import sys

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0


def data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    return train_test_split(x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target)


def network():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10))


def main():
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = data()
    model = network()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_t, y_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(40):
        model.train()
        for batch in torch.randperm(len(x_t), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_t[batch]), y_t[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} images")
    torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), os.path.join(HERE, "digits_cnn.onnx"), dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    with open(os.path.join(HERE, "digits_labels.txt"), "w") as f:
        f.write("\n".join(str(d) for d in range(10)) + "\n")
    save_samples(x_test, y_test)


def save_samples(x_test, y_test):
    """The first held-out image of each digit: samples/digit<d>.png (8×8 grey, 0..255), and all ten,
    model-ready and in class order 0..9, in digits_samples.npy ([10, 1, 8, 8], float32 in [0, 1])."""
    folder = os.path.join(HERE, "samples")
    os.makedirs(folder, exist_ok=True)
    picks = [int(np.flatnonzero(y_test == d)[0]) for d in range(10)]
    for d, i in enumerate(picks):
        Image.fromarray(np.round(x_test[i, 0] * 255).astype(np.uint8), "L").save(os.path.join(folder, f"digit{d}.png"))
    np.save(os.path.join(HERE, "digits_samples.npy"), x_test[picks])


if __name__ == "__main__":
    if sys.argv[1:] == ["--samples-only"]:
        save_samples(*data()[1::2])
    else:
        main()
