"""The scoring loop: every test case through every row's detector, gathered into metrics and pictures.

Rows that differ only in calibrated settings (:meth:`himatch_med.config.Settings.flagged`) share one extractor, one
bank (recalibrated for each row by :func:`himatch_med.bank.store.recalibrated`) and the features of each test case.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from himatch_med import findings, io, jobs
from himatch_med.bank.store import cached_bank, recalibrated, reference_memory
from himatch_med.config import ReadOptions, Settings
from himatch_med.detect import Detection, Detector, Prepared, load_extractor
from himatch_med.errors import InputError
from himatch_med.evaluation.datasets import Case, Dataset
from himatch_med.features import Extractor
from himatch_med.metrics import PixelMetrics, average_precision, image_auroc
from himatch_med.volume import from_slices, to_slices

ABLATION_AXES = ("stages", "planes", "method", "fusion", "references_k", "cls_weight")
"""Settings that take several values in one evaluation, outermost first (``stages`` varies the slowest)."""
HIMATCH_ONLY = ("fusion", "references_k", "cls_weight")
"""Ablated settings a baseline (``method`` other than ``himatch``) does not use: its rows keep the base values."""
PIXEL_RANGE = (-20.0, 100.0)
"""Histogram range of the pixel metrics, in z-units."""
BASELINE_RANGE = (0.0, 2.0)
"""Histogram range of a baseline row's pixel metrics: its maps are cosine distances."""
PIXEL_BINS = 48_000
GALLERY = ("detected", "missed", "false_alarm")
"""Picture categories: anomalous cases with the highest scores, anomalous with the lowest, normal with the highest."""


def ablation_rows(base: Settings, **values: list | None) -> list[Settings]:
    """One settings per combination of the values given for :data:`ABLATION_AXES` (``None``: the base's value).

    Args:
        base: resolved settings of everything else.
        values: e.g. ``fusion=["mean", "max"]``, ``stages=[[3, 6, 9, 12], [12]]``.

    Returns:
        Rows in product order (``stages`` varying slowest), duplicates dropped; a baseline's row keeps the base's
        values of :data:`HIMATCH_ONLY`, so it appears once per ``stages``.
    """
    unknown = sorted(set(values) - set(ABLATION_AXES))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} cannot be ablated; choose among {', '.join(ABLATION_AXES)}")
    choices = [values.get(axis) or [getattr(base, axis)] for axis in ABLATION_AXES]
    rows: list[Settings] = []
    for combination in itertools.product(*choices):
        changes = dict(zip(ABLATION_AXES, combination, strict=True))
        changes["stages"], changes["planes"] = tuple(changes["stages"]), tuple(changes["planes"])
        if changes["method"] != "himatch":
            # A baseline scores one plane.
            changes.update({axis: getattr(base, axis) for axis in HIMATCH_ONLY}, planes=())
        row = replace(base, **changes)
        if row not in rows:
            rows.append(row)
    return rows



@dataclass(frozen=True)
class Panel:
    """One picture: a display-oriented slice ``(H, W)`` in [0, 1], its map, foreground, and ground truth or ``None``."""

    name: str
    caption: str
    image: np.ndarray
    heat: np.ndarray
    foreground: np.ndarray
    truth: np.ndarray | None


