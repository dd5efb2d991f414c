"""Read inputs for ``explain``: image files and folders (Pillow), ``.npy`` and ``.npz`` arrays.

Images are preprocessed as ImageNet users expect: resize the shorter side and center-crop to
``size``, convert to grey or RGB, scale to [0, scale], normalise by per-channel mean and std, and
lay out as NCHW or NHWC. Defaults come from the model's input shape where it is fixed. Arrays
are taken as model-ready (no preprocessing): one sample, or a batch along axis 0.
"""

import contextlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import InputError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass
class Sample:
    name: str  # unique stem for output files
    source: str  # file, with the index or key for arrays
    array: Optional[np.ndarray]  # one model-ready sample, no batch axis (None: it could not be read)
    image: Optional[np.ndarray] = None  # the picture as seen (H×W or H×W×3 in [0, 1]), for overlays


@dataclass
class Preprocess:
    size: Optional[Sequence[int]] = None  # (H, W)
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    scale: float = 1.0
    layout: Optional[str] = None  # "nchw" or "nhwc"
    grayscale: bool = False


@dataclass
class InputSpec:
    """What the explained graph input expects: rank, layout, channels, fixed spatial size, and its
    element type (an integer one takes raw pixels, which the model scales itself)."""

    shape: list
    dtype: object = np.float32

    @property
    def integer(self):
        return np.dtype(self.dtype).kind in "iu"

    @property
    def rank(self):
        return len(self.shape)

    def layout(self, requested=None):
        if requested:
            return requested
        if self.rank == 4 and self.shape[1] in (1, 3):
            return "nchw"
        if self.rank == 4 and self.shape[3] in (1, 3):
            return "nhwc"
        return "nchw"

    def channels(self, layout):
        if self.rank != 4:
            return None
        c = self.shape[1] if layout == "nchw" else self.shape[3]
        return c if isinstance(c, int) else None

    def spatial(self, layout):
        if self.rank != 4:
            return None
        hw = self.shape[2:4] if layout == "nchw" else self.shape[1:3]
        return tuple(hw) if all(isinstance(d, int) for d in hw) else None


def expand_paths(paths):
    """Files named, and the image and array files inside folders (sorted, not recursive)."""
    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            inside = sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES + ARRAY_SUFFIXES)
            )
            if not inside:
                raise InputError(f"{path}: folder has no image ({', '.join(IMAGE_SUFFIXES)}) or array files")
            files.extend(inside)
        elif not os.path.isfile(path):
            raise InputError(f"{path}: no such file or folder")
        elif not path.lower().endswith(IMAGE_SUFFIXES + ARRAY_SUFFIXES):
            raise InputError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or array (.npy, .npz) file")
        else:
            files.append(path)
    return files


@dataclass
class Pending:
    """One input, located but not read: an image file, or a row of an array in a .npy file or an
    .npz member. Small and picklable, so that another process (a Ray worker) can read it."""

    name: str  # unique stem for output files
    source: str
    path: str
    key: Optional[str] = None  # the .npz member
    row: Optional[int] = None  # the sample's index along the array's axis 0; None for an image
    error: Optional[str] = None  # why it cannot be read, found while listing the inputs


def read_inputs(paths, spec: InputSpec, preprocess: Preprocess):
    """Every input as a Pending, lazily and in order, for ``InputReader.sample``. Arrays are checked
    against the model here (a file that is pickled, not numeric or of the wrong shape is one
    Pending with its error); images when they are read. Paths that do not exist and settings
    that contradict the model fail here, at once."""
    files = expand_paths(paths)
    if any(not f.lower().endswith(ARRAY_SUFFIXES) for f in files):
        check_preprocess(spec, preprocess)
    return _unique_names(p for path in files for p in _file_inputs(path, spec))


# An input given in Python: a file or folder path, a decoded image, or a model-ready array
InputItem = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


def load_samples(items: Sequence[InputItem], spec: InputSpec, preprocess: Preprocess) -> list[Sample]:
    """Every input as model-ready samples, in order and all read now; the first bad one is an
    InputError. Names are unique over all of them (a repeated one gets -1, -2, ...)."""
    reader = InputReader(spec, preprocess)

    def samples():
        for index, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                yield from (reader.sample(p) for p in read_inputs([item], spec, preprocess))
            else:
                yield from object_samples(item, index, spec, preprocess)

    return list(_unique_names(samples()))


def object_samples(item: Union[Image.Image, np.ndarray], index: int, spec: InputSpec, p: Preprocess) -> list[Sample]:
    """An input given as an object rather than a file, named by its ``index`` among the inputs: a
    PIL image goes through the image pipeline as an image file does; an array is model-ready, one
    sample or a batch along axis 0, as a .npy file is."""
    if isinstance(item, Image.Image):
        check_preprocess(spec, p)
        return [image_sample(item, f"image{index}", f"<image {index}>", spec, p)]
    source = f"<array {index}>"
    batch = _batch_of_samples(source, np.asarray(item), spec)
    rows = _row_names(f"array{index}", source, len(batch))
    return [Sample(name, where, _model_ready(row, spec)) for (name, where), row in zip(rows, batch)]


