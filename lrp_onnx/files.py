"""Writing files without ever leaving a partial one behind."""

import io
import os
import tempfile


def png_bytes(image, **options):
    """A PIL image encoded as PNG, for ``atomic_write`` (or to measure its compressed size)."""
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def atomic_write(path, data: bytes):
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=".lrp-onnx-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
