"""Known-answer tests for himatch_med.matching: seeded spherical k-means and chunked nearest-centroid distances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from himatch_med.matching import nearest_distance, reference_distances, spherical_kmeans


def unit(*shape, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def planted_clusters(centres: torch.Tensor, per_cluster: int, noise: float, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit points scattered tightly around each centre, shuffled; returns the points and their true cluster."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(per_cluster)
    points = F.normalize(centres[labels] + noise * torch.randn(len(labels), centres.shape[1], generator=generator),
                         dim=-1)
    order = torch.randperm(len(labels), generator=generator)
    return points[order], labels[order]


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.arccos((F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).clamp(-1, 1)))


# --------------------------------------------------------------------------------------------------------------------
# spherical_kmeans


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_planted_clusters(seed):
    """Every live centroid sits on a planted centre, every centre is found, and the found partition refines the truth.

    k is larger than the number of planted clusters: with a random (not k-means++) initialisation and k equal to the
    number of clusters, two seeds can fall in one cluster and Lloyd iterations cannot split them apart again.
    """
    centres = torch.eye(16)[:3] * 1.0  # orthogonal: 90 degrees apart
    points, labels = planted_clusters(centres, per_cluster=40, noise=0.01, seed=seed)
    centroids, sizes = spherical_kmeans(points[None], torch.ones(1, len(points), dtype=torch.bool), 8, iterations=10,
                                        seed=seed)
    centroids, sizes = centroids[0], sizes[0]
    live = sizes > 0
    angles = angle_degrees(centroids[live], centres)  # (live, 3)
    assert float(angles.min(dim=1).values.max()) < 5.0
    assert float(angles.min(dim=0).values.max()) < 5.0
    # The clusters partition the points; each cluster's members share one planted label.
    assignment = (points @ centroids[live].T).argmax(dim=1)
    counts = torch.bincount(assignment, minlength=int(live.sum()))
    assert torch.equal(counts.float(), sizes[live])
    for cluster in range(int(live.sum())):
        assert len(labels[assignment == cluster].unique()) == 1
    # Sizes per planted centre add up to that centre's 40 points.
    nearest_centre = angles.argmin(dim=1)
    assert torch.equal(torch.zeros(3).index_add(0, nearest_centre, sizes[live]), torch.full((3,), 40.0))


def test_kmeans_with_k_equal_to_clusters_converges_onto_planted_means():
    """Whenever both planted clusters receive a centroid, Lloyd lands exactly on their normalised means."""
    centres = torch.eye(8)[:2]
    points, labels = planted_clusters(centres, per_cluster=30, noise=0.02, seed=5)
    expected = F.normalize(torch.stack([points[labels == c].sum(0) for c in range(2)]), dim=-1)
    recovered = 0
    for seed in range(20):
        centroids, sizes = spherical_kmeans(points[None], torch.ones(1, 60, dtype=torch.bool), 2, iterations=10,
                                            seed=seed)
        angles = angle_degrees(centroids[0], centres)
        if sorted(angles.argmin(dim=1).tolist()) != [0, 1]:
            continue  # both initial points fell in one cluster: a local optimum, allowed for random initialisation
        recovered += 1
        assert float(angles.min(dim=1).values.max()) < 3.0
        assert torch.equal(sizes[0], torch.tensor([30.0, 30.0]))
        torch.testing.assert_close(centroids[0][angles.argmin(dim=1).argsort()], expected)
    assert recovered > 0


def test_kmeans_is_deterministic_for_a_seed():
    points = unit(3, 50, 12, seed=1)
    valid = torch.rand(3, 50, generator=torch.Generator().manual_seed(2)) > 0.3
    a = spherical_kmeans(points, valid, 6, iterations=5, seed=7)
    b = spherical_kmeans(points, valid, 6, iterations=5, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kmeans_does_not_use_global_rng():
    points = unit(2, 40, 8, seed=3)
    valid = torch.ones(2, 40, dtype=torch.bool)
    torch.manual_seed(0)
    a = spherical_kmeans(points, valid, 5, iterations=5, seed=1)
    torch.manual_seed(999)
    b = spherical_kmeans(points, valid, 5, iterations=5, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kmeans_is_independent_of_batch_composition():
    points = unit(4, 60, 10, seed=4)
    valid = torch.ones(4, 60, dtype=torch.bool)
    valid[0, ::3] = False
    valid[1, 40:] = False
    valid[3, :55] = False  # only 5 valid points: fewer than k
    alone = [spherical_kmeans(points[i:i + 1], valid[i:i + 1], 8, iterations=6, seed=3) for i in range(4)]
    together = spherical_kmeans(points, valid, 8, iterations=6, seed=3)
    shuffled = spherical_kmeans(points[[2, 0, 3, 1]], valid[[2, 0, 3, 1]], 8, iterations=6, seed=3)
    for i in range(4):
        assert torch.equal(together[0][i], alone[i][0][0])
        assert torch.equal(together[1][i], alone[i][1][0])
    for position, i in enumerate([2, 0, 3, 1]):
        assert torch.equal(shuffled[0][position], alone[i][0][0])
        assert torch.equal(shuffled[1][position], alone[i][1][0])


@pytest.mark.parametrize("valid_count", [1, 3, 8])
def test_kmeans_keeps_few_valid_points_exactly(valid_count):
    points = unit(1, 20, 6, seed=5)
    valid = torch.zeros(1, 20, dtype=torch.bool)
    chosen = torch.tensor([17, 2, 9, 11, 0, 5, 14, 19][:valid_count])
    valid[0, chosen] = True
    centroids, sizes = spherical_kmeans(points, valid, 8, iterations=10, seed=0)
    live = sizes[0] > 0
    assert int(live.sum()) == valid_count
    assert torch.equal(sizes[0][live], torch.ones(valid_count))
    # The live centroids are the valid points themselves (as a set).
    found = centroids[0][live]
    match = (found @ points[0, chosen].T).argmax(dim=1)
    assert sorted(match.tolist()) == list(range(valid_count))
    torch.testing.assert_close(found, points[0, chosen][match], rtol=0, atol=1e-6)
    # Unused slots repeat a live centroid (so nearest distances do not change).
    for slot in torch.nonzero(~live).flatten().tolist():
        assert torch.isclose(found @ centroids[0, slot], torch.tensor(1.0), atol=1e-6).any()


def test_kmeans_with_fewer_points_than_k():
    points = unit(2, 3, 5, seed=6)
    valid = torch.tensor([[True, True, True], [False, True, False]])
    centroids, sizes = spherical_kmeans(points, valid, 5, iterations=4, seed=0)
    assert centroids.shape == (2, 5, 5) and sizes.shape == (2, 5)
    assert torch.equal(sizes.sum(dim=1), torch.tensor([3.0, 1.0]))
    assert torch.equal((sizes > 0).sum(dim=1), torch.tensor([3, 1]))
    torch.testing.assert_close(centroids[1], points[1, 1].expand(5, -1), rtol=0, atol=1e-6)


def test_kmeans_ignores_invalid_points():
    points = unit(2, 50, 8, seed=7)
    valid = torch.rand(2, 50, generator=torch.Generator().manual_seed(8)) > 0.4
    reference = spherical_kmeans(points, valid, 6, iterations=8, seed=2)
    for garbage in (torch.zeros_like(points), 1e3 * unit(2, 50, 8, seed=9), -points):
        replaced = torch.where(valid[..., None], points, garbage)
        result = spherical_kmeans(replaced, valid, 6, iterations=8, seed=2)
        assert torch.equal(result[0], reference[0])
        assert torch.equal(result[1], reference[1])


def test_kmeans_ignores_non_finite_invalid_points():
    points = unit(1, 30, 8, seed=23)
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, [4, 17]] = False
    reference = spherical_kmeans(points, valid, 4, iterations=5, seed=0)
    poisoned = points.clone()
    poisoned[0, 4] = float("nan")
    poisoned[0, 17] = float("inf")
    result = spherical_kmeans(poisoned, valid, 4, iterations=5, seed=0)
    assert torch.equal(result[0], reference[0])
    assert torch.equal(result[1], reference[1])


def test_kmeans_sizes_and_norms():
    points = unit(3, 64, 16, seed=10)
    valid = torch.rand(3, 64, generator=torch.Generator().manual_seed(11)) > 0.5
    centroids, sizes = spherical_kmeans(points, valid, 8, iterations=10, seed=0)
    assert centroids.shape == (3, 8, 16) and sizes.shape == (3, 8)
    assert torch.equal(sizes.sum(dim=1), valid.sum(dim=1).float())
    assert bool((sizes >= 0).all())
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(3, 8))
    # Each valid point's cluster (nearest live centroid) has the recorded size.
    for b in range(3):
        live = sizes[b] > 0
        assignment = (points[b, valid[b]] @ centroids[b, live].T).argmax(dim=1)
        assert torch.equal(torch.bincount(assignment, minlength=int(live.sum())).float(), sizes[b, live])


def test_kmeans_unused_slots_have_size_zero_and_repeat_largest():
    # Two exact duplicates of each of 2 directions: at most 2 clusters can stay non-empty.
    base = unit(2, 6, seed=12)
    points = base[[0, 0, 0, 1, 1, 0, 1]][None]
    centroids, sizes = spherical_kmeans(points, torch.ones(1, 7, dtype=torch.bool), 5, iterations=5, seed=0)
    live = sizes[0] > 0
    assert int(live.sum()) == 2
    assert sorted(sizes[0][live].tolist()) == [3.0, 4.0]
    largest = centroids[0][sizes[0].argmax()]
    for slot in torch.nonzero(~live).flatten().tolist():
        assert torch.equal(centroids[0, slot], largest)


def test_kmeans_centroid_is_normalised_mean_of_members():
    points = unit(1, 30, 4, seed=13)
    valid = torch.ones(1, 30, dtype=torch.bool)
    centroids, sizes = spherical_kmeans(points, valid, 4, iterations=30, seed=1)
    live = sizes[0] > 0
    assignment = (points[0] @ centroids[0, live].T).argmax(dim=1)
    expected = F.normalize(torch.stack([points[0, assignment == c].sum(0) for c in range(int(live.sum()))]), dim=-1)
    torch.testing.assert_close(centroids[0, live], expected, rtol=0, atol=1e-5)


def test_kmeans_rejects_slice_without_valid_points():
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1] = False
    with pytest.raises(ValueError, match="valid"):
        spherical_kmeans(unit(2, 5, 3), valid, 2, iterations=2, seed=0)


def test_kmeans_does_not_mutate_inputs():
    points, valid = unit(2, 20, 4, seed=14), torch.rand(2, 20, generator=torch.Generator().manual_seed(1)) > 0.2
    points_copy, valid_copy = points.clone(), valid.clone()
    spherical_kmeans(points, valid, 3, iterations=3, seed=0)
    assert torch.equal(points, points_copy) and torch.equal(valid, valid_copy)


# --------------------------------------------------------------------------------------------------------------------
# nearest_distance / reference_distances


def brute_nearest(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(queries))
    for q in range(len(queries)):
        best = -math.inf
        for m in range(len(memory)):
            best = max(best, float(torch.dot(queries[q], memory[m])))
        out[q] = 1 - best
    return out


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 38, 8192])
def test_nearest_distance_against_brute_force(chunk):
    queries, memory = unit(37, 12, seed=15), unit(11, 12, seed=16)
    distance = nearest_distance(queries, memory, chunk=chunk)
    assert distance.shape == (37,)
    torch.testing.assert_close(distance, brute_nearest(queries, memory), rtol=0, atol=1e-6)


def test_nearest_distance_of_a_memory_row_is_zero():
    memory = unit(9, 7, seed=17)
    torch.testing.assert_close(nearest_distance(memory, memory, chunk=4), torch.zeros(9), rtol=0, atol=1e-6)
    torch.testing.assert_close(nearest_distance(-memory[:1], memory[:1]), torch.tensor([2.0]))


def brute_reference(grid: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    batch, patches, _ = grid.shape
    refs, cents = memory.shape[1:3]
    out = torch.empty(batch, patches, refs)
    for b in range(batch):
        for p in range(patches):
            for k in range(refs):
                out[b, p, k] = 1 - max(float(torch.dot(grid[b, p], memory[b, k, c])) for c in range(cents))
    return out


@pytest.mark.parametrize("chunk", [1, 4, 12, 13, 14, 4096])
def test_reference_distances_against_brute_force(chunk):
    grid, memory = unit(2, 13, 8, seed=18), unit(2, 3, 4, 8, seed=19)
    distances = reference_distances(grid, memory, chunk=chunk)
    assert distances.shape == (2, 13, 3)
    torch.testing.assert_close(distances, brute_reference(grid, memory), rtol=0, atol=1e-6)


def test_reference_distances_min_is_distance_to_union_of_references():
    grid, memory = unit(2, 10, 6, seed=20), unit(2, 4, 5, 6, seed=21)
    distances = reference_distances(grid, memory, chunk=3)
    for b in range(2):
        union = nearest_distance(grid[b], memory[b].flatten(0, 1))
        torch.testing.assert_close(distances[b].amin(dim=-1), union, rtol=0, atol=1e-6)


def test_reference_distances_of_a_planted_centroid_is_zero_for_that_reference_only():
    memory = unit(1, 3, 4, 16, seed=22)
    grid = memory[:, 1, 2][:, None].clone()  # the patch is centroid 2 of reference 1
    distances = reference_distances(grid, memory)[0, 0]
    assert float(distances[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(distances[0]) > 1e-3 and float(distances[2]) > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# spherical_kmeans against the implementation it replaced (index_add sums, stages in one call, early stop)


def one_hot_kmeans(points, valid, k, *, iterations, seed):
    """The implementation before 0.3 (one-hot membership matrix, every iteration run), kept as the reference."""
    if not valid.any(dim=1).all():
        raise ValueError("spherical_kmeans needs at least one valid point per slice")
    batch, count, _ = points.shape
    # Invalid points take no part, not even as 0 * NaN in the cluster sums.
    points = torch.where(valid[..., None], points, torch.zeros_like(points))
    generator = torch.Generator().manual_seed(seed)
    priority = torch.rand(count, generator=generator).to(points.device).expand(batch, -1)
    priority = priority.masked_fill(~valid, -1.0)
    first, chosen = priority.topk(min(k, count), dim=1)
    centroids = torch.gather(points, 1, chosen[..., None].expand(-1, -1, points.shape[-1]))
    live = first >= 0
    if live.shape[1] < k:
        pad = k - live.shape[1]
        centroids = torch.cat([centroids, centroids[:, :1].expand(-1, pad, -1)], dim=1)
        live = torch.cat([live, live.new_zeros(batch, pad)], dim=1)
    weights = valid.to(points.dtype)
    for _ in range(iterations + 1):
        similarity = (points @ centroids.transpose(1, 2)).masked_fill(~live[:, None], -torch.inf)
        members = F.one_hot(similarity.argmax(dim=2), k).to(points.dtype) * weights[..., None]
        sizes = members.sum(dim=1)
        sums = members.transpose(1, 2) @ points
        filled = sizes > 0
        centroids = torch.where(filled[..., None], F.normalize(sums, dim=-1), centroids)
        live = live & filled
    largest = sizes.argmax(dim=1)
    spare = torch.gather(centroids, 1, largest[:, None, None].expand(-1, 1, centroids.shape[-1]))
    centroids = torch.where(live[..., None], centroids, spare)
    return centroids, torch.where(live, sizes, torch.zeros_like(sizes))



def realistic_points(slices: int, patches: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-like features: a few anatomical directions with spread, and foreground masks of varied size."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(slices, 12, dim, generator=generator), dim=-1)
    labels = torch.randint(0, 12, (slices, patches), generator=generator)
    points = F.normalize(torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim))
                         + 0.6 * torch.randn(slices, patches, dim, generator=generator) / dim**0.5, dim=-1)
    valid = torch.rand(slices, patches, generator=generator) < torch.linspace(0.05, 1.0, slices)[:, None]
    valid[:, 0] = True
    return points, valid


@pytest.mark.parametrize(("seed", "k", "iterations"), [(0, 32, 20), (1, 32, 20), (2, 8, 50), (3, 32, 0), (4, 64, 3)])
def test_kmeans_equals_the_one_hot_implementation(seed, k, iterations):
    """Same assignments, sizes exactly; centroids within float32 summation-order rounding (1e-6)."""
    points, valid = realistic_points(6, 196, 48, seed)
    valid[5] = False
    valid[5, [3, 70, 150]] = True  # fewer valid points than k
    centroids, sizes = spherical_kmeans(points, valid, k, iterations=iterations, seed=seed)
    expected_centroids, expected_sizes = one_hot_kmeans(points, valid, k, iterations=iterations, seed=seed)
    assert torch.equal(sizes, expected_sizes)
    torch.testing.assert_close(centroids, expected_centroids, rtol=0, atol=1e-6)


def test_kmeans_clusters_all_stages_in_one_call():
    """Stages stacked in front of the batch give exactly what one call per stage gives."""
    stages = [realistic_points(4, 64, 24, seed)[0] for seed in (5, 6, 7)]
    valid = realistic_points(4, 64, 24, 8)[1]
    together = spherical_kmeans(torch.stack(stages), valid, 16, iterations=20, seed=3)
    assert together[0].shape == (3, 4, 16, 24) and together[1].shape == (3, 4, 16)
    for stage, grid in enumerate(stages):
        alone = spherical_kmeans(grid, valid, 16, iterations=20, seed=3)
        assert torch.equal(together[0][stage], alone[0])
        assert torch.equal(together[1][stage], alone[1])


def test_kmeans_stops_early_only_at_a_fixed_point():
    """Any iteration count past convergence gives the same bits as the full one-hot run of that many."""
    points, valid = realistic_points(3, 120, 16, 9)
    results = [spherical_kmeans(points, valid, 10, iterations=n, seed=1) for n in (30, 100)]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    expected = one_hot_kmeans(points, valid, 10, iterations=100, seed=1)
    assert torch.equal(results[1][1], expected[1])
    torch.testing.assert_close(results[1][0], expected[0], rtol=0, atol=1e-6)


def test_reference_distances_in_bfloat16_are_float32_within_its_rounding():
    grid, memory = unit(2, 13, 8, seed=18), unit(2, 3, 4, 8, seed=19)
    exact = reference_distances(grid, memory)
    half = reference_distances(grid.bfloat16(), memory.bfloat16())
    assert half.dtype == torch.float32 and not torch.equal(half, exact)
    torch.testing.assert_close(half, exact, rtol=0, atol=2e-2)  # 8 bits of mantissa: cosines to about 1/256


def test_reference_distances_in_bfloat16_keep_small_distances_fine():
    # Patches close to a centroid (distances below 0.05, where normal tissue lies): a bfloat16 product rounded as a
    # cosine near 1 would be off by up to 0.0027 here and 0.0011 on average; as cos - 1 by at most 0.0010.
    generator = torch.Generator().manual_seed(5)
    memory = F.normalize(torch.randn(2, 3, 4, 64, generator=generator), dim=-1)
    grid = F.normalize(memory[:, :, 0].repeat(1, 4, 1) + 0.15 * torch.randn(2, 12, 64, generator=generator) / 8,
                       dim=-1)
    exact = reference_distances(grid, memory)
    error = (reference_distances(grid.bfloat16(), memory.bfloat16()) - exact)[exact < 0.05].abs()
    assert error.numel() == 24 and float(error.max()) < 1.5e-3 and float(error.mean()) < 7e-4
