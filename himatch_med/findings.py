"""Findings: connected regions of the fused map above the finding threshold, and what a radiologist reads of them.

Pure numpy/scipy on arrays of one grid: a label map from a map and a threshold (:func:`label_findings`), one record
per finding (:func:`describe_findings`: size in voxels and mL, peak and mean z, where it lies in scanner coordinates
and in the file's voxel indices), the normal references' distribution of map values that the finding threshold and
the peaks' percentiles come from (:class:`NormalValues`, built at calibration from a :class:`ValueHistogram`), and a
lesion-level comparison with a ground-truth mask (:func:`match_regions`).

Positions: ``ras_mm`` is the scanner's RAS+ world (NIfTI), ``lps_mm`` the same point in DICOM's LPS+ (x and y
negated); ``voxel`` indices are those of the array as its file stores it, from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

CONNECTIVITY = {6: 1, 18: 2, 26: 3}
"""Neighbourhood size -> the rank of :func:`scipy.ndimage.generate_binary_structure` in 3D (faces, edges, corners)."""
TAIL_LEVELS = tuple(1.0 - 10.0 ** -(2 + i / 5) for i in range(1, 26))
"""Quantile levels above 0.99 kept in a :class:`NormalValues` table: 5 per decade down to 1e-7 of the voxels."""
LEVELS = tuple(i / 100 for i in range(100)) + TAIL_LEVELS + (1.0,)
"""Quantile levels of a :class:`NormalValues` table: every percent, a fine upper tail, and the maximum."""
HISTOGRAM_RANGE = (-20.0, 100.0)
"""z-range of :class:`ValueHistogram` (beyond it values count at the ends; the exact minimum and maximum are kept)."""
HISTOGRAM_BINS = 48_000
"""Bins of :class:`ValueHistogram`: 0.0025 z each."""


def structure(connectivity: int) -> np.ndarray:
    """The 3D neighbourhood of ``connectivity`` (6, 18 or 26) voxels."""
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity={connectivity!r} is not one of 6, 18, 26")
    return ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity])


def label_findings(anomaly: np.ndarray, threshold: float, *, voxel_volume: float, min_volume: float,
                   foreground: np.ndarray | None = None, connectivity: int = 26) -> np.ndarray:
    """Label map of the regions of ``anomaly`` above ``threshold``: 0 nothing, 1..N from the most anomalous.

    A region is a connected set of voxels above the threshold (inside ``foreground``); regions smaller than
    ``min_volume`` are dropped. Regions are numbered by their peak, highest first (ties: the larger first, then the
    first in the array's order), so label 1 is the most anomalous finding.

    Args:
        anomaly: the fused map ``(X, Y, Z)`` in z-units.
        threshold: the finding threshold in z-units; a voxel belongs to a finding when its value is above it.
        voxel_volume: the volume of one voxel in mm³.
        min_volume: the smallest finding kept, in mm³.
        foreground: voxels that may belong to a finding ``(X, Y, Z)``; all when ``None``.
        connectivity: 6, 18 or 26 neighbours.

    Returns:
        The label map, of the smallest unsigned integer type that holds N.
    """
    if anomaly.ndim != 3:
        raise ValueError(f"anomaly has shape {anomaly.shape}; a volume (X, Y, Z) is expected")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r} must be a finite z-value")
    if not voxel_volume > 0 or not min_volume >= 0:
        raise ValueError(f"voxel_volume={voxel_volume!r} must be positive and min_volume={min_volume!r} not negative")
    above = anomaly > threshold
    if foreground is not None:
        if foreground.shape != anomaly.shape:
            raise ValueError(f"foreground has shape {foreground.shape}, the map {anomaly.shape}")
        above &= foreground.astype(bool)
    regions, count = ndimage.label(above, structure=structure(connectivity))
    if count == 0:
        return np.zeros(anomaly.shape, dtype=np.uint8)
    index = np.arange(1, count + 1)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    peaks = np.asarray(ndimage.maximum(anomaly, regions, index), dtype=np.float64)
    keep = sizes * voxel_volume >= min_volume * (1 - 1e-9)  # a region of exactly the minimum size is kept
    # lexsort sorts by the last key first; scipy numbers regions in array order, so the index breaks ties.
    order = index[keep][np.lexsort((index[keep], -sizes[keep], -peaks[keep]))]
    lookup = np.zeros(count + 1, dtype=_label_dtype(len(order)))
    lookup[order] = np.arange(1, len(order) + 1)
    return lookup[regions]


def _label_dtype(count: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if count <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise RuntimeError(f"{count} findings do not fit a label map")


def describe_findings(labels: np.ndarray, anomaly: np.ndarray, affine: np.ndarray, *, slice_axis: int,
                      normal: NormalValues | None = None) -> list[dict]:
    """One record per finding of a label map, in label order.

    Args:
        labels: the label map from :func:`label_findings` ``(X, Y, Z)``, on the file's voxel grid.
        anomaly: the fused map on the same grid.
        affine: the file's voxel-to-world RAS affine ``(4, 4)``.
        slice_axis: the file's voxel axis (0, 1, 2 for i, j, k) along which the volume was sliced.
        normal: the normal references' map values, for the peaks' percentiles (``None``: not given).

    Returns:
        Dicts with ``label``, ``voxels``, ``volume_ml``, ``peak_z``, ``mean_z``, ``peak_percentile`` (percentage of
        the normal references' foreground voxels at or below the peak; ``None`` without ``normal``), ``centroid`` and
        ``peak`` (each ``ras_mm``, ``lps_mm``, ``voxel``), ``bbox_voxel`` (``min`` and ``max``, inclusive) and
        ``slices`` (the file axis and the first and last index along it).
    """
    if labels.shape != anomaly.shape:
        raise ValueError(f"labels {labels.shape} and anomaly {anomaly.shape} must share a grid")
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    found = []
    for number, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == number
        values = anomaly[box][inside].astype(np.float64)
        offset = np.array([s.start for s in box])
        voxels = np.argwhere(inside) + offset
        peak = voxels[int(np.argmax(values))]
        centroid = voxels.mean(axis=0)
        found.append({
            "label": number,
            "voxels": int(len(values)),
            "volume_ml": round(len(values) * voxel_ml, 4),
            "peak_z": round(float(values.max()), 4),
            "mean_z": round(float(values.mean()), 4),
            "peak_percentile": None if normal is None else round(float(normal.percentile(values.max())), 4),
            "centroid": _position(centroid, affine, digits=2),
            "peak": _position(peak, affine, digits=None),
            "bbox_voxel": {"min": voxels.min(axis=0).tolist(), "max": voxels.max(axis=0).tolist()},
            "slices": {"file_axis": "ijk"[slice_axis], "first": int(voxels[:, slice_axis].min()),
                       "last": int(voxels[:, slice_axis].max())},
        })
    return found


def _position(voxel: np.ndarray, affine: np.ndarray, *, digits: int | None) -> dict:
    ras = affine[:3, :3] @ voxel + affine[:3, 3]
    index = [round(float(v), digits) for v in voxel] if digits is not None else [int(v) for v in voxel]
    return {"ras_mm": [round(float(v), 2) for v in ras], "lps_mm": [round(float(v), 2) for v in ras * (-1, -1, 1)],
            "voxel": index}


def voxel_volume(affine: np.ndarray) -> float:
    """The volume of one voxel in mm³, from the affine."""
    return abs(float(np.linalg.det(affine[:3, :3])))


@dataclass(frozen=True)
class NormalValues:
    """The distribution of the fused map over the normal references' foreground voxels, as a quantile table.

    ``levels`` (Q,) rise from 0 to 1 (:data:`LEVELS`), ``values`` (Q,) are the map values there (``values[-1]`` is the
    largest normal value); ``voxels`` is how many voxels it was measured on.
    """

    levels: tuple[float, ...]
    values: tuple[float, ...]
    voxels: int

    def percentile(self, value: float) -> float:
        """Percentage (0-100) of normal voxels at or below ``value``; 100 above the largest."""
        values, levels = np.asarray(self.values), np.asarray(self.levels)
        if value >= values[-1]:
            return 100.0
        if value < values[0]:
            return 0.0
        # The highest level whose value is <= value, interpolated to the next: flat runs of the table count fully.
        upper = int(np.searchsorted(values, value, side="right"))
        low, high = values[upper - 1], values[upper]
        share = 0.0 if high <= low else (value - low) / (high - low)
        return 100.0 * float(levels[upper - 1] + share * (levels[upper] - levels[upper - 1]))

    def threshold(self, fraction: float) -> float:
        """The value above which ``fraction`` of normal voxels lie (interpolated on the table's upper tail)."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction={fraction!r} must lie strictly between 0 and 1")
        tails = 1.0 - np.asarray(self.levels[:-1])
        values = np.asarray(self.values[:-1])
        if fraction <= tails[-1]:
            return float(self.values[-1]) if fraction < tails[-1] else float(values[-1])
        # Tails fall steeply near 1: interpolate in log of the tail, where the table is evenly spaced.
        return float(np.interp(-np.log10(fraction), -np.log10(tails), values))

    def to_dict(self) -> dict:
        """The table as JSON-ready data (for the bank's metadata)."""
        return {"levels": [round(v, 9) for v in self.levels], "values": [round(v, 5) for v in self.values],
                "voxels": self.voxels}

    @classmethod
    def from_dict(cls, data: dict) -> NormalValues:
        """The table from :meth:`to_dict`'s data."""
        return cls(tuple(float(v) for v in data["levels"]), tuple(float(v) for v in data["values"]),
                   int(data["voxels"]))


class ValueHistogram:
    """Accumulates map values in a fixed histogram (bounded memory), keeping the exact minimum and maximum.

    Args:
        value_range: the histogram's z-range; values beyond it count in the end bins.
        bins: number of bins.
    """

    def __init__(self, value_range: tuple[float, float] = HISTOGRAM_RANGE, bins: int = HISTOGRAM_BINS) -> None:
        self.low, self.high = value_range
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.minimum, self.maximum = np.inf, -np.inf

    def add(self, values: torch.Tensor) -> None:
        """Count ``values`` (any shape)."""
        values = values.detach().flatten().float().cpu()
        if values.numel() == 0:
            return
        width = (self.high - self.low) / self.bins
        index = ((values - self.low) / width).floor().clamp(0, self.bins - 1).long()
        self.counts += torch.bincount(index, minlength=self.bins)
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))

    @property
    def total(self) -> int:
        """How many values were counted."""
        return int(self.counts.sum())

    def quantile(self, level: float) -> float:
        """The value at quantile ``level`` (0 to 1), interpolated inside its bin, clamped to the exact extremes."""
        total = self.total
        if total == 0:
            raise ValueError("no values were counted")
        if level <= 0:
            return self.minimum
        if level >= 1:
            return self.maximum
        cumulative = np.cumsum(self.counts.numpy())
        rank = level * total
        index = int(np.searchsorted(cumulative, rank, side="left"))
        before = cumulative[index - 1] if index else 0
        inside = (rank - before) / max(int(self.counts[index]), 1)
        width = (self.high - self.low) / self.bins
        return float(np.clip(self.low + width * (index + inside), self.minimum, self.maximum))

    def table(self) -> NormalValues:
        """The quantile table at :data:`LEVELS`."""
        values = np.maximum.accumulate([self.quantile(level) for level in LEVELS])
        return NormalValues(LEVELS, tuple(float(v) for v in values), self.total)


def match_regions(findings: np.ndarray, truth: np.ndarray, *, connectivity: int = 26) -> dict:
    """Lesion-level comparison of findings with a ground-truth mask.

    A ground-truth region (a connected component of ``truth``) is hit when a finding overlaps it; a finding that
    overlaps no ground-truth region is a false-positive region. Each ground-truth region's Dice is measured against
    the findings that overlap it (0 for a missed one).

    Args:
        findings: the label map of the findings ``(X, Y, Z)`` (0 = none).
        truth: the ground-truth mask on the same grid.
        connectivity: the neighbourhood of ground-truth regions (6, 18 or 26).

    Returns:
        ``regions`` (ground-truth regions), ``hit``, ``missed``, ``findings``, ``false_positive_regions`` and
        ``dice`` (one value per ground-truth region, in the order scipy numbers them).
    """
    if findings.shape != truth.shape:
        raise ValueError(f"findings {findings.shape} and truth {truth.shape} must share a grid")
    regions, count = ndimage.label(truth.astype(bool), structure=structure(connectivity))
    found = int(findings.max()) if findings.size else 0
    overlap = (regions > 0) & (findings > 0)
    # Pairs (ground-truth region, finding) that share a voxel.
    pairs = np.unique(np.stack([regions[overlap], findings[overlap].astype(np.int64)]), axis=1)
    dice = []
    for region in range(1, count + 1):
        touching = pairs[1][pairs[0] == region]
        if touching.size == 0:
            dice.append(0.0)
            continue
        mine, theirs = regions == region, np.isin(findings, touching)
        dice.append(float(2 * np.count_nonzero(mine & theirs) / (np.count_nonzero(mine) + np.count_nonzero(theirs))))
    hit = int(sum(d > 0 for d in dice))
    true_findings = set(pairs[1].tolist())
    return {"regions": count, "hit": hit, "missed": count - hit, "findings": found,
            "false_positive_regions": int(sum(1 for n in range(1, found + 1) if n not in true_findings)),
            "dice": [round(d, 4) for d in dice]}
