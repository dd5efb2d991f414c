"""Per-op propagators; importing this package registers all of them."""

from . import elementwise, linear, pooling, products, quantized, routing  # noqa: F401
