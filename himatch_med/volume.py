"""Geometry: volumes to and from canonical RAS, volumes to and from slices, patch maps back to slice size.

Slices are cut in the canonical (RAS) array and shown in a fixed display orientation (the plane transposed and both
axes flipped: anterior or superior at the top, the patient's right on the image's left), so that the backbone sees
anatomy upright whatever the file's own orientation. Every operation here has its exact inverse.
"""

from __future__ import annotations

import functools

import nibabel.orientations as nio
import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering

AXIS_INDEX = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Slice axis name -> index of the canonical RAS array."""


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a volume to RAS by axis permutation and flips only (no resampling).

    Args:
        array: the volume ``(X, Y, Z)`` as stored in its file.
        affine: its voxel-to-world affine ``(4, 4)``.

    Returns:
        The reoriented volume, in the file's memory order (NIfTI's is Fortran's, so axial slices lie whole in
        memory), and the orientation ``(3, 2)`` that :func:`from_canonical` needs to undo it.
    """
    orientation = nio.io_orientation(affine)
    to_ras = nio.ornt_transform(orientation, nio.axcodes2ornt("RAS"))
    # Copied in the order the voxels lie (flips undone): 8 instead of 26 ms for 240 x 240 x 155 in C order, and the
    # display-oriented axial slices cut from it are then contiguous too.
    return np.copy(nio.apply_orientation(array, to_ras), order="K"), orientation


def from_canonical(array: np.ndarray, orientation: np.ndarray, *, order: str | None = "C") -> np.ndarray:
    """Undo :func:`to_canonical`: put a canonical ``(X', Y', Z')`` array back on the file's own voxel grid.

    ``order``: the memory order of the result, ``C`` or ``F`` (NIfTI's: a map written from an F-ordered array is
    copied once, not reordered on the way to the file), or ``None`` for a view of ``array`` (axes permuted and
    flipped, nothing copied) for a reader that takes any strides.
    """
    if order not in ("C", "F", None):
        raise ValueError(f"order={order!r} is not C, F or None")
    back = nio.ornt_transform(nio.axcodes2ornt("RAS"), orientation)
    placed = nio.apply_orientation(array, back)
    if order is None:
        return placed
    return np.asfortranarray(placed) if order == "F" else np.ascontiguousarray(placed)


def to_slices(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """Cut a canonical volume ``(X, Y, Z)`` into display-oriented slices ``(S, H, W)`` along ``axis``."""
    planes = volume.movedim(axis, 0)
    return planes.transpose(1, 2).flip(1, 2)


def from_slices(slices: torch.Tensor | np.ndarray, axis: int) -> torch.Tensor | np.ndarray:
    """Stack display-oriented slices ``(S, H, W)`` back into a canonical volume; the inverse of :func:`to_slices`.

    A numpy array gives a view (numpy flips without copying; torch's flip copies).
    """
    if isinstance(slices, np.ndarray):
        return np.moveaxis(np.flip(slices, (1, 2)).swapaxes(1, 2), 0, axis)
    return slices.flip(1, 2).transpose(1, 2).movedim(0, axis)


def relative_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position of each slice ``(S,)`` between the first (0) and last (1) slice that holds foreground.

    Measuring along the foreground rather than the field of view lets a brain cut with a wide margin line up with
    one cut tightly.
    """
    index = torch.arange(len(valid), dtype=torch.float32)
    if not valid.any():
        return torch.zeros(len(valid))
    first, last = index[valid].min(), index[valid].max()
    return ((index - first) / (last - first).clamp(min=1)).clamp(0, 1)


def backbone_size(height: int, width: int, *, image_size: int, patch_size: int) -> tuple[int, int]:
    """Backbone image size keeping the slice's aspect: shorter side ``image_size``, sides multiples of the patch."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of the patch size {patch_size}")
    scale = image_size / min(height, width)
    return tuple(max(patch_size, round(side * scale / patch_size) * patch_size) for side in (height, width))


def maps_to_slices(maps: torch.Tensor, size: tuple[int, int], *, sigma: float) -> torch.Tensor:
    """Upsample patch maps ``(S, h, w)`` bilinearly to slice size ``(S, H, W)`` and smooth each slice.

    Both steps are linear and separable, so they are applied as one ``(H, h)`` matrix on the rows and one ``(W, w)``
    on the columns: the same result as interpolating then filtering, at a small fraction of the cost.

    Args:
        maps: maps on the patch grid.
        size: the slice size ``(H, W)``.
        sigma: Gaussian standard deviation in slice pixels (0: no smoothing); borders replicate the edge value.
    """
    rows = resampling_matrix(maps.shape[1], size[0], sigma).to(maps.device)
    columns = resampling_matrix(maps.shape[2], size[1], sigma).to(maps.device)
    return rows @ maps.float() @ columns.T


@functools.lru_cache(maxsize=32)
def resampling_matrix(source: int, target: int, sigma: float) -> torch.Tensor:
    """The ``(target, source)`` matrix of 1D linear interpolation (``align_corners=False``) then Gaussian smoothing.

    Built by sending the identity through :func:`torch.nn.functional.interpolate` and MONAI's Gaussian filter, so it
    is exactly those operations.
    """
    basis = F.interpolate(torch.eye(source, dtype=torch.float64)[:, None], size=target, mode="linear",
                          align_corners=False)
    if sigma > 0:
        # Replicate padding: zero padding would pull the border towards 0, which is a meaningful z-value.
        kernel = gaussian_1d(torch.tensor(sigma, dtype=torch.float64), truncated=4.0, normalize=True)
        basis = separable_filtering(basis, [kernel.to(basis)], mode="replicate")
    return basis[:, 0].T.float().contiguous()
