"""Train the bundled vision transformer: a small ViT on the same digits split as the bundled CNN.

    python models/train_digits_vit.py

torchvision's VisionTransformer (2 layers, 4 heads, width 48, 2×2 patches: 16 tokens and a class
token), its patch projection taking the one grey channel. Trained with ±1-pixel random shifts and
label smoothing on the seeded 75/25 split of train_digits_cnn.py; writes models/digits_vit.onnx
(dynamo exporter, symbolic batch) and prints the held-out accuracy. torch, torchvision and
scikit-learn are needed here only, never at run time.
"""

import os

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from train_digits_cnn import HERE, SEED, data

WIDTH, PATCH, EPOCHS, BATCH = 48, 2, 200, 64


def network():
    model = VisionTransformer(image_size=8, patch_size=PATCH, num_layers=2, num_heads=4, hidden_dim=WIDTH,
                              mlp_dim=2 * WIDTH, num_classes=10)
    model.conv_proj = nn.Conv2d(1, WIDTH, PATCH, PATCH)  # grey digits: one input channel
    return model


def shifted(x, generator):
    """The batch moved by up to one pixel each way, zeros coming in: the digits' strokes are not
    centred alike, and 1,347 images are few for a transformer."""
    i, j = torch.randint(0, 3, (2,), generator=generator)
    return nn.functional.pad(x, (1, 1, 1, 1))[:, :, i:i + 8, j:j + 8]


def fit(model, x, y, epochs, batch_size, lr, augment=None):
    """AdamW with a one-cycle schedule and label smoothing, seeded: how the bundled ViTs train.
    ``augment(batch, generator)`` changes each batch (None: no augmentation)."""
    steps = epochs * -(-len(x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            inputs = x[batch] if augment is None else augment(x[batch], generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), y[batch], label_smoothing=0.1).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def main():
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = data()
    model = fit(network(), torch.from_numpy(x_train), torch.from_numpy(y_train), EPOCHS, BATCH, 2e-3, shifted)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} images")
    torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), os.path.join(HERE, "digits_vit.onnx"), dynamo=True,
                      input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False)


if __name__ == "__main__":
    main()
