"""Findings as arrays: regions above the threshold, numbered by peak, sized and placed in scanner coordinates."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import LPS, OBLIQUE, PERMUTED, as_stored, brain_volume, save_nifti
from scipy import ndimage

from himatch_med import jobs
from himatch_med.bank.store import cached_bank
from himatch_med.config import Settings
from himatch_med.detect import Detector
from himatch_med.findings import (
    LEVELS,
    NormalValues,
    ValueHistogram,
    describe_findings,
    label_findings,
    match_regions,
    voxel_volume,
)


def _blob(shape, centre, radius, height):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - np.asarray(centre), axis=-1)
    return np.where(distance <= radius, height - distance, 0.0)


def test_findings_of_a_strided_view_are_those_of_its_copy():
    # The run hands the findings views on the file's grid (flipped and permuted canonical maps, nothing copied).
    shape = (30, 30, 20)
    heat = _blob(shape, (6, 6, 6), 3, 4.0) + _blob(shape, (20, 20, 12), 4, 9.0) + _blob(shape, (25, 5, 15), 2, 6.0)
    region = heat > -1
    region[:, :, :3] = False
    view, inside = (np.flip(a.transpose(2, 0, 1), (0, 2)) for a in (heat, region))
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    found, copied = (describe_findings(labels, a, affine, slice_axis=0)
                     for a, labels in ((a, label_findings(a, 1.0, voxel_volume=1.44, min_volume=5.0, foreground=f))
                                       for a, f in ((view, inside), (np.ascontiguousarray(view),
                                                                     np.ascontiguousarray(inside)))))
    assert len(found) == 3 and found == copied


def test_regions_are_numbered_from_the_highest_peak_and_small_ones_dropped():
    shape = (30, 30, 20)
    heat = _blob(shape, (6, 6, 6), 3, 4.0) + _blob(shape, (20, 20, 12), 4, 9.0) + _blob(shape, (25, 5, 15), 1, 6.0)
    labels = label_findings(heat, 1.0, voxel_volume=2.0, min_volume=20.0)
    assert labels.dtype == np.uint8
    assert labels.max() == 2  # the 1-voxel-radius blob (7 voxels above 1 z, 14 mm³) is dropped
    assert labels[20, 20, 12] == 1 and labels[6, 6, 6] == 2 and labels[25, 5, 15] == 0
    assert np.array_equal(labels > 0, (heat > 1.0) & (labels > 0))
    kept = label_findings(heat, 1.0, voxel_volume=2.0, min_volume=14.0)  # exactly the minimum: kept
    assert kept.max() == 3 and kept[25, 5, 15] == 2


def test_connectivity_decides_whether_diagonal_neighbours_are_one_finding():
    heat = np.zeros((6, 6, 6))
    heat[1, 1, 1] = heat[2, 2, 2] = 5.0
    assert label_findings(heat, 1.0, voxel_volume=1.0, min_volume=0.0).max() == 1
    assert label_findings(heat, 1.0, voxel_volume=1.0, min_volume=0.0, connectivity=18).max() == 2
    assert label_findings(heat, 1.0, voxel_volume=1.0, min_volume=0.0, connectivity=6).max() == 2
    with pytest.raises(ValueError, match="connectivity=4"):
        label_findings(heat, 1.0, voxel_volume=1.0, min_volume=0.0, connectivity=4)


def test_a_threshold_no_voxel_reaches_gives_an_empty_map_not_an_error():
    heat = _blob((10, 10, 10), (5, 5, 5), 3, 4.0)
    labels = label_findings(heat, 50.0, voxel_volume=1.0, min_volume=0.0)
    assert labels.shape == heat.shape and not labels.any()
    assert describe_findings(labels, heat, OBLIQUE, slice_axis=2) == []


def test_findings_stay_inside_the_foreground():
    heat = _blob((12, 12, 12), (6, 6, 6), 4, 6.0)
    foreground = np.zeros(heat.shape, dtype=bool)
    foreground[:, :6] = True
    labels = label_findings(heat, 1.0, voxel_volume=1.0, min_volume=0.0, foreground=foreground)
    assert labels[:, 6:].max() == 0 and labels[6, 5, 6] == 1


def test_a_finding_is_placed_and_sized_in_the_files_own_coordinates():
    heat = _blob((30, 28, 16), (11, 14, 7), 3.5, 5.0)
    heat[12, 15, 8] = 7.0  # a peak off the centre
    labels = label_findings(heat, 1.0, voxel_volume=voxel_volume(OBLIQUE), min_volume=0.0)
    (finding,) = describe_findings(labels, heat, OBLIQUE, slice_axis=2)
    inside = np.argwhere(labels == 1)
    assert finding["voxels"] == len(inside)
    assert finding["volume_ml"] == pytest.approx(len(inside) * 1.5 * 2.0 * 3.0 / 1000, abs=1e-4)
    assert finding["peak_z"] == 7.0 and finding["peak"]["voxel"] == [12, 15, 8]
    assert finding["mean_z"] == pytest.approx(heat[labels == 1].mean(), abs=1e-3)
    centre = inside.mean(axis=0)
    ras = OBLIQUE[:3, :3] @ centre + OBLIQUE[:3, 3]
    np.testing.assert_allclose(finding["centroid"]["ras_mm"], ras, atol=0.01)
    np.testing.assert_allclose(finding["centroid"]["lps_mm"], ras * (-1, -1, 1), atol=0.01)
    np.testing.assert_allclose(finding["centroid"]["voxel"], centre, atol=0.01)
    np.testing.assert_allclose(finding["peak"]["ras_mm"], OBLIQUE[:3, :3] @ (12, 15, 8) + OBLIQUE[:3, 3], atol=0.01)
    assert finding["bbox_voxel"] == {"min": inside.min(axis=0).tolist(), "max": inside.max(axis=0).tolist()}
    assert finding["slices"] == {"file_axis": "k", "first": int(inside[:, 2].min()), "last": int(inside[:, 2].max())}
    assert finding["peak_percentile"] is None


def test_normal_values_give_the_threshold_and_the_percentiles_of_a_known_distribution():
    values = torch.from_numpy(np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32))
    histogram = ValueHistogram()
    for part in values.split(300_000):
        histogram.add(part)
    table = histogram.table()
    assert table.voxels == 2_000_000 and len(table.values) == len(LEVELS)
    assert table.values[-1] == pytest.approx(float(values.max()))
    assert table.threshold(1e-3) == pytest.approx(3.090, abs=0.02)
    assert table.threshold(0.5) == pytest.approx(0.0, abs=0.01)
    assert histogram.quantile(1 - 1e-4) == pytest.approx(float(np.quantile(values.numpy(), 1 - 1e-4)), abs=0.005)
    assert table.percentile(0.0) == pytest.approx(50.0, abs=0.2)
    assert table.percentile(3.09) == pytest.approx(99.9, abs=0.01)
    assert table.percentile(1e3) == 100.0 and table.percentile(-1e3) == 0.0
    assert NormalValues.from_dict(table.to_dict()).threshold(1e-3) == pytest.approx(table.threshold(1e-3), abs=1e-4)


def test_lesion_level_match_counts_hits_misses_false_positive_regions_and_dice():
    truth = np.zeros((20, 20, 10), dtype=bool)
    truth[2:6, 2:6, 2:6] = True  # hit
    truth[12:15, 12:15, 2:5] = True  # missed
    findings = np.zeros(truth.shape, dtype=np.uint8)
    findings[3:7, 2:6, 2:6] = 1  # overlaps the first: 48 of 64 voxels each
    findings[15:18, 2:5, 6:9] = 2  # on nothing
    findings[0, 19, 0] = 3  # on nothing
    result = match_regions(findings, truth)
    assert result["regions"] == 2 and result["hit"] == 1 and result["missed"] == 1
    assert result["findings"] == 3 and result["false_positive_regions"] == 2
    assert result["dice"] == [pytest.approx(2 * 48 / 128, abs=1e-4), 0.0]
    empty = match_regions(np.zeros_like(findings), np.zeros_like(truth))
    assert empty == {"regions": 0, "hit": 0, "missed": 0, "findings": 0, "false_positive_regions": 0, "dice": []}


# --------------------------------------------------------------------------------------------------------------------
# The job: a planted lesion in an oblique, anisotropic volume, through the product's own path with the stand-in

SIZE = 96
"""Backbone image size of these tests: the stand-in's 8-pixel patches are 40 / 96 * 8 = 3.3 slice pixels."""


