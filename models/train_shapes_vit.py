"""Train the synthetic-shapes vision transformers of issue 17, clean and with the Clever-Hans
watermark, on the data of train_shapes_cnn.py.

    python models/train_shapes_vit.py

torchvision's VisionTransformer (3 layers, 4 heads, width 64, 8×8 patches: 64 tokens and a class
token). Writes models/shapes_vit.onnx and models/shapes_vit_shortcut.onnx (dynamo exporter,
symbolic batch) and adds their accuracies to models/shapes_accuracy.json. torch and torchvision
are needed here only.
"""

import torch
from torchvision.models.vision_transformer import VisionTransformer

from train_digits_vit import fit
from train_shapes_cnn import SEED, as_input, shapes, train_both

WIDTH, PATCH, EPOCHS, BATCH = 64, 8, 80, 64


def network():
    return VisionTransformer(image_size=shapes.SIZE, patch_size=PATCH, num_layers=3, num_heads=4, hidden_dim=WIDTH,
                             mlp_dim=2 * WIDTH, num_classes=len(shapes.CLASSES))


def train(images, labels):
    torch.manual_seed(SEED)
    return fit(network(), torch.from_numpy(as_input(images)), torch.from_numpy(labels), EPOCHS, BATCH, 1e-3)


if __name__ == "__main__":
    train_both("shapes_vit", train, dynamo=True)
