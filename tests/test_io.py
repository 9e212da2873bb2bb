"""Files: reading every input kind, atomic writes, banks on disk."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CORONAL, OBLIQUE, brain_volume, ct_volume, save_nifti, write_dicom, write_dicom_object

from himatch_med import io
from himatch_med.bank.data import Bank, BankInfo
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

    def explode(self, file_map, *args, **kwargs):  # half the data reaches the file, then the disk is full
        file_map["image"].fileobj.write(b"\0" * (352 + 4 * 5 * 6 * 2))
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", explode)
    with pytest.raises(OSError, match="disk full"):
        io.write_map(np.ones((4, 5, 6), np.float32), like.header, tmp_path / "out_anomaly.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def _set(folder):
    return {name: folder / f"x_{name}.txt" for name in ("one", "two", "report")}


def test_a_set_is_placed_whole_and_its_lock_removed(tmp_path):
    paths = _set(tmp_path)
    with io.write_set(paths, lock=tmp_path / ".x.lock", owner="x") as staged:
        for name, path in staged.items():
            assert path.parent == tmp_path and path.name.startswith(f".x_{name}.txt.") and ".part" in path.name
            io.write_text(name, path)
        assert not any(p.exists() for p in paths.values())  # nothing under a final name before the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_one.txt", "x_report.txt", "x_two.txt"]
    with pytest.raises(RuntimeError, match="x: its two was not written, so none of its outputs is placed"):
        with io.write_set(paths, lock=tmp_path / ".x.lock", owner="x") as staged:
            io.write_text("new", staged["one"])
            io.write_text("new", staged["report"])
    assert [paths[name].read_text() for name in ("one", "two", "report")] == ["one", "two", "report"]


def test_ctrl_c_while_a_set_is_placed_is_delivered_once_it_is_whole(tmp_path, monkeypatch):
    import os
    import signal

    paths = _set(tmp_path)
    real = os.replace

    def replace(source, target):
        if str(target).endswith("x_one.txt"):
            signal.raise_signal(signal.SIGINT)  # in the middle of placing: would leave one without the others
        return real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with io.write_set(paths, lock=tmp_path / ".x.lock", owner="x") as staged:
            for name, path in staged.items():
                io.write_text(name, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_one.txt", "x_report.txt", "x_two.txt"]


def _bank(stages=2):
    n, d = 5, 8
    return Bank(cls=torch.randn(n, d).half(), layout=torch.randn(n, 4, d).half(),
                centroids=torch.randn(n, stages, 3, d).half(), sizes=torch.ones(n, stages, 3, dtype=torch.int32),
                positions=torch.linspace(0, 1, n), groups=torch.tensor([0, 0, 1, 1, 1]),
                calibration_mean=torch.zeros(stages), calibration_std=torch.ones(stages),
                calibration_slice_scores=torch.tensor([0.1, 0.2]), calibration_volume_scores=torch.zeros(0),
                info=BankInfo(settings={"model": "m", "image_size": 32}))


def test_bank_round_trip_memory_mapped(tmp_path):
    bank = _bank()
    io.write_bank(bank.tensors(), bank.metadata, tmp_path / "bank")
    tensors, meta = io.read_bank(tmp_path / "bank")
    loaded = Bank.from_stored(tensors, meta, source="bank")
    for name, tensor in bank.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    assert loaded.info.settings == bank.info.settings and len(meta["arrays_sha256"]) == 64
    assert loaded.id == meta["arrays_sha256"][:16] and bank.id == ""
    memory = loaded.memory(torch.tensor([[4, 0]]), 1, torch.device("cpu"))
    assert memory.shape == (1, 2, 3, 8) and memory.dtype == torch.float32
    assert torch.equal(memory[0, 0], bank.centroids[4, 1].float()) and torch.equal(memory[0, 1], bank.centroids[0, 1].float())


def test_a_damaged_bank_is_refused(tmp_path):
    bank = _bank()
    folder = io.write_bank(bank.tensors(), bank.metadata, tmp_path / "bank")
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
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "file_sha256", explode)  # after the arrays were written, before the metadata
    # The message names where the bank goes (a full disk is the output's, not an input's) and the fix.
    with pytest.raises(InputError, match=r"bank: the bank could not be written to .* \(disk full\); free space"):
        io.write_bank(_bank().tensors(), _bank().metadata, tmp_path / "bank")
    assert list(tmp_path.iterdir()) == []


def test_bank_settings_mismatch_names_each_difference():
    bank = _bank()
    with pytest.raises(InputError, match="image_size: bank has 32, this run asks for 64"):
        bank.check({"model": "m", "image_size": 64}, source="b")
    bank.check({"model": "m", "image_size": 32}, source="b")


def test_a_bank_is_shared_like_the_other_outputs(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = io.write_bank(_bank().tensors(), _bank().metadata, tmp_path / "bank")
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
    assert "pass the image the mask belongs to" in message and "8-bit (uint8) or wider" in message


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


@pytest.mark.parametrize("decompressor", ["isal", "zlib"])
@pytest.mark.parametrize("kind", [nib.Nifti1Image, nib.Nifti2Image])
def test_a_gzipped_nifti_reads_as_nibabel_loads_it(tmp_path, monkeypatch, kind, decompressor):
    if decompressor == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setattr(io, "_igzip", None)
    array = np.random.default_rng(2).integers(-1000, 3000, (9, 8, 7)).astype(np.int16)
    image = kind(array, OBLIQUE)
    image.header.set_slope_inter(0.5, -10)
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"made by a scanner"))
    image.set_qform(OBLIQUE, code=1)
    path = tmp_path / "scan.nii.gz"
    nib.save(image, path)
    read, loaded = io.read_image(path), nib.load(path)
    np.testing.assert_array_equal(read.array, loaded.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(read.affine, loaded.affine)
    assert type(read.header) is type(loaded.header) and read.header.get_qform(coded=True)[1] == 1
    assert len(read.header.extensions) == 1 and read.notes == ()


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
        written = nib.load(io.write_map(np.zeros(ct.shape, np.float32), image.header, tmp_path / "out" / "map.nii.gz"))
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


# DICOM series checked from their headers, as NIfTI headers are.

def _slices(seed=0, count=10, rows=24, columns=22):
    """CT planes ``(slices, rows, columns)`` in HU."""
    return ct_volume(seed, (rows, columns, count)).transpose(2, 0, 1)


def test_a_dicom_series_is_stacked_by_position_whatever_the_file_names(tmp_path):
    hu = _slices()
    names = [f"x{(7 * k) % 10}.dcm" for k in range(10)]  # name order is not slice order
    write_dicom(tmp_path / "ct", hu, names=names)
    image = io.read_image(tmp_path / "ct")
    assert image.kind == "dicom" and image.array.shape == (22, 24, 10) and not image.notes
    np.testing.assert_array_equal(image.array, np.round(hu).transpose(2, 1, 0))
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3], axis=0), [0.7, 0.8, 3.0], atol=1e-4)


def test_a_missing_slice_is_refused_with_the_spacing_found(tmp_path):
    folder = tmp_path / "ct"
    paths = write_dicom(folder, _slices(count=12))
    paths[6].unlink()
    with pytest.raises(InputError) as raised:
        io.read_image(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder}: DICOM series 1.2.826.0.1.3680043.8.498.101 is not evenly spaced: its slices "
                              "are 3 mm apart but 6 mm between IM0006.dcm and IM0008.dcm (1 slice missing?)")
    assert "at a uniform 3.3 mm, slices would be misplaced by up to 1.5 mm" in message and "re-export the complete series" in message and "dcm2niix" in message


def test_uneven_spacing_is_refused(tmp_path):
    steps = [0, 3, 6, 9, 14, 17, 19, 22, 25, 47]
    positions = [(-18.0, -12.0, 40.0 + z) for z in steps]
    write_dicom(tmp_path / "ct", _slices(), positions=positions)
    with pytest.raises(InputError, match=r"is not evenly spaced: its slices are 3 mm apart but 22 mm between "
                                         r"IM0009.dcm and IM0010.dcm; the spacing varies from 2 to 22 mm"):
        io.read_image(tmp_path / "ct")


def test_duplicate_positions_are_refused(tmp_path):
    positions = [(-18.0, -12.0, 40.0 + 3 * k) for k in range(9)] + [(-18.0, -12.0, 52.0)]
    write_dicom(tmp_path / "ct", _slices(), positions=positions)
    with pytest.raises(InputError, match=r"has 2 slices at one position \(e.g. IM0005.dcm and IM0010.dcm at 52 mm along "
                                         r"the slice normal\); it may hold several acquisitions"):
        io.read_image(tmp_path / "ct")


def test_a_series_mixing_orientations_is_refused(tmp_path):
    hu = _slices()
    write_dicom(tmp_path / "ct", hu[:6])
    write_dicom(tmp_path / "ct", hu[6:], orientation=CORONAL, origin=(-18.0, 10.0, 60.0),
                names=[f"COR{k}.dcm" for k in range(4)])
    with pytest.raises(InputError, match=r"mixes slice orientations \(4 coronal slices, e.g. COR0.dcm; 6 axial "
                                         r"slices, e.g. IM0001.dcm\); stacked as one volume they would be wrong"):
        io.read_image(tmp_path / "ct")


def test_a_folder_is_a_dicom_series_by_its_content_not_a_file_name(tmp_path):
    from himatch_med import jobs

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    save_nifti(ct_volume(1, (20, 22, 6)), OBLIQUE, cohort / "a.nii.gz")
    (cohort / "stray.dcm").write_bytes(b"")  # an empty file named .dcm is not a DICOM series
    assert not io.is_dicom_folder(cohort)
    assert jobs.expand_inputs([cohort]) == [cohort / "a.nii.gz"]
    # DICOM slices named without a suffix, beside a NIfTI volume: both are inputs, neither hides the other.
    write_dicom(cohort, _slices(), names=[f"slice{k}" for k in range(10)])
    assert not io.is_dicom_folder(cohort)
    assert jobs.expand_inputs([cohort]) == [cohort / "a.nii.gz", cohort]
    assert io.read_image(cohort).array.shape == (22, 24, 10)
    write_dicom(tmp_path / "series", _slices(), names=[f"{k}" for k in range(10)])
    assert io.is_dicom_folder(tmp_path / "series") and jobs.expand_inputs([tmp_path / "series"]) == [
        tmp_path / "series"]


SEG = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def test_a_seg_or_rtstruct_beside_the_images_is_not_a_series(tmp_path):
    folder = tmp_path / "ct"
    write_dicom(folder, _slices())
    write_dicom_object(folder / "seg.dcm", "SEG", SEG, series="1.2.826.0.1.3680043.8.498.201", rows=24)
    write_dicom_object(folder / "contours.dcm", "RTSTRUCT", RTSTRUCT, series="1.2.826.0.1.3680043.8.498.202")
    image = io.read_image(folder)
    assert image.array.shape == (22, 24, 10)
    assert image.notes == ("not read, as they are not images: contours.dcm (an RT structure set, RTSTRUCT), seg.dcm "
                           "(a DICOM SEG segmentation)",)
    alone = tmp_path / "seg-only"
    alone.mkdir()
    write_dicom_object(alone / "seg.dcm", "SEG", SEG, series="1.2.826.0.1.3680043.8.498.201", rows=24)
    with pytest.raises(InputError, match=r"seg-only: holds no DICOM image series: seg.dcm is a DICOM SEG "
                                         r"segmentation, not an image; pass the folder of the images"):
        io.read_image(alone)


def test_several_series_are_listed_with_modality_and_description(tmp_path):
    folder = tmp_path / "study"
    write_dicom(folder, _slices(count=6), series="1.2.3.1", description="Head 5mm", thickness=5.0,
                names=[f"a{k}.dcm" for k in range(6)])
    write_dicom(folder, _slices(count=8), series="1.2.3.2", description="Head 1mm", modality="CT", thickness=1.0,
                names=[f"b{k}.dcm" for k in range(8)])
    with pytest.raises(InputError) as raised:
        io.read_image(folder)
    assert str(raised.value) == (f'{folder}: holds 2 DICOM series; choose one with --series UID from: 1.2.3.1 (CT, '
                                 '"Head 5mm", 6 slices); 1.2.3.2 (CT, "Head 1mm", 8 slices)')
    assert io.read_image(folder, series="1.2.3.2").array.shape == (22, 24, 8)
    with pytest.raises(InputError, match=r'has no series 1.2.3.9; it holds: 1.2.3.1 \(CT, "Head 5mm", 6 slices\)'):
        io.read_image(folder, series="1.2.3.9")


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


@pytest.mark.parametrize("compressor", ["isal", "zlib"])
def test_maps_are_valid_gzip_nifti_read_back_equal_with_the_same_bytes_every_time(tmp_path, monkeypatch, compressor):
    if compressor == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setattr(io, "_igzip", None)
    like = io.read_image(save_nifti(brain_volume(4)[0], OBLIQUE, tmp_path / "in.nii.gz", sform_code=4, qform_code=1))
    heat = np.random.default_rng(0).normal(size=like.array.shape).astype(np.float32)
    first = io.write_map(heat, like.header, tmp_path / "a" / "map.nii.gz")
    second = io.write_map(heat, like.header, tmp_path / "b" / "map.nii.gz")
    assert first.read_bytes() == second.read_bytes()  # no time or temporary name in the gzip header
    back = nib.load(first)
    np.testing.assert_array_equal(np.asarray(back.dataobj), heat)
    assert back.get_data_dtype() == np.float32
    for coded in ("get_sform", "get_qform"):
        (matrix, code), (expected, expected_code) = (getattr(h, coded)(coded=True) for h in (back.header, like.header))
        np.testing.assert_allclose(matrix, expected, atol=1e-6)
        assert code == expected_code
    # One standard gzip member holding exactly the NIfTI nibabel itself would write.
    assert gzip.decompress(first.read_bytes()) == nib.Nifti1Image(heat, None, back.header).to_bytes()


@pytest.mark.parametrize("kind", [nib.Nifti1Image, nib.Nifti2Image])
def test_a_map_streamed_in_chunks_holds_the_bytes_nibabel_writes_whole(tmp_path, monkeypatch, kind):
    """Written in small chunks, with an extension in the header, NIfTI-2 too: exactly nibabel's own file."""
    monkeypatch.setattr(io, "MAP_WRITE_CHUNK", 1000)  # many chunks, a slice split across them
    heat = np.random.default_rng(1).normal(size=(9, 8, 7)).astype(np.float32)
    header = kind(heat, OBLIQUE).header
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"made by a scanner"))
    written = io.write_map(heat, header, tmp_path / "map.nii.gz", dtype=np.float32)
    expected = kind(heat, None, nib.load(written).header).to_bytes()
    assert gzip.decompress(written.read_bytes()) == expected
    assert type(nib.load(written)) is kind and len(nib.load(written).header.extensions) == 1