class Gallery:
    """The few cases worth a picture in each of :data:`GALLERY`, kept in bounded memory while the test set streams by.

    Args:
        count: pictures per category.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.kept: dict[str, list] = {category: [] for category in GALLERY}
        self.order = itertools.count()

    def offer(self, label: int, score: float, panel: Callable[[], Panel]) -> None:
        """Consider a case; ``panel`` is only called when the case is kept."""
        keys = {"detected": score, "missed": -score} if label else {"false_alarm": score}
        made = None
        for category, key in keys.items():
            kept = self.kept[category]
            if len(kept) < self.count or key > kept[0][0]:
                made = made or panel()
                entry = (key, next(self.order), made)
                if len(kept) < self.count:
                    heapq.heappush(kept, entry)
                else:
                    heapq.heapreplace(kept, entry)

    def panels(self) -> dict[str, list[Panel]]:
        """Kept panels per category, most telling first."""
        return {category: [entry[2] for entry in sorted(kept, reverse=True)] for category, kept in self.kept.items()}


class Tally:
    """What one row gathers over the test set: a record per case, slice scores, pixel and voxel histograms, pictures.

    Args:
        settings: the row's settings.
        volumes: whether cases are annotated volumes (slice and voxel metrics too).
        pixel_range: ``(lo, hi)`` of the pixel histograms, in z-units.
        bins: histogram bins.
        pictures: gallery pictures per category (0: none).
    """

    def __init__(self, settings: Settings, *, volumes: bool, pixel_range: tuple[float, float], bins: int,
                 pictures: int) -> None:
        self.settings = settings
        self.volumes = volumes
        self.range = pixel_range
        self.records: list[dict] = []
        self.slices: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.pixels = PixelMetrics(lo=pixel_range[0], hi=pixel_range[1], bins=bins)
        self.voxels = PixelMetrics(lo=pixel_range[0], hi=pixel_range[1], bins=bins) if volumes else None
        self.masked = 0
        self.outside = 0
        self.counted = 0
        self.gallery = Gallery(pictures) if pictures > 0 else None
        self.stages: tuple[int, ...] = settings.stages
        self.seconds = 0.0
        self.lesions: list[tuple[int, dict]] = []  # (label, lesion-level match) per case with a mask

    def add(self, case: Case, prepared: Prepared, detection: Detection, truth: np.ndarray | None, label: int,
            lesions: dict | None = None) -> None:
        """Add one case's detection and ground truth (``truth`` canonical boolean, or ``None`` without a mask).

        ``lesions``: the case's findings matched with its mask (:func:`himatch_med.findings.match_regions`).
        """
        maps = detection.anomaly.numpy()
        scores = detection.slice_scores.numpy()
        truths = to_slices(torch.from_numpy(truth), prepared.axis).numpy() if truth is not None else None
        record = {"class": case.group, "name": io.stem(case.path), "path": str(case.path), "label": label,
                  "score": detection.volume_score, "percentile": detection.volume_percentile,
                  "anomalous_pixels": int(truth.sum()) if truth is not None else None}
        if truths is not None:
            self.masked += 1
            for index in range(len(maps)):
                self.pixels.update(maps[index], truths[index])
            if self.voxels is not None:
                self.voxels.update(detection.canonical("anomaly").numpy(), truth)
            self.outside += int(np.count_nonzero((maps < self.range[0]) | (maps > self.range[1])))
            self.counted += maps.size
        if self.volumes:
            labels = truths.reshape(len(truths), -1).any(axis=1) if truths is not None else np.full(len(scores), label)
            self.slices.append((record["name"], scores.copy(), labels.astype(np.int64)))
            record["slices"] = len(scores)
            record["anomalous_slices"] = int(labels.sum())
        if lesions is not None:
            self.lesions.append((label, lesions))
            record.update({"findings": lesions["findings"], "lesions": lesions["regions"],
                           "lesions_hit": lesions["hit"], "false_positive_regions": lesions["false_positive_regions"]})
        self.records.append(record)
        if self.gallery is not None:
            self.gallery.offer(label, detection.volume_score, lambda: _panel(record, prepared, maps, truths, scores))

    def metrics(self) -> dict:
        """The row's metrics; ``nan`` where undefined (one class only, no masks)."""
        labels = np.array([r["label"] for r in self.records], dtype=np.int64)
        scores = np.array([r["score"] for r in self.records], dtype=np.float64)
        result: dict = {"cases": len(self.records), "anomalous_cases": int(labels.sum())}
        if self.volumes:
            slice_scores = np.concatenate([s for _, s, _ in self.slices]) if self.slices else np.zeros(0)
            slice_labels = np.concatenate([lab for _, _, lab in self.slices]) if self.slices else np.zeros(0)
            result["slices"], result["anomalous_slices"] = len(slice_scores), int(slice_labels.sum())
            result["image_auroc"], result["image_ap"] = _ranked(slice_scores, slice_labels)
            result["volume_auroc"], result["volume_ap"] = _ranked(scores, labels)
        else:
            result["image_auroc"], result["image_ap"] = _ranked(scores, labels)
        if self.masked:
            pixels = self.pixels.compute()
            result.update({key: pixels[key] for key in ("pixel_auroc", "pixel_ap", "aupro", "best_dice",
                                                        "best_dice_threshold")})
            if self.voxels is not None:
                voxels = self.voxels.compute()
                result.update({"voxel_auroc": voxels["pixel_auroc"], "voxel_ap": voxels["pixel_ap"],
                               "voxel_aupro": voxels["aupro"], "voxel_best_dice": voxels["best_dice"]})
            result["masked_cases"] = self.masked
            result["pixels_outside_range"] = self.outside / max(self.counted, 1)
        if self.lesions:
            result["lesions"] = lesion_summary(self.lesions)
        return result


