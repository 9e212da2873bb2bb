"""The GPU path gives the CPU's answer (bf16 backbone aside); skipped where there is no CUDA device."""

import pytest
import torch
from conftest import OBLIQUE, StandIn, as_stored, brain_volume

from himatch_med.bank.build import build_bank
from himatch_med.config import Settings
from himatch_med.detect import Detector, prepare
from himatch_med.volume import to_canonical

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_stand_in_detection_on_cuda_matches_cpu():
    settings = Settings(model="stand-in", image_size=64, centroids=16, calibration_slices=32).resolved()

    def prepared(seed, lesion=None):
        array = as_stored(brain_volume(seed, (56, 60, 14), lesion=lesion, radius=3.0)[0], OBLIQUE)
        return prepare(torch.from_numpy(to_canonical(array, OBLIQUE)[0]), settings)

    results = {}
    for device in ("cpu", "cuda"):
        extractor = StandIn(device=device)
        extractor.projections = [p.to(device) for p in extractor.projections]
        bank = build_bank(extractor, [(f"n{i}", prepared(i)) for i in range(3)], settings).to(device)
        results[device] = Detector(extractor, bank, settings).detect(prepared(9, (20, 24, 7)))
    torch.testing.assert_close(results["cuda"].anomaly, results["cpu"].anomaly, atol=1e-3, rtol=1e-3)
    assert abs(results["cuda"].volume_score - results["cpu"].volume_score) < 1e-3


def test_kmeans_on_cuda_matches_cpu_and_repeats_itself():
    """On CUDA the cluster sums are a one-hot product (deterministic there): the CPU's answer, the same every time."""
    from test_matching import realistic_points

    from himatch_med.matching import spherical_kmeans

    points, valid = realistic_points(8, 196, 64, seed=3)
    stages = torch.stack([points, points.flip(1)])
    cpu = spherical_kmeans(stages, valid, 32, iterations=20, seed=0)
    cuda = [spherical_kmeans(stages.cuda(), valid.cuda(), 32, iterations=20, seed=0) for _ in range(2)]
    assert torch.equal(cuda[0][0], cuda[1][0]) and torch.equal(cuda[0][1], cuda[1][1])
    torch.testing.assert_close(cuda[0][1].cpu(), cpu[1], rtol=0, atol=0)
    torch.testing.assert_close(cuda[0][0].cpu(), cpu[0], rtol=0, atol=1e-5)
