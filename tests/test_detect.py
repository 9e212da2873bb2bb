"""End to end on tensors with the weight-free stand-in extractor: planted lesions light up where they were planted."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import LESION, LPS, OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume
from sklearn.metrics import roc_auc_score

from himatch_med.bank.build import build_bank
from himatch_med.config import Settings
from himatch_med.detect import Detector, batches, matching_dtype, prepare, slice_sigma, stage_distances
from himatch_med.volume import to_canonical

RADIUS = 3.0


def synthetic(seed, lesion=None):
    return brain_volume(seed, SHAPE, lesion=lesion, radius=RADIUS)


def prepared(array, affine, settings=SETTINGS):
    """Prepare the synthetic anatomy ``array`` (given in RAS) as read from a file stored with ``affine``."""
    canonical, _ = to_canonical(as_stored(array, affine), affine)
    return prepare(torch.from_numpy(canonical), settings)


def test_bank_holds_every_scored_slice_and_a_calibration(bank):
    assert len(bank) == int(bank.groups.bincount().sum())
    assert bank.centroids.shape[1:] == (3, 16, 24)
    assert (bank.calibration_std > 0).all()
    assert len(bank.calibration_slice_scores) == min(64, len(bank)) and len(bank.calibration_volume_scores) == 4
    # Calibration leaves each volume out: held-out normal slices lie around z = 0, not far above.
    assert abs(float(bank.calibration_slice_scores.median())) < 3


def test_planted_lesion_lights_up_where_it_was_planted(detector):
    array, lesion = synthetic(11, lesion=LESION)
    canonical, orientation = to_canonical(as_stored(array, OBLIQUE), OBLIQUE)
    query = prepare(torch.from_numpy(canonical), SETTINGS)
    result = detector.detect(query)
    heat = result.canonical("anomaly").numpy()
    truth, _ = to_canonical(as_stored(lesion, OBLIQUE), OBLIQUE)
    foreground = canonical != 0
    auroc = roc_auc_score(truth[foreground], heat[foreground])
    assert auroc >= 0.95
    # The hottest voxel of the volume lies in or right next to the lesion.
    peak = np.unravel_index(np.argmax(np.where(foreground, heat, -np.inf)), canonical.shape)
    distance = np.min(np.linalg.norm(np.argwhere(truth) - np.array(peak), axis=1))
    assert distance <= 2
    # A slice through the lesion scores highest (the top 1 % of a slice need not be largest where its area is).
    lesion_slices = np.flatnonzero(truth.any(axis=(0, 1)))
    assert int(result.slice_scores.argmax()) in lesion_slices
    assert float(result.slice_scores[lesion_slices].min()) > float(np.delete(result.slice_scores, lesion_slices).max())


def test_lesion_volume_scores_above_lesion_free_ones(detector):
    normal = [detector.detect(prepared(synthetic(20 + i)[0], OBLIQUE)).volume_score for i in range(3)]
    sick = detector.detect(prepared(synthetic(30, lesion=LESION)[0], OBLIQUE))
    assert sick.volume_score > max(normal) + 0.5
    assert sick.volume_percentile == 100.0


def test_a_reference_scores_near_zero_against_a_bank_that_contains_it(stand_in):
    # With as many centroids as patches, every patch of a reference is its own centroid: distance exactly 0. K = 3:
    # the caps of the ellipsoids are mostly background, and fp16 storage can rank another volume's cap level with the
    # slice's own copy; among three retrieved, its own is always there.
    settings = Settings(model="stand-in", image_size=64, centroids=128, calibration_slices=64, batch_size=8,
                        references_k=3, position_window=0.0).resolved()
    volumes = [(f"n{i}", prepared(synthetic(i)[0], PERMUTED, settings)) for i in range(3)]
    bank = build_bank(stand_in, volumes, settings)
    again = volumes[1][1]
    for part, features, patches in batches(stand_in, again, settings, torch.device("cpu")):
        stage_maps, _ = stage_distances(features, bank, settings, again.positions[part])
        assert float(stage_maps[:, patches].abs().max()) < 1e-3  # centroids are stored in fp16
    # And the whole volume scores below every calibration volume of other normal anatomy.
    result = Detector(stand_in, bank, settings).detect(again)
    assert result.volume_score < float(bank.calibration_volume_scores.min())


def test_every_fusion_mode_finds_the_lesion(detector):
    array, lesion = synthetic(12, lesion=LESION)
    canonical, _ = to_canonical(as_stored(array, LPS), LPS)
    truth, _ = to_canonical(as_stored(lesion, LPS), LPS)
    foreground = canonical != 0
    for fusion in ("mean", "max", "last", "uncertainty"):
        settings = replace(SETTINGS, fusion=fusion)
        result = replace(detector, settings=settings).detect(prepare(torch.from_numpy(canonical), settings))
        assert roc_auc_score(truth[foreground], result.canonical("anomaly").numpy()[foreground]) >= 0.9, fusion


def test_slices_without_foreground_are_not_scored(detector):
    array, _ = synthetic(3)
    array[:, :, :3] = 0  # the three lowest axial slices (the identity affine stores them along k)
    query = prepared(array, np.diag([1.0, 1.0, 1.0, 1.0]))
    result = detector.detect(query)
    assert not result.scored[:3].any() and (result.slice_scores[:3] == 0).all()


def test_slice_scores_are_those_of_the_slice_maps_scored_whole(detector):
    # Slices are scored batch by batch as their maps are made; the scores are those of the finished maps.
    from himatch_med.scoring import slice_scores

    array, _ = synthetic(3, lesion=LESION)
    array[:, :, :3] = 0
    query = prepared(array, np.diag([1.0, 1.0, 1.0, 1.0]))
    for size in (1, 3, 64):
        result = Detector(detector.extractor, detector.bank, replace(SETTINGS, batch_size=size)).detect(query)
        whole = slice_scores(result.anomaly, query.foreground, result.scored, SETTINGS.top_fraction)
        assert torch.equal(result.slice_scores, whole) and bool(result.slice_scores.any()), size
        # Slices not scored read as normal: each the same map, of the lowest value the scored ones have.
        unscored = result.anomaly[~result.scored]
        assert len(unscored) >= 3 and torch.equal(unscored, unscored[:1].expand_as(unscored))
        assert float(unscored.max() - unscored.min()) < 1e-4
        assert float(unscored.max()) <= float(result.anomaly[result.scored].min()) + 1e-4


def test_detection_keeps_the_slice_maps_the_picture_shows(detector):
    query = prepared(synthetic(13, lesion=LESION)[0], PERMUTED)
    result = detector.detect(query)
    assert result.anomaly.shape == query.slices.shape and result.axis == query.axis
    # The canonical volume is the slices stacked back: cut again, it gives the very same slice maps.
    from himatch_med.volume import to_slices

    assert torch.equal(to_slices(result.canonical("uncertainty"), result.axis), result.uncertainty)
    assert result.canonical("anomaly").shape == to_canonical(as_stored(synthetic(13)[0], PERMUTED), PERMUTED)[0].shape


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_detection_stacks_its_slice_maps_back_along_its_own_axis(axis):
    from himatch_med.detect import Detection
    from himatch_med.volume import to_slices

    volume = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(5, 6, 7)
    slices = to_slices(volume, axis)
    count = len(slices)
    detection = Detection(anomaly=slices, uncertainty=-slices, axis=axis, slice_scores=torch.zeros(count),
                          slice_percentiles=torch.zeros(count), scored=torch.ones(count, dtype=torch.bool),
                          volume_score=0.0, volume_percentile=0.0)
    assert torch.equal(detection.canonical("anomaly"), volume)
    assert torch.equal(detection.canonical("uncertainty"), -volume)
    with pytest.raises(ValueError, match="name='scored'"):
        detection.canonical("scored")


@pytest.mark.parametrize(("height", "width", "expected"), [
    (56, 60, 4.0 * 56 / 64),  # shorter side 56 -> 64 px: a backbone pixel is 56/64 slice pixels
    (60, 56, 4.0 * 60 / 72),  # rows now the longer side: 60 * 64/56 = 68.6 px, rounded to 9 patches = 72
    (100, 300, 4.0 * 100 / 64),  # 100 x 300 -> 64 x 192
    (256, 256, 4.0 * 256 / 64),
])
def test_smoothing_sigma_goes_from_backbone_pixels_to_slice_pixels(height, width, expected):
    assert slice_sigma(SETTINGS, height, width, 8) == pytest.approx(expected)


def test_smoothing_sigma_follows_the_rounded_backbone_height():
    # 50 x 30 at 64 px with 16 px patches: the height 50 * 64/30 = 106.7 rounds to 112 (7 patches), so a backbone
    # pixel is 50/112 slice pixels, not 30/64.
    settings = replace(SETTINGS, smoothing_sigma=2.0)
    assert slice_sigma(settings, 50, 30, 16) == pytest.approx(2.0 * 50 / 112)


class SaysBfloat16:
    """The stand-in, saying that it computes its features in bfloat16 (as a bf16 backbone does)."""

    arithmetic = "bfloat16"

    def __init__(self, inner):
        self.inner = inner
        self.model_id, self.patch_size, self.stages, self.device = (inner.model_id, inner.patch_size, inner.stages,
                                                                     inner.device)

    def __call__(self, images):
        return self.inner(images)


def test_features_of_a_bfloat16_extractor_are_matched_in_bfloat16_close_to_float32(stand_in, references, detector):
    from himatch_med import jobs

    said = SaysBfloat16(stand_in)
    assert matching_dtype(said) == torch.bfloat16 and matching_dtype(stand_in) == torch.float32
    paths = sorted(references.iterdir())
    half = Detector(said, build_bank(said, ((str(p), jobs.read(p, SETTINGS).prepared) for p in paths), SETTINGS),
                    SETTINGS)
    assert half.dtype == torch.bfloat16 and detector.dtype == torch.float32
    # The calibration was matched in bfloat16 too: its z-units are the queries'.
    assert not torch.equal(half.bank.calibration_std, detector.bank.calibration_std)
    torch.testing.assert_close(half.bank.calibration_std, detector.bank.calibration_std, rtol=0.05, atol=0)
    array, lesion = synthetic(11, lesion=LESION)
    query = prepared(array, OBLIQUE)
    exact, rounded = detector.detect(query), half.detect(query)
    assert not torch.equal(exact.anomaly, rounded.anomaly)
    inside = query.foreground & exact.scored[:, None, None]
    difference = (exact.anomaly - rounded.anomaly)[inside].abs()
    # The stand-in's last stage spreads its normal distances over 0.004 only (a real backbone's over 0.03): its
    # bfloat16 rounding is a larger share here than it is on a real volume (0.002 z on average there).
    assert float(difference.mean()) < 0.05 and float(difference.max()) < 0.5
    assert rounded.volume_score == pytest.approx(exact.volume_score, rel=0.03)
    assert len(rounded.replicate_scores) == len(exact.replicate_scores) > 0
    canonical, _ = to_canonical(as_stored(array, OBLIQUE), OBLIQUE)
    truth, _ = to_canonical(as_stored(lesion, OBLIQUE), OBLIQUE)
    foreground = canonical != 0
    assert roc_auc_score(truth[foreground], rounded.canonical("anomaly").numpy()[foreground]) >= 0.95