def lesion_summary(cases: list[tuple[int, dict]]) -> dict:
    """Lesion-level detection over cases ``(label, match)``: regions hit and missed, false-positive regions, Dice.

    ``sensitivity`` is the share of ground-truth regions a finding overlaps; ``false_positive_regions_per_normal_case``
    counts findings in the normal cases; ``dice`` is the mean per-region Dice (a missed region counts 0).
    """
    regions = sum(m["regions"] for _, m in cases)
    hit = sum(m["hit"] for _, m in cases)
    normal = [m for label, m in cases if label == 0]
    dice = [d for _, m in cases for d in m["dice"]]
    return {"regions": regions, "hit": hit, "missed": regions - hit,
            "sensitivity": hit / regions if regions else float("nan"),
            "false_positive_regions": sum(m["false_positive_regions"] for _, m in cases),
            "false_positive_regions_per_case": sum(m["false_positive_regions"] for _, m in cases) / len(cases),
            "normal_cases": len(normal),
            "false_positive_regions_per_normal_case": sum(m["findings"] for m in normal) / len(normal) if normal
            else float("nan"),
            "dice": float(np.mean(dice)) if dice else float("nan")}


def case_lesions(detection: Detection, prepared: Prepared, truth: np.ndarray | None, detector: Detector,
                 voxel_volume: float) -> dict | None:
    """A case's findings at its row's threshold, matched with its mask; ``None`` without a mask or a threshold."""
    settings = detector.settings
    if settings.method != "himatch":
        return None  # the finding threshold is in HiMatch-AD's z-units
    threshold, _ = findings.threshold_of(detector.bank.info.findings, fraction=settings.finding_false_positive_fraction,
                                         override=settings.finding_threshold)
    if truth is None or threshold is None:
        return None
    region = from_slices(prepared.foreground & detection.scored[:, None, None], prepared.axis).numpy()
    labels = findings.label_findings(detection.canonical("anomaly").numpy(), threshold, voxel_volume=voxel_volume,
                                     min_volume=settings.finding_min_volume, foreground=region,
                                     connectivity=settings.finding_connectivity, extent=settings.finding_extent)
    return findings.match_regions(labels, truth, connectivity=settings.finding_connectivity)


