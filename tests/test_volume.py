"""Known-answer tests for himatch_med.volume: canonical RAS, slices, positions, backbone size, maps back to slices."""

from __future__ import annotations

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest
import torch
from conftest import LPS, OBLIQUE, PERMUTED

from himatch_med.volume import (
    AXIS_INDEX,
    backbone_size,
    from_canonical,
    from_slices,
    maps_to_slices,
    relative_positions,
    to_canonical,
    to_slices,
)

ANISOTROPIC = np.diag([0.4, 0.9, 3.5, 1.0])
ANISOTROPIC_PERMUTED_FLIPPED = np.array([[0, 0.7, 0, -5], [0, 0, -4.0, 20], [-0.3, 0, 0, 7], [0, 0, 0, 1]])
AFFINES = {
    "oblique": OBLIQUE,
    "permuted": PERMUTED,
    "lps": LPS,
    "anisotropic": ANISOTROPIC,
    "anisotropic-permuted-flipped": ANISOTROPIC_PERMUTED_FLIPPED,
}
# Distinct sizes per axis, so that a wrong permutation cannot go unnoticed.
SHAPE = (5, 6, 7)


def unique_volume(shape=SHAPE, dtype=np.int32) -> np.ndarray:
    """Every voxel a different value: equal arrays mean every voxel landed in the right place."""
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


def canonical_affine(affine: np.ndarray, shape) -> np.ndarray:
    """The affine of the canonical array, built with nibabel independently of the code under test."""
    to_ras = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    return affine @ nio.inv_ornt_aff(to_ras, shape)


# --------------------------------------------------------------------------------------------------------------------
# to_canonical / from_canonical


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.int16])
def test_canonical_round_trip_is_exact(name, dtype):
    array = unique_volume(dtype=dtype)
    canonical, orientation = to_canonical(array, AFFINES[name])
    back = from_canonical(canonical, orientation)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert np.array_equal(back, array)


@pytest.mark.parametrize("name", list(AFFINES))
def test_back_on_the_file_grid_in_nifti_order_is_the_same_array_and_the_same_file(name, tmp_path):
    """Maps go back to the file's grid F-ordered, as NIfTI stores them: same values, same file bytes as C order."""
    from himatch_med.io import write_map

    array = unique_volume(dtype=np.float32)
    canonical, orientation = to_canonical(array, AFFINES[name])
    sliced = torch.from_numpy(canonical).permute(2, 1, 0).flip(1, 2).contiguous()  # as slices come back
    canonical = sliced.flip(1, 2).permute(2, 1, 0).numpy()
    c_order, f_order = from_canonical(canonical, orientation), from_canonical(canonical, orientation, order="F")
    assert np.array_equal(f_order, c_order) and np.array_equal(f_order, array)
    assert f_order.flags.f_contiguous and c_order.flags.c_contiguous
    view = from_canonical(canonical, orientation, order=None)  # for readers of any strides: nothing copied
    assert np.array_equal(view, array) and np.shares_memory(view, canonical)
    header = nib.Nifti1Image(array, AFFINES[name]).header
    written = [write_map(a, header, tmp_path / f"{order}.nii.gz").read_bytes()
               for order, a in (("c", c_order), ("f", f_order), ("view", view))]
    assert written[0] == written[1] == written[2]


@pytest.mark.parametrize("name", list(AFFINES))
def test_canonical_array_matches_nibabel_closest_canonical(name):
    array = unique_volume()
    affine = AFFINES[name]
    canonical, _ = to_canonical(array, affine)
    reference = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    assert nio.aff2axcodes(reference.affine) == ("R", "A", "S")
    assert np.array_equal(canonical, np.asanyarray(reference.dataobj))


@pytest.mark.parametrize("name", list(AFFINES))
def test_canonical_array_is_ras(name):
    affine = AFFINES[name]
    canonical, _ = to_canonical(unique_volume(), affine)
    assert nio.aff2axcodes(canonical_affine(affine, SHAPE)) == ("R", "A", "S")
    # One block of memory with no flipped axis (its axes in some order): torch takes it as it is.
    axes = sorted(range(3), key=lambda axis: canonical.strides[axis])
    dense = [canonical.itemsize * int(np.prod([canonical.shape[a] for a in axes[:i]])) for i in range(3)]
    assert [canonical.strides[axis] for axis in axes] == dense
    assert torch.from_numpy(canonical).shape == canonical.shape


@pytest.mark.parametrize("name", list(AFFINES))
def test_canonical_array_keeps_the_files_memory_order_so_axial_slices_are_contiguous(name):
    affine = AFFINES[name]
    stored = np.asfortranarray(unique_volume())  # as nibabel reads a NIfTI file
    canonical, _ = to_canonical(stored, affine)
    assert not np.shares_memory(canonical, stored)
    assert np.array_equal(canonical, np.ascontiguousarray(to_canonical(np.ascontiguousarray(stored), affine)[0]))
    # In memory as the file was, flips undone: the canonical axis stored fastest is the file's first axis.
    fastest = int(np.argmin(canonical.strides))
    assert fastest == int(nio.io_orientation(affine)[0, 0])
    if nio.io_orientation(affine)[:, 0].tolist() == [0, 1, 2]:  # axial slices: display-oriented, whole in memory
        assert to_slices(torch.from_numpy(canonical), 2).is_contiguous()


