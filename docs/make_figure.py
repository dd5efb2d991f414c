"""Make docs/digits_heatmaps.png, the README's and the docs' picture: the bundled digits and their LRP heatmaps.

    python docs/make_figure.py

Top row: the ten sample digits (models/samples). Rows below: relevance for the predicted class under
alpha-beta (α=2, β=1) and epsilon-plus-flat, bwr colormap (red positive, blue negative, white zero).
"""

import os

from PIL import Image, ImageDraw

import lrp_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "models")
ZOOM, GAP, LABEL = 12, 6, 130


def main():
    rows = [("input", None), ("alpha-beta", "alpha-beta"), ("epsilon-plus-flat", "epsilon-plus-flat")]
    cell = 8 * ZOOM + GAP
    figure = Image.new("RGB", (LABEL + 10 * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(figure)
    for row, (title, composite) in enumerate(rows):
        draw.text((4, row * cell + 4 * ZOOM), title, fill="black")
        explainer = lrp_onnx.Explainer(os.path.join(MODELS, "digits_cnn.onnx"),
                                       composite=composite or lrp_onnx.DEFAULT_COMPOSITE)
        explanations = lrp_onnx.explain_images(explainer, os.path.join(MODELS, "samples"))
        for col, e in enumerate(explanations):
            if composite is None:
                tile = Image.fromarray((e.sample.image * 255).astype("uint8")).convert("RGB")
            else:
                tile = lrp_onnx.heatmap(e.relevance, cmap="bwr")
            figure.paste(tile.resize((8 * ZOOM, 8 * ZOOM), Image.NEAREST), (LABEL + col * cell, row * cell))
    figure.save(os.path.join(HERE, "digits_heatmaps.png"))


if __name__ == "__main__":
    main()
