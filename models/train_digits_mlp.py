"""Train the second bundled classifier: a scikit-learn MLP on the same digits, exported with skl2onnx.

    python models/train_digits_mlp.py

Same data and seeded split as train_digits_cnn.py, but flattened: 64 features in [0, 1]. Writes
models/digits_mlp.onnx (float input "features" [N, 64]; outputs "label" and "probabilities", no
ZipMap) and prints the held-out accuracy. scikit-learn and skl2onnx are needed here only.
"""

import os

from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.neural_network import MLPClassifier

from train_digits_cnn import HERE, SEED, data


def main():
    x_train, x_test, y_train, y_test = (a.reshape(len(a), -1) if a.ndim > 1 else a for a in data())
    model = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=600, random_state=SEED).fit(x_train, y_train)
    print(f"held-out accuracy: {model.score(x_test, y_test):.4f} on {len(y_test)} images")
    onx = to_onnx(model, initial_types=[("features", FloatTensorType([None, 64]))], options={"zipmap": False},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    with open(os.path.join(HERE, "digits_mlp.onnx"), "wb") as f:
        f.write(onx.SerializeToString())


if __name__ == "__main__":
    main()