def test_bank_arrays_are_a_safetensors_file_that_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    bank = _bank()
    tensors = {**bank.tensors(), "calibration_volume_scores": torch.zeros(0)}
    folder = io.write_bank(tensors, bank.metadata, tmp_path / "bank")
    loaded = load_file(folder / io.BANK_ARRAYS)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    again = io.write_bank(tensors, bank.metadata, tmp_path / "again")
    assert (again / io.BANK_ARRAYS).read_bytes() == (folder / io.BANK_ARRAYS).read_bytes()


def test_bank_arrays_are_written_in_blocks(tmp_path):
    """Arrays larger than a block go out block by block and come back equal."""
    from safetensors.torch import load_file

    big = torch.arange(10_000, dtype=torch.int64).reshape(100, 100)
    io.write_safetensors({"big": big, "half": big.half()}, tmp_path / "arrays.safetensors", block=4096)
    loaded = load_file(tmp_path / "arrays.safetensors")
    assert torch.equal(loaded["big"], big) and torch.equal(loaded["half"], big.half())


def test_spilled_rows_come_back_memory_mapped_and_equal():
    spill = io.Spill()
    parts = [torch.randn(3, 4, 5).half(), torch.randn(1, 4, 5).half(), torch.randn(6, 4, 5).half()]
    for part in parts:
        spill.append(part)
    back = spill.tensor()
    assert back.shape == (10, 4, 5) and back.dtype == torch.float16
    assert torch.equal(back, torch.cat(parts))
    with pytest.raises(RuntimeError, match="differ"):
        spill.append(torch.zeros(1, 4, 6).half())


