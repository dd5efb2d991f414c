"""Writing files without ever leaving a partial one behind."""

import io
import os
import tempfile

from ..errors import OutputError


def png_bytes(image, **options):
    """A PIL image encoded as PNG, for ``atomic_write`` (or to measure its compressed size)."""
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def atomic_write(path, data):
    """Write ``data`` (bytes, or a list of byte chunks, so that a large file needs no joined copy) to a
    temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=".lrp-onnx-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; the user's umask decides
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def writable_folder(path):
    """Create ``path`` if needed and prove it can be written, before anything is computed."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lrp-onnx-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{path}: cannot write the output folder ({e.strerror or e})") from None


def _umask():
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