def _row_names(stem: str, source: str, count: int) -> list[tuple[str, str]]:
    """(name, source) of each sample of an array input: the input's own where it holds one."""
    return [(stem, source)] if count == 1 else [(f"{stem}_{i}", f"{source}[{i}]") for i in range(count)]


def _model_ready(row: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A row of an array input: float32, except that integer arrays stay integers for an integer
    input (the explainer refuses floats there)."""
    return np.array(row, None if spec.integer and row.dtype.kind in "iu" else np.float32)


class InputReader:
    """Reads Pendings as model-ready Samples with the given settings, keeping the last array file
    open: consecutive rows of one .npy or .npz member are read without opening it again."""

    def __init__(self, spec: InputSpec, preprocess: Preprocess):
        self.spec, self.preprocess = spec, preprocess
        self._open: Optional[tuple[tuple[str, Optional[str]], np.ndarray]] = None  # (path, .npz key), its array

    def sample(self, pending: Pending):
        """The Sample of ``pending``, or the InputError that says why it cannot be explained."""
        if pending.error is not None:
            raise InputError(pending.error)
        if pending.row is None:
            sample = _image_sample(pending.path, self.spec, self.preprocess)
            sample.name = pending.name
            return sample
        location = (pending.path, pending.key)
        if self._open is None or self._open[0] != location:
            self._open = (location, _batch_of_samples(pending.source, _array(*location), self.spec))
        return Sample(pending.name, pending.source, _model_ready(self._open[1][pending.row], self.spec))

    def read(self, item, index):
        """The Sample of an input given as a Pending (read now), a Sample, or a model-ready array
        (named by its ``index`` among the inputs)."""
        if isinstance(item, Pending):
            return self.sample(item)
        if isinstance(item, Sample):
            return item
        return Sample(*identity(item, index), np.asarray(item))


def read_samples(inputs, reader):
    """Each input as a Sample (``InputReader.read``), read when it is needed."""
    return (reader.read(item, index) for index, item in enumerate(inputs))


def stacked_batches(samples, size, command):
    """(index of the first, the Samples, their arrays stacked [≤ size, ...]) of consecutive
    ``samples``, all of the first one's shape: ``command`` refuses inputs of several shapes."""
    batch, start, shape = [], 0, None
    for index, sample in enumerate(samples):
        shape = shape or sample.array.shape
        if sample.array.shape != shape:
            raise InputError(
                f"{command} needs inputs of one shape: input {index} is {list(sample.array.shape)}, "
                f"the first is {list(shape)}"
            )
        batch.append(sample)
        if len(batch) == size:
            yield start, batch, np.stack([s.array for s in batch])
            batch, start = [], index + 1
    if batch:
        yield start, batch, np.stack([s.array for s in batch])


def identity(item, index):
    """(name, source) of an input: a Pending's or Sample's own, an array's from its index."""
    if isinstance(item, (Pending, Sample)):
        return item.name, item.source
    return f"input{index}", f"<input {index}>"


def _file_inputs(path, spec):
    if not path.lower().endswith(ARRAY_SUFFIXES):
        yield Pending(_stem(path), path, path)
        return
    try:
        keys = _array_keys(path)
    except InputError as e:  # the file itself: nothing can be read from it
        yield Pending(_stem(path), path, path, error=str(e))
        return
    for key in keys:
        stem, source = (_stem(path), path) if key is None else (f"{_stem(path)}_{key}", f"{path}[{key}]")
        try:
            count = len(_batch_of_samples(source, _array(path, key), spec))
        except InputError as e:
            yield Pending(stem, source, path, key, error=str(e))
            continue
        for i, (name, where) in enumerate(_row_names(stem, source, count)):
            yield Pending(name, where, path, key, i)


def _unique_names(pending):
    seen = {}
    for p in pending:
        base, n = p.name, seen.get(p.name, 0)
        seen[base] = n + 1
        if n:
            p.name = f"{base}-{n}"
        yield p


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _array_keys(path):
    """[None] for a .npy file, the member names of an .npz."""
    if path.lower().endswith(".npy"):
        return [None]
    with _numpy_errors(path):
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)


def _array(path, key):
    """A .npy file memory-mapped (key None), or an .npz member, loaded whole."""
    with _numpy_errors(path):
        if key is None:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as data:
            return data[key]


