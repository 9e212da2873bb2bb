"""Clustered normal features and stage maps: seeded spherical k-means, nearest-centroid distances."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spherical_kmeans(
    points: torch.Tensor, valid: torch.Tensor, k: int, *, iterations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the valid unit vectors of each slice into at most ``k`` unit centroids, for a batch of slices at once.

    Initial centroids are the valid points ranked highest by a seeded random priority over patch positions, so a
    slice's clustering does not depend on which batch it came in (nor on the stage: the stages of a batch can be
    clustered in one call). A slice with ``k`` or fewer valid points keeps them as its centroids. Unused centroid
    slots repeat the slice's largest centroid with size 0, which leaves every nearest-centroid distance unchanged.

    Lloyd iterations stop early once no assignment changes: from then on every iteration would repeat the last, so
    the result is the one all ``iterations`` give.

    Args:
        points: unit vectors ``(..., n, D)``; every leading index is a slice (e.g. ``(L, B, n, D)``).
        valid: which points take part ``(..., n)``, broadcast to the leading shape of ``points``; every slice needs
            at least one.
        k: centroids per slice.
        iterations: Lloyd iterations.
        seed: seed of the initial choice.

    Returns:
        Centroids ``(..., k, D)`` and cluster sizes ``(..., k)`` (0 for unused slots).
    """
    leading, (count, dim) = points.shape[:-2], points.shape[-2:]
    valid = valid.expand(*leading, count)
    if not valid.any(dim=-1).all():
        raise ValueError("spherical_kmeans needs at least one valid point per slice")
    points, valid = points.reshape(-1, count, dim), valid.reshape(-1, count)
    batch = len(points)
    # Invalid points take no part, not even as 0 * NaN in the cluster sums.
    points = torch.where(valid[..., None], points, torch.zeros_like(points))
    generator = torch.Generator().manual_seed(seed)
    priority = torch.rand(count, generator=generator).to(points.device).expand(batch, -1)
    priority = priority.masked_fill(~valid, -1.0)
    first, chosen = priority.topk(min(k, count), dim=1)
    centroids = torch.gather(points, 1, chosen[..., None].expand(-1, -1, dim))
    live = first >= 0
    if live.shape[1] < k:
        pad = k - live.shape[1]
        centroids = torch.cat([centroids, centroids[:, :1].expand(-1, pad, -1)], dim=1)
        live = torch.cat([live, live.new_zeros(batch, pad)], dim=1)
    weights = valid.to(points.dtype).flatten()
    flat_points = points.reshape(batch * count, dim)
    # Slice b's clusters are rows b * k .. b * k + k - 1 of one flat table, so one index_add sums every cluster of
    # every slice (no (n, k) one-hot matrix; sequential and so deterministic on the CPU).
    offsets = (torch.arange(batch, device=points.device) * k)[:, None]
    deterministic_sums = points.device.type == "cpu"
    previous = None
    for _ in range(iterations + 1):
        similarity = (points @ centroids.transpose(1, 2)).masked_fill(~live[:, None], -torch.inf)
        assignment = similarity.argmax(dim=2)
        if previous is not None and torch.equal(assignment, previous):
            break
        previous = assignment
        if deterministic_sums:
            rows = (assignment + offsets).flatten()
            sizes = points.new_zeros(batch * k).index_add_(0, rows, weights).view(batch, k)
            sums = points.new_zeros(batch * k, dim).index_add_(0, rows, flat_points).view(batch, k, dim)
        else:
            # index_add_ adds with atomics on accelerators (bits vary run to run); a one-hot product is
            # deterministic there and cheap at these sizes.
            members = F.one_hot(assignment, k).to(points.dtype) * valid[..., None]
            sizes, sums = members.sum(dim=1), members.transpose(1, 2) @ points
        filled = sizes > 0
        centroids = torch.where(filled[..., None], F.normalize(sums, dim=-1), centroids)
        live = live & filled
    largest = sizes.argmax(dim=1)
    spare = torch.gather(centroids, 1, largest[:, None, None].expand(-1, 1, dim))
    centroids = torch.where(live[..., None], centroids, spare)
    sizes = torch.where(live, sizes, torch.zeros_like(sizes))
    return centroids.reshape(*leading, k, dim), sizes.reshape(*leading, k)


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Cosine distance ``1 - cos`` from each query row ``(Q, D)`` to its nearest unit-norm memory row ``(M, D)``."""
    return torch.cat([1 - (part @ memory.T).amax(dim=1) for part in queries.split(chunk)])


def reference_distances(grid: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Distance of every patch to the nearest centroid of each of its slice's references.

    Args:
        grid: query patch features ``(B, P, D)``, unit norm (P patches per slice).
        memory: the centroids of each slice's ``K`` references ``(B, K, c, D)``, unit norm, in the grid's dtype:
            the products are computed in it (bfloat16 about halves their time where the device has it).
        chunk: patches compared at once (bounds memory at ``B * chunk * K * c``).

    Returns:
        ``d`` of shape ``(B, P, K)``, float32: ``1 - max_m cos(f(p), m)`` over the centroids of reference k. The
        stage map is ``d.amin(-1)``, the distance to the union of all references' centroids.
    """
    batch, refs, cents, dim = memory.shape
    flat = memory.reshape(batch, refs * cents, dim)
    reduced = grid.dtype != torch.float32
    if reduced:
        # A bfloat16 product is summed in float32 but rounded on the way out: a cosine near 1 would come out in
        # steps of 1/256, a large share of the spread of normal distances. With a column of ones against one of -1
        # the product is cos - 1 itself, a small number rounded to 1/256 of its own size (5 times smaller errors).
        grid = torch.cat([grid, grid.new_ones(*grid.shape[:-1], 1)], dim=-1)
        flat = torch.cat([flat, flat.new_full((*flat.shape[:-1], 1), -1)], dim=-1)
    flat = flat.transpose(1, 2)
    # The products in float32 before their maximum: the same values, and bfloat16's amax is 6 times slower.
    parts = [(part @ flat).float().unflatten(-1, (refs, cents)).amax(dim=-1) for part in grid.split(chunk, dim=1)]
    nearest = torch.cat(parts, dim=1)
    return -nearest if reduced else 1 - nearest
