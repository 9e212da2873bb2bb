"""Scan: a volume as read from its file, with the exact way back to that file.

:func:`read_scan` reads a file through :mod:`himatch_med.io`, refuses what cannot be analysed (no content, NaN
voxels, singular or sheared affines, slices one pixel wide) and reorients it to RAS. A :class:`Scan` then answers
every question that needs the file's own geometry: masks and labels read onto its grid (one grid check), maps put
back on the file's voxel grid and saved with its header, the file's own voxel index of a slice, and the pixel aspect
of its slices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from himatch_med import io
from himatch_med.config import ReadOptions
from himatch_med.errors import InputError
from himatch_med.volume import AXIS_INDEX, from_canonical, to_canonical


@dataclass(frozen=True, eq=False)
class Scan:
    """A volume as read: its canonical RAS array and what is needed to go back to its file.

    ``canonical`` (X', Y', Z') raw intensities (float32) reoriented to RAS; ``orientation`` (3, 2) the file's
    orientation from :func:`himatch_med.volume.to_canonical`; ``affine`` the file's voxel-to-world RAS affine;
    ``header`` the NIfTI header outputs copy (one is made for DICOM and 2D images); ``path`` the file or DICOM
    folder; ``kind`` ``nifti``, ``dicom`` or ``image``; ``notes`` what the reader wants the user to know. The array in
    the file's own order is not kept: :meth:`to_file` gives it back exactly.
    """

    canonical: np.ndarray
    orientation: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path
    kind: str
    notes: tuple[str, ...] = ()
    sources: tuple[Path, ...] = ()
    """For a DICOM series: its files in the order of the file grid's third axis (what DICOM outputs refer to)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the array as the file stores it ``(X, Y, Z)``."""
        return tuple(self.canonical.shape[int(axis)] for axis in self.orientation[:, 0])

    def to_file(self, canonical: np.ndarray, *, order: str | None = "C") -> np.ndarray:
        """A canonical array ``(X', Y', Z')`` on the file's own voxel grid ``(X, Y, Z)``: the inverse of reading.

        ``order``: the result's memory order (``C``, or ``F`` as NIfTI stores it; ``None``: a view, not copied).
        """
        return from_canonical(canonical, self.orientation, order=order)

    def as_read(self) -> io.Image:
        """The image as read from the file: its array back in the file's own order, with the file's geometry."""
        return io.Image(self.to_file(self.canonical), self.affine, self.header, self.path, self.kind, self.notes,
                        self.sources)

    def write_map(self, canonical: np.ndarray, path: str | Path, *, display: io.Display | None = None,
                  dtype=np.float32) -> Path:
        """Save a canonical map on the file's voxel grid as NIfTI with the file's header (float32 unless ``dtype``).

        ``display``: the range and intent viewers are asked to show it with (:class:`himatch_med.io.Display`).
        """
        # A view on the file's grid: nibabel copies it once, slice by slice, as it writes (an F-ordered copy first
        # took 48 ms for 240 x 240 x 155, a C-ordered one 134; the maps come as views in NIfTI's order already).
        array = self.to_file(canonical, order=None)
        if array.shape != self.shape:
            raise RuntimeError(f"map shape {array.shape} differs from the input's {self.shape}")
        return io.write_map(array, self.header, path, display=display, dtype=dtype)

    def aligned(self, path: Path, what: str, *, values: tuple[int, ...] | None = None) -> np.ndarray:
        """A mask or label file on this scan's grid as a canonical boolean volume (``> 0``, or one of ``values``).

        Args:
            path: the mask or label file.
            what: what the file is, for the message (``--mask``, ``the mask``).
            values: label values that count (``None``: any value above 0).

        Raises:
            InputError: when the file does not lie on the scan's grid (shape and affine).
        """
        other = io.read_image(path)
        if other.array.shape != self.shape or not np.allclose(other.affine, self.affine, atol=1e-3):
            raise InputError(f"{path}: {what} must lie on the grid of {self.path} (shape {self.shape}, same affine); "
                             f"it has shape {other.array.shape}")
        truth = other.array > 0 if values is None else np.isin(np.rint(other.array), values)
        return to_canonical(truth, other.affine)[0]

    def file_slice_index(self, index: int, axis: int) -> tuple[int, int]:
        """The file's own ``(voxel axis, voxel index)`` of canonical slice ``index`` along canonical ``axis``."""
        file_axis = int(np.flatnonzero(self.orientation[:, 0] == axis)[0])
        flipped = self.orientation[file_axis, 1] < 0
        return file_axis, (self.shape[file_axis] - 1 - index) if flipped else index

    def spacing(self) -> tuple[float, float, float]:
        """The voxel sizes (mm) along the canonical axes."""
        zooms = np.zeros(3)
        zooms[self.orientation[:, 0].astype(int)] = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(z) for z in zooms)

    def pixel_aspect(self, axis: int) -> float:
        """Row over column spacing of the display-oriented slices cut along canonical ``axis``."""
        zooms = self.spacing()
        columns, rows = (a for a in range(3) if a != axis)  # to_slices puts the higher axis on the rows
        return float(zooms[rows] / zooms[columns])