@pytest.fixture(scope="module")
def planted(stand_in, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    (root / "refs").mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS)):
        save_nifti(as_stored(brain_volume(i)[0], affine), affine, root / "refs" / f"normal{i}.nii.gz")
    array, lesion = brain_volume(9, lesion=(14, 18, 7), radius=5)
    save_nifti(as_stored(array, OBLIQUE), OBLIQUE, root / "query.nii.gz")
    save_nifti(as_stored(brain_volume(11)[0], OBLIQUE), OBLIQUE, root / "normal.nii.gz")
    settings = Settings(model=stand_in.model_id, image_size=SIZE).resolved()
    bank = cached_bank([root / "refs"], None, settings, stand_in, root / "cache")
    report = jobs.process(root / "query.nii.gz", Detector(stand_in, bank, settings), root / "out", progress=False)
    return root, bank, settings, report, as_stored(lesion, OBLIQUE)


def test_the_largest_finding_is_the_planted_lesion_in_size_and_scanner_position(planted):
    root, _, _, report, lesion = planted
    labels = nib.load(root / "out" / "query_findings.nii.gz")
    assert labels.get_data_dtype().kind == "u" and labels.header.get_intent()[0] == "label"
    largest = max(report["findings"], key=lambda f: f["voxels"])
    region = np.asarray(labels.dataobj) == largest["label"]
    assert (region & lesion).sum() >= 0.9 * lesion.sum()
    # Resampling error: the map's in-plane resolution is one backbone patch (3.3 slice pixels here), so the edge of a
    # finding is uncertain by that much: its volume lies within the lesion grown by a patch in-plane.
    patch = int(np.ceil(8 * 40 / SIZE))
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # OBLIQUE stores the axial axis along k
    shell = int(ndimage.binary_dilation(lesion, in_plane, iterations=patch).sum() - lesion.sum())
    voxel_ml = 1.5 * 2.0 * 3.0 / 1000
    assert abs(largest["volume_ml"] - lesion.sum() * voxel_ml) <= shell * voxel_ml
    centre = OBLIQUE[:3, :3] @ np.argwhere(lesion).mean(axis=0) + OBLIQUE[:3, 3]
    np.testing.assert_allclose(largest["centroid"]["ras_mm"], centre, atol=2.0)
    np.testing.assert_allclose(largest["centroid"]["lps_mm"], centre * (-1, -1, 1), atol=2.0)
    assert largest["peak_percentile"] == 100.0 and largest["peak_z"] > report["finding_threshold"]["z"]
    assert report["finding_threshold"]["source"] == "bank"
    assert report["outputs"]["findings"] == "query_findings.nii.gz"


