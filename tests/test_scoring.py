"""Known-answer tests for himatch_med.scoring: top-fraction means, slice and volume scores, percentiles."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from himatch_med.scoring import foreground_counts, masked, percentile, slice_scores, top_mean, volume_score

# --------------------------------------------------------------------------------------------------------------------
# top_mean


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.2, (10 + 9) / 2),  # exactly 2 of 10
    (0.25, (10 + 9 + 8) / 3),  # ceil(2.5) = 3
    (0.01, 10.0),  # ceil(0.1) = 1
    (0.0, 10.0),  # at least one value
    (1.0, 5.5),  # all
])
def test_top_mean_known_answers(fraction, expected):
    values = torch.arange(1, 11, dtype=torch.float32)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    assert float(top_mean(values, fraction)) == pytest.approx(expected)


def test_top_mean_one_percent_of_many_values():
    values = torch.arange(1000, dtype=torch.float32)
    assert float(top_mean(values, 0.01)) == pytest.approx(sum(range(990, 1000)) / 10)
    values = torch.arange(1001, dtype=torch.float32)
    assert float(top_mean(values, 0.01)) == pytest.approx(sum(range(990, 1001)) / 11)  # ceil(10.01) = 11


def test_top_mean_flattens_and_accepts_integers():
    values = torch.tensor([[1, 7], [3, 9]])
    result = top_mean(values, 0.5)
    assert result.dtype.is_floating_point
    assert float(result) == pytest.approx(8.0)


def test_top_mean_empty_is_zero():
    result = top_mean(torch.zeros(0), 0.01)
    assert result.shape == () and float(result) == 0.0


@pytest.mark.parametrize("count, fraction", [(1, 0.01), (997, 0.01), (30000, 0.01), (200_003, 0.05), (64, 1.0)])
def test_top_mean_on_the_cpu_is_torch_topk_mean_bit_for_bit(count, fraction):
    # numpy selects the top values on the CPU; summed in topk's order they give torch's float32 mean exactly.
    generator = torch.Generator().manual_seed(count)
    values = torch.randn(count, generator=generator) * 3
    values[: count // 3] = values[0]  # many ties
    expected = values.float().topk(max(1, math.ceil(round(fraction * count, 9)))).values.mean()
    found = top_mean(values.reshape(-1, 1), fraction)
    assert found.dtype == torch.float32 and found.shape == () and torch.equal(found, expected)


def test_top_mean_with_ties():
    assert float(top_mean(torch.tensor([1.0, 4.0, 4.0, 4.0]), 0.5)) == pytest.approx(4.0)


def test_top_mean_count_is_not_inflated_by_float_rounding():
    values = torch.arange(100, dtype=torch.float32)
    assert float(top_mean(values, 0.07)) == pytest.approx(sum(range(93, 100)) / 7)


# --------------------------------------------------------------------------------------------------------------------
# slice_scores / volume_score


def scored_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    maps = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    foreground = torch.zeros(3, 4, 5, dtype=torch.bool)
    foreground[:, 1:3, 1:4] = True  # 6 pixels per slice
    maps[~foreground] = 1000.0  # background values must never count
    scored = torch.tensor([True, False, True])
    return maps, foreground, scored


def test_slice_scores_known_answer():
    maps, foreground, scored = scored_maps()
    scores = slice_scores(maps, foreground, scored, 0.5)  # top 3 of the 6 foreground values
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # Slice 0 foreground: 6, 7, 8, 11, 12, 13 -> top 3 = 11, 12, 13. Slice 2: +40.
    torch.testing.assert_close(scores, torch.tensor([12.0, 0.0, 52.0]))


def test_slice_scores_unscored_slices_are_zero():
    maps, foreground, _ = scored_maps()
    scores = slice_scores(maps, foreground, torch.zeros(3, dtype=torch.bool), 0.01)
    assert torch.equal(scores, torch.zeros(3))


def test_slice_scores_scored_slice_without_foreground_is_zero():
    maps, foreground, _ = scored_maps()
    foreground[1] = False
    scores = slice_scores(maps, foreground, torch.ones(3, dtype=torch.bool), 0.01)
    assert float(scores[1]) == 0.0
    torch.testing.assert_close(scores[[0, 2]], torch.tensor([13.0, 53.0]))


def test_slice_scores_negative_maps():
    maps = -torch.ones(1, 3, 3) * torch.arange(1, 10, dtype=torch.float32).reshape(1, 3, 3)
    scores = slice_scores(maps, torch.ones(1, 3, 3, dtype=torch.bool), torch.tensor([True]), 0.2)
    torch.testing.assert_close(scores, torch.tensor([-1.5]))  # ceil(1.8) = 2 values: -1, -2


def test_volume_score_over_scored_foreground_only():
    maps, foreground, scored = scored_maps()
    maps[1] = 5000.0  # an unscored slice never counts
    # Scored foreground: 6..13 (slice 0) and 46..53 (slice 2), 12 values; top 0.25 -> 3 values 51, 52, 53.
    assert volume_score(maps, foreground, scored, 0.25) == pytest.approx(52.0)
    assert volume_score(maps, foreground, scored, 0.0) == pytest.approx(53.0)
    assert isinstance(volume_score(maps, foreground, scored, 0.25), float)


def test_numpy_selection_equals_torch_boolean_indexing():
    """masked and foreground_counts (numpy on the CPU, for speed) give what torch's indexing and sum give."""
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(7, 9, 11, generator=generator).transpose(1, 2)  # not contiguous, as slices are cut
    mask = (torch.rand(7, 9, 11, generator=generator) > 0.4).transpose(1, 2)
    assert torch.equal(masked(values, mask), values[mask])
    assert torch.equal(masked(values.bfloat16(), mask), values.bfloat16()[mask])  # numpy has no bf16: torch's path
    assert torch.equal(foreground_counts(mask), mask.flatten(1).sum(dim=1))
    assert foreground_counts(mask).dtype == torch.int64
    assert foreground_counts(mask[:0]).tolist() == []
    # What is not a boolean mask of the values' shape keeps torch's own meaning and errors.
    with pytest.raises(IndexError):
        masked(values, mask.flatten())
    indices = mask.to(torch.long)  # integer indexing, not a mask, as in torch
    assert torch.equal(masked(values, indices), values[indices])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates uint8 masks; numpy would take them for indices
        assert torch.equal(masked(values, mask.to(torch.uint8)), values[mask.to(torch.uint8)])


