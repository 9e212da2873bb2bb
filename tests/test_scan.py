"""Scan: the round trip file -> canonical volume -> file, masks on its grid, the file's own slice index, pixel aspect."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import LPS, OBLIQUE, PERMUTED, save_nifti

from himatch_med.config import ReadOptions
from himatch_med.errors import InputError
from himatch_med.scan import read_scan
from himatch_med.volume import AXIS_INDEX, to_canonical, to_slices

FLIPPED = np.diag([1.0, 1.0, -2.5, 1.0])
"""RAI: the file's first axial slice (k = 0) is the most superior one."""
ANISOTROPIC = np.diag([0.5, 0.8, 3.0, 1.0])
ANISOTROPIC_PERMUTED_FLIPPED = np.array([[0, 0.7, 0, -5], [0, 0, -4.0, 20], [-0.3, 0, 0, 7], [0, 0, 0, 1]])
"""File axis i runs inferior (0.3 mm), j right (0.7 mm), k posterior (4 mm)."""
HEADERS = {"oblique": OBLIQUE, "permuted": PERMUTED, "lps": LPS, "flipped": FLIPPED, "anisotropic": ANISOTROPIC,
           "anisotropic-permuted-flipped": ANISOTROPIC_PERMUTED_FLIPPED}
SHAPE = (9, 10, 11)  # distinct sizes (a wrong permutation cannot go unnoticed), slices of at least 8 x 8


def unique(shape=SHAPE) -> np.ndarray:
    """Every voxel a different value (and none zero, so that every voxel is foreground)."""
    return np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)


def stored(tmp_path, affine, array=None, name="scan.nii.gz"):
    return save_nifti(unique() if array is None else array, affine, tmp_path / name)


@pytest.mark.parametrize("header", list(HEADERS))
def test_the_round_trip_gives_back_the_file_exactly(header, tmp_path):
    affine = HEADERS[header]
    scan = read_scan(stored(tmp_path, affine), axis="axial")
    assert scan.shape == SHAPE
    np.testing.assert_array_equal(scan.to_file(scan.canonical), unique())
    reference = nib.as_closest_canonical(nib.load(tmp_path / "scan.nii.gz"))
    np.testing.assert_array_equal(scan.canonical, np.asanyarray(reference.dataobj))


@pytest.mark.parametrize("header", list(HEADERS))
def test_a_map_goes_back_on_the_file_grid_with_its_header(header, tmp_path):
    affine = HEADERS[header]
    scan = read_scan(stored(tmp_path, affine), axis="axial")
    written = nib.load(scan.write_map(scan.canonical * 2, tmp_path / "map.nii.gz"))
    np.testing.assert_array_equal(written.get_fdata(), unique() * 2)
    np.testing.assert_allclose(written.affine, nib.load(tmp_path / "scan.nii.gz").affine)
    assert written.get_data_dtype() == np.float32


def test_a_map_of_another_shape_is_refused(tmp_path):
    scan = read_scan(stored(tmp_path, PERMUTED), axis="axial")
    with pytest.raises(RuntimeError, match="differs from the input's"):
        scan.write_map(np.zeros((11, 10, 9), np.float32), tmp_path / "map.nii.gz")


@pytest.mark.parametrize("header", list(HEADERS))
def test_a_mask_lands_on_the_voxels_it_marks(header, tmp_path):
    affine = HEADERS[header]
    mask = np.zeros(SHAPE, np.float32)
    mask[1, 4, 2] = 3
    scan = read_scan(stored(tmp_path, affine), axis="axial")
    aligned = scan.aligned(stored(tmp_path, affine, mask, "mask.nii.gz"), "--mask")
    assert aligned.dtype == bool
    # The marked voxel is the one whose intensity the file stores at [1, 4, 2].
    assert scan.canonical[aligned].tolist() == [unique()[1, 4, 2]]
    assert not scan.aligned(tmp_path / "mask.nii.gz", "--mask", values=(2,)).any()


def test_a_mask_on_another_grid_is_refused(tmp_path):
    scan = read_scan(stored(tmp_path, OBLIQUE), axis="axial")
    with pytest.raises(InputError, match="mask.nii.gz: --mask must lie on the grid of .*scan.nii.gz"):
        scan.aligned(stored(tmp_path, PERMUTED, unique(), "mask.nii.gz"), "--mask")
    with pytest.raises(InputError, match="shape"):
        scan.aligned(save_nifti(np.ones((9, 10, 12), np.float32), OBLIQUE, tmp_path / "long.nii.gz"), "--mask")


