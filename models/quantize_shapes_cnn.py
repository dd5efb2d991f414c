"""The deployed forms of the synthetic-shapes CNNs: int8 (ONNX Runtime's static QDQ quantization,
per channel, calibrated on the shapes training split) and float16 (ONNX Runtime's float16
converter, float32 inputs and outputs kept).

    python models/quantize_shapes_cnn.py

Reads models/shapes_cnn.onnx and models/shapes_cnn_shortcut.onnx (models/train_shapes_cnn.py) and
writes, beside each, NAME.int8.onnx and NAME.fp16.onnx, and each form's accuracy on the clean and
swapped test splits into models/shapes_accuracy.json (as "NAME.int8", "NAME.fp16"). Settings are
fixed here, before any explanation is evaluated. Needs onnxruntime only (and this folder).
"""

import json
import os
import sys
import tempfile

import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synthetic_shapes as shapes  # noqa: E402
from train_shapes_cnn import TEST_COUNT, TEST_SEED, TRAIN_SEED, as_input  # noqa: E402

MODELS = ("shapes_cnn", "shapes_cnn_shortcut")
CALIBRATION_COUNT = 256  # images of the training split, the quantizer's calibration data


class Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over the first training images, 32 at a time."""

    def __init__(self, images):
        self.batches = iter([{"image": as_input(images[k:k + 32])} for k in range(0, len(images), 32)])

    def get_next(self):
        return next(self.batches, None)


def int8(source, target, calibration_images):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as folder:
        prepared = os.path.join(folder, "prepared.onnx")
        quant_pre_process(source, prepared)
        quantize_static(prepared, target, Calibration(calibration_images), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def fp16(source, target, calibration_images):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(source), keep_io_types=True), target)


def accuracy(path, split):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": as_input(split.images)})[0]
    return float((logits.argmax(1) == split.labels).mean())


def main():
    train = shapes.generate(CALIBRATION_COUNT, TRAIN_SEED)
    test = {"clean": shapes.generate(TEST_COUNT, TEST_SEED),
            "swapped": shapes.generate(TEST_COUNT, TEST_SEED, watermark="swapped")}
    path = os.path.join(HERE, "shapes_accuracy.json")
    report = json.load(open(path))
    for name in MODELS:
        for form, make in (("int8", int8), ("fp16", fp16)):
            target = os.path.join(HERE, f"{name}.{form}.onnx")
            make(os.path.join(HERE, f"{name}.onnx"), target, train.images)
            report[f"{name}.{form}"] = {split: accuracy(target, test[split]) for split in test}
            print(f"{name}.{form}: " + ", ".join(f"{s} {v:.4f}" for s, v in report[f"{name}.{form}"].items()))
    report["deployed_forms"] = {"int8": f"static QDQ per channel, int8, calibrated on {CALIBRATION_COUNT} "
                                        f"training images (seed {TRAIN_SEED})",
                                "fp16": "ONNX Runtime's float16 converter, keep_io_types=True"}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