@pytest.mark.parametrize("name", list(AFFINES))
def test_canonical_marker_keeps_its_world_position(name):
    affine = AFFINES[name]
    marker = (1, 4, 2)
    array = np.zeros(SHAPE, dtype=np.float32)
    array[marker] = 1
    canonical, _ = to_canonical(array, affine)
    (landed,) = np.argwhere(canonical == 1)
    world = affine @ np.array([*marker, 1.0])
    assert np.allclose(canonical_affine(affine, SHAPE) @ np.array([*landed, 1.0]), world)


def test_canonical_of_ras_identity_is_unchanged():
    array = unique_volume()
    canonical, orientation = to_canonical(array, np.diag([2.0, 3.0, 1.0, 1.0]))
    assert np.array_equal(canonical, array)
    assert np.array_equal(orientation, nio.axcodes2ornt("RAS"))


def test_lps_axes_are_flipped_to_ras():
    array = unique_volume()
    canonical, _ = to_canonical(array, LPS)
    assert np.array_equal(canonical, array[::-1, ::-1, :])


def test_to_canonical_does_not_mutate_its_input():
    array = unique_volume()
    copy = array.copy()
    to_canonical(array, PERMUTED)
    assert np.array_equal(array, copy)


# --------------------------------------------------------------------------------------------------------------------
# to_slices / from_slices


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_round_trip_is_exact(axis):
    volume = torch.from_numpy(unique_volume())
    slices = to_slices(volume, axis)
    assert torch.equal(from_slices(slices, axis), volume)
    # numpy's is a view of the slices with the same values.
    stacked = from_slices(slices.contiguous().numpy(), axis)
    assert np.array_equal(stacked, volume.numpy()) and not stacked.flags.owndata


@pytest.mark.parametrize(("axis", "shape"), [(0, (5, 7, 6)), (1, (6, 7, 5)), (2, (7, 6, 5))])
def test_slice_shapes(axis, shape):
    """(S, H, W): S along the axis; rows run along the later remaining RAS axis, columns along the earlier."""
    assert tuple(to_slices(torch.zeros(SHAPE), axis).shape) == shape


def marked(*voxels) -> torch.Tensor:
    volume = torch.zeros(SHAPE)
    for value, voxel in enumerate(voxels, start=1):
        volume[voxel] = value
    return volume


def where(slices: torch.Tensor, value: float) -> tuple[int, int, int]:
    (found,) = torch.nonzero(slices == value).tolist()
    return tuple(found)


def test_axial_display_orientation():
    """Axial slice of a RAS volume: anterior at the top row, the patient's right on the left column."""
    x, y, z = SHAPE
    # 1: most anterior voxel, 2: most posterior, 3: patient's far right (highest R), 4: patient's far left.
    volume = marked((2, y - 1, 3), (2, 0, 3), (x - 1, 3, 3), (0, 3, 3))
    slices = to_slices(volume, AXIS_INDEX["axial"])
    height, width = slices.shape[1:]
    assert where(slices, 1)[:2] == (3, 0)
    assert where(slices, 2)[:2] == (3, height - 1)
    assert where(slices, 3)[::2] == (3, 0)
    assert where(slices, 4)[::2] == (3, width - 1)


def test_coronal_display_orientation():
    """Coronal: superior at the top row, the patient's right on the left column."""
    x, y, z = SHAPE
    volume = marked((2, 1, z - 1), (2, 1, 0), (x - 1, 1, 3), (0, 1, 3))
    slices = to_slices(volume, AXIS_INDEX["coronal"])
    height, width = slices.shape[1:]
    assert where(slices, 1)[:2] == (1, 0)
    assert where(slices, 2)[:2] == (1, height - 1)
    assert where(slices, 3)[::2] == (1, 0)
    assert where(slices, 4)[::2] == (1, width - 1)


def test_sagittal_display_orientation_superior_on_top():
    x, y, z = SHAPE
    volume = marked((2, 3, z - 1), (2, 3, 0))
    slices = to_slices(volume, AXIS_INDEX["sagittal"])
    assert where(slices, 1)[:2] == (2, 0)
    assert where(slices, 2)[:2] == (2, slices.shape[1] - 1)


def test_lps_file_right_voxel_lands_on_the_left_column():
    """End to end from an LPS file: file index 0 along x is the patient's far right, so it is shown on the left."""
    array = np.zeros(SHAPE, dtype=np.float32)
    array[0, 2, 4] = 1
    canonical, _ = to_canonical(array, LPS)
    slices = to_slices(torch.from_numpy(canonical), AXIS_INDEX["axial"])
    index, _, column = where(slices, 1)
    assert (index, column) == (4, 0)