def test_volume_score_equals_the_top_mean_of_the_scored_foreground():
    generator = torch.Generator().manual_seed(6)
    maps = torch.randn(12, 20, 20, generator=generator)
    foreground = torch.rand(12, 20, 20, generator=generator) > 0.3
    for scored in (torch.ones(12, dtype=torch.bool), torch.arange(12) % 3 > 0):
        inside = foreground & scored[:, None, None]
        expected = float(maps[inside].topk(math.ceil(0.05 * int(inside.sum()))).values.double().mean())
        assert volume_score(maps, foreground, scored, 0.05) == pytest.approx(expected, rel=1e-12)


def test_volume_score_nothing_scored_is_zero():
    maps, foreground, _ = scored_maps()
    assert volume_score(maps, foreground, torch.zeros(3, dtype=torch.bool), 0.01) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# percentile


def test_percentile_known_answers():
    reference = torch.tensor([3.0, 1.0, 4.0, 2.0])  # unsorted on purpose
    scores = torch.tensor([0.0, 1.0, 2.0, 2.5, 4.0, 5.0])
    torch.testing.assert_close(percentile(scores, reference), torch.tensor([0.0, 25.0, 50.0, 50.0, 100.0, 100.0]))


def test_percentile_counts_ties_as_at_or_below():
    reference = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    result = percentile(torch.tensor([2.0, 1.999, 3.0]), reference)
    torch.testing.assert_close(result, torch.tensor([80.0, 20.0, 100.0]))


def test_percentile_empty_reference_is_nan():
    result = percentile(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(0))
    assert result.shape == (3,) and result.dtype == torch.float32
    assert bool(torch.isnan(result).all())