@pytest.mark.parametrize("aspect, contours", [(1.0, False), (3.0, True), (0.2, False)])
def test_a_figure_is_cropped_as_matplotlib_tight_crops_it(tmp_path, aspect, contours):
    # write_figure measures the tight box with the images hidden (they are clipped to their axes); the picture must
    # be matplotlib's own bbox_inches="tight" one, pixel for pixel.
    from PIL import Image as Picture

    from himatch_med.figures import overview
    from himatch_med.screening import roc_figure

    rng = np.random.default_rng(0)
    slices = rng.random((3, 40, 50)).astype(np.float32)
    maps = rng.normal(2, 2, (3, 40, 50)).astype(np.float32)
    foreground = np.zeros((3, 40, 50), bool)
    foreground[:, 5:35, 5:45] = True
    labels = np.zeros((3, 40, 50), np.uint8)
    labels[:, 10:20, 10:25] = 1
    figures = [overview(slices, maps, foreground, ["slice k=1  score 2.00"] * 3, title="a long title\nof two lines",
                        aspect=aspect, findings=labels, contours=foreground if contours else None),
               roc_figure(np.array([0, 0.5, 1]), np.array([0, 0.8, 1]), 0.7, 3, 4)]
    for number, figure in enumerate(figures):
        canvas = figure.canvas
        ours = io.write_figure(figure, tmp_path / f"ours{number}.png")
        assert figure.canvas is canvas  # measuring leaves a figure its own canvas (a window's stays the window's)
        figure.savefig(tmp_path / f"tight{number}.png", format="png", dpi=100, bbox_inches="tight")
        mine, theirs = (np.asarray(Picture.open(path)) for path in (ours, tmp_path / f"tight{number}.png"))
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), number


def test_a_figure_is_compressed_at_the_fast_zlib_level(tmp_path):
    # zlib's header says which kind of level compressed a stream (FLEVEL: 0 for 1, 1 for 2-5, 2 for PIL's default 6).
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.subplots().imshow(np.random.default_rng(0).random((20, 20)))
    data = io.write_figure(figure, tmp_path / "f.png").read_bytes()
    start = data.index(b"IDAT") + 4
    assert io.FIGURE_COMPRESSION == 3 and data[start + 1] >> 6 == 1
