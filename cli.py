"""Run the lrp-onnx CLI from a checkout: ``python cli.py convert model.onnx``."""

import sys

from lrp_onnx.cli import main

if __name__ == "__main__":
    sys.exit(main())
