"""What viewers and PACS open: DICOM SEG and Parametric Map over the source series, label files, 2D pictures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import brain_volume, ct_volume, write_dicom

from himatch_med import exports, jobs
from himatch_med.bank.store import cached_bank
from himatch_med.config import Settings
from himatch_med.detect import Detector


@pytest.fixture(scope="module")
def ct_series(stand_in, tmp_path_factory):
    """Three normal CT series and one with a bright lesion, through the job with the stand-in."""
    root = tmp_path_factory.mktemp("ct")
    for i in range(3):
        write_dicom(root / "refs" / f"n{i}", ct_volume(i).transpose(2, 1, 0), series=f"1.2.826.0.1.3680043.8.498.2{i}")
    hu = ct_volume(7).transpose(2, 1, 0)
    hu[5:9, 16:26, 14:24] = 400.0  # slices, rows, columns
    write_dicom(root / "query", hu, series="1.2.826.0.1.3680043.8.498.30")
    settings = Settings(model=stand_in.model_id, modality="ct", image_size=96).resolved()
    bank = cached_bank(sorted((root / "refs").iterdir()), None, settings, stand_in, root / "cache")
    return root, bank, settings


def _run(ct_series, stand_in, folder, monkeypatch):
    root, bank, settings = ct_series
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    return jobs.process(root / "query", Detector(stand_in, bank, settings), folder, progress=False)


def test_dicom_seg_and_parametric_map_lie_on_the_source_series(ct_series, stand_in, tmp_path, monkeypatch):
    import highdicom as hd
    import pydicom

    report = _run(ct_series, stand_in, tmp_path, monkeypatch)
    assert report["findings"], "the planted block must be found"
    sources = sorted((pydicom.dcmread(p) for p in (ct_series[0] / "query").iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    seg = hd.seg.segread(tmp_path / report["outputs"]["seg"])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [int(n) for n in seg.get_segment_numbers()] == [f["label"] for f in report["findings"]]
    labels = np.asarray(nib.load(tmp_path / report["outputs"]["findings"]).dataobj)  # (columns, rows, slices)
    orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient]
    np.testing.assert_allclose(orientation, [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-6)
    pixels = seg.pixel_array.reshape(seg.NumberOfFrames, seg.Rows, seg.Columns)
    for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
        # One segment: highdicom puts its identification among the shared groups.
        identified = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
        segment = int(identified.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        index = sources.index(source)
        np.testing.assert_array_equal(pixels[frame] > 0, labels[:, :, index].T == segment)
    assert sum(int(np.count_nonzero(p)) for p in pixels) == int(np.count_nonzero(labels))

    pm = pydicom.dcmread(tmp_path / report["outputs"]["parametric_map"])
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.NumberOfFrames == len(sources)
    heat = nib.load(tmp_path / report["outputs"]["anomaly"]).get_fdata(dtype=np.float32)
    values = pm.pixel_array.reshape(pm.NumberOfFrames, pm.Rows, pm.Columns)
    for frame, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
        source = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose(values[frame], heat[:, :, sources.index(source)].T, atol=1e-6)
    pixel = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in pixel.PixelSpacing] == [float(v) for v in sources[0].PixelSpacing]


def test_dicom_outputs_are_the_same_bytes_for_the_same_input(ct_series, stand_in, tmp_path, monkeypatch):
    first = _run(ct_series, stand_in, tmp_path / "a", monkeypatch)
    second = _run(ct_series, stand_in, tmp_path / "b", monkeypatch)
    for key in ("seg", "parametric_map", "findings"):
        assert (tmp_path / "a" / first["outputs"][key]).read_bytes() == \
            (tmp_path / "b" / second["outputs"][key]).read_bytes(), key


def test_label_files_name_and_colour_each_finding():
    records = [{"label": 1, "volume_ml": 2.5, "peak_z": 9.25}, {"label": 2, "volume_ml": 0.031, "peak_z": 4.0}]
    itksnap = exports.itksnap_labels(records).splitlines()
    assert itksnap[-2].split()[:4] == ["1", *map(str, exports.colour(1))]
    assert itksnap[-1].endswith('"Finding 2: 0.031 mL, peak 4.0 z"')
    slicer = exports.slicer_colour_table(records).splitlines()
    assert slicer[2] == "0 background 0 0 0 0"
    assert slicer[3] == f"1 finding_1_2.5mL_peak_9.2z {' '.join(map(str, exports.colour(1)))} 255"


def test_2d_results_lie_on_the_image_as_itk_reads_it(stand_in, tmp_path):
    import SimpleITK as sitk

    (tmp_path / "normal").mkdir()
    for i in range(3):
        plane = (brain_volume(i, (48, 40, 3))[0][:, :, 1] * 1.5).clip(0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(plane), str(tmp_path / "normal" / f"n{i}.png"))
    plane = (brain_volume(7, (48, 40, 3), lesion=(12, 11, 1), radius=5)[0][:, :, 1] * 1.5).clip(0, 255)
    sitk.WriteImage(sitk.GetImageFromArray(plane.astype(np.uint8)), str(tmp_path / "query.png"))
    settings = Settings(model=stand_in.model_id, image_size=64).resolved()
    bank = cached_bank([tmp_path / "normal"], None, settings, stand_in, tmp_path / "cache")
    report = jobs.process(tmp_path / "query.png", Detector(stand_in, bank, settings), tmp_path / "out", progress=False)
    source = sitk.ReadImage(str(tmp_path / "query.png"))
    heat = sitk.ReadImage(str(tmp_path / "out" / "query_anomaly.nii.gz"))
    assert heat.GetSize()[:2] == source.GetSize()
    # Every pixel of the heatmap lies on the pixel of the image it scores (before: 1 of 1,920 did).
    for index in ((0, 0), (39, 0), (0, 47), (17, 23)):
        np.testing.assert_allclose(heat.TransformIndexToPhysicalPoint((*index, 0))[:2],
                                   source.TransformIndexToPhysicalPoint(index), atol=1e-6)
    values = sitk.GetArrayFromImage(heat)[0]  # (rows, columns) as the image
    lesion = plane > 200  # off the centre: a flip would move the heat off it
    assert lesion[np.unravel_index(np.argmax(values), values.shape)]
    assert values[lesion].mean() > values[~lesion].mean() + 1
    for key in ("anomaly_png", "overlay_png"):
        picture = sitk.ReadImage(str(tmp_path / "out" / report["outputs"][key]))
        assert picture.GetSize() == source.GetSize() and picture.GetNumberOfComponentsPerPixel() == 3
    assert json.loads((tmp_path / "out" / "query_report.json").read_text())["kind"] == "image"


@pytest.mark.parametrize("view", ["contiguous", "flipped and transposed", "strided"])
def test_the_uncertainty_display_range_is_the_percentile_of_the_positive_values_whatever_the_view(view):
    # The maps come as views on the file's grid (flipped axes, transposed); the display range reads their memory in
    # order, which must give the same 99.5th percentile of the positive values as the map itself.
    rng = np.random.default_rng(3)
    volume = np.where(rng.random((30, 26, 12)) < 0.4, rng.gamma(2.0, 0.3, (30, 26, 12)), 0).astype(np.float32)
    array = {"contiguous": volume, "flipped and transposed": volume.transpose(2, 0, 1)[::-1, :, ::-1],
             "strided": volume[::2, 1:, ::3]}[view]
    expected = float(np.percentile(np.array(array)[np.array(array) > 0], 99.5))
    display = exports.uncertainty_display(array)
    assert display.cal_max == expected
    assert (display.cal_min, display.intent) == (0.0, "none")
    assert exports.uncertainty_display(np.zeros((3, 4, 5), np.float32)).cal_max == 1.0