@contextlib.contextmanager
def _numpy_errors(path):
    try:
        yield
    except ValueError as e:
        if "pickle" in str(e).lower() or "Python objects" in str(e):  # np.load, or np.load with mmap_mode
            raise InputError(f"{path}: holds pickled objects; lrp-onnx never loads pickles") from None
        raise InputError(f"{path}: not a readable numpy array ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable numpy array ({e})") from None


def _batch_of_samples(source, array, spec):
    """``array`` as a batch along axis 0 (it holds one sample, or a batch), checked against the model."""
    if array.dtype.kind not in "fiub":
        raise InputError(f"{source}: array of {array.dtype} is not numeric")
    if array.ndim == spec.rank - 1:
        array = array[None]
    if array.ndim != spec.rank:
        raise InputError(
            f"{source}: shape {list(array.shape)} does not fit the model input {spec.shape} "
            "(one sample, or a batch along axis 0)"
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and got != want:
            what = "channels" if spec.rank == 4 and axis in (1, 3) and want in (1, 3) else f"axis {axis}"
            raise InputError(
                f"{source}: wrong number of {what}: {got}, the model takes {want} (input shape {spec.shape})"
            )
    return array


def _open_image(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path}: refused, too many pixels ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: unreadable or corrupt image ({first_line(e)})") from None


def resized_and_cropped(image, size, resample=Image.BILINEAR):
    """Scale so the image covers size (H, W) (the shorter side fits), then center-crop."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), resample)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def check_preprocess(spec, p: Preprocess):
    """The image settings against the model, before any image is read."""
    if spec.rank != 4:
        raise InputError(f"the model input {spec.shape} is not an image batch (rank 4); give arrays, not images")
    layout = spec.layout(p.layout)
    channels = spec.channels(layout)
    if channels not in (1, 3, None):
        raise InputError(f"the model takes {channels} channels; images have 1 (grey) or 3 (RGB)")
    fixed = spec.spatial(layout)
    if p.size is not None and fixed is not None and _size(p) != fixed:
        raise InputError(
            f"--size {_size(p)[0]} {_size(p)[1]} does not match the model's fixed input size {fixed[0]}x{fixed[1]}"
        )
    if spec.integer and (p.mean is not None or p.std is not None or p.scale != 1.0):
        raise InputError(
            f"the model takes {np.dtype(spec.dtype).name} pixels and scales them itself; "
            "--mean, --std and --scale are for float inputs"
        )
    c = 1 if (p.grayscale or channels == 1) and channels != 3 else 3
    for name, values in (("mean", p.mean), ("std", p.std)):
        if values is not None and len(values) not in (1, c):
            raise InputError(f"--{name} has {len(values)} values; the images have {c} channel(s)")


def _size(p):
    return tuple(p.size) if len(p.size) == 2 else (p.size[0], p.size[0])


def _image_sample(path, spec, p: Preprocess):
    """The image at ``path`` as the model takes it (settings already passed ``check_preprocess``)."""
    return image_sample(_open_image(path), _stem(path), path, spec, p)


def image_sample(image: Image.Image, name: str, source: str, spec: InputSpec, p: Preprocess) -> Sample:
    """A decoded image as the model takes it: grey or RGB as the model's channels, resized and
    cropped to ``p.size``, scaled, normalised and laid out (settings already passed ``check_preprocess``)."""
    layout = spec.layout(p.layout)
    channels = spec.channels(layout)
    grey = p.grayscale or channels == 1
    image = image.convert("L" if grey else "RGB")
    fixed = spec.spatial(layout)
    if p.size is not None:
        image = resized_and_cropped(image, _size(p))
    elif fixed is not None and (image.height, image.width) != fixed:
        raise InputError(
            f"{source}: image is {image.height}x{image.width} (HxW) but the model takes "
            f"{fixed[0]}x{fixed[1]}; pass --size to resize and crop"
        )
    pixels = np.asarray(image, np.float32) / 255.0
    shown = pixels
    # np.ndarray: numpy's stubs type floating[Any] / float32 as complex128
    hwc: np.ndarray = pixels[..., None] if pixels.ndim == 2 else pixels
    if grey and channels == 3:
        hwc = np.repeat(hwc, 3, axis=2)
    if spec.integer:  # the raw 8-bit values, as the model reads them
        raw = np.rint(hwc * 255).astype(spec.dtype)
        return Sample(name, source, np.ascontiguousarray(raw.transpose(2, 0, 1) if layout == "nchw" else raw), shown)
    hwc = hwc * p.scale
    if p.mean is not None:
        hwc = hwc - np.asarray(p.mean, np.float32)
    if p.std is not None:
        hwc = hwc / np.asarray(p.std, np.float32)
    array = hwc.transpose(2, 0, 1) if layout == "nchw" else hwc
    return Sample(name, source, np.ascontiguousarray(array, np.float32), shown)
