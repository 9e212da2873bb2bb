"""The baselines reproduce hand-computed answers on tiny features; a planted lesion lights up with each of them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import LESION, SETTINGS, SHAPE, brain_volume

from himatch_med.baselines import (
    centroid_distances,
    nearest_patch_distances,
    patch_scores,
    sample_patches,
    support_slices,
)
from himatch_med.detect import Detector, prepare, reference_patches
from himatch_med.errors import InputError
from himatch_med.volume import from_slices

# Unit vectors in 2D at known angles: cos(0) = 1, cos(60 deg) = 0.5, cos(90 deg) = 0.
E0 = [1.0, 0.0]
E60 = [0.5, 3 ** 0.5 / 2]
E90 = [0.0, 1.0]


def test_nearest_patch_distance_by_hand():
    grid = torch.tensor([[[E0, E90], [E60, [-1.0, 0.0]]]])  # (1, 2, 2, 2)
    memory = torch.tensor([E0, E60])
    # E0 -> 0; E90 -> nearest E60 (cos 0.866) -> 0.134; E60 -> 0; -E0 -> nearest E60 (cos -0.5) -> 1.5.
    expected = torch.tensor([[[0.0, 1 - 3 ** 0.5 / 2], [0.0, 1.5]]])
    for chunk in (1, 2, 8):  # the memory compared in parts gives the same answer
        assert torch.allclose(nearest_patch_distances(grid, memory, chunk=chunk), expected, atol=1e-6)
    with pytest.raises(ValueError, match="memory holds no reference patch"):
        nearest_patch_distances(grid, memory[:0])


def test_support_slice_and_its_centroids_by_hand():
    bank_cls = torch.tensor([E90, E60, [-1.0, 0.0]], dtype=torch.float16)  # stored as the bank stores it
    query_cls = torch.tensor([[2.0, 0.1], [0.0, -3.0]])  # not unit norm: cosine all the same
    assert support_slices(query_cls, bank_cls).tolist() == [1, 2]
    assert support_slices(query_cls, bank_cls, chunk=1).tolist() == [1, 2]
    grid = torch.tensor([[[E0, E90]]])  # (1, 1, 2, 2)
    centroids = torch.tensor([[E60, E60, [-1.0, 0.0]]])  # (1, c=3, 2), a repeated slot as k-means leaves it
    assert torch.allclose(centroid_distances(grid, centroids), torch.tensor([[[0.5, 1 - 3 ** 0.5 / 2]]]), atol=1e-6)


def test_patch_scores_average_the_top_fraction_of_the_foreground():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 9.0]], [[4.0, 0.0], [0.0, 0.0]]])
    patches = torch.tensor([[[True, True], [True, False]], [[False, True], [True, True]]])
    # slice 0: foreground 1, 2, 3 (9 is background); top 50 % of 3 = 2 values -> (3 + 2) / 2; slice 1: top 2 of 0s.
    assert torch.allclose(patch_scores(maps, patches, 0.5), torch.tensor([2.5, 0.0]))
    assert torch.allclose(patch_scores(maps, patches, 0.01), torch.tensor([3.0, 0.0]))


def test_the_patch_sample_keeps_the_highest_keys_whatever_the_order():
    patches = torch.arange(12.0).view(6, 2)
    keys = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5, 0.2], dtype=torch.float64)
    empty = (patches[:0], keys[:0])
    at_once = sample_patches(*empty, patches, keys, 3)
    kept = empty
    for part in (slice(0, 2), slice(2, 5), slice(5, 6)):
        kept = sample_patches(*kept, patches[part], keys[part], 3)
    assert torch.equal(at_once[0], patches[[1, 3, 4]]) and torch.equal(kept[0], at_once[0])


@pytest.fixture(scope="module")
def lesion_case():
    volume, mask = brain_volume(9, SHAPE, lesion=LESION, radius=4.0)
    canonical = torch.from_numpy(volume)
    return prepare(canonical, SETTINGS), torch.from_numpy(mask)


@pytest.mark.parametrize("method", ["anomalydino", "dino-ad"])
def test_a_planted_lesion_lights_up_with_each_baseline(method, lesion_case, bank, stand_in, references):
    from himatch_med import jobs

    prepared, mask = lesion_case
    settings = replace(SETTINGS, method=method)
    memory = None
    if method == "anomalydino":
        memory = reference_patches(stand_in, ((str(p), jobs.read(p, settings).prepared)
                                              for p in sorted(references.iterdir())), settings, torch.device("cpu"))
    detection = Detector(stand_in, bank, settings, memory=memory).detect(prepared)
    assert bool(mask[:, :, int(detection.slice_scores.argmax())].any())  # the top slice holds the lesion
    anomaly, foreground = detection.canonical("anomaly"), from_slices(prepared.foreground, prepared.axis)
    assert anomaly[mask].mean() > 2 * anomaly[foreground & ~mask].mean()
    # Cosine distances, not z-units: no percentile from the HiMatch calibration.
    assert 0 <= float(detection.anomaly.min()) and float(detection.anomaly.max()) <= 2
    assert detection.volume_percentile != detection.volume_percentile
    assert float(detection.uncertainty.abs().max()) == 0


def test_anomalydino_memory_is_capped_seeded_and_independent_of_the_batch_size(stand_in, references):
    from himatch_med import jobs

    def memory(**changes):
        settings = replace(SETTINGS, **changes)
        return reference_patches(stand_in, ((str(p), jobs.read(p, settings).prepared)
                                            for p in sorted(references.iterdir())), settings, torch.device("cpu"))

    full = memory(memory_patches=10 ** 7)
    capped = memory(memory_patches=100)
    assert len(capped) == 100 and len(full) > 1000
    assert torch.equal(capped, memory(memory_patches=100, batch_size=3))
    assert not torch.equal(capped, memory(memory_patches=100, seed=1))
    # Each kept patch is one of the references' patches.
    assert bool((capped @ full.T).amax(dim=1).gt(1 - 1e-5).all())
    with pytest.raises(InputError, match="no reference slice with foreground"):
        reference_patches(stand_in, iter(()), SETTINGS, torch.device("cpu"))


def test_anomalydino_without_its_memory_is_refused(lesion_case, bank, stand_in):
    with pytest.raises(ValueError, match="needs the references' patches"):
        Detector(stand_in, bank, replace(SETTINGS, method="anomalydino")).detect(lesion_case[0])


def test_the_command_lines_take_the_method(tmp_path, capsys):
    from himatch_med.evaluate import parser
    from himatch_med.run import main

    args = parser().parse_args(["volumes", "--images", "i", "--labels", "l", "--references", "r", "-o", "o",
                                "--method", "himatch", "anomalydino", "dino-ad"])
    assert args.method == ["himatch", "anomalydino", "dino-ad"]
    # run (and screen) answer with HiMatch-AD only: a baseline is for comparison, beside it.
    query = tmp_path / "q.nii.gz"
    query.write_bytes(b"")
    assert main([str(query), "--references", str(tmp_path), "--method", "dino-ad", "-o", str(tmp_path / "o")]) == 2
    assert "--method dino-ad is a baseline for comparison" in capsys.readouterr().err