def _ranked(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    if len(set(labels.tolist())) < 2:
        return float("nan"), float("nan")
    return image_auroc(scores, labels), average_precision(scores, labels)


def _panel(record: dict, prepared: Prepared, maps: np.ndarray, truths: np.ndarray | None,
           scores: np.ndarray) -> Panel:
    """The picture of a case: the slice with the most lesion, or else the highest-scoring slice."""
    if truths is not None and truths.any():
        index = int(truths.reshape(len(truths), -1).sum(axis=1).argmax())
    else:
        index = int(scores.argmax())
    where = f"{record['class']}" if len(maps) == 1 else f"slice {index} (canonical order)"
    caption = f"{where}: score {record['score']:.2f} z"
    return Panel(record["name"], caption, prepared.slices[index].numpy().copy(), maps[index].copy(),
                 prepared.foreground[index].numpy().copy(), None if truths is None else truths[index].copy())


@dataclass
class Evaluation:
    """Everything an evaluation found: the dataset, one tally per row, failures, timings, notes."""

    dataset: Dataset
    tallies: list[Tally]
    failures: list[dict]
    timings: dict
    notes: list[str]
    pixel_range: tuple[float, float]
    bins: int

    @property
    def evaluated(self) -> int:
        """The largest number of cases any row evaluated."""
        return max((len(t.records) for t in self.tallies), default=0)


Loader = Callable[[Settings, str], Extractor]


def evaluate(dataset: Dataset, rows: list[Settings], *, device: str = "auto", cache: Path | None = None,
             options: ReadOptions | None = None, anomaly_labels: tuple[int, ...] | None = None,
             pixel_range: tuple[float, float] = PIXEL_RANGE, bins: int = PIXEL_BINS, pictures: int = 2,
             load: Loader = load_extractor, progress: bool = True, strict: bool = False) -> Evaluation:
    """Score every test case with every row's settings and gather the metrics.

    Args:
        dataset: from :func:`himatch_med.evaluation.datasets.discover` or ``volume_dataset``.
        rows: resolved settings, one per table row (:func:`ablation_rows`).
        device: ``auto``, ``cpu``, ``cuda``...
        cache: bank cache folder (``None``: the user cache, as ``run`` uses).
        options: how files are read.
        anomaly_labels: label values that count as anomalous (``None``: any value ``> 0``).
        pixel_range: histogram range of the pixel metrics in z-units.
        bins: histogram bins.
        pictures: pictures per gallery category, for the first row (0: none).
        load: ``(settings, device) -> extractor``; the backbone by default.
        progress: show progress bars.
        strict: raise on the first failing case instead of recording it.
    """
    if not rows:
        raise ValueError("rows is empty; pass at least one settings")
    if not dataset.cases:
        raise InputError("the dataset holds no test case to evaluate" + (
            f" ({len(dataset.skipped)} skipped: {dataset.skipped[0][1]})" if dataset.skipped else ""))
    from tqdm.auto import tqdm

    started = time.perf_counter()
    tallies = [Tally(row, volumes=dataset.volumes, pixel_range=pixel_range if row.method == "himatch" else
                     BASELINE_RANGE, bins=bins, pictures=pictures if number == 0 else 0)
               for number, row in enumerate(rows)]
    failures = [{"path": path, "rows": "all", "error": reason} for path, reason in dataset.skipped]
    notes = list(dataset.notes)
    # Rows that differ only in calibrated settings share the features and the bank's references (recalibrated).
    # A baseline row reads the same bank and features as HiMatch-AD's rows.
    row_only = [axis for axis in ABLATION_AXES if axis in Settings.flagged("calibrated") or axis == "method"]
    groups: dict[Settings, list[int]] = {}
    for number, row in enumerate(rows):
        groups.setdefault(replace(row, **{k: getattr(rows[0], k) for k in row_only}), []).append(number)
    timings: dict = {"groups": []}
    for members in groups.values():
        members_rows = [rows[i] for i in members]
        clock = time.perf_counter()
        extractor = load(members_rows[0], device)
        bank = cached_bank(list(dataset.references), dataset.reference_labels, members_rows[0], extractor, cache,
                           options=options)
        banks, redone = recalibrated(bank, members_rows, extractor, references=list(dataset.references),
                                     options=options, progress=progress)
        bank_seconds = round(time.perf_counter() - clock, 2)
        memory, memory_seconds = None, 0.0
        dino = [row for row in members_rows if row.method == "anomalydino"]
        if dino:
            clock = time.perf_counter()
            memory = reference_memory(list(dataset.references), dataset.reference_labels, dino[0], extractor,
                                      options=options, progress=progress)
            memory_seconds = round(time.perf_counter() - clock, 2)
        detectors = [Detector(extractor, row_bank, row, memory=memory if row.method == "anomalydino" else None)
                     for row_bank, row in zip(banks, members_rows, strict=True)]
        group = {"rows": [i + 1 for i in members], "stages": list(extractor.stages), "references": len(bank),
                 "recalibrated_rows": [members[i] + 1 for i in redone],
                 "bank_seconds": bank_seconds, "features_seconds": 0.0}
        if memory is not None:
            group.update({"anomalydino_memory_patches": len(memory), "anomalydino_memory_seconds": memory_seconds})
        for i in members:
            tallies[i].stages = tuple(extractor.stages)
        unit = "volume" if dataset.volumes else "image"
        for case in tqdm(dataset.cases, desc=f"rows {group['rows'][0]}-{group['rows'][-1]}", unit=unit, leave=False,
                         disable=not progress):
            try:
                outcome = _score_case(case, detectors, dataset.has_masks, options, anomaly_labels)
            except Exception as error:  # one failing case must not lose the others
                if strict:
                    raise
                failures.append({"path": str(case.path), "rows": group["rows"],
                                 "error": jobs.describe_error(case.path, error)})
                continue
            prepared, detections, seconds, truth, label, shared, voxel_volume = outcome
            group["features_seconds"] += shared
            for i, detection, spent, detector in zip(members, detections, seconds, detectors, strict=True):
                tallies[i].add(case, prepared, detection, truth, label,
                               lesions=case_lesions(detection, prepared, truth, detector, voxel_volume))
                tallies[i].seconds += spent
        group["features_seconds"] = round(group["features_seconds"], 2)
        timings["groups"].append(group)
    if not dataset.volumes and rows[0].modality == "ct":
        notes.append("modality ct applies a HU window; 2D PNG sets store display intensities, for which the mri "
                     "preset (percentiles of the non-zero foreground) is the usual choice")
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    return Evaluation(dataset, tallies, failures, timings, notes, tuple(pixel_range), bins)


def _score_case(case: Case, detectors: list[Detector], has_masks: bool, options: ReadOptions | None,
                anomaly_labels: tuple[int, ...] | None):
    """Read one case and detect with every row of a group, computing the backbone features once."""
    job = jobs.read(case.path, detectors[0].settings, options)
    prepared = job.prepared
    truth = job.scan.aligned(case.mask, "the mask", values=anomaly_labels) if case.mask is not None else None
    shared = 0.0
    computed = None
    if len(detectors) > 1:
        clock = time.perf_counter()
        computed = list(detectors[0].batches(prepared))
        shared = time.perf_counter() - clock
    detections, seconds = [], []
    for detector in detectors:
        clock = time.perf_counter()
        detections.append(detector.detect(prepared, computed=computed, spread=False))
        seconds.append(time.perf_counter() - clock)
    if truth is None and has_masks and case.label == 0:
        truth = np.zeros(job.scan.canonical.shape, dtype=bool)
    label = case.label if case.label is not None else int(truth is not None and truth.any())
    return prepared, detections, seconds, truth, label, shared, findings.voxel_volume(job.scan.affine)