def test_percentile_mixed_dtypes_and_scalar():
    reference = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    result = percentile(torch.tensor([2.5], dtype=torch.float64), reference)
    assert float(result[0]) == pytest.approx(50.0)
    assert float(percentile(torch.tensor(3.0), reference.float())) == pytest.approx(75.0)


def test_percentile_is_monotone():
    reference = torch.rand(50, generator=torch.Generator().manual_seed(0))
    scores = torch.linspace(-0.5, 1.5, 41)
    result = percentile(scores, reference)
    assert bool((result[1:] >= result[:-1]).all())
    assert float(result[0]) == 0.0 and float(result[-1]) == 100.0
    assert not math.isnan(float(result.sum()))


# Ranking (issue 18): slivers, the percentile basis, the bootstrap draws.

def test_foreground_shares_are_relative_to_the_largest_slice():
    from himatch_med.scoring import foreground_shares

    foreground = torch.zeros(3, 10, 10, dtype=torch.bool)
    foreground[0, :1, :5] = True
    foreground[1, :5, :10] = True
    assert foreground_shares(foreground).tolist() == pytest.approx([0.1, 1.0, 0.0])


def test_slivers_are_scored_slices_below_the_share_and_never_all_of_them():
    from himatch_med.scoring import sliver_slices

    foreground = torch.zeros(4, 10, 10, dtype=torch.bool)
    foreground[0, :1, :1] = True  # 1 %
    foreground[1, :10, :10] = True
    foreground[2, :3, :10] = True  # 30 %
    scored = torch.tensor([True, True, True, False])
    assert sliver_slices(foreground, scored, 0.2).tolist() == [True, False, False, False]
    assert sliver_slices(foreground, scored, 0.0).tolist() == [False] * 4
    # The largest slice not scored (its lesion excluded it): every scored slice would be a sliver, so none is.
    assert sliver_slices(foreground, torch.tensor([True, False, False, False]), 0.2).tolist() == [False] * 4


@pytest.mark.parametrize(("error", "needed"), [(10.0, 25), (5.0, 100), (20.0, 7), (50.0, 1)])
def test_a_stable_percentile_needs_volumes_for_its_standard_error(error, needed):
    from himatch_med.scoring import percentile_basis, stable_volumes

    assert stable_volumes(error) == needed
    # The standard error at the median from the number needed is at most the error, and from one fewer above it.
    assert 50 / needed**0.5 <= error + 1e-9 and (needed == 1 or 50 / (needed - 1) ** 0.5 > error)
    assert percentile_basis(needed, 10 * needed, error)["stable"]
    assert needed == 1 or not percentile_basis(needed - 1, 10 * needed, error)["stable"]


def test_the_percentile_basis_of_two_volumes():
    from himatch_med.scoring import percentile_basis

    assert percentile_basis(2, 24, 10.0) == {"normal_volumes": 2, "normal_slices": 24, "resolution_points": 50.0,
                                             "standard_error_points": 35.36, "stable_from_volumes": 25,
                                             "stable": False}
    assert percentile_basis(0, 0, 10.0)["resolution_points"] is None


def test_bootstrap_draws_are_seeded_counts_of_each_volume():
    from himatch_med.scoring import bootstrap_draws

    draws = bootstrap_draws(10, 8, seed=0)
    assert draws.shape == (8, 10) and draws.sum(dim=1).tolist() == [10] * 8 and bool((draws >= 0).all())
    assert torch.equal(draws, bootstrap_draws(10, 8, seed=0))
    assert not torch.equal(draws, bootstrap_draws(10, 8, seed=1))


def test_volume_score_over_some_slices_takes_the_volumes_count_of_top_voxels():
    maps = torch.arange(20, dtype=torch.float32).reshape(2, 2, 5)
    foreground = torch.ones(2, 2, 5, dtype=torch.bool)
    scored = torch.ones(2, dtype=torch.bool)
    assert volume_score(maps, foreground, scored, 0.1) == pytest.approx(18.5)  # top 2 of 20
    assert volume_score(maps, foreground, scored, 0.1, count=40) == pytest.approx(17.5)  # top 4 of these 20
    assert volume_score(maps, foreground, scored, 0.1, count=1000) == pytest.approx(9.5)  # all of them
