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
                   foreground: np.ndarray | None = None, connectivity: int = 26, extent: float = 0.0) -> np.ndarray:
    """Label map of the regions of ``anomaly`` above ``threshold``: 0 nothing, 1..N from the most anomalous.

    A region is a connected set of voxels above the threshold (inside ``foreground``). With ``extent`` > 0 a finding
    keeps only the voxels of its region at or above ``extent`` times its peak: the map is smoothed, so a bright lesion's
    region above a low threshold reaches well beyond it, while half its peak (``extent`` 0.5) lies at the edge of a
    uniformly bright lesion (PET delineates lesions at a fixed share of their maximum for the same reason). Findings
    smaller than ``min_volume`` are dropped. Findings are numbered by their peak, highest first (ties: the larger
    first, then the first in the array's order), so label 1 is the most anomalous.

    Args:
        anomaly: the fused map ``(X, Y, Z)`` in z-units.
        threshold: the finding threshold in z-units; a voxel belongs to a finding when its value is above it.
        voxel_volume: the volume of one voxel in mm³.
        min_volume: the smallest finding kept, in mm³.
        foreground: voxels that may belong to a finding ``(X, Y, Z)``; all when ``None``.
        connectivity: 6, 18 or 26 neighbours.
        extent: share of its peak a voxel needs to belong to a finding (0: every voxel of its region).

    Returns:
        The label map, of the smallest unsigned integer type that holds N.
    """
    if anomaly.ndim != 3:
        raise ValueError(f"anomaly has shape {anomaly.shape}; a volume (X, Y, Z) is expected")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r} must be a finite z-value")
    if not 0 <= extent < 1:
        raise ValueError(f"extent={extent!r} must lie in [0, 1)")
    if not voxel_volume > 0 or not min_volume >= 0:
        raise ValueError(f"voxel_volume={voxel_volume!r} must be positive and min_volume={min_volume!r} not negative")
    above = anomaly > threshold
    if foreground is not None:
        if foreground.shape != anomaly.shape:
            raise ValueError(f"foreground has shape {foreground.shape}, the map {anomaly.shape}")
        above &= foreground.astype(bool)
    # Only the box around the voxels above the threshold is labelled: usually a small part of the volume, and its
    # raster order is the volume's, so the regions and their numbering are the same.
    whole = anomaly.shape
    if not above.any():
        return np.zeros(whole, dtype=np.uint8)
    box = tuple(slice(int(hits[0]), int(hits[-1]) + 1)
                for hits in (np.flatnonzero(above.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))))
    above, anomaly = above[box], anomaly[box]
    regions, count = ndimage.label(above, structure=structure(connectivity))
    index = np.arange(1, count + 1)
    peaks = region_peaks(anomaly, regions, count)
    if extent > 0:
        floor = np.concatenate([[np.inf], extent * np.maximum(peaks, 0)])
        regions = np.where(anomaly >= floor[regions], regions, 0)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    keep = sizes * voxel_volume >= min_volume * (1 - 1e-9)  # a region of exactly the minimum size is kept
    # lexsort sorts by the last key first; scipy numbers regions in array order, so the index breaks ties.
    order = index[keep][np.lexsort((index[keep], -sizes[keep], -peaks[keep]))]
    lookup = np.zeros(count + 1, dtype=_label_dtype(len(order)))
    lookup[order] = np.arange(1, len(order) + 1)
    labels = np.zeros(whole, dtype=lookup.dtype)
    labels[box] = lookup[regions]
    return labels


def region_peaks(values: np.ndarray, regions: np.ndarray, count: int) -> np.ndarray:
    """The maximum of ``values`` in each region 1..``count`` of a label map (float64), as ``ndimage.maximum`` gives.

    Our own because ``ndimage.maximum`` with labels sorts the whole volume (3.3 s for a 240 x 240 x 155 map, the
    largest cost of writing the outputs); this visits only the labelled voxels once. Equality is pinned in a test.
    """
    inside = regions > 0
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, regions[inside], values[inside].astype(np.float64))
    return peaks[1:]


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