def read_scan(path: str | Path, *, axis: str, options: ReadOptions | None = None) -> Scan:
    """Read a NIfTI file, DICOM series folder or 2D image, check that it can be analysed, and reorient it to RAS.

    Args:
        path: the file or DICOM folder.
        axis: the slice axis name (``axial``, ``coronal``, ``sagittal``): its slices must be at least 2 pixels wide.
        options: how the file is read (:class:`himatch_med.config.ReadOptions`).

    Raises:
        InputError: naming the file and the fix, for anything that cannot be read or analysed.
    """
    options = options or ReadOptions()
    return scan_of(io.read_image(path, volume_index=options.volume_index, series=options.series), axis=axis,
                   options=options)


def scan_of(image: io.Image, *, axis: str, options: ReadOptions | None = None) -> Scan:
    """Check that an image (read from a file, or made in memory) can be analysed, and reorient it to RAS.

    The checks of :func:`read_scan` after reading; ``options`` gives the NaN policy and whether shear is allowed.
    """
    options = options or ReadOptions()
    image = check_values(image, nan_policy=options.nan_policy)
    check_geometry(image, axis, allow_shear=options.allow_shear)
    canonical, orientation = to_canonical(image.array, image.affine)
    check_plane(image, canonical.shape, axis)
    return Scan(canonical, orientation, image.affine, image.header, image.path, image.kind, image.notes, image.sources)


def check_values(image: io.Image, *, nan_policy: str = "refuse") -> io.Image:
    """Refuse volumes without content: an empty axis, NaN or infinite voxels (or zero them), a constant volume."""
    if min(image.array.shape) == 0:
        raise InputError(f"{image.path}: has an axis of size 0 (shape {image.array.shape}); the file holds no image")
    bad = ~np.isfinite(image.array)
    count = int(np.count_nonzero(bad))
    if count and nan_policy != "zero":
        raise InputError(f"{image.path}: has {count} NaN or infinite voxels; fix the file, or pass --nan-policy zero "
                         "to set them to 0")
    if count:
        image = replace(image, array=np.where(bad, np.float32(0), image.array),
                        notes=image.notes + (f"{count} NaN or infinite voxels set to 0 (--nan-policy zero)",))
    low, high = float(image.array.min()), float(image.array.max())
    if low == high:
        raise InputError(f"{image.path}: is constant (every voxel is {low:g}); there is no image to compare")
    return image


def check_geometry(image: io.Image, axis: str, *, allow_shear: bool = False) -> None:
    """Refuse affines that cannot place a voxel (singular), sheared ones unless allowed, 2D images cut off-axial."""
    linear = image.affine[:3, :3]
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(linear)) < 1e-12:
        raise InputError(f"{image.path}: its affine is singular or not finite, so voxels have no position; fix the "
                         "header (e.g. the pixdim, qform or sform)")
    directions = linear / np.linalg.norm(linear, axis=0)
    shear = float(np.abs(directions.T @ directions - np.eye(3)).max())
    if shear > 1e-3 and not allow_shear:
        raise InputError(f"{image.path}: its affine is sheared (axes {np.degrees(np.arcsin(min(shear, 1))):.1f}° off "
                         "perpendicular, e.g. a CT gantry tilt); resample it to an orthogonal grid, or pass "
                         "--allow-shear to slice along the nearest voxel axes")
    if image.kind == "image" and axis != "axial":
        raise InputError(f"{image.path}: is a 2D image; it can only be sliced along --axis axial")


MIN_SLICE_SIDE = 8
"""Fewest pixels a slice side needs to be a study's (a backbone patch covers 14-16 pixels of the resized slice)."""


def check_plane(image: io.Image, canonical_shape: tuple[int, ...], axis: str) -> None:
    """Refuse slices too small for a study: one pixel wide (another axis may do), or a thumbnail or a crop."""
    plane = [size for index, size in enumerate(canonical_shape) if index != AXIS_INDEX[axis]]
    if min(plane) >= MIN_SLICE_SIDE:
        return
    described = f"{image.path}: its {axis} slices would be {plane[0]} x {plane[1]} pixels (shape {image.array.shape})"
    others = [name for name, index in AXIS_INDEX.items() if name != axis and image.kind != "image"
              and min(size for i, size in enumerate(canonical_shape) if i != index) >= MIN_SLICE_SIDE]
    if others:
        raise InputError(f"{described}; choose another --axis" + (f" ({' or '.join(others)})" if others else ""))
    raise InputError(f"{described}; too small to be a study (a slice needs at least {MIN_SLICE_SIDE} x "
                     f"{MIN_SLICE_SIDE} pixels); pass the full image, not a thumbnail or a crop")
