"""Relevance maps as pictures: symmetric normalisation around 0 and the usual LRP colormaps."""

from typing import Optional, Sequence, Union, cast

import numpy as np
import numpy.typing as npt
from PIL import Image

from ..errors import InputError

# An image to blend under a heatmap: PIL, or an array in [0, 1] or [0, 255]
Overlay = Union[Image.Image, npt.ArrayLike]

# Each colormap: anchors (position in [0, 1], RGB in [0, 1]), linearly interpolated; 0.5 is relevance 0.
COLORMAPS: dict[str, list[tuple[float, tuple[float, float, float]]]] = {
    "gray": [(0.0, (0, 0, 0)), (1.0, (1, 1, 1))],
    "bwr": [(0.0, (0, 0, 1)), (0.5, (1, 1, 1)), (1.0, (1, 0, 0))],
    "seismic": [(0.0, (0, 0, 0.3)), (0.25, (0, 0, 1)), (0.5, (1, 1, 1)), (0.75, (1, 0, 0)), (1.0, (0.5, 0, 0))],
    "coldnhot": [(0.0, (0, 1, 1)), (0.25, (0, 0, 1)), (0.5, (0, 0, 0)), (0.75, (1, 0, 0)), (1.0, (1, 1, 0))],
    "hot": [(0.0, (0, 0, 0)), (0.375, (1, 0, 0)), (0.75, (1, 1, 0)), (1.0, (1, 1, 1))],
    "cold": [(0.0, (1, 1, 1)), (0.25, (0, 1, 1)), (0.625, (0, 0, 1)), (1.0, (0, 0, 0))],
    "wred": [(0.0, (1, 1, 1)), (0.5, (1, 1, 1)), (1.0, (1, 0, 0))],
    "wblue": [(0.0, (0, 0, 1)), (0.5, (1, 1, 1)), (1.0, (1, 1, 1))],
}


def colormap(values: np.ndarray, cmap: str = "bwr") -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB through a named colormap."""
    if cmap not in COLORMAPS:
        raise InputError(f"unknown colormap {cmap!r}; known: {', '.join(COLORMAPS)}")
    positions, colors = zip(*COLORMAPS[cmap])
    channels = [np.interp(values, positions, [c[k] for c in colors]) for k in range(3)]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def relevance_map(relevance: npt.ArrayLike, channel_axis: int = 0) -> np.ndarray:
    """Relevance of one sample summed over channels, scaled to [-1, 1] by its largest magnitude."""
    r = np.asarray(relevance, np.float64)
    if r.ndim == 3:
        r = r.sum(axis=channel_axis)
    elif r.ndim == 1:
        r = r[None, :]
    elif r.ndim != 2:
        raise InputError(f"a heatmap needs one sample's relevance of rank 1 to 3, got shape {r.shape}")
    peak = np.abs(r).max()
    return r / peak if peak > 0 else r


def heatmap(
    relevance: npt.ArrayLike,
    cmap: str = "bwr",
    channel_axis: int = 0,
    overlay: Union[Overlay, Sequence[Overlay], None] = None,
    alpha: float = 0.5,
) -> Union[Image.Image, list[Image.Image]]:
    """A PIL image of one sample's relevance: 0 is the colormap's centre, ±max|R| its ends; for a
    batch of images ([N, C, H, W], or [N, H, W, C] with ``channel_axis=-1``, as ``explain``
    returns it) a list of them, each scaled by its own largest magnitude.

    ``overlay``: an image (PIL, or an array in [0, 1] or [0, 255]) of the same size to blend under
    it; for a batch, one per sample.
    """
    if np.ndim(relevance) == 4:
        batch = np.asarray(relevance)
        # a batch takes one overlay per sample
        overlays = [None] * len(batch) if overlay is None else cast(Sequence[Optional[Overlay]], overlay)
        return [_heatmap(r, cmap, channel_axis, o, alpha) for r, o in zip(batch, overlays)]
    return _heatmap(relevance, cmap, channel_axis, cast(Optional[Overlay], overlay), alpha)


def _heatmap(
    relevance: npt.ArrayLike, cmap: str, channel_axis: int, overlay: Optional[Overlay], alpha: float
) -> Image.Image:
    """One sample's heatmap (``heatmap``)."""
    normalised = relevance_map(relevance, channel_axis)
    image = Image.fromarray(colormap((normalised + 1) / 2, cmap), "RGB")
    if overlay is None:
        return image
    if not isinstance(overlay, Image.Image):
        array = np.asarray(overlay, np.float64)
        array = array * 255 if array.max() <= 1.0 else array
        overlay = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    base = overlay.convert("L").convert("RGB").resize(image.size)
    return Image.blend(base, image, alpha)
