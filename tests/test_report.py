"""What one input's report says: calibration notes, versions, top slices in the file's own indices; the picture."""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import replace

import monai
import nibabel
import numpy
import pytest
import scipy
import SimpleITK
import torch
import transformers
from conftest import LESION, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume, save_nifti

import himatch_med
from himatch_med import jobs
from himatch_med.report import calibration_notes, installed_versions, make_report, overview_figure, versions


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "lesion.nii.gz"
    save_nifti(as_stored(brain_volume(31, SHAPE, lesion=LESION, radius=3.0)[0], PERMUTED), PERMUTED, path)
    return jobs.read(path, SETTINGS)


def report_of(job, detector):
    detection = detector.detect(job.prepared)
    return make_report(job.scan, job.prepared, detection, detector, jobs.output_paths(job.scan.path, job.scan.path.parent))


@pytest.mark.parametrize(("change", "expected"), [
    ({"references_k": 2}, "references_k 4 -> 2"),
    ({"fusion": "mean", "top_fraction": 0.05}, "fusion 'uncertainty' -> 'mean', top_fraction 0.01 -> 0.05"),
    ({"position_window": 0.0}, "position_window 0.1 -> 0.0"),
])
def test_a_run_that_changes_a_calibrated_setting_gets_a_note(job, detector, change, expected):
    report = report_of(job, replace(detector, settings=replace(SETTINGS, **change)))
    notes = [n for n in report["notes"] if "calibrated with other settings" in n]
    assert len(notes) == 1 and f"({expected})" in notes[0] and "approximate" in notes[0]


@pytest.mark.parametrize("change", [{}, {"batch_size": 3}, {"chunk_size": 5}, {"seed": 7}, {"centroids": 4}])
def test_settings_that_leave_the_calibration_valid_get_no_note(detector, change):
    # Speed-only settings change nothing; the seed and the centroids did their work when the bank was built.
    assert calibration_notes(detector.bank, replace(SETTINGS, **change)) == []


def test_the_report_records_the_versions(job, detector):
    found = report_of(job, detector)["versions"]
    # Against each package's own idea of its version, not the package metadata the code reads.
    assert found["python"] == platform.python_version() and found["himatch_med"] == himatch_med.__version__
    assert found["torch"] == str(torch.__version__) and found["numpy"] == numpy.__version__
    assert found["nibabel"] == nibabel.__version__ and found["scipy"] == scipy.__version__
    assert found["monai"] == monai.__version__ and found["transformers"] == transformers.__version__
    assert found["SimpleITK"] == SimpleITK.Version.VersionString()
    assert found == versions() and set(found) == {"python", "himatch_med", "torch", "transformers", "monai",
                                                  "nibabel", "SimpleITK", "numpy", "scipy"}


def test_a_package_that_is_not_installed_is_recorded_as_none(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "monai":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    installed_versions.cache_clear()  # looked up once per process
    try:
        assert versions()["monai"] is None and versions()["torch"] == real("torch")
    finally:
        installed_versions.cache_clear()


def test_top_slices_name_the_files_own_voxel_index(job, detector):
    report = report_of(job, detector)
    top = report["top_slices"][0]
    # PERMUTED stores the axial (superior) axis along j, upwards: the file's j is the canonical slice index.
    assert (top["file_axis"], top["file_index"]) == ("j", top["slice"])
    assert abs(top["slice"] - LESION[2]) <= 1
    assert report["shape"] == list(job.scan.shape) and report["bank"]["id"] == detector.bank.id


def test_the_overview_shows_the_top_slices_at_their_aspect(job, detector):
    detection = detector.detect(job.prepared)
    report = make_report(job.scan, job.prepared, detection, detector, jobs.output_paths(job.scan.path, job.scan.path))
    figure = overview_figure(job.prepared, detection, report, aspect=job.scan.pixel_aspect(job.prepared.axis))
    panels = [axes for axes in figure.axes if axes.images]
    assert len(panels) == 4
    first = report["top_slices"][0]["slice"]
    shown = panels[0].images[1].get_array()
    assert numpy.array_equal(numpy.asarray(shown), detection.anomaly[first].numpy())