def top_slice(scan, axis="axial"):
    """The canonical index of the most superior (or anterior, or right) slice: the last one along the axis."""
    return scan.canonical.shape[AXIS_INDEX[axis]] - 1


def test_the_file_index_of_the_top_slice_of_a_flipped_volume(tmp_path):
    scan = read_scan(stored(tmp_path, FLIPPED), axis="axial")
    # k runs superior to inferior: the top slice is the file's first.
    assert scan.file_slice_index(top_slice(scan), AXIS_INDEX["axial"]) == (2, 0)
    assert scan.file_slice_index(0, AXIS_INDEX["axial"]) == (2, SHAPE[2] - 1)


def test_the_file_index_of_the_top_slice_of_a_permuted_volume(tmp_path):
    # PERMUTED stores superior along j, upwards: the top axial slice is the file's last j.
    scan = read_scan(stored(tmp_path, PERMUTED), axis="axial")
    assert scan.file_slice_index(top_slice(scan), AXIS_INDEX["axial"]) == (1, SHAPE[1] - 1)
    # Sagittal slices run along x, which PERMUTED stores along k from right to left: the rightmost is k = 0.
    assert scan.file_slice_index(top_slice(scan, "sagittal"), AXIS_INDEX["sagittal"]) == (2, 0)


@pytest.mark.parametrize("header", list(HEADERS))
@pytest.mark.parametrize("axis", list(AXIS_INDEX))
def test_the_file_index_names_the_slice_that_holds_the_voxels(header, axis, tmp_path):
    scan = read_scan(stored(tmp_path, HEADERS[header]), axis="axial")
    slices = to_slices(torch.from_numpy(scan.canonical), AXIS_INDEX[axis])
    for index in (0, len(slices) - 1):
        file_axis, file_index = scan.file_slice_index(index, AXIS_INDEX[axis])
        expected = np.take(unique(), file_index, axis=file_axis)
        assert sorted(slices[index].flatten().tolist()) == sorted(expected.flatten().tolist())


@pytest.mark.parametrize(("axis", "aspect"), [("axial", 0.8 / 0.5), ("coronal", 3.0 / 0.5), ("sagittal", 3.0 / 0.8)])
def test_the_pixel_aspect_of_an_anisotropic_slice(axis, aspect, tmp_path):
    scan = read_scan(stored(tmp_path, ANISOTROPIC), axis=axis)
    assert scan.pixel_aspect(AXIS_INDEX[axis]) == pytest.approx(aspect)


@pytest.mark.parametrize("axis", list(AXIS_INDEX))
def test_the_pixel_aspect_follows_the_axes_to_the_slice_rows_and_columns(axis, tmp_path):
    """Against nibabel's canonical image: rows of a slice run along the later remaining RAS axis."""
    affine = ANISOTROPIC_PERMUTED_FLIPPED
    scan = read_scan(stored(tmp_path, affine), axis=axis)
    zooms = nib.as_closest_canonical(nib.load(tmp_path / "scan.nii.gz")).header.get_zooms()
    columns, rows = (a for a in range(3) if a != AXIS_INDEX[axis])
    assert scan.pixel_aspect(AXIS_INDEX[axis]) == pytest.approx(zooms[rows] / zooms[columns])
    assert scan.pixel_aspect(AXIS_INDEX["axial"]) == pytest.approx(4.0 / 0.7)


def test_values_are_checked_when_read(tmp_path):
    array = unique()
    array[0, 0, 0] = np.nan
    path = stored(tmp_path, OBLIQUE, array)
    with pytest.raises(InputError, match="1 NaN or infinite voxels"):
        read_scan(path, axis="axial")
    scan = read_scan(path, axis="axial", options=ReadOptions(nan_policy="zero"))
    assert "1 NaN or infinite voxels set to 0 (--nan-policy zero)" in scan.notes
    assert np.isfinite(scan.canonical).all() and (scan.canonical == 0).sum() == 1


def test_read_options_are_checked():
    with pytest.raises(ValueError, match="nan_policy='ignore'"):
        ReadOptions(nan_policy="ignore")


def test_canonical_is_what_volume_gives(tmp_path):
    scan = read_scan(stored(tmp_path, OBLIQUE), axis="axial")
    canonical, orientation = to_canonical(unique(), nib.load(tmp_path / "scan.nii.gz").affine)
    np.testing.assert_array_equal(scan.canonical, canonical)
    np.testing.assert_array_equal(scan.orientation, orientation)
