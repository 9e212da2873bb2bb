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


def top_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of ``values`` (at least one value); 0 for an empty tensor."""
    if values.numel() == 0:
        return values.new_zeros(())
    return values.flatten().float().topk(top_count(fraction, values.numel())).values.mean()


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


def volume_score(maps: torch.Tensor, foreground: torch.Tensor, scored: torch.Tensor, fraction: float) -> float:
    """Mean of the top ``fraction`` of the foreground voxels of the scored slices of ``maps`` ``(S, H, W)``."""
    inside = foreground & scored.to(maps.device)[:, None, None]
    count = int(inside.sum())
    if count == 0:
        return 0.0
    values = maps[inside].float()  # only foreground values: selection degrades on the many tied background ones
    k = top_count(fraction, count)
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
