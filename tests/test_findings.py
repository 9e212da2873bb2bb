"""Findings as arrays: regions above the threshold, numbered by peak, sized and placed in scanner coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import OBLIQUE

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
