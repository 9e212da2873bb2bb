"""Slice and volume scores from fused maps, and percentiles against the bank's calibration scores."""

from __future__ import annotations

import math

import torch


def top_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of ``values`` (at least one value); 0 for an empty tensor."""
    if values.numel() == 0:
        return values.new_zeros(())
    # The rounding keeps 0.07 * 100 = 7.000000000000001 from becoming 8 values.
    count = max(1, math.ceil(round(fraction * values.numel(), 9)))
    return values.flatten().float().topk(count).values.mean()


def slice_scores(maps: torch.Tensor, foreground: torch.Tensor, scored: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-slice score ``(S,)``: mean of the top ``fraction`` of foreground values; 0 for slices not scored.

    Args:
        maps: fused maps ``(S, H, W)``.
        foreground: foreground pixels ``(S, H, W)``.
        scored: slices that are scored ``(S,)``.
        fraction: the top fraction (METHOD.md: 1 %).
    """
    scores = maps.new_zeros(len(maps), dtype=torch.float32)
    for index in torch.nonzero(scored).flatten().tolist():
        scores[index] = top_mean(maps[index][foreground[index]], fraction)
    return scores


def volume_score(maps: torch.Tensor, foreground: torch.Tensor, scored: torch.Tensor, fraction: float) -> float:
    """Mean of the top ``fraction`` of the foreground voxels of the scored slices of ``maps`` ``(S, H, W)``."""
    return float(top_mean(maps[scored][foreground[scored]], fraction))


def percentile(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Percentage (0-100) of ``reference`` scores at or below each of ``scores``; NaN when there is no reference."""
    if reference.numel() == 0:
        return torch.full_like(scores, math.nan, dtype=torch.float32)
    ordered = reference.float().to(scores.device).sort().values
    below = torch.searchsorted(ordered, scores.float().contiguous(), right=True)
    return 100.0 * below / len(ordered)
