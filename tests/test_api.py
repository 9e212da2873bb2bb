"""The Python API: a detector opened or built, detection on images in memory, maps on the input's grid, save.

The stand-in extractor and the conftest bank; inputs with oblique, permuted and LPS headers, a bright lesion planted
in a brain on a z-scored (-3.62) background.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import LESION, OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_distributed, as_stored, brain_volume, save_nifti

import himatch_med as hm
from himatch_med import jobs
from himatch_med.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CHANGED = {k: v for k, v in asdict(SETTINGS).items() if v != getattr(hm.Settings(), k) and k != "model"}
"""The test settings as keyword arguments (the stand-in brings its own model)."""


@pytest.fixture(scope="module")
def planted():
    """A brain with a bright lesion on a z-scored background (-3.62 around it), and the lesion mask (canonical)."""
    volume, lesion = brain_volume(5, SHAPE, lesion=LESION)
    return as_distributed(volume, volume > 0, kind="zscore"), lesion


@pytest.fixture(scope="module")
def query_file(planted, tmp_path_factory):
    """The planted brain stored oblique (qform and sform differ), as a NIfTI file."""
    path = tmp_path_factory.mktemp("query") / "patient.nii.gz"
    image = nib.Nifti1Image(as_stored(planted[0], OBLIQUE), OBLIQUE)
    image.set_qform(OBLIQUE + np.array([[0, 0, 0, 0.5]] + [[0] * 4] * 3), code=1)
    image.set_sform(OBLIQUE, code=4)
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def from_file(detector, query_file):
    return hm.detect_image(detector, query_file)


def test_a_file_gives_maps_on_its_grid_with_its_header_and_the_lesion_lights_up(from_file, query_file, planted):
    source = nib.load(query_file)
    for image in (from_file.anomaly, from_file.uncertainty, from_file.labels):
        assert isinstance(image, nib.Nifti1Image) and image.shape == source.shape
        np.testing.assert_allclose(image.affine, source.affine)
        np.testing.assert_allclose(image.header.get_qform(), source.header.get_qform())
        assert image.header.get_sform(coded=True)[1] == 4 and image.header.get_qform(coded=True)[1] == 1
    heat = from_file.array("anomaly")
    lesion = as_stored(planted[1], OBLIQUE)
    assert np.unravel_index(heat.argmax(), heat.shape) in set(zip(*np.nonzero(lesion)))
    assert heat[lesion].mean() > heat[~lesion & (heat != 0)].mean() + 2
    assert from_file.findings and from_file.findings[0]["peak_z"] == pytest.approx(float(heat.max()), abs=1e-3)
    assert np.array_equal(np.asarray(from_file.labels.dataobj) > 0, from_file.array("labels") > 0)
    assert from_file.volume_score == from_file.report["volume_score"] and 0 <= from_file.volume_percentile <= 100
    assert from_file.slice_scores.shape == (SHAPE[2],) and from_file.slice_scores.max() > 0
    assert from_file.report["input"] == str(query_file)


def test_a_nibabel_image_in_memory_gives_what_its_file_gives(detector, query_file, from_file):
    loaded = nib.load(query_file)
    image = nib.Nifti1Image(np.asanyarray(loaded.dataobj), loaded.affine, loaded.header)  # no file name
    result = hm.detect_image(detector, image, name="patient")
    assert isinstance(result.anomaly, nib.Nifti1Image)
    np.testing.assert_allclose(result.anomaly.affine, loaded.affine)
    np.testing.assert_allclose(result.anomaly.header.get_qform(), loaded.header.get_qform())
    np.testing.assert_array_equal(result.array("anomaly"), from_file.array("anomaly"))
    np.testing.assert_array_equal(result.array("uncertainty"), from_file.array("uncertainty"))
    assert result.findings == from_file.findings and result.volume_score == from_file.volume_score


def test_a_simpleitk_image_gives_simpleitk_maps_on_its_grid(detector, query_file, from_file):
    image = sitk.ReadImage(str(query_file))  # ITK takes the sform (LPS geometry): the same grid
    result = hm.detect_image(detector, image)
    for made in (result.anomaly, result.uncertainty, result.labels):
        assert isinstance(made, sitk.Image) and made.GetSize() == image.GetSize()
        assert made.GetOrigin() == image.GetOrigin() and made.GetSpacing() == image.GetSpacing()
        assert made.GetDirection() == image.GetDirection()
    as_array = sitk.GetArrayFromImage(result.anomaly).transpose(2, 1, 0)
    np.testing.assert_allclose(as_array, from_file.array("anomaly"), atol=1e-5)
    np.testing.assert_allclose(as_array, result.array("anomaly"))
    assert result.volume_score == pytest.approx(from_file.volume_score, abs=1e-5)


def test_an_array_and_affine_pair_with_permuted_axes(detector, planted, tmp_path):
    stored = as_stored(planted[0], PERMUTED)
    result = hm.detect_image(detector, (stored, PERMUTED))
    assert isinstance(result.anomaly, nib.Nifti1Image) and result.anomaly.shape == stored.shape
    np.testing.assert_allclose(result.anomaly.affine, PERMUTED)
    path = save_nifti(stored, PERMUTED, tmp_path / "permuted.nii.gz")
    np.testing.assert_array_equal(result.array("anomaly"), hm.detect_image(detector, path).array("anomaly"))
    heat, lesion = result.array("anomaly"), as_stored(planted[1], PERMUTED)
    assert np.unravel_index(heat.argmax(), heat.shape) in set(zip(*np.nonzero(lesion)))


def test_inputs_are_not_modified(detector, planted):
    stored = as_stored(planted[0], OBLIQUE).copy()
    before, affine = stored.copy(), OBLIQUE.copy()
    hm.detect_image(detector, (stored, affine))
    np.testing.assert_array_equal(stored, before)
    np.testing.assert_array_equal(affine, OBLIQUE)


def test_save_writes_the_files_the_command_line_writes(detector, query_file, from_file, tmp_path):
    written = from_file.save(tmp_path / "api")
    cli = jobs.process(query_file, detector, tmp_path / "cli", progress=False)
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(p.name for p in (tmp_path / "cli").iterdir())
    for name in ("patient_anomaly.nii.gz", "patient_findings.nii.gz", "patient_uncertainty.nii.gz"):
        np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "api" / name).dataobj),
                                      np.asanyarray(nib.load(tmp_path / "cli" / name).dataobj))
    on_disk = json.loads((tmp_path / "api" / "patient_report.json").read_text(encoding="utf-8"))
    assert on_disk["outputs"] == cli["outputs"] == written["outputs"]
    assert on_disk["volume_score"] == cli["volume_score"] and on_disk["findings"] == cli["findings"]


def test_an_image_in_memory_is_saved_under_its_name(detector, planted, tmp_path):
    result = hm.detect_image(detector, (as_stored(planted[0], OBLIQUE), OBLIQUE), name="case7")
    result.save(tmp_path)
    assert (tmp_path / "case7_anomaly.nii.gz").is_file() and (tmp_path / "case7_report.json").is_file()
    np.testing.assert_allclose(nib.load(tmp_path / "case7_anomaly.nii.gz").affine, OBLIQUE)


def test_a_mask_in_memory_replaces_the_foreground_mode(detector, planted):
    stored = as_stored(planted[0], OBLIQUE)
    mask = np.zeros(stored.shape, bool)
    mask[:, :, 4:10] = stored[:, :, 4:10] > -3.62
    result = hm.detect_image(detector, (stored, OBLIQUE), mask=mask)
    heat = result.array("anomaly")
    assert np.all(heat[~mask] == 0) and np.any(heat[mask] != 0)
    with pytest.raises(InputError, match=r"the mask has shape \(3, 3, 3\); it must lie on the grid"):
        hm.detect_image(detector, (stored, OBLIQUE), mask=np.ones((3, 3, 3)))


def test_what_cannot_be_an_image_is_refused_with_the_fix(detector, planted):
    with pytest.raises(ValueError, match="a list is not an image himatch-med reads; pass a path, a nibabel image"):
        hm.detect_image(detector, [1, 2, 3])
    with pytest.raises(ValueError, match=r"the affine has shape \(3, 3\); pass a 4 x 4"):
        hm.detect_image(detector, (planted[0], np.eye(3)))
    with pytest.raises(InputError, match="image: has 1 NaN or infinite voxels"):
        volume = planted[0].copy()
        volume[3, 3, 3] = np.nan
        hm.detect_image(detector, (volume, OBLIQUE))
    with pytest.raises(ValueError, match="name='x': for an image in memory; the outputs of a file are named after"):
        hm.detect_image(detector, "patient.nii.gz", name="x")
    with pytest.raises(ValueError, match="referencesk: not a setting"):
        hm.build_detector([], referencesk=3)


def test_a_bank_built_written_and_opened_gives_the_same_detector(stand_in, references, bank, planted, tmp_path):
    built = hm.build_detector([references], extractor=stand_in, **CHANGED)
    assert built.bank.id == bank.id
    written = hm.build_detector([references], output=tmp_path / "bank", extractor=stand_in, **CHANGED)
    opened = hm.open_detector(tmp_path / "bank", extractor=stand_in)
    assert written.settings == built.settings == SETTINGS
    # The bank defines the run: what it records comes back (the stages its model used, the calibrated settings).
    assert opened.settings.calibration_fields() == SETTINGS.calibration_fields()
    assert opened.settings.stages == stand_in.stages and opened.settings.model == "stand-in"
    image = (as_stored(planted[0], OBLIQUE), OBLIQUE)
    scores = {hm.detect_image(d, image).volume_score for d in (built, written, opened)}
    assert len(scores) == 1
    with pytest.raises(InputError, match="image_size: bank has 64, this run asks for 32"):
        hm.open_detector(tmp_path / "bank", extractor=stand_in, image_size=32)


def test_a_triplanar_bank_built_in_memory_is_the_one_a_written_bank_holds(stand_in, references, planted, tmp_path):
    built = hm.build_detector([references], extractor=stand_in, planes=("all",), **CHANGED)
    written = hm.build_detector([references], output=tmp_path / "bank", extractor=stand_in, planes=("all",),
                                **CHANGED)
    assert built.bank.planes == written.bank.planes == ("axial", "coronal", "sagittal")
    image = (as_stored(planted[0], OBLIQUE), OBLIQUE)
    found = [hm.detect_image(d, image) for d in (built, written)]
    assert found[0].volume_score == found[1].volume_score
    assert set(found[0].outcome.detection.planes) == {"axial", "coronal", "sagittal"}


def test_importing_the_package_stays_light():
    code = ("import sys, himatch_med as hm\nassert 'torch' not in sys.modules\n"
            "assert callable(hm.detect_image) and 'torch' in sys.modules\nprint(hm.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hm.__version__
