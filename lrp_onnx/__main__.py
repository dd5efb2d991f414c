"""``python -m lrp_onnx``: the ``lrp-onnx`` command line."""

import sys

from .cli import main

sys.exit(main())
