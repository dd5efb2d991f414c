"""Per-op propagators; importing this package registers all of them."""

from . import elementwise, linear, pooling, products, routing  # noqa: F401