def test_a_lesion_free_volume_has_no_finding_at_the_default_threshold(planted, stand_in, tmp_path):
    root, bank, settings, _, _ = planted
    report = jobs.process(root / "normal.nii.gz", Detector(stand_in, bank, settings), tmp_path, progress=False)
    assert report["findings"] == [] and report["finding_threshold"]["source"] == "bank"
    assert not np.asarray(nib.load(tmp_path / "normal_findings.nii.gz").dataobj).any()


def test_a_threshold_no_voxel_reaches_gives_empty_findings(planted, stand_in, tmp_path):
    root, bank, settings, _, _ = planted
    report = jobs.process(root / "query.nii.gz", Detector(stand_in, bank, replace(settings, finding_threshold=1e6)), tmp_path,
                            progress=False)
    assert report["findings"] == [] and report["finding_threshold"] == {**report["finding_threshold"], "z": 1e6,
                                                                          "source": "setting"}
    assert not np.asarray(nib.load(tmp_path / "query_findings.nii.gz").dataobj).any()
    assert "0 background" in (tmp_path / "query_findings.ctbl").read_text()


def test_a_bank_built_before_findings_says_how_to_get_them(planted, stand_in, tmp_path):
    root, bank, settings, _, _ = planted
    old = replace(bank, info=replace(bank.info, findings=None))
    report = jobs.process(root / "query.nii.gz", Detector(stand_in, old, settings), tmp_path / "a", progress=False)
    assert report["findings"] == [] and report["finding_threshold"]["source"] == "none"
    assert any("rebuild the bank" in note and "--finding-threshold" in note for note in report["notes"])
    given = jobs.process(root / "query.nii.gz", Detector(stand_in, old, replace(settings, finding_threshold=3.0)),
                           tmp_path / "b", progress=False)
    assert given["findings"] and given["findings"][0]["peak_percentile"] is None


def test_maps_and_findings_lie_in_the_inputs_physical_space_as_itk_reads_them(planted):
    import SimpleITK as sitk

    root, _, _, report, _ = planted
    source = sitk.ReadImage(str(root / "query.nii.gz"))
    for name in ("anomaly", "uncertainty", "anomaly_overlay", "findings"):
        output = sitk.ReadImage(str(root / "out" / report["outputs"][name]))
        assert output.GetSize() == source.GetSize(), name
        np.testing.assert_allclose(output.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(output.GetSpacing(), source.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(output.GetDirection(), source.GetDirection(), atol=1e-6)
    finding = report["findings"][0]
    peak = source.TransformIndexToPhysicalPoint([int(v) for v in finding["peak"]["voxel"]])
    np.testing.assert_allclose(peak, finding["peak"]["lps_mm"], atol=0.01)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / "query_findings.nii.gz")))
    assert labels[tuple(finding["peak"]["voxel"][::-1])] == finding["label"]