# --------------------------------------------------------------------------------------------------------------------
# relative_positions


def test_relative_positions_between_first_and_last_foreground_slice():
    valid = torch.tensor([False, True, False, True, True, False])
    expected = torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    torch.testing.assert_close(relative_positions(valid), expected)


def test_relative_positions_whole_range():
    valid = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(relative_positions(valid), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_relative_positions_no_foreground_is_zero():
    assert torch.equal(relative_positions(torch.zeros(4, dtype=torch.bool)), torch.zeros(4))


def test_relative_positions_single_foreground_slice():
    positions = relative_positions(torch.tensor([False, False, True, False]))
    assert torch.equal(positions, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.all((positions >= 0) & (positions <= 1))


# --------------------------------------------------------------------------------------------------------------------
# backbone_size


@pytest.mark.parametrize(("height", "width"), [(240, 180), (180, 240), (256, 256), (512, 137), (37, 1000), (448, 448)])
@pytest.mark.parametrize(("image_size", "patch"), [(448, 16), (224, 14), (64, 16)])
def test_backbone_size(height, width, image_size, patch):
    out_height, out_width = backbone_size(height, width, image_size=image_size, patch_size=patch)
    assert isinstance(out_height, int) and isinstance(out_width, int)
    assert out_height % patch == 0 and out_width % patch == 0
    # The shorter side is exactly image_size.
    assert (out_height if height <= width else out_width) == image_size
    assert min(out_height, out_width) == image_size
    # The longer side keeps the aspect to within half a patch.
    scale = image_size / min(height, width)
    assert abs(out_height - height * scale) <= patch / 2
    assert abs(out_width - width * scale) <= patch / 2


def test_backbone_size_square_and_known_answer():
    assert backbone_size(256, 256, image_size=448, patch_size=16) == (448, 448)
    # 240 * 448 / 180 = 597.3 -> 37.3 patches -> 592.
    assert backbone_size(240, 180, image_size=448, patch_size=16) == (592, 448)


def test_backbone_size_rejects_image_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="image_size=450"):
        backbone_size(100, 100, image_size=450, patch_size=16)


# --------------------------------------------------------------------------------------------------------------------
# maps_to_slices


def test_maps_to_slices_shape_and_dtype():
    out = maps_to_slices(torch.rand(3, 4, 5, dtype=torch.float64), (32, 40), sigma=2.0)
    assert out.shape == (3, 32, 40)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("value", [0.0, 2.5, -3.0])
def test_maps_to_slices_keeps_constant_without_smoothing(value):
    out = maps_to_slices(torch.full((2, 3, 5), value), (24, 40), sigma=0)
    assert torch.equal(out, torch.full((2, 24, 40), value))


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_maps_to_slices_keeps_constant_with_smoothing(sigma):
    out = maps_to_slices(torch.full((2, 3, 5), 2.5), (24, 40), sigma=sigma)
    torch.testing.assert_close(out, torch.full((2, 24, 40), 2.5), rtol=1e-6, atol=1e-6)


def test_maps_to_slices_keeps_constant_with_smoothing_approximately():
    """Whatever the kernel's normalisation, replicate padding keeps a constant map constant (up to 1e-4)."""
    out = maps_to_slices(torch.full((2, 3, 5), 2.5), (24, 40), sigma=4.0)
    torch.testing.assert_close(out, torch.full((2, 24, 40), 2.5), rtol=1e-4, atol=0)
    assert float(out.max() - out.min()) < 1e-6


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_maps_to_slices_peak_stays_in_place(sigma):
    maps = torch.zeros(2, 6, 8)
    maps[0, 1, 6] = 5.0
    maps[1, 4, 2] = 5.0
    # 6 x 8 patches of 8 x 8 pixels: patch (r, c) covers rows 8r..8r+7, columns 8c..8c+7; its centre is at 8r+3.5.
    out = maps_to_slices(maps, (48, 64), sigma=sigma)
    for index, (row, column) in enumerate([(1, 6), (4, 2)]):
        peak_row, peak_column = divmod(int(out[index].argmax()), 64)
        assert peak_row in (8 * row + 3, 8 * row + 4)
        assert peak_column in (8 * column + 3, 8 * column + 4)
        # Symmetric about the patch centre.
        torch.testing.assert_close(out[index, 8 * row + 3, 8 * column + 3], out[index, 8 * row + 4, 8 * column + 4])


def test_maps_to_slices_does_not_mix_slices():
    maps = torch.zeros(3, 4, 4)
    maps[1, 2, 2] = 1.0
    out = maps_to_slices(maps, (16, 16), sigma=3.0)
    assert torch.equal(out[0], torch.zeros(16, 16))
    assert torch.equal(out[2], torch.zeros(16, 16))
    assert float(out[1].max()) > 0


def test_maps_to_slices_does_not_mutate_its_input():
    maps = torch.rand(2, 3, 3)
    copy = maps.clone()
    maps_to_slices(maps, (12, 12), sigma=2.0)
    assert torch.equal(maps, copy)
