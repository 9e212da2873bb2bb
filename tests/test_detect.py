"""End to end on tensors with the weight-free stand-in extractor: planted lesions light up where they were planted."""

import numpy as np
import pytest
import torch
from conftest import LPS, OBLIQUE, PERMUTED, as_stored, brain_volume
from sklearn.metrics import roc_auc_score

from himatch_med.config import Settings
from himatch_med.detect import build_bank, detect, prepare
from himatch_med.volume import to_canonical

SETTINGS = Settings(model="stand-in", image_size=64, centroids=16, calibration_slices=64, batch_size=8,
                    kmeans_iterations=10, references_k=4).resolved()
SHAPE = (56, 60, 14)
LESION = (20, 24, 7)
RADIUS = 3.0


def synthetic(seed, lesion=None):
    return brain_volume(seed, SHAPE, lesion=lesion, radius=RADIUS)


def prepared(array, affine, settings=SETTINGS):
    """Prepare the synthetic anatomy ``array`` (given in RAS) as read from a file stored with ``affine``."""
    canonical, _ = to_canonical(as_stored(array, affine), affine)
    return prepare(torch.from_numpy(canonical), settings)


@pytest.fixture(scope="module")
def bank(stand_in):
    volumes = [(f"normal{i}", prepared(synthetic(i)[0], affine))
               for i, affine in enumerate((OBLIQUE, PERMUTED, LPS, OBLIQUE))]
    return build_bank(stand_in, volumes, SETTINGS)


def test_bank_holds_every_scored_slice_and_a_calibration(bank):
    assert len(bank) == int(bank.groups.bincount().sum())
    assert bank.centroids.shape[1:] == (3, 16, 24)
    assert (bank.calibration_std > 0).all()
    assert len(bank.calibration_slice_scores) == min(64, len(bank)) and len(bank.calibration_volume_scores) == 4
    # Calibration leaves each volume out: held-out normal slices lie around z = 0, not far above.
    assert abs(float(bank.calibration_slice_scores.median())) < 3


def test_planted_lesion_lights_up_where_it_was_planted(stand_in, bank):
    array, lesion = synthetic(11, lesion=LESION)
    canonical, orientation = to_canonical(as_stored(array, OBLIQUE), OBLIQUE)
    query = prepare(torch.from_numpy(canonical), SETTINGS)
    result = detect(stand_in, bank, query, SETTINGS)
    truth, _ = to_canonical(as_stored(lesion, OBLIQUE), OBLIQUE)
    foreground = canonical != 0
    auroc = roc_auc_score(truth[foreground], result.anomaly.numpy()[foreground])
    assert auroc >= 0.95
    # The hottest voxel of the volume lies in or right next to the lesion.
    peak = np.unravel_index(np.argmax(np.where(foreground, result.anomaly.numpy(), -np.inf)), canonical.shape)
    distance = np.min(np.linalg.norm(np.argwhere(truth) - np.array(peak), axis=1))
    assert distance <= 2
    # A slice through the lesion scores highest (the top 1 % of a slice need not be largest where its area is).
    lesion_slices = np.flatnonzero(truth.any(axis=(0, 1)))
    assert int(result.slice_scores.argmax()) in lesion_slices
    assert float(result.slice_scores[lesion_slices].min()) > float(np.delete(result.slice_scores, lesion_slices).max())


def test_lesion_volume_scores_above_lesion_free_ones(stand_in, bank):
    normal = [detect(stand_in, bank, prepared(synthetic(20 + i)[0], OBLIQUE), SETTINGS).volume_score
              for i in range(3)]
    sick = detect(stand_in, bank, prepared(synthetic(30, lesion=LESION)[0], OBLIQUE), SETTINGS)
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
    from himatch_med.detect import batches, stage_distances
    for part, features, patches in batches(stand_in, again, settings, torch.device("cpu")):
        stage_maps, _ = stage_distances(features, bank, settings, again.positions[part])
        assert float(stage_maps[:, patches].abs().max()) < 1e-3  # centroids are stored in fp16
    # And the whole volume scores below every calibration volume of other normal anatomy.
    result = detect(stand_in, bank, again, settings)
    assert result.volume_score < float(bank.calibration_volume_scores.min())


def test_same_input_same_output(stand_in, bank):
    query = prepared(synthetic(5, lesion=LESION)[0], OBLIQUE)
    first, second = detect(stand_in, bank, query, SETTINGS), detect(stand_in, bank, query, SETTINGS)
    assert torch.equal(first.anomaly, second.anomaly) and torch.equal(first.uncertainty, second.uncertainty)


def test_every_fusion_mode_finds_the_lesion(stand_in, bank):
    from dataclasses import replace

    array, lesion = synthetic(12, lesion=LESION)
    canonical, _ = to_canonical(as_stored(array, LPS), LPS)
    truth, _ = to_canonical(as_stored(lesion, LPS), LPS)
    foreground = canonical != 0
    for fusion in ("mean", "max", "last", "uncertainty"):
        settings = replace(SETTINGS, fusion=fusion)
        result = detect(stand_in, bank, prepare(torch.from_numpy(canonical), settings), settings)
        assert roc_auc_score(truth[foreground], result.anomaly.numpy()[foreground]) >= 0.9, fusion


def test_slices_without_foreground_are_not_scored(stand_in, bank):
    array, _ = synthetic(3)
    array[:, :, :3] = 0  # the three lowest axial slices (the identity affine stores them along k)
    query = prepared(array, np.diag([1.0, 1.0, 1.0, 1.0]))
    result = detect(stand_in, bank, query, SETTINGS)
    assert not result.scored[:3].any() and (result.slice_scores[:3] == 0).all()
