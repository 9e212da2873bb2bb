"""Known-answer tests for himatch_med.fusion: z-units, stage uncertainty, uncertainty weights, fusion modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from himatch_med.fusion import calibrate, fuse, stage_uncertainty, uncertainty_weights


def random(*shape, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# calibrate


def test_calibrate_known_answer():
    distance = torch.tensor([[0.2, 0.4], [1.0, 3.0]])
    z = calibrate(distance, torch.tensor([0.2, 2.0]), torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(z, torch.tensor([[0.0, 2.0], [-2.0, 2.0]]))


def test_calibrate_against_hand_computation_on_grids():
    distance = random(3, 2, 4, 5, seed=0)
    mean, std = torch.tensor([0.1, 0.3, 0.5]), torch.tensor([0.05, 0.2, 1.5])
    z = calibrate(distance, mean, std)
    assert z.shape == distance.shape
    expected = torch.empty_like(distance)
    for stage in range(3):
        expected[stage] = (distance[stage] - mean[stage]) / std[stage]
    torch.testing.assert_close(z, expected)


def test_calibrated_bank_statistics_are_zero_mean_unit_std():
    distance = random(2, 1000, seed=1) * torch.tensor([[1.0], [5.0]])
    z = calibrate(distance, distance.mean(dim=1), distance.std(dim=1))
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(dim=1), torch.ones(2))


# --------------------------------------------------------------------------------------------------------------------
# stage_uncertainty


def test_stage_uncertainty_known_answer():
    # K = 4 distances 1, 2, 3, 4: population std sqrt(1.25); K = 2 equal distances: 0.
    per_reference = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]],
                                  [[1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 0.0, 2.0]]])
    u = stage_uncertainty(per_reference, torch.tensor([1.0, 0.5]))
    expected = torch.tensor([[math.sqrt(1.25), 0.0], [2 * math.sqrt(1.25), 2.0]])
    torch.testing.assert_close(u, expected)


def test_stage_uncertainty_is_population_std_over_k_in_stage_units():
    per_reference = random(3, 2, 4, 5, 8, seed=2)
    std = torch.tensor([0.1, 0.2, 0.4])
    u = stage_uncertainty(per_reference, std)
    assert u.shape == (3, 2, 4, 5)
    expected = np.std(per_reference.numpy(), axis=-1, ddof=0) / std.numpy()[:, None, None, None]
    torch.testing.assert_close(u, torch.from_numpy(expected))


def test_stage_uncertainty_is_torchs_population_std_to_float32_rounding():
    # A batch's distances as matching gives them (4 stages, 16 slices, 14 x 14 patches, K = 9 references), around
    # 0.3 with a small spread, as normal tissue has: the two-pass std is Tensor.std's to float32 rounding.
    per_reference = 0.3 + 0.05 * torch.randn(4, 16, 14, 14, 9, generator=torch.Generator().manual_seed(5))
    std = torch.tensor([0.04, 0.05, 0.06, 0.08])
    expected = per_reference.std(dim=-1, correction=0) / std.view(-1, 1, 1, 1)
    torch.testing.assert_close(stage_uncertainty(per_reference, std), expected, rtol=1e-5, atol=1e-6)


def test_stage_uncertainty_single_reference_is_zero():
    u = stage_uncertainty(random(2, 6, 1, seed=3), torch.tensor([0.3, 0.7]))
    assert torch.equal(u, torch.zeros(2, 6))


# --------------------------------------------------------------------------------------------------------------------
# uncertainty_weights


def test_weights_follow_uncertainty():
    u = torch.tensor([[0.1, 2.0, 0.7], [0.5, 0.3, 0.7], [1.0, 1.0, 0.7]])  # (L=3, P=3)
    w = uncertainty_weights(u, 1.0)
    torch.testing.assert_close(w.sum(dim=0), torch.ones(3))
    # Lower uncertainty -> higher weight, per patch.
    for patch in range(2):
        order = u[:, patch].argsort()
        assert bool((w[order, patch][:-1] > w[order, patch][1:]).all())
    # Equal uncertainty -> equal weights.
    torch.testing.assert_close(w[:, 2], torch.full((3,), 1 / 3))


def test_weights_known_answer_and_temperature():
    u = torch.tensor([[0.0], [1.0]])
    w = uncertainty_weights(u, 1.0)
    torch.testing.assert_close(w[:, 0], torch.tensor([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]))
    w2 = uncertainty_weights(u, 2.0)
    half = math.exp(-0.5)
    torch.testing.assert_close(w2[:, 0], torch.tensor([1 / (1 + half), half / (1 + half)]))
    # A low temperature gives (almost) all the weight to the most certain stage; a high one evens them out.
    torch.testing.assert_close(uncertainty_weights(u, 1e-3)[:, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(uncertainty_weights(u, 1e6)[:, 0], torch.tensor([0.5, 0.5]), rtol=0, atol=1e-6)


def test_weights_shift_invariant_per_patch():
    u = random(4, 3, 3, seed=4)
    torch.testing.assert_close(uncertainty_weights(u, 0.7), uncertainty_weights(u + 5.0, 0.7))


# --------------------------------------------------------------------------------------------------------------------
# fuse


def stage_maps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = 4 * random(3, 2, 5, seed=seed) - 2
    u = random(3, 2, 5, seed=seed + 100)
    return z, u


def test_fuse_uncertainty_against_hand_computation():
    z, u = stage_maps(5)
    fused, fused_u = fuse(z, u, mode="uncertainty", temperature=0.5)
    expected, expected_u = torch.empty(2, 5), torch.empty(2, 5)
    for i in range(2):
        for j in range(5):
            e = [math.exp(-float(u[stage, i, j]) / 0.5) for stage in range(3)]
            w = [x / sum(e) for x in e]
            expected[i, j] = sum(w[stage] * float(z[stage, i, j]) for stage in range(3))
            expected_u[i, j] = sum(w[stage] * float(u[stage, i, j]) for stage in range(3))
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused_u, expected_u)


def test_fuse_uncertainty_known_answer():
    z = torch.tensor([[2.0], [-1.0]])
    u = torch.tensor([[0.0], [math.log(3.0)]])  # weights 3/4 and 1/4 at τ = 1
    fused, fused_u = fuse(z, u, mode="uncertainty", temperature=1.0)
    torch.testing.assert_close(fused, torch.tensor([0.75 * 2 - 0.25]))
    torch.testing.assert_close(fused_u, torch.tensor([0.25 * math.log(3.0)]))


def test_fuse_uncertainty_equal_uncertainty_is_mean():
    z, _ = stage_maps(6)
    u = torch.full_like(z, 0.4)
    fused, fused_u = fuse(z, u, mode="uncertainty", temperature=1.0)
    torch.testing.assert_close(fused, z.mean(dim=0))
    torch.testing.assert_close(fused_u, torch.full((2, 5), 0.4))


def test_fuse_mean():
    z, u = stage_maps(7)
    fused, fused_u = fuse(z, u, mode="mean", temperature=1.0)
    torch.testing.assert_close(fused, (z[0] + z[1] + z[2]) / 3)
    torch.testing.assert_close(fused_u, (u[0] + u[1] + u[2]) / 3)


def test_fuse_max_takes_highest_stage_with_its_uncertainty():
    z, u = stage_maps(8)
    fused, fused_u = fuse(z, u, mode="max", temperature=1.0)
    expected, expected_u = torch.empty(2, 5), torch.empty(2, 5)
    for i in range(2):
        for j in range(5):
            best = max(range(3), key=lambda stage: float(z[stage, i, j]))
            expected[i, j], expected_u[i, j] = z[best, i, j], u[best, i, j]
    assert torch.equal(fused, expected)
    assert torch.equal(fused_u, expected_u)


def test_fuse_last_is_last_stage_only():
    z, u = stage_maps(9)
    fused, fused_u = fuse(z, u, mode="last", temperature=1.0)
    assert torch.equal(fused, z[-1])
    assert torch.equal(fused_u, u[-1])


@pytest.mark.parametrize("mode", ["uncertainty", "mean", "max", "last"])
def test_fuse_single_stage_is_that_stage(mode):
    z, u = stage_maps(10)
    fused, fused_u = fuse(z[:1], u[:1], mode=mode, temperature=1.0)
    torch.testing.assert_close(fused, z[0])
    torch.testing.assert_close(fused_u, u[0])


@pytest.mark.parametrize("mode", ["uncertainty", "mean", "max", "last"])
def test_fuse_does_not_mutate_inputs(mode):
    z, u = stage_maps(11)
    z_copy, u_copy = z.clone(), u.clone()
    fuse(z, u, mode=mode, temperature=1.0)
    assert torch.equal(z, z_copy) and torch.equal(u, u_copy)


def test_fuse_unknown_mode_raises():
    z, u = stage_maps(12)
    with pytest.raises(ValueError, match="'median'"):
        fuse(z, u, mode="median", temperature=1.0)


def test_fuse_lower_uncertainty_stage_dominates():
    """The stage whose references agree decides the fused map where the other's references disagree."""
    z = torch.tensor([[5.0, 5.0], [0.0, 0.0]])
    u = torch.tensor([[0.0, 10.0], [10.0, 0.0]])
    fused, _ = fuse(z, u, mode="uncertainty", temperature=1.0)
    assert float(fused[0]) == pytest.approx(5.0, abs=1e-3)
    assert float(fused[1]) == pytest.approx(0.0, abs=1e-3)