def calibration_record(histogram: ValueHistogram, volume_peaks: list[float], fraction: float) -> dict:
    """What a bank records for findings, from the normal references' calibration maps.

    Args:
        histogram: the fused map over the calibration slices' foreground (each queried without its own volume).
        volume_peaks: the highest foreground value of each calibration volume.
        fraction: the share of normal foreground voxels allowed above the finding threshold.

    Returns:
        ``false_positive_fraction``, ``threshold`` (z), ``normal_values`` (:meth:`NormalValues.to_dict`),
        ``normal_volume_peaks`` and ``normal_volumes_with_voxels_above`` (the share of calibration volumes with a
        voxel above the threshold).
    """
    if histogram.total == 0:
        raise RuntimeError("calibration measured no foreground voxel")
    threshold = histogram.quantile(1.0 - fraction)
    peaks = [round(float(p), 4) for p in volume_peaks]
    return {"false_positive_fraction": fraction, "threshold": round(threshold, 4),
            "normal_values": histogram.table().to_dict(), "normal_volume_peaks": peaks,
            "normal_volumes_with_voxels_above": round(sum(p > threshold for p in peaks) / max(len(peaks), 1), 4)}


def threshold_of(record: dict | None, *, fraction: float, override: float | None = None
                 ) -> tuple[float | None, str]:
    """The finding threshold of a run and where it comes from.

    Args:
        record: the bank's :func:`calibration_record` (``None`` for a bank built before findings existed).
        fraction: the run's ``finding_false_positive_fraction``.
        override: the run's ``finding_threshold`` (z), which wins when given.

    Returns:
        The threshold (``None`` when there is none) and its source: ``setting``, ``bank`` (recorded at calibration),
        ``bank table`` (another fraction than recorded, read from the recorded distribution) or ``none``.
    """
    if override is not None:
        return float(override), "setting"
    if not record:
        return None, "none"
    if abs(record["false_positive_fraction"] - fraction) <= 1e-12:
        return float(record["threshold"]), "bank"
    return NormalValues.from_dict(record["normal_values"]).threshold(fraction), "bank table"


@dataclass(frozen=True)
class Findings:
    """The findings of one input on its file's voxel grid.

    ``labels`` the label map ``(X, Y, Z)`` (0 = none), ``records`` one dict per finding (:func:`describe_findings`),
    ``threshold`` the z-value used (``None``: none known, nothing was looked for), ``source`` where it came from
    (:func:`threshold_of`), ``notes`` what a user should know.
    """

    labels: np.ndarray
    records: list[dict]
    threshold: float | None
    source: str
    notes: tuple[str, ...] = ()


NO_THRESHOLD_NOTE = ("the bank was built before findings existed (it records no finding threshold), so no findings "
                     "were looked for; rebuild the bank from the same references (`python -m himatch_med.bank build`) "
                     "to calibrate one, or pass --finding-threshold Z (in z-units of the heatmap)")


def find(anomaly: np.ndarray, region: np.ndarray, affine: np.ndarray, *, slice_axis: int, record: dict | None,
         fraction: float, override: float | None, min_volume: float, connectivity: int,
         extent: float = 0.0) -> Findings:
    """The findings of one input: threshold, label map and records, all on the file's voxel grid.

    Args:
        anomaly: the fused map ``(X, Y, Z)`` on the file's grid.
        region: the voxels that may hold a finding (the scored slices' foreground).
        affine: the file's affine.
        slice_axis: the file's voxel axis the volume was sliced along.
        record: the bank's findings calibration (:func:`calibration_record`), ``None`` for an older bank.
        fraction, override: the run's ``finding_false_positive_fraction`` and ``finding_threshold``.
        min_volume: smallest finding in mm³.
        connectivity: 6, 18 or 26.
        extent: share of its peak a voxel of a finding needs (:func:`label_findings`).
    """
    threshold, source = threshold_of(record, fraction=fraction, override=override)
    if threshold is None:
        return Findings(np.zeros(anomaly.shape, np.uint8), [], None, source, (NO_THRESHOLD_NOTE,))
    labels = label_findings(anomaly, threshold, voxel_volume=voxel_volume(affine), min_volume=min_volume,
                            foreground=region, connectivity=connectivity, extent=extent)
    normal = NormalValues.from_dict(record["normal_values"]) if record else None
    return Findings(labels, describe_findings(labels, anomaly, affine, slice_axis=slice_axis, normal=normal),
                    threshold, source)
