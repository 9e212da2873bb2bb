"""Slice and volume scores from fused maps, and percentiles against the bank's calibration scores."""

from __future__ import annotations

import math

import numpy as np
import torch


def top_count(fraction: float, count: int | torch.Tensor):
    """How many values the top ``fraction`` of ``count`` values is: the ceiling, at least one."""
    # The rounding keeps 0.07 * 100 = 7.000000000000001 from becoming 8 values.
    if isinstance(count, torch.Tensor):
        return torch.ceil(torch.round(fraction * count.double(), decimals=9)).clamp(min=1).long()
    return max(1, math.ceil(round(fraction * count, 9)))


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]``: the same values in the same order.

    On the CPU numpy selects them, about ten times faster than torch's boolean indexing there (62 against 7 ms for a
    240 x 240 x 155 map, a cost every volume score paid).
    """
    if (values.device.type == "cpu" and mask.device.type == "cpu" and mask.dtype == torch.bool
            and mask.shape == values.shape and values.dtype != torch.bfloat16 and not values.requires_grad):
        return torch.from_numpy(values.numpy()[mask.numpy()])
    return values[mask]  # torch's own checks and semantics for anything else


def foreground_counts(mask: torch.Tensor) -> torch.Tensor:
    """The true pixels of each slice of a mask ``(S, ...)`` as int64 ``(S,)`` (numpy's count on the CPU: 6x)."""
    if mask.device.type == "cpu" and mask.dtype == torch.bool and mask.numel():
        return torch.from_numpy(np.count_nonzero(mask.numpy().reshape(len(mask), -1), axis=1).astype(np.int64))
    return mask.flatten(1).sum(dim=1)


def top_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of ``values`` (at least one value); 0 for an empty tensor."""
    if values.numel() == 0:
        return values.new_zeros(())
    flat, k = values.flatten().float(), top_count(fraction, values.numel())
    if flat.device.type == "cpu" and not flat.requires_grad:
        # numpy's introselect is 2-8 times faster than torch.topk on the CPU (a bank's calibration takes one top
        # mean per sampled slice and volume). Sorted as topk sorts them, the values are added in the same order: the
        # same float32 mean, pinned in a test.
        array = flat.numpy()
        top = np.sort(np.partition(array, array.size - k)[array.size - k:])[::-1]
        return torch.from_numpy(top.copy()).mean()
    return flat.topk(k).values.mean()


def slice_scores(maps: torch.Tensor, foreground: torch.Tensor, scored: torch.Tensor, fraction: float,
                 chunk: int = 32) -> torch.Tensor:
    """Per-slice score ``(S,)``: mean of the top ``fraction`` of foreground values; 0 for slices not scored.

    Args:
        maps: fused maps ``(S, H, W)``.
        foreground: foreground pixels ``(S, H, W)``.
        scored: slices that are scored ``(S,)``.
        fraction: the top fraction (docs/method.md: 1 %).
        chunk: slices handled at once (one masked copy of that many slices is made).
    """
    scores = torch.zeros(len(maps), dtype=torch.float32, device=maps.device)
    for start in range(0, len(maps), chunk):
        inside = foreground[start:start + chunk].flatten(1) & scored[start:start + chunk, None].to(maps.device)
        counts = inside.sum(dim=1)
        if not counts.any():
            continue
        values = maps[start:start + chunk].flatten(1).float().masked_fill(~inside, -torch.inf)
        counts_k = top_count(fraction, counts)
        # One topk for the chunk: each slice then averages its own leading k values.
        top = values.topk(int(counts_k.max()), dim=1).values.nan_to_num(neginf=0.0).double().cumsum(dim=1)
        means = top.gather(1, (counts_k - 1)[:, None])[:, 0] / counts_k
        scores[start:start + chunk] = torch.where(counts > 0, means, torch.zeros_like(means)).float()
    return scores


def volume_score(maps: torch.Tensor, foreground: torch.Tensor, scored: torch.Tensor, fraction: float, *,
                 count: int | None = None) -> float:
    """Mean of the top ``fraction`` of the foreground voxels of the scored slices of ``maps`` ``(S, H, W)``.

    ``count``: the number of voxels the fraction is of, when ``maps`` holds only some slices of a volume (the mean
    is then over as many voxels as the volume's top fraction, or all of these).
    """
    rows = scored.to(maps.device)
    if not bool(rows.all()):
        maps, foreground = maps[rows], foreground[rows]
    values = masked(maps, foreground).float()  # only foreground values: selection degrades on the many tied ones
    present = values.numel()
    if present == 0:
        return 0.0
    k = min(top_count(fraction, present if count is None else count), present)
    if values.device.type == "cpu":
        # numpy's introselect is several times faster than torch.topk for a large k on the CPU.
        array = values.numpy()
        return float(np.partition(array, array.size - k)[array.size - k:].mean(dtype=np.float64))
    return float(values.topk(k).values.double().mean())


def percentile(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Percentage (0-100) of ``reference`` scores at or below each of ``scores``; NaN when there is no reference."""
    if reference.numel() == 0:
        return torch.full_like(scores, math.nan, dtype=torch.float32)
    ordered = reference.float().to(scores.device).sort().values
    below = torch.searchsorted(ordered, scores.float().contiguous(), right=True)
    return 100.0 * below / len(ordered)


def foreground_shares(foreground: torch.Tensor) -> torch.Tensor:
    """Each slice's foreground area as a share of the largest slice's ``(S,)``, from the foreground ``(S, H, W)``."""
    area = foreground_counts(foreground).double()
    return (area / area.max().clamp(min=1)).float()


def sliver_slices(foreground: torch.Tensor, scored: torch.Tensor, area: float) -> torch.Tensor:
    """The scored slices ``(S,)`` whose foreground is less than ``area`` of the largest slice's (slivers).

    A sliver (the thin end of an organ) has few patches: the mean of its top values rests on few of them, and its
    patches are edge and partial-volume ones, unlike most of the references'. Slivers are mapped but do not rank.
    When every scored slice would be a sliver (the largest slice not scored), none is: the volume keeps a score.
    """
    slivers = scored.to(foreground.device) & (foreground_shares(foreground) < area)
    if bool((scored.to(slivers.device) & ~slivers).any()):
        return slivers
    return torch.zeros_like(slivers)


def stable_volumes(error: float) -> int:
    """Normal volumes an empirical percentile needs for a standard error of at most ``error`` points at the median.

    The share of ``n`` normal scores below a query's estimates a probability ``p`` with standard error
    ``sqrt(p (1 - p) / n)``, largest at ``p = 0.5``: ``50 / sqrt(n)`` percentile points; it is at most ``error`` for
    ``n >= (50 / error) ** 2`` (25 volumes for 10 points). Its resolution, ``100 / n`` points, is then finer still.
    """
    return max(1, math.ceil(round((50.0 / error) ** 2, 9)))


def percentile_basis(volumes: int, slices: int, error: float) -> dict:
    """What a percentile rests on: the normal volumes and slices, its resolution and standard error, and if enough.

    Args:
        volumes: normal volumes whose scores the volume percentile compares with.
        slices: normal slices whose scores the slice percentiles compare with.
        error: the largest standard error (percentile points) called stable (:func:`stable_volumes`).
    """
    needed = stable_volumes(error)
    return {"normal_volumes": volumes, "normal_slices": slices,
            "resolution_points": round(100.0 / volumes, 2) if volumes else None,
            "standard_error_points": round(50.0 / math.sqrt(volumes), 2) if volumes else None,
            "stable_from_volumes": needed, "stable": volumes >= needed}


def bootstrap_draws(volumes: int, replicates: int, seed: int) -> torch.Tensor:
    """How often each of ``volumes`` reference volumes is drawn in each of ``replicates`` bootstrap samples.

    Returns:
        Counts ``(replicates, volumes)``, each row summing to ``volumes``; seeded (the same for the same arguments).
    """
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(volumes, (replicates, volumes), generator=generator)
    return torch.zeros((replicates, volumes), dtype=torch.int32).scatter_add_(
        1, drawn, torch.ones_like(drawn, dtype=torch.int32))

