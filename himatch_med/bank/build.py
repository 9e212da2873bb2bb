"""Building a bank: seeded k-means of each reference slice's foreground patches, then the calibration.

:func:`build_bank` streams prepared normal volumes through the extractor into a :class:`BankBuilder`, which keeps a
seeded sample of whole volumes; :func:`calibrate_bank` queries that sample against the bank without each slice's own
volume (docs/method.md §3). Tensors only, but for the per-slice arrays of a bank being built, spilled to temporary
files through :class:`himatch_med.io.Spill`; reading the references and storing the bank is
:mod:`himatch_med.bank.store`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import groupby

import numpy as np
import torch

from himatch_med import io
from himatch_med.bank.data import ARRAYS, STORAGE_DTYPE, Bank, BankInfo
from himatch_med.config import Settings
from himatch_med.detect import (
    Prepared,
    Progress,
    device_of_extractor,
    fill_background,
    fused_maps,
    matching_dtype,
    reference_batches,
    slice_sigma,
    stage_distances,
)
from himatch_med.errors import InputError
from himatch_med.features import Extractor, Features
from himatch_med.findings import ValueHistogram, calibration_record
from himatch_med.matching import spherical_kmeans
from himatch_med.scoring import bootstrap_draws, foreground_shares, masked, top_mean
from himatch_med.timing import NO_TIMER, Timer
from himatch_med.volume import maps_to_slices


@dataclass(frozen=True)
class Sample:
    """One reference slice kept for calibration: its features, foreground, and its row in the bank.

    ``area``: its foreground as a share of its volume's largest slice's (slivers are left out of the scores).
    """

    cls: torch.Tensor
    layout: torch.Tensor
    grids: tuple[torch.Tensor, ...]
    patch_foreground: torch.Tensor
    foreground: torch.Tensor
    position: float
    group: int
    row: int
    aspect: float = 1.0
    area: float = 1.0


class BankBuilder:
    """Accumulates references slice batch by slice batch; keeps whole volumes, seeded, for calibration.

    Calibration samples whole reference volumes (by a seeded random priority, as many as fit in
    ``calibration_slices``), so that a calibration volume's score is computed over all its slices like a query's.
    A volume longer than the budget is thinned to evenly spaced slices.

    Args:
        centroids: c, centroids per slice and stage.
        iterations: k-means iterations.
        seed: seed of k-means and of the calibration sample.
        calibration_slices: size of the calibration sample.
    """

    def __init__(self, *, centroids: int, iterations: int, seed: int, calibration_slices: int) -> None:
        self.k, self.iterations, self.seed = centroids, iterations, seed
        self.capacity = calibration_slices
        # The per-slice arrays grow with the bank: spilled to temporary files as they come, so that building holds
        # none of them in memory (the bank then reads them memory-mapped, like a stored bank).
        self.parts: dict[str, io.Spill] = {name: io.Spill() for name in ARRAYS[:6]}
        self.sources: list[dict] = []
        self.kept: list[tuple[float, list[Sample]]] = []
        self.current: list[Sample] = []
        self.current_source: object = None
        self.stride, self.offered = 1, 0
        self.rows = 0
        self.volumes = 0
        self.random = np.random.default_rng(seed)

    def add(self, cls: torch.Tensor, layout: torch.Tensor, grids: tuple[torch.Tensor, ...],
            patch_foreground: torch.Tensor, foreground: torch.Tensor, positions: torch.Tensor,
            groups: list[object], sources: list[dict], aspects: list[float] | None = None,
            areas: torch.Tensor | None = None) -> None:
        """Add ``B`` reference slices, of one reference or of several consecutive ones (a batch of 2D images).

        Args:
            cls, layout, grids: their features (``(B, D)``, ``(B, g*g, D)``, ``L`` grids ``(B, h, w, D)``).
            patch_foreground: foreground patches ``(B, h, w)``; each slice needs at least one.
            foreground: foreground pixels ``(B, H, W)``.
            positions: relative slice positions ``(B,)``.
            groups: one key per slice of the reference it comes from (a reference's slices come consecutively).
            sources: one record per slice (file, slice index) for the bank's metadata.
            areas: each slice's foreground as a share of its volume's largest slice's ``(B,)`` (default 1).
            aspects: each slice's pixel aspect (:attr:`himatch_med.detect.Prepared.pixel_aspect`; default 1).
        """
        # All stages of the batch in one call: they share the foreground and the seeded initial choice.
        centroids, sizes = spherical_kmeans(torch.stack([grid.flatten(1, 2) for grid in grids]),
                                            patch_foreground.flatten(1), self.k, iterations=self.iterations,
                                            seed=self.seed)
        self.parts["cls"].append(cls.to("cpu", STORAGE_DTYPE))
        self.parts["layout"].append(layout.to("cpu", STORAGE_DTYPE))
        self.parts["centroids"].append(centroids.transpose(0, 1).to("cpu", STORAGE_DTYPE))
        self.parts["sizes"].append(sizes.transpose(0, 1).to("cpu", torch.int32))
        self.parts["positions"].append(positions.to("cpu", torch.float32))
        self.sources.extend(sources)
        indices = []
        for row, group in enumerate(groups):
            if group != self.current_source or not self.volumes:
                self._close_volume()
                self.current_source = group
                self.volumes += 1
            index = self.volumes - 1  # dense: volumes without a usable slice take no number
            indices.append(index)
            if self.offered % self.stride == 0:
                self.current.append(Sample(cls[row].cpu(), layout[row].cpu(),
                                           tuple(grid[row].to("cpu", STORAGE_DTYPE) for grid in grids),
                                           patch_foreground[row].cpu(), foreground[row].cpu(),
                                           float(positions[row]), index, self.rows,
                                           1.0 if aspects is None else float(aspects[row]),
                                           area=1.0 if areas is None else float(areas[row])))
            self.offered += 1
            self.rows += 1
            if len(self.current) > self.capacity:
                # Too long for the budget: keep every other slice from here on, evenly spaced.
                self.current, self.stride = self.current[::2], self.stride * 2
        self.parts["groups"].append(torch.tensor(indices, dtype=torch.int64))

    def _close_volume(self) -> None:
        if self.current:
            self.kept.append((float(self.random.random()), self.current))
            self.kept.sort(key=lambda item: -item[0])
            total, fitting = 0, []
            for priority, samples in self.kept:
                if fitting and total + len(samples) > self.capacity:
                    continue
                fitting.append((priority, samples))
                total += len(samples)
            self.kept = fitting
        self.current, self.stride, self.offered = [], 1, 0

    @property
    def samples(self) -> list[Sample]:
        """The calibration sample: the slices of the kept volumes, in bank order."""
        self._close_volume()
        return sorted((s for _, samples in self.kept for s in samples), key=lambda sample: sample.row)

    def bank(self, info: BankInfo) -> Bank:
        """The references gathered so far, not yet calibrated (calibration arrays empty), with ``info``'s sources."""
        if not self.parts["cls"].rows:
            raise InputError("no usable reference slice: every reference slice lacks foreground or is labelled; "
                             "check the reference files, --foreground and --min-foreground")
        arrays = {name: spill.tensor() for name, spill in self.parts.items()}
        stages = arrays["centroids"].shape[1]
        empty = torch.zeros(0)
        return Bank(**arrays, calibration_mean=torch.zeros(stages), calibration_std=torch.ones(stages),
                    calibration_slice_scores=empty, calibration_volume_scores=empty,
                    info=replace(info, sources=tuple(self.sources)))


def bank_settings(settings: Settings, extractor: Extractor) -> dict:
    """What a bank must share with a query: model and its weights' fingerprint, preset, image size, stages used.

    The fingerprint (:func:`himatch_med.backbone.weights_fingerprint`) is absent for an extractor without weights.
    """
    fingerprint = getattr(extractor, "fingerprint", None)
    return {**settings.bank_fields(), "model": extractor.model_id, "stages": list(extractor.stages),
            "planes": list(settings.planes),
            **({"model_fingerprint": fingerprint} if fingerprint else {})}


def build_bank(extractor: Extractor, references: Iterable[tuple[str, Prepared]], settings: Settings,
               progress: Progress | None = None, timer: Timer = NO_TIMER) -> Bank:
    """Build and calibrate a bank from prepared normal volumes (each a 2D image or a 3D volume).

    Args:
        extractor: the backbone.
        references: ``(source name, prepared volume)`` pairs; their scored slices become references.
        settings: resolved settings.
        progress: called with the number of slices finished after each batch.
        timer: charged with the time of each phase: preprocess, backbone, kmeans, calibration (benchmarks).
    """
    device = device_of_extractor(extractor)
    builder = BankBuilder(centroids=settings.centroids, iterations=settings.kmeans_iterations, seed=settings.seed,
                          calibration_slices=settings.calibration_slices)
    shares: dict[int, torch.Tensor] = {}
    for features, patches, pieces in reference_batches(extractor, references, settings, device, timer):
        # Each reference's foreground shares once, not once per batch of its slices (a volume's whole foreground
        # is summed: 20 ms at 240 x 240 x 155, which was most of this phase). Only this batch's references are kept.
        shares = {number: shares[number] if number in shares else foreground_shares(prepared.foreground)
                  for number, _, prepared, _ in pieces}
        with timer("kmeans"):
            builder.add(features.cls, features.layout, features.grids, patches,
                        torch.cat([prepared.foreground[part] for _, _, prepared, part in pieces]),
                        torch.cat([prepared.positions[part] for _, _, prepared, part in pieces]),
                        [number for number, _, _, part in pieces for _ in range(len(part))],
                        [{"source": source, "slice": i} for _, source, _, part in pieces for i in part.tolist()],
                        [prepared.pixel_aspect for _, _, prepared, part in pieces for _ in range(len(part))],
                        torch.cat([shares[number][part] for number, _, _, part in pieces]))
        if progress:
            progress(len(patches))
    info = BankInfo(settings=bank_settings(settings, extractor),
                    calibrated_with=settings.calibration_fields(), patch_size=extractor.patch_size)
    bank = builder.bank(info)
    with timer("calibration"):
        return calibrate_bank(bank, builder.samples, settings, extractor.patch_size, device,
                              dtype=matching_dtype(extractor))



def build_planes(extractor: Extractor, references: Callable[[Settings], Iterable[tuple[str, Prepared]]],
                 settings: Settings, progress: Progress | None = None, timer: Timer = NO_TIMER) -> Bank:
    """:func:`build_bank` for ``settings.axis``, holding one more bank per other plane of ``settings.planes``.

    Args:
        references: the references prepared with the settings it is given (whose ``axis`` is the plane to cut):
            each other plane reads the same files again, cut along it, and gets its own calibration.
        extractor, settings, progress, timer: as in :func:`build_bank`.
    """
    bank = build_bank(extractor, references(settings), settings, progress=progress, timer=timer)
    planes = [replace(settings, axis=plane) for plane in settings.planes if plane != settings.axis]
    others = tuple(build_bank(extractor, references(plane), plane, progress=progress, timer=timer) for plane in planes)
    return replace(bank, others=others)

def calibrate_bank(bank: Bank, samples: list[Sample], settings: Settings, patch_size: int,
                   device: torch.device, *, dtype: torch.dtype = torch.float32) -> Bank:
    """The bank calibrated by querying sampled references against it without their own volume.

    The samples are queried ``batch_size`` at a time (consecutive samples of one grid shape). A bank made from a
    single volume (or image) leaves out only the sampled slice itself. ``dtype``: what the matching computes in, as
    the queries' will (:func:`himatch_med.detect.matching_dtype` of the extractor).
    """
    single = bank.groups.unique().numel() == 1
    groups = torch.arange(len(bank)) if single else bank.groups
    if len(bank) < 2:
        raise InputError("a bank needs at least two reference slices to calibrate; add reference images")
    # Made ready for queries once (descriptors converted, on the device), not by every query.
    probe = replace(bank, groups=groups).to(device)
    raw = []  # per run of samples: (samples, stage maps (L, B, h, w), per-reference distances)
    for part in _runs(samples, settings.batch_size):
        stage_maps, per_reference = stage_distances(
            _features(part, device), probe, settings, torch.tensor([s.position for s in part]),
            torch.tensor([s.row if single else s.group for s in part]), dtype=dtype)
        raw.append((part, stage_maps, per_reference))
    foreground_values = [stage_maps[:, row][:, s.patch_foreground.to(stage_maps.device)]
                         for part, stage_maps, _ in raw for row, s in enumerate(part)]
    every = torch.cat(foreground_values, dim=1)
    mean = every.mean(dim=1).cpu().float()
    std = every.std(dim=1).clamp(min=1e-6).cpu().float()
    calibrated = replace(bank, calibration_mean=mean, calibration_std=std)
    slice_values, volume_values = [], {}
    normal = ValueHistogram()  # findings: the normal voxels' distribution sets the finding threshold
    # Scored a run at a time, as a query's batch is (a 2D set's samples are one slice each: one by one, the fusion
    # and resampling of 500 images took a third of the calibration); only the foreground values are per sample.
    for part, stage_maps, per_reference in raw:
        anomaly, _ = fused_maps(stage_maps, per_reference, calibrated, settings)
        patches = torch.stack([s.patch_foreground for s in part]).to(anomaly.device)
        anomaly = fill_background(anomaly, patches).cpu()
        start = 0
        # Consecutive samples of one slice size and pixel aspect are resampled alike, together.
        for (size, aspect), alike in groupby(part, key=lambda sample: (tuple(sample.foreground.shape), sample.aspect)):
            alike = list(alike)
            sigma = slice_sigma(settings, *size, patch_size, aspect)
            slice_maps = maps_to_slices(anomaly[start:start + len(alike)], size, sigma=sigma)
            start += len(alike)
            found = [masked(slice_map, sample.foreground) for slice_map, sample in zip(slice_maps, alike)]
            normal.add(torch.cat(found))  # a histogram and the extremes: the same counted at once
            for values, sample in zip(found, alike):
                # Slivers neither rank nor count in a query's volume score: nor in the scores it is compared with.
                sliver = sample.area < settings.sliver_area
                score = None if sliver else float(top_mean(values, settings.top_fraction))
                if score is not None:
                    slice_values.append(score)
                volume_values.setdefault(sample.group, []).append((sliver, values, score))
    volume_scores = [_volume_score(v, settings.top_fraction) for v in volume_values.values()]
    peaks = [max((float(x.max()) for _, x, _ in v if x.numel()), default=-math.inf) for v in volume_values.values()]
    findings = calibration_record(normal, peaks, settings.finding_false_positive_fraction)
    spread = spread_calibration(probe, samples, settings, mean, std, full=foreground_values, dtype=dtype) \
        if not single else {}
    return replace(calibrated, calibration_slice_scores=torch.tensor(slice_values, dtype=torch.float32),
                   calibration_volume_scores=torch.tensor(volume_scores, dtype=torch.float32),
                   calibration_volume_groups=torch.tensor(list(volume_values), dtype=torch.int64),
                   info=replace(calibrated.info, findings=findings), **spread)


def spread_calibration(probe: Bank, samples: list[Sample], settings: Settings, mean: torch.Tensor,
                       std: torch.Tensor, *, full: list[torch.Tensor] | None = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The bank subsets of a score's spread: a seeded bootstrap over the reference volumes, each calibrated.

    Replicate ``b`` draws the reference volumes with replacement; its subset is the references of the volumes drawn.
    Its calibration queries ``spread_calibration_slices`` evenly spaced calibration samples against that subset
    without the sample's own volume (samples
    left with no reference are skipped; a replicate left with none keeps the full calibration), so that a query
    against the subset is in the subset's own z-units. A bank of one volume has no subsets to compare: none are made.

    Args:
        probe: the bank, ready for queries on the samples' device.
        samples: the calibration sample.
        settings: resolved settings (``spread_replicates``, ``seed``, retrieval).
        mean, std: the full calibration ``(L,)``.
        full: each sample's foreground stage values ``(L, n)`` in the full calibration. A sample whose subset holds
            every other volume, and as many references to retrieve, retrieves exactly what it retrieved there, so
            its values are taken from there, not computed again (with two reference volumes that is every sample
            the subsets keep).
        dtype: what the matching computes in (:func:`calibrate_bank`).

    Returns:
        ``spread_draws`` ``(B, volumes)``, ``spread_mean`` and ``spread_std`` ``(B, L)``; empty when none are made.
    """
    volumes = int(probe.groups.max()) + 1
    if settings.spread_replicates < 1 or volumes < 2:
        return {}
    device = probe.cls.device
    draws = bootstrap_draws(volumes, settings.spread_replicates, settings.seed)
    # Evenly spaced: a subset's mean and spread of distances need thousands of patches, not every sampled slice.
    step = max(1, math.ceil(len(samples) / settings.spread_calibration_slices))
    samples, full = samples[::step], None if full is None else full[::step]
    # The full calibration's K: the references left to the sample of the largest volume.
    whole = min(settings.references_k, len(probe) - int(torch.bincount(probe.groups).max()))
    means, stds = [], []
    for drawn in draws:
        kept = drawn.to(device)[probe.groups] > 0
        # What each sample's volume has left of the subset once it leaves itself out: a run of samples shares it
        # (capped at K), so that a batch of several volumes retrieves as many references as each volume alone.
        left = (int(kept.sum()) - torch.bincount(probe.groups[kept], minlength=volumes)).clamp(
            max=settings.references_k).tolist()
        missing = (drawn == 0).long()
        everything = (int(missing.sum()) - missing == 0).tolist()  # the subset holds every other volume
        values: list[torch.Tensor | None] = [None] * len(samples)
        if full is not None:
            for number, sample in enumerate(samples):
                if everything[sample.group] and left[sample.group] == whole:
                    values[number] = full[number]
        number_of = {id(sample): number for number, sample in enumerate(samples)}
        pending = [s for number, s in enumerate(samples) if values[number] is None and left[s.group]]
        for part in _runs(pending, settings.batch_size, key=lambda sample: left[sample.group]):
            stage_maps, _ = stage_distances(_features(part, device), probe, settings,
                                            torch.tensor([s.position for s in part]),
                                            torch.tensor([s.group for s in part]), allowed=kept, dtype=dtype)
            for row, sample in enumerate(part):
                values[number_of[id(sample)]] = stage_maps[:, row][:, sample.patch_foreground.to(device)]
        values = [v for v in values if v is not None]  # in the samples' order, as the full calibration sums them
        every = torch.cat(values, dim=1) if values else None
        means.append(mean if every is None else every.mean(dim=1).cpu().float())
        stds.append(std if every is None else every.std(dim=1).clamp(min=1e-6).cpu().float())
    return {"spread_draws": draws, "spread_mean": torch.stack(means), "spread_std": torch.stack(stds)}


def _volume_score(entries: list[tuple[bool, torch.Tensor, float | None]], fraction: float) -> float:
    """A calibration volume's score from its samples' ``(sliver, values, slice score)``, as a query's is computed.

    The top mean over the slices that are not slivers (over all of them when every one is); a volume of one such
    slice (a 2D image) has that slice's score, which is the same top mean, not computed again.
    """
    kept = [(values, score) for sliver, values, score in entries if not sliver]
    if len(kept) == 1:
        return kept[0][1]
    return float(top_mean(torch.cat([values for values, _ in kept] or [values for _, values, _ in entries]), fraction))


def _features(part: list[Sample], device: torch.device) -> Features:
    return Features(torch.stack([s.cls for s in part]).to(device), torch.stack([s.layout for s in part]).to(device),
                    tuple(torch.stack([s.grids[stage] for s in part]).to(device, torch.float32)
                          for stage in range(len(part[0].grids))))


def _runs(samples: list[Sample], size: int, *, key: Callable[[Sample], object] | None = None
          ) -> Iterator[list[Sample]]:
    """Consecutive samples in runs of at most ``size`` whose grids have one shape (so that they stack).

    ``key``: each run's samples also share its value.
    """
    run: list[Sample] = []
    for sample in samples:
        if run and (len(run) == size or run[0].grids[0].shape != sample.grids[0].shape
                    or (key is not None and key(run[0]) != key(sample))):
            yield run
            run = []
        run.append(sample)
    if run:
        yield run
