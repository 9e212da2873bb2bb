"""Files: reading every input kind, atomic writes, banks on disk."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import OBLIQUE, brain_volume, save_nifti

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


def test_nifti_bytes_keep_the_header_and_are_the_same_every_time(tmp_path):
    array = brain_volume(3)[0]
    path = save_nifti(array, OBLIQUE, tmp_path / "a.nii.gz", sform_code=4, qform_code=1)
    image = io.read_image(path)
    data = io.nifti_bytes(image)
    assert data == io.nifti_bytes(image)  # no time in the gzip header
    back = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), array)
    for coded in ("get_sform", "get_qform"):
        (matrix, code), (expected, expected_code) = (getattr(h, coded)(coded=True) for h in (back.header, image.header))
        np.testing.assert_allclose(matrix, expected, atol=1e-6)
        assert code == expected_code
    rounded = io.Image(np.rint(array), image.affine, image.header, path, "nifti")
    whole = nib.Nifti1Image.from_bytes(gzip.decompress(io.nifti_bytes(rounded, dtype=np.int16)))
    assert whole.get_data_dtype() == np.int16
    np.testing.assert_array_equal(whole.get_fdata(), np.rint(array))