def test_the_heatmap_asks_viewers_for_its_range_and_leaves_the_background_at_zero(planted):
    root, _, _, report, _ = planted
    heat = nib.load(root / "out" / "query_anomaly.nii.gz")
    values = heat.get_fdata()
    threshold = report["finding_threshold"]["z"]
    assert heat.header.get_intent()[0] == "z score"
    assert float(heat.header["cal_min"]) == pytest.approx(threshold, abs=1e-4)
    assert float(heat.header["cal_max"]) == pytest.approx(values.max(), abs=1e-4)
    query = nib.load(root / "query.nii.gz").get_fdata()
    assert (values[query == 0] == 0).all() and (values[query != 0] != 0).mean() > 0.99
    overlay = nib.load(root / "out" / "query_anomaly_overlay.nii.gz").get_fdata()
    assert np.isnan(overlay[values <= threshold]).all() and (overlay[values > threshold] == values[values > threshold]).all()


def test_findings_are_the_same_bytes_on_a_rerun(planted, stand_in, tmp_path):
    root, bank, settings, _, _ = planted
    jobs.process(root / "query.nii.gz", Detector(stand_in, bank, settings), tmp_path, progress=False)
    for name in ("query_findings.nii.gz", "query_findings.txt", "query_findings.ctbl", "query_anomaly.nii.gz"):
        assert (tmp_path / name).read_bytes() == (root / "out" / name).read_bytes(), name
    assert json.loads((tmp_path / "query_report.json").read_text())["findings"] == \
        json.loads((root / "out" / "query_report.json").read_text())["findings"]


def test_a_run_on_a_stored_bank_takes_its_false_positive_fraction(planted):
    from himatch_med.cli import bank_defaults

    root, bank, _, _, _ = planted
    (folder,) = [p for p in (root / "cache").iterdir() if p.is_dir()]
    recorded = bank_defaults(folder)
    assert recorded["finding_false_positive_fraction"] == bank.info.findings["false_positive_fraction"]
    assert "findings" not in recorded and "finding_threshold" not in recorded


def test_region_peaks_equal_scipys_maximum_per_label():
    from scipy import ndimage

    from himatch_med.findings import region_peaks

    generator = np.random.default_rng(0)
    values = generator.normal(size=(30, 20, 10)).astype(np.float32)
    regions, count = ndimage.label(values > 1.0)
    assert count > 20
    expected = np.asarray(ndimage.maximum(values, regions, np.arange(1, count + 1)), dtype=np.float64)
    np.testing.assert_array_equal(region_peaks(values, regions, count), expected)


def _labels_of_the_whole_volume(anomaly, threshold, *, voxel_volume, min_volume, connectivity, extent):
    """The labelling as it was before the box: the whole volume at once (the reference the box must equal)."""
    from scipy import ndimage

    from himatch_med.findings import structure

    regions, count = ndimage.label(anomaly > threshold, structure=structure(connectivity))
    index = np.arange(1, count + 1)
    peaks = np.asarray(ndimage.maximum(anomaly, regions, index), dtype=np.float64)
    if extent > 0:
        floor = np.concatenate([[np.inf], extent * np.maximum(peaks, 0)])
        regions = np.where(anomaly >= floor[regions], regions, 0)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    keep = sizes * voxel_volume >= min_volume * (1 - 1e-9)
    order = index[keep][np.lexsort((index[keep], -sizes[keep], -peaks[keep]))]
    lookup = np.zeros(count + 1, dtype=np.int64)
    lookup[order] = np.arange(1, len(order) + 1)
    return lookup[regions]


@pytest.mark.parametrize("connectivity,extent,min_volume", [(26, 0.0, 0.0), (6, 0.5, 3.0), (18, 0.0, 2.0)])
def test_labelling_the_box_of_the_voxels_above_equals_labelling_the_whole_volume(connectivity, extent, min_volume):
    from scipy import ndimage

    generator = np.random.default_rng(3)
    anomaly = ndimage.gaussian_filter(generator.normal(size=(40, 36, 30)), 1.5).astype(np.float32) * 8
    anomaly[:5] = anomaly[-4:] = -1  # nothing above near the edges: the box is smaller than the volume
    anomaly[:, :3] = -1
    anomaly[20, 20, 20] = anomaly.max()  # a tie of peaks between regions
    labels = label_findings(anomaly, 1.0, voxel_volume=1.0, min_volume=min_volume, connectivity=connectivity,
                            extent=extent)
    expected = _labels_of_the_whole_volume(anomaly, 1.0, voxel_volume=1.0, min_volume=min_volume,
                                           connectivity=connectivity, extent=extent)
    assert labels.max() > 5
    np.testing.assert_array_equal(labels, expected)
    assert not label_findings(np.zeros((4, 4, 4), np.float32), 1.0, voxel_volume=1.0, min_volume=0.0).any()
