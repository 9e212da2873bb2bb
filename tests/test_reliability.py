"""The bad-input matrix: every row gets one clear message naming the file, exit code != 0, nothing written or changed.

Plus the guarantees: inputs never modified, results repeat bit for bit.
"""

import hashlib
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import FAST, OBLIQUE, as_stored, brain_volume, ct_volume, save_nifti

from himatch_med.bank.__main__ import bank_main
from himatch_med.run import main


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def inputs(tmp_path, cohort):
    """A copy of the cohort's query in a fresh folder, with room for broken files beside it."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cohort / "query.nii.gz", folder / "query.nii.gz")
    return folder


def run_cli(capsys, args, *, bank=True, tiny=None, cohort=None, out):
    source = ["--bank", str(bank)] if not isinstance(bank, bool) else []
    code = main([*map(str, args), *source, "--model", str(tiny), "-o", str(out), *FAST])
    return code, capsys.readouterr().err


def nifti(folder, name, array, affine=OBLIQUE):
    return save_nifti(np.asarray(array, dtype=np.float32), affine, folder / name)


def sform_only(folder, name, array, affine):
    """A file whose only orientation is an sform (a qform cannot hold a singular or sheared matrix)."""
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), None)
    image.header.set_sform(affine, code=2)
    image.header.set_qform(None, code=0)
    nib.save(image, folder / name)
    return folder / name


def normal():
    return as_stored(brain_volume(4)[0], OBLIQUE)


def write(folder, name, data: bytes):
    (folder / name).write_bytes(data)
    return folder / name


def one_bit(folder, name):
    """A mask stored as DT_BINARY (1 bit per voxel), which nibabel cannot read."""
    import struct

    path = save_nifti((normal() > 100).astype(np.uint8), OBLIQUE, folder / name)
    data = bytearray(path.read_bytes())
    data[70:74] = struct.pack("<hh", 1, 1)  # datatype DT_BINARY, bitpix 1
    path.write_bytes(bytes(data))
    return path


ROWS = {
    "not an image": (lambda f: write(f, "notes.nii.gz", b"patient notes"), "notes.nii.gz: cannot be read as NIfTI"),
    "empty file": (lambda f: write(f, "empty.nii.gz", b""), "empty.nii.gz: the file is empty"),
    "truncated": (lambda f: write(f, "cut.nii.gz", (f / "query.nii.gz").read_bytes()[:3000]),
                  "cut.nii.gz: cannot be read as NIfTI"),
    "2D NIfTI": (lambda f: nifti(f, "flat.nii.gz", np.ones((20, 20))), "flat.nii.gz: has 2 dimensions"),
    "4D": (lambda f: nifti(f, "four.nii.gz", np.stack([normal()] * 3, axis=-1)),
           "four.nii.gz: is 4D with 3 volumes; choose one with --volume-index 0..2"),
    "NaN voxels": (lambda f: nifti(f, "nan.nii.gz", np.where(normal() > 120, np.nan, normal())),
                   "NaN or infinite voxels; fix the file, or pass --nan-policy zero"),
    "constant": (lambda f: nifti(f, "flat.nii.gz", np.full((20, 22, 8), 7.0)), "is constant (every voxel is 7)"),
    "axis of size 0": (lambda f: nifti(f, "zero.nii.gz", np.zeros((20, 0, 8))), "has an axis of size 0"),
    "axis of size 1": (lambda f: nifti(f, "thin.nii.gz", normal()[20:21]),
                       "its axial slices would be 1 x"),
    "no foreground": (lambda f: nifti(f, "dark.nii.gz", np.pad(np.ones((1, 1, 1)), ((0, 39), (0, 43), (0, 13)))),
                      "no slice has at least 1% foreground under --foreground border"),
    "singular affine": (lambda f: sform_only(f, "singular.nii.gz", normal(), np.diag([1.0, 1.0, 0.0, 1.0])),
                        "affine is singular"),
    "sheared affine": (lambda f: sform_only(f, "sheared.nii.gz", normal(), np.array(
        [[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])), "affine is sheared"),
    "tiny volume": (lambda f: nifti(f, "tiny.nii.gz", ct_volume(0, (2, 2, 2)), np.diag([0.8, 0.8, 2.5, 1])),
                    "tiny.nii.gz: its axial slices would be 2 x 2 pixels (shape (2, 2, 2)); too small to be a study"),
    "1-bit voxels": (lambda f: one_bit(f, "mask.nii"), "mask.nii: stores 1-bit voxels (NIfTI datatype DT_BINARY)"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_gets_one_clear_message(row, inputs, tmp_path, tiny_bank, tiny_dinov3, cohort, capsys):
    make, message = ROWS[row]
    path = make(inputs)
    before = digest(inputs)
    out = tmp_path / "out"
    code, err = run_cli(capsys, [path], bank=tiny_bank, tiny=tiny_dinov3, out=out)
    assert code != 0
    assert message in err and str(path.name) in err, err
    assert "Traceback" not in err
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".write-test")]
    assert digest(inputs) == before


def test_nan_policy_zero_replaces_and_warns(inputs, tmp_path, tiny_bank, tiny_dinov3, capsys):
    path = ROWS["NaN voxels"][0](inputs)
    code, err = run_cli(capsys, [path, "--nan-policy", "zero"], bank=tiny_bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code == 0
    assert "NaN or infinite voxels set to 0" in err
    assert np.isfinite(nib.load(tmp_path / "o" / "nan_anomaly.nii.gz").get_fdata()).all()


def test_volume_index_takes_one_volume_of_a_4d_file(inputs, tmp_path, tiny_bank, tiny_dinov3, capsys):
    path = ROWS["4D"][0](inputs)
    code, _ = run_cli(capsys, [path, "--volume-index", "1"], bank=tiny_bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code == 0
    assert nib.load(tmp_path / "o" / "four_anomaly.nii.gz").shape == nib.load(path).shape[:3]


def test_disagreeing_qform_and_sform_say_which_is_used(inputs, tmp_path, tiny_bank, tiny_dinov3, capsys):
    code, err = run_cli(capsys, [inputs / "query.nii.gz"], bank=tiny_bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code == 0
    assert "qform (code 1) and sform (code 4) disagree" in err and "the sform is used" in err


def test_a_bank_from_another_model_is_refused(inputs, tmp_path, tiny_bank, tiny_dinov2, capsys):
    code = main([str(inputs / "query.nii.gz"), "--bank", str(tiny_bank), "--model", str(tiny_dinov2), "-o",
                 str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "was built with other weights than" in err and "fingerprints differ" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.nii.gz"))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_bank_folder_is_refused(damage, inputs, tmp_path, tiny_bank, tiny_dinov3, capsys):
    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank, bank)
    arrays = bank / "bank.safetensors"
    if damage == "missing":
        arrays.unlink()
        expected = "not a complete bank (missing bank.safetensors); build it with `python -m himatch_med.bank build`"
    else:
        arrays.write_bytes(arrays.read_bytes()[:-100])
        expected = "checksum differs from the one recorded in bank.json (truncated or modified); rebuild the bank"
    code, err = run_cli(capsys, [inputs / "query.nii.gz"], bank=bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code == 2 and expected in err


def test_empty_and_all_invalid_reference_folders(tmp_path, tiny_dinov3, capsys):
    (tmp_path / "empty").mkdir()
    assert bank_main(["build", str(tmp_path / "empty"), "-o", str(tmp_path / "b1"), "--model", str(tiny_dinov3)]) == 2
    assert "holds no NIfTI, DICOM or 2D image files" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.nii.gz").write_text("junk")
    nifti(tmp_path / "bad", "b.nii.gz", np.full((10, 10, 4), 3.0))
    code = bank_main(["build", str(tmp_path / "bad"), "-o", str(tmp_path / "b2"), "--model", str(tiny_dinov3), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "no usable reference slice" in err
    assert "a.nii.gz: cannot be read as NIfTI" in err and "b.nii.gz: is constant" in err
    assert not (tmp_path / "b2").exists()


def test_an_output_folder_that_cannot_be_written(inputs, tmp_path, tiny_bank, tiny_dinov3, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, err = run_cli(capsys, [inputs / "query.nii.gz"], bank=tiny_bank, tiny=tiny_dinov3, out=blocker / "out")
    assert code == 2 and "the output folder cannot be written" in err and "-o" in err


def test_an_output_that_would_overwrite_an_input(tmp_path, tiny_bank, tiny_dinov3, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    nifti(folder, "a.nii.gz", normal())
    nifti(folder, "a_anomaly.nii.gz", normal())  # an input named like a's output
    before = digest(folder)
    code, err = run_cli(capsys, [folder / "a.nii.gz", folder / "a_anomaly.nii.gz"], bank=tiny_bank, tiny=tiny_dinov3,
                        out=folder)
    assert code == 2 and "would overwrite an input" in err
    assert digest(folder) == before


def test_a_dicom_folder_with_several_series(tmp_path, tiny_bank, tiny_dinov3, capsys):
    import SimpleITK as sitk

    folder = tmp_path / "dicom"
    folder.mkdir()
    volume = brain_volume(2, (20, 22, 4))[0].astype(np.int16)
    for series in ("1.2.3.1", "1.2.3.2"):
        image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            plane = image[:, :, k]
            plane.SetMetaData("0020|000e", series)
            plane.SetMetaData("0020|0032", f"0\\0\\{k}")
            plane.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
            writer.SetFileName(str(folder / f"{series}-{k}.dcm"))
            writer.Execute(plane)
    code, err = run_cli(capsys, [folder], bank=tiny_bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code != 0 and ("holds 2 DICOM series; choose one with --series UID from: 1.2.3.1 (OT, no description, 4 "
                          "slices); 1.2.3.2 (OT, no description, 4 slices)") in err, err
    code, err = run_cli(capsys, [folder, "--series", "1.2.3.2"], bank=tiny_bank, tiny=tiny_dinov3,
                        out=tmp_path / "o")
    assert code == 0, err
    assert nib.load(tmp_path / "o" / "dicom_anomaly.nii.gz").shape == (20, 22, 4)


def test_same_input_same_settings_identical_bytes(inputs, tmp_path, tiny_dinov3, cohort, capsys):
    outputs = []
    for run in ("a", "b"):
        bank = tmp_path / f"bank-{run}"
        assert bank_main(["build", str(cohort / "refs"), "-o", str(bank), "--model", str(tiny_dinov3), *FAST]) == 0
        code, _ = run_cli(capsys, [inputs / "query.nii.gz"], bank=bank, tiny=tiny_dinov3, out=tmp_path / run)
        assert code == 0
        outputs.append(tmp_path / run)
    assert (outputs[0] / "query_anomaly.nii.gz").read_bytes() == (outputs[1] / "query_anomaly.nii.gz").read_bytes()
    assert (outputs[0] / "query_uncertainty.nii.gz").read_bytes() == \
        (outputs[1] / "query_uncertainty.nii.gz").read_bytes()
    banks = [(tmp_path / f"bank-{run}" / "bank.safetensors").read_bytes() for run in ("a", "b")]
    assert banks[0] == banks[1]


def _png_size(path):
    import struct

    return struct.unpack(">II", path.read_bytes()[16:24])


def test_the_overview_figure_stays_bounded_at_any_pixel_aspect():
    from himatch_med.figures import overview

    slices = np.random.default_rng(0).random((2, 40, 44))
    for aspect in (1000.0, 2e6, 1e-6):
        figure = overview(slices, slices * 4, slices > 0.1, ["a", "b"], title="t", aspect=aspect)
        assert max(figure.get_size_inches()) < 20


@pytest.mark.parametrize("aspect", [1000.0, 2e6])
def test_an_extreme_pixel_aspect_is_drawn_capped_and_said(aspect, tmp_path, tiny_bank, tiny_dinov3, capsys):
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    # Rows 1 mm apart, columns 1/aspect mm: a header that is almost certainly wrong, but still a volume.
    path = nifti(folder, "thin_pixels.nii.gz", brain_volume(4)[0] + 20, np.diag([1 / aspect, 1.0, 3.0, 1.0]))
    started = time.perf_counter()
    code, err = run_cli(capsys, [path], bank=tiny_bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code == 0, err
    assert time.perf_counter() - started < 60
    assert f"the slices' pixels are {aspect:g} times taller than wide" in err and "capped at 8:1" in err
    width, height = _png_size(tmp_path / "o" / "thin_pixels_overview.png")
    assert width < 2500 and height < 2500
    report = (tmp_path / "o" / "thin_pixels_report.json").read_text()
    assert "capped at 8:1" in report


def test_an_analyze_pair_and_a_misnamed_gzip_run_through(tmp_path, tiny_bank, tiny_dinov3, capsys):
    import gzip

    folder = tmp_path / "in"
    folder.mkdir()
    volume = as_stored(brain_volume(5)[0] + 20, OBLIQUE)
    nib.save(nib.Nifti1Pair(volume, OBLIQUE), folder / "pair.hdr")
    (folder / "zipped.nii").write_bytes(gzip.compress(nib.Nifti1Image(volume, OBLIQUE).to_bytes()))
    code, err = run_cli(capsys, [folder], bank=tiny_bank, tiny=tiny_dinov3, out=tmp_path / "o")
    assert code == 0, err
    assert "zipped.nii: the file is gzip-compressed though its name ends in .nii" in err
    for name in ("pair", "zipped"):
        heat = nib.load(tmp_path / "o" / f"{name}_anomaly.nii.gz")
        assert heat.shape == volume.shape and np.allclose(heat.affine, OBLIQUE, atol=1e-5)
