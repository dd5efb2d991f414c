"""Writing files without ever leaving a partial one behind."""

import contextlib
import io
import os
import tempfile
from typing import Union

from ..errors import OutputError

# A file or folder path, as str or os.PathLike
StrPath = Union[str, "os.PathLike[str]"]

TEMPORARY_PREFIX = ".lrp-onnx-"


def png_bytes(image, **options):
    """A PIL image encoded as PNG, for ``atomic_write`` (or to measure its compressed size)."""
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def atomic_write(path, data, durable=True):
    """Write ``data`` (bytes, or a list of byte chunks, so that a large file needs no joined copy) to a
    temporary file beside ``path``, then rename it over ``path``: a killed process leaves the old
    file or the new one, never part of one. ``durable`` flushes it to disk first, so that it also
    survives a power cut."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)


@contextlib.contextmanager
def atomic_path(path, durable=True):
    """A temporary path beside ``path`` for the block to write (as atomic_write), renamed over
    ``path`` when the block ends, removed if it raises."""
    fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; the user's umask decides
        os.close(fd)
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temporaries(folder):
    """Delete the temporary files a killed lrp-onnx left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(TEMPORARY_PREFIX) and name.endswith(".tmp"):
            os.unlink(os.path.join(folder, name))


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
