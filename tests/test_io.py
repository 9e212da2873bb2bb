"""Files: reading every input kind, atomic writes, banks on disk."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import OBLIQUE, brain_volume, ct_volume, save_nifti

from himatch_med import io
from himatch_med.bank import Bank
from himatch_med.errors import InputError
from himatch_med.volume import to_canonical, to_slices


def test_a_2d_image_is_a_one_slice_volume_whose_slice_is_the_image(tmp_path):
    import SimpleITK as sitk

    plane = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
    sitk.WriteImage(sitk.GetImageFromArray(plane), str(tmp_path / "a.png"))
    image = io.read_image(tmp_path / "a.png")
    assert image.kind == "image" and image.array.shape == (7, 12, 1)
    canonical, _ = to_canonical(image.array, image.affine)
    np.testing.assert_array_equal(to_slices(torch.from_numpy(canonical), 2)[0].numpy(), plane)


def test_4d_needs_a_volume_index(tmp_path):
    path = save_nifti(np.random.rand(4, 5, 6, 3).astype(np.float32), OBLIQUE, tmp_path / "4d.nii.gz")
    with pytest.raises(InputError, match="4D with 3 volumes; choose one with --volume-index 0..2"):
        io.read_image(path)
    image = io.read_image(path, volume_index=2)
    np.testing.assert_array_equal(image.array, np.asarray(nib.load(path).dataobj)[..., 2])
    with pytest.raises(InputError, match="out of range"):
        io.read_image(path, volume_index=3)


def test_dicom_series_geometry_matches_simpleitk(tmp_path):
    import SimpleITK as sitk

    volume, _ = brain_volume(1, (20, 24, 6))
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    angle = np.deg2rad(12)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in (("0020|000e", "1.2.3.4"), ("0020|0013", str(k)), ("0008|0060", "MR"),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "\\".join(map(str, image.GetDirection()[0:7:3] + image.GetDirection()[1:8:3]))),
                           ("0018|0050", "2.5")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(plane)
    read = io.read_image(folder)
    assert read.kind == "dicom" and read.array.shape == (20, 24, 6)
    np.testing.assert_array_equal(read.array, volume.astype(np.int16))
    # World geometry: voxel (i, j, k) -> LPS point from SimpleITK, RAS from our affine; they must agree.
    for index in ((0, 0, 0), (19, 23, 5), (3, 7, 2)):
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = read.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty.nii.gz: the file is empty"):
        io.read_image(tmp_path / "empty.nii.gz")
    (tmp_path / "text.nii").write_text("not an image at all")
    with pytest.raises(InputError, match="text.nii: cannot be read as NIfTI"):
        io.read_image(tmp_path / "text.nii")


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    like = io.read_image(save_nifti(np.zeros((4, 5, 6), np.float32), OBLIQUE, tmp_path / "in.nii.gz"))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        io.write_map(np.ones((4, 5, 6), np.float32), like, tmp_path / "out_anomaly.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def _bank(stages=2):
    n, d = 5, 8
    return Bank(cls=torch.randn(n, d).half(), layout=torch.randn(n, 4, d).half(),
                centroids=torch.randn(n, stages, 3, d).half(), sizes=torch.ones(n, stages, 3, dtype=torch.int32),
                positions=torch.linspace(0, 1, n), groups=torch.tensor([0, 0, 1, 1, 1]),
                calibration_mean=torch.zeros(stages), calibration_std=torch.ones(stages),
                calibration_slice_scores=torch.tensor([0.1, 0.2]), calibration_volume_scores=torch.zeros(0),
                meta={"format_version": 1, "settings": {"model": "m", "image_size": 32}})


def test_bank_round_trip_memory_mapped(tmp_path):
    bank = _bank()
    io.write_bank(bank.tensors(), bank.meta, tmp_path / "bank")
    tensors, meta = io.read_bank(tmp_path / "bank")
    loaded = Bank.from_stored(tensors, meta, source="bank")
    for name, tensor in bank.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    assert meta["settings"] == bank.meta["settings"] and len(meta["arrays_sha256"]) == 64
    memory = loaded.memory(torch.tensor([[4, 0]]), torch.device("cpu"))
    assert memory.shape == (2, 1, 2, 3, 8)
    assert torch.equal(memory[1, 0, 0], bank.centroids[4, 1].float())


def test_a_damaged_bank_is_refused(tmp_path):
    bank = _bank()
    folder = io.write_bank(bank.tensors(), bank.meta, tmp_path / "bank")
    arrays = folder / io.BANK_ARRAYS
    data = bytearray(arrays.read_bytes())
    data[-3] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum differs"):
        io.read_bank(folder)
    arrays.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(InputError, match="checksum differs"):
        io.read_bank(folder)
    (folder / io.BANK_META).unlink()
    with pytest.raises(InputError, match="not a complete bank"):
        io.read_bank(folder)


def test_a_bank_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import safetensors.torch

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(OSError):
        io.write_bank(_bank().tensors(), {}, tmp_path / "bank")
    assert list(tmp_path.iterdir()) == []


def test_bank_settings_mismatch_names_each_difference():
    bank = _bank()
    with pytest.raises(InputError, match="image_size: bank has 32, this run asks for 64"):
        bank.check({"model": "m", "image_size": 64}, source="b")
    bank.check({"model": "m", "image_size": 32}, source="b")
    assert json.dumps(bank.meta)


def test_a_bank_is_shared_like_the_other_outputs(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = io.write_bank(_bank().tensors(), _bank().meta, tmp_path / "bank")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {io.BANK_ARRAYS: 0o644, io.BANK_META: 0o644}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


# Inputs read the way their header says (what the data type, the compression and the voxel sizes really are).

def _raw(path, **fields):
    """Rewrite fields of an uncompressed NIfTI-1 header in place: what a broken writer leaves behind."""
    import struct

    offsets = {"datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim1": (80, "<f"), "pixdim2": (84, "<f"),
               "pixdim3": (88, "<f")}
    data = bytearray(path.read_bytes())
    for name, value in fields.items():
        offset, form = offsets[name]
        data[offset:offset + struct.calcsize(form)] = struct.pack(form, value)
    path.write_bytes(bytes(data))
    return path


def test_complex_data_is_read_as_its_magnitude_with_a_note(tmp_path):
    magnitude = ct_volume(0, (20, 22, 6)) + 1100  # an MR-like magnitude: a dim, non-zero background
    phase = np.linspace(0, np.pi, magnitude.size).reshape(magnitude.shape)
    path = save_nifti((magnitude * np.exp(1j * phase)).astype(np.complex64), OBLIQUE, tmp_path / "complex.nii.gz")
    image = io.read_image(path)
    np.testing.assert_allclose(image.array, magnitude, rtol=1e-5)
    assert any("complex64 voxels: their magnitude is used (the phase is dropped)" in n for n in image.notes)


def test_rgb_data_is_read_as_the_mean_of_its_channels_with_a_note(tmp_path):
    ct = ct_volume(1, (20, 22, 6))
    grey = np.clip((ct + 1000) / 8, 0, 255).astype(np.uint8)
    rgb = np.zeros(ct.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = grey, grey // 2, 255 - grey
    image = io.read_image(save_nifti(rgb, OBLIQUE, tmp_path / "rgb.nii.gz"))
    np.testing.assert_allclose(image.array, (grey.astype(np.float32) + grey // 2 + (255 - grey)) / 3, rtol=1e-6)
    assert any("RGB voxels: the mean of the red, green and blue channels is used" in n for n in image.notes)


def test_one_bit_data_is_refused_with_its_real_cause(tmp_path):
    path = _raw(save_nifti((ct_volume(2, (20, 22, 6)) > 0).astype(np.uint8), OBLIQUE, tmp_path / "mask.nii"),
                datatype=1, bitpix=1)
    with pytest.raises(InputError) as raised:
        io.read_image(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: stores 1-bit voxels (NIfTI datatype DT_BINARY)") and "truncated" not in message
    assert "fslmaths" in message


@pytest.mark.parametrize("content, name", [("gzip", "named.nii"), ("plain", "named.nii.gz")])
def test_compression_is_read_from_the_content_not_the_name(content, name, tmp_path):
    import shutil

    ct = ct_volume(3, (20, 22, 6))
    source = save_nifti(ct, OBLIQUE, tmp_path / ("real.nii.gz" if content == "gzip" else "real.nii"))
    path = tmp_path / name
    shutil.copy(source, path)
    image = io.read_image(path)
    np.testing.assert_array_equal(image.array, ct)
    np.testing.assert_allclose(image.affine, OBLIQUE, atol=1e-5)
    expected = ("is gzip-compressed though its name ends in .nii" if content == "gzip" else
                "is not gzip-compressed though its name ends in .nii.gz")
    assert any(expected in n and "read by its content" in n for n in image.notes), image.notes


def test_a_truncated_gzip_is_still_called_truncated(tmp_path):
    data = save_nifti(ct_volume(3, (20, 22, 6)), OBLIQUE, tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.nii.gz: cannot be read as NIfTI .*truncated download"):
        io.read_image(tmp_path / "cut.nii.gz")


def test_analyze_and_nifti_pairs_are_read(tmp_path):
    ct = ct_volume(4, (20, 22, 6))
    nib.save(nib.Nifti1Pair(ct, OBLIQUE), tmp_path / "pair.hdr")
    nib.save(nib.AnalyzeImage(ct, np.diag([1.5, 2.0, 3.0, 1.0])), tmp_path / "old.hdr")
    pair = io.read_image(tmp_path / "pair.hdr")
    np.testing.assert_array_equal(pair.array, ct)
    np.testing.assert_allclose(pair.affine, OBLIQUE, atol=1e-5)
    assert not pair.notes and io.read_image(tmp_path / "pair.img").array.shape == ct.shape
    old = io.read_image(tmp_path / "old.hdr")
    np.testing.assert_array_equal(old.array, ct)
    assert any("Analyze 7.5 header holds no orientation" in n for n in old.notes)
    assert io.list_images(tmp_path) == [tmp_path / "old.hdr", tmp_path / "pair.hdr"]
    assert io.stem("pair.hdr") == "pair" and io.stem("pair.img") == "pair"
    # Outputs are single-file NIfTI on the input's grid, whatever the input's format.
    for image in (pair, old):
        written = nib.load(io.write_map(np.zeros(ct.shape, np.float32), image, tmp_path / "out" / "map.nii.gz"))
        assert isinstance(written, nib.Nifti1Image)
        np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)


def test_a_voxel_size_of_zero_is_noted_when_the_affine_depends_on_it(tmp_path):
    ct = ct_volume(5, (20, 22, 6))
    qform_only = _raw(save_nifti(ct, np.diag([1.5, 2.0, 3.0, 1.0]), tmp_path / "q.nii", sform_code=0), pixdim3=0.0)
    image = io.read_image(qform_only)
    assert any(n.startswith("pixdim[3] (the voxel size along the third axis) is 0 in the header; 1 mm is assumed")
               for n in image.notes), image.notes
    np.testing.assert_allclose(np.diag(image.affine), [1.5, 2.0, 1.0, 1.0])
    # With an sform the voxel sizes of pixdim do not place the voxels: nothing to say.
    with_sform = _raw(save_nifti(ct, np.diag([1.5, 2.0, 3.0, 1.0]), tmp_path / "s.nii"), pixdim3=0.0)
    assert not [n for n in io.read_image(with_sform).notes if "pixdim" in n]
