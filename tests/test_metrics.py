"""Tests for himatch_med.metrics: known answers by hand, and agreement with exact metrics on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from himatch_med.metrics import PixelMetrics, average_precision, image_auroc, pixel_metrics, score_range


def _exact_aupro(score_maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """AUPRO with every distinct score as a threshold (O(pixels) memory), coded independently as a reference."""
    scores, weights, normal = [], [], []
    n_regions = 0
    for score_map, mask in zip(score_maps, masks, strict=True):
        labels, n = ndimage.label(mask > 0, structure=np.ones((3,) * mask.ndim))
        sizes = np.bincount(labels.ravel())
        scores.append(score_map.ravel())
        weights.append(np.where(labels.ravel() > 0, 1.0 / sizes[labels.ravel()], 0.0))
        normal.append(labels.ravel() == 0)
        n_regions += n
    scores, weights, normal = np.concatenate(scores), np.concatenate(weights), np.concatenate(normal)
    order = np.argsort(-scores, kind="stable")
    scores, weights, normal = scores[order], weights[order], normal[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    fpr = np.r_[0.0, np.cumsum(normal)[last_of_tie] / normal.sum()]
    pro = np.r_[0.0, np.cumsum(weights)[last_of_tie] / n_regions]
    keep = fpr <= fpr_limit  # a prefix, since fpr never decreases
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        j = keep.sum()
        y = np.append(y, y[-1] + (fpr_limit - x[-1]) / (fpr[j] - x[-1]) * (pro[j] - y[-1]))
        x = np.append(x, fpr_limit)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def _random_set(seed: int, n_images: int = 6, size: int = 48) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noisy maps with a few square lesions of different sizes that score higher on average."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n_images):
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(i % 3):
            side = int(rng.integers(2, 12))
            row, col = rng.integers(0, size - side, size=2)
            mask[row : row + side, col : col + side] = 1
        maps.append(rng.normal(size=(size, size)) + 1.5 * mask)
        masks.append(mask)
    return maps, masks


# --- image level ---------------------------------------------------------------------------------------------------


def test_image_auroc_known_answers() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert image_auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert image_auroc(np.full(4, 3.0), labels) == 0.5
    # One of the four normal/anomalous pairs is misordered.
    assert image_auroc(np.array([0.1, 0.5, 0.4, 0.9]), labels) == 0.75


def test_average_precision_known_answers() -> None:
    labels = np.array([0, 0, 1, 1])
    assert average_precision(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert average_precision(np.full(4, 3.0), labels) == 0.5
    # Ranking: anomalous, normal, anomalous -> (1/2)*1 + (1/2)*(2/3).
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)


def test_image_metrics_binarise_labels_and_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=200)
    scores = rng.normal(size=200) + (labels > 0)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels > 0, scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels > 0, scores))


@pytest.mark.parametrize("metric", [image_auroc, average_precision])
def test_image_metrics_reject_bad_input(metric) -> None:
    with pytest.raises(ValueError, match="both classes"):
        metric(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="both classes"):
        metric(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="same length"):
        metric(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="finite"):
        metric(np.array([0.1, np.nan]), np.array([0, 1]))


# --- pixel level: hand-computed answers ---------------------------------------------------------------------------


def _perfect_set() -> tuple[list[np.ndarray], list[np.ndarray]]:
    mask_a = np.zeros((16, 16), dtype=np.uint8)
    mask_a[2:6, 2:6] = 1
    mask_a[10:12, 9:15] = 255  # masks are binarised with > 0
    mask_b = np.zeros((16, 16), dtype=np.uint8)
    mask_b[7:9, 7:9] = 1
    rng = np.random.default_rng(1)
    maps = [rng.uniform(0.0, 0.4, size=(16, 16)) + 0.6 * (m > 0) for m in (mask_a, mask_b)]
    return maps, [mask_a, mask_b]


def test_perfect_scores() -> None:
    maps, masks = _perfect_set()
    result = pixel_metrics(maps, masks, lo=0.0, hi=1.0, bins=1000)
    assert result["pixel_auroc"] == 1.0
    assert result["pixel_ap"] == 1.0
    assert result["aupro"] == pytest.approx(1.0)
    assert result["best_dice"] == 1.0
    # The highest threshold reaching the best Dice: the lower edge of the lowest anomalous score's bin.
    lowest_anomalous = min(m[k > 0].min() for m, k in zip(maps, masks, strict=True))
    assert result["best_dice_threshold"] == pytest.approx(np.floor(lowest_anomalous * 1000) / 1000)
    assert result["n_regions"] == 3
    assert result["n_positive"] == 16 + 12 + 4
    assert result["n_negative"] == 2 * 256 - 32


def test_inverted_scores() -> None:
    maps, masks = _perfect_set()
    result = pixel_metrics([1.0 - m for m in maps], masks, lo=0.0, hi=1.0, bins=1000)
    assert result["pixel_auroc"] == 0.0
    assert result["aupro"] == 0.0


def test_all_equal_scores_are_ties() -> None:
    maps, masks = _perfect_set()
    result = pixel_metrics([np.full_like(m, 0.7) for m in maps], masks, lo=0.0, hi=1.0, bins=1000)
    n_positive, n_negative = 32, 480
    assert result["pixel_auroc"] == 0.5
    assert result["pixel_ap"] == pytest.approx(n_positive / (n_positive + n_negative))
    # PRO rises linearly with FPR from (0, 0) to (1, 1): area up to 0.3 is 0.3**2 / 2, divided by 0.3.
    assert result["aupro"] == pytest.approx(0.15)
    assert result["best_dice"] == pytest.approx(2 * n_positive / (2 * n_positive + n_negative))


def test_random_scores_give_half() -> None:
    rng = np.random.default_rng(2)
    maps = [rng.uniform(size=(64, 64)) for _ in range(4)]
    masks = [rng.uniform(size=(64, 64)) < 0.3 for _ in range(4)]
    result = pixel_metrics(maps, masks, lo=0.0, hi=1.0)
    assert result["pixel_auroc"] == pytest.approx(0.5, abs=0.02)
    assert result["pixel_ap"] == pytest.approx(0.3, abs=0.02)


def _two_region_set(small_region_score: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """1000 normal pixels scored 0, 2, ..., 1998; a 100-pixel region at 1999 and a 4-pixel region at a given score.

    With ``lo=0, hi=2000, bins=2000`` every integer score has its own bin, so there are no ties across classes.
    """
    normal_scores = np.arange(0, 2000, 2, dtype=np.float64)
    # Image 1: the large region is the first 100 pixels in raster order (rows 0-2 and 10 pixels of row 3), one
    # component, followed by 500 normal pixels.
    map_1 = np.concatenate([np.full(100, 1999.0), normal_scores[:500]]).reshape(20, 30)
    mask_1 = np.concatenate([np.ones(100, bool), np.zeros(500, bool)]).reshape(20, 30)
    # Image 2: 500 normal pixels, then the small region as the last 4 pixels of the last row.
    map_2 = np.concatenate([normal_scores[500:], np.full(4, float(small_region_score))]).reshape(28, 18)
    mask_2 = np.concatenate([np.zeros(500, bool), np.ones(4, bool)]).reshape(28, 18)
    return [map_1, map_2], [mask_1, mask_2]


def test_aupro_small_region_missed_at_low_fpr() -> None:
    # The small region scores 999: 500 normals (FPR 0.5) lie above it, so up to FPR 0.3 only the large region is
    # detected and PRO stays at (1 + 0) / 2 from FPR 0 on.
    maps, masks = _two_region_set(999)
    result = pixel_metrics(maps, masks, lo=0, hi=2000, bins=2000)
    assert result["n_regions"] == 2
    assert result["aupro"] == pytest.approx(0.5, abs=1e-12)
    # Pixel-wise the small region is negligible: pixel AUROC is much higher than PRO suggests.
    assert result["pixel_auroc"] == pytest.approx((100 * 1.0 + 4 * 0.5) / 104)


def test_aupro_small_region_found_at_fpr_one_tenth() -> None:
    # The small region scores 1799: 100 normals (1800..1998, FPR 0.1) lie above it. PRO is 0.5 on [0, 0.1] and 1 on
    # [0.1, 0.3]: area 0.05 + 0.2 = 0.25, divided by 0.3.
    maps, masks = _two_region_set(1799)
    result = pixel_metrics(maps, masks, lo=0, hi=2000, bins=2000)
    assert result["aupro"] == pytest.approx(0.25 / 0.3, abs=1e-12)
    assert result["aupro"] == pytest.approx(_exact_aupro(maps, masks), abs=1e-12)


def test_aupro_interpolates_at_fpr_limit() -> None:
    # Ten normal pixels (two at 3, eight at 1) and a one-pixel region.
    mask = np.zeros((1, 11), dtype=np.uint8)
    mask[0, -1] = 1
    # Region at 2: the curve is (0, 0) -> (0.2, 0) -> (0.2, 1) -> (1, 1); cut at 0.3 the area is 0.1.
    found = np.array([[3.0, 3.0] + [1.0] * 8 + [2.0]])
    assert pixel_metrics([found], [mask], lo=0, hi=4, bins=8)["aupro"] == pytest.approx(0.1 / 0.3)
    # Region at 1, tied with eight normals: the curve is (0, 0) -> (0.2, 0) -> (1, 1), so PRO at FPR 0.3 is
    # interpolated to 0.1 / 0.8 and the area is a triangle 0.1 wide.
    tied = np.array([[3.0, 3.0] + [1.0] * 8 + [1.0]])
    assert pixel_metrics([tied], [mask], lo=0, hi=4, bins=8)["aupro"] == pytest.approx(0.5 * 0.1 * 0.125 / 0.3)
    assert pixel_metrics([tied], [mask], lo=0, hi=4, bins=8, fpr_limit=1.0)["aupro"] == pytest.approx(0.4)
    assert pixel_metrics([tied], [mask], lo=0, hi=4, bins=8)["aupro"] == pytest.approx(_exact_aupro([tied], [mask]))


def test_region_count_uses_full_connectivity_by_default() -> None:
    mask = np.zeros((6, 6, 6), dtype=np.uint8)
    mask[1, 1, 1] = 1
    mask[2, 2, 2] = 1  # touches the first voxel at a corner only
    mask[4:6, 4:6, 4:6] = 1
    score_map = np.zeros(mask.shape)
    full = PixelMetrics(lo=0, hi=1)
    full.update(score_map, mask)
    faces = PixelMetrics(lo=0, hi=1, connectivity=1)
    faces.update(score_map, mask)
    assert full.compute()["n_regions"] == 2
    assert faces.compute()["n_regions"] == 3


def test_volume_regions_are_3d_components() -> None:
    # A tube along the last axis is one region as a volume but one region per slice when fed slice by slice.
    mask = np.zeros((8, 8, 5), dtype=np.uint8)
    mask[3:5, 3:5, :] = 1
    score_map = mask.astype(np.float64)
    volume = PixelMetrics(lo=0, hi=1)
    volume.update(score_map, mask)
    slices = PixelMetrics(lo=0, hi=1)
    for z in range(5):
        slices.update(score_map[..., z], mask[..., z])
    assert volume.compute()["n_regions"] == 1
    assert slices.compute()["n_regions"] == 5
    assert volume.compute()["pixel_auroc"] == slices.compute()["pixel_auroc"] == 1.0


def test_image_without_anomaly_adds_only_negatives() -> None:
    maps, masks = _random_set(3)
    metrics = PixelMetrics(lo=-5, hi=7)
    for score_map, mask in zip(maps, masks, strict=True):
        metrics.update(score_map, mask)
    before = metrics.compute()
    normal_map = np.random.default_rng(4).normal(size=(32, 32))
    metrics.update(normal_map, np.zeros((32, 32)))
    after = metrics.compute()
    assert after["n_positive"] == before["n_positive"]
    assert after["n_regions"] == before["n_regions"]
    assert after["n_negative"] == before["n_negative"] + 32 * 32
    labels = np.concatenate([m.ravel() > 0 for m in masks] + [np.zeros(32 * 32, bool)])
    scores = np.concatenate([m.ravel() for m in maps] + [normal_map.ravel()])
    assert after["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)


def test_no_positives_gives_nan() -> None:
    metrics = PixelMetrics(lo=0, hi=1)
    metrics.update(np.random.default_rng(5).uniform(size=(8, 8)), np.zeros((8, 8)))
    result = metrics.compute()
    for key in ("pixel_auroc", "pixel_ap", "aupro", "best_dice", "best_dice_threshold"):
        assert math.isnan(result[key]), key
    assert result["n_negative"] == 64
    assert result["n_positive"] == 0
    empty = PixelMetrics(lo=0, hi=1).compute()
    assert math.isnan(empty["pixel_auroc"])


def test_no_negatives_defines_ap_and_dice_only() -> None:
    metrics = PixelMetrics(lo=0, hi=1)
    metrics.update(np.full((4, 4), 0.3), np.ones((4, 4)))
    result = metrics.compute()
    assert math.isnan(result["pixel_auroc"])
    assert math.isnan(result["aupro"])
    assert result["pixel_ap"] == 1.0
    assert result["best_dice"] == 1.0


def test_out_of_range_scores_are_clipped_into_end_bins() -> None:
    score_map = np.array([[-100.0, -np.inf], [100.0, np.inf]])
    mask = np.array([[0, 0], [1, 1]])
    result = pixel_metrics([score_map], [mask], lo=0, hi=1, bins=10)
    assert result["pixel_auroc"] == 1.0
    assert result["n_positive"] + result["n_negative"] == 4


# --- pixel level: agreement with exact metrics ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_matches_exact_metrics_on_random_data(seed: int) -> None:
    maps, masks = _random_set(seed)
    lo, hi = score_range(maps)
    result = pixel_metrics(maps, masks, lo=lo, hi=hi, bins=10_000)
    labels = np.concatenate([m.ravel() > 0 for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-3)
    assert result["aupro"] == pytest.approx(_exact_aupro(maps, masks), abs=1e-3)
    # Best Dice from an exhaustive search over every distinct score.
    order = np.argsort(-scores)
    tp = np.cumsum(labels[order])
    exact_dice = np.max(2 * tp / (np.arange(1, scores.size + 1) + labels.sum()))
    assert result["best_dice"] == pytest.approx(exact_dice, abs=1e-3)


def test_coarse_bins_still_close() -> None:
    maps, masks = _random_set(13)
    labels = np.concatenate([m.ravel() > 0 for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    result = pixel_metrics(maps, masks, bins=1000)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=2e-3)


def test_one_call_helper_equals_accumulator() -> None:
    maps, masks = _random_set(14)
    metrics = PixelMetrics(lo=-4, hi=6, bins=500)
    for score_map, mask in zip(maps, masks, strict=True):
        metrics.update(score_map, mask)
    assert pixel_metrics(maps, masks, lo=-4, hi=6, bins=500) == metrics.compute()


# --- memory bound and input checks ---------------------------------------------------------------------------------


def test_state_size_does_not_grow_with_images() -> None:
    metrics = PixelMetrics(lo=-5, hi=7, bins=2000)
    size = metrics.nbytes
    assert size <= 3 * 2000 * 8
    rng = np.random.default_rng(6)
    for _ in range(50):
        mask = rng.uniform(size=(64, 64)) < 0.05  # many small regions per image
        metrics.update(rng.normal(size=(64, 64)), mask)
    assert metrics.nbytes == size
    assert metrics.compute()["n_regions"] > 1000
    arrays = [value for value in vars(metrics).values() if isinstance(value, np.ndarray)]
    assert arrays
    assert all(array.size <= 2000 for array in arrays)


def test_score_range() -> None:
    assert score_range([np.array([1.0, 3.0]), np.array([[np.nan, -1.0]])]) == (-1.0, 3.0)
    assert score_range([np.array([1.0, 3.0])], margin=0.5) == (0.0, 4.0)
    assert score_range([np.full((2, 2), 2.0)]) == (1.5, 2.5)
    with pytest.raises(ValueError, match="no finite score"):
        score_range([np.array([np.nan])])
    with pytest.raises(ValueError, match="margin"):
        score_range([np.array([1.0])], margin=-1)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        PixelMetrics(lo=1, hi=1)
    with pytest.raises(ValueError, match="bins"):
        PixelMetrics(lo=0, hi=1, bins=0)
    with pytest.raises(ValueError, match="fpr_limit"):
        PixelMetrics(lo=0, hi=1, fpr_limit=0)
    with pytest.raises(ValueError, match="connectivity"):
        PixelMetrics(lo=0, hi=1, connectivity=0)
    metrics = PixelMetrics(lo=0, hi=1)
    with pytest.raises(ValueError, match="mask shape"):
        metrics.update(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2D"):
        metrics.update(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="one mask per map"):
        pixel_metrics([np.zeros((2, 2))], [])
