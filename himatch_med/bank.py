"""The reference bank: descriptors of normal slices, their clustered features, and the calibration.

Format (version 1), written by :func:`himatch_med.io.write_bank` as a folder with two files:

- ``bank.safetensors``: ``cls`` (N, D) fp16, ``layout`` (N, g*g, D) fp16, ``centroids`` (N, L, c, D) fp16,
  ``sizes`` (N, L, c) int32, ``positions`` (N,) fp32, ``groups`` (N,) int64 (which reference volume a slice came
  from), ``calibration_mean`` and ``calibration_std`` (L,) fp32, ``calibration_slice_scores`` (M,) fp32,
  ``calibration_volume_scores`` (V,) fp32;
- ``bank.json``: ``format_version``, the settings a query must repeat (model, modality, window, image size), the
  ``stages``, the sources (file and slice of every reference), the calibration settings, and ``arrays_sha256``: the
  SHA-256 of the SHA-256 digests of the arrays file's 64 MiB blocks (see :func:`himatch_med.io.file_sha256`), checked
  on every load.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m himatch_med.bank build ...`: dispatch before the heavy imports below so that --help is instant.
    import sys

    from himatch_med.run import bank_main

    sys.exit(bank_main())

from dataclasses import dataclass, field

import numpy as np
import torch

from himatch_med import __version__
from himatch_med.errors import InputError
from himatch_med.matching import spherical_kmeans

FORMAT_VERSION = 2
"""Version 2 (himatch-med 0.2): references prepared with the background detection and intensity headroom of 0.2."""
ARRAYS = ("cls", "layout", "centroids", "sizes", "positions", "groups", "calibration_mean", "calibration_std",
          "calibration_slice_scores", "calibration_volume_scores")
STORAGE_DTYPE = torch.float16


@dataclass
class Bank:
    """References ``N`` with ``L`` stages of ``c`` centroids each, and the calibration of their stage maps."""

    cls: torch.Tensor
    layout: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor
    positions: torch.Tensor
    groups: torch.Tensor
    calibration_mean: torch.Tensor
    calibration_std: torch.Tensor
    calibration_slice_scores: torch.Tensor
    calibration_volume_scores: torch.Tensor
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict, *, source: str) -> Bank:
        """A bank from the arrays and metadata :func:`himatch_med.io.read_bank` returns."""
        version = meta.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise InputError(f"{source}: bank format version {version} was written by a newer himatch-med (this one, "
                             f"{__version__}, reads version {FORMAT_VERSION}); upgrade himatch-med to use it")
        if version != FORMAT_VERSION:
            raise InputError(f"{source}: bank format version {version!r} was built by an older himatch-med whose "
                             "preprocessing differs (version 0.2 detects a constant non-zero background and leaves "
                             "intensity headroom for bright lesions), so its references would not match this run's "
                             "slices; rebuild it from the same references with `python -m himatch_med.bank build`")
        missing = [name for name in ARRAYS if name not in tensors]
        if missing:
            raise InputError(f"{source}: the bank lacks arrays {', '.join(missing)}; rebuild the bank")
        return cls(**{name: tensors[name] for name in ARRAYS}, meta=meta)

    def __len__(self) -> int:
        return len(self.cls)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays by name, as stored."""
        return {name: getattr(self, name) for name in ARRAYS}

    def to(self, device: torch.device | str, *, centroid_budget: int = 8 << 30) -> Bank:
        """This bank with its retrieval arrays on ``device``.

        The centroids follow when they fit ``centroid_budget`` bytes; else they stay memory-mapped on the host and
        only the retrieved rows travel.
        """
        device = torch.device(device)
        if device.type == "cpu":
            return self
        moved = {name: tensor.to(device) for name, tensor in self.tensors().items() if name != "centroids"}
        fits = self.centroids.numel() * self.centroids.element_size() <= centroid_budget
        return Bank(**moved, centroids=self.centroids.to(device) if fits else self.centroids, meta=self.meta)

    def memory(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Centroids of the references ``indices`` ``(B, K)`` as float32 ``(L, B, K, c, D)`` on ``device``."""
        rows = self.centroids[indices.flatten().to(self.centroids.device)]
        rows = rows.to(device=device, dtype=torch.float32)
        return rows.unflatten(0, indices.shape).movedim(2, 0)

    def check(self, expected: dict, *, source: str) -> None:
        """Raise :class:`InputError` unless the bank was built with the ``expected`` settings (model, stages, ...)."""
        recorded = self.meta.get("settings", {})
        wrong = [f"{key}: bank has {recorded.get(key)!r}, this run asks for {value!r}"
                 for key, value in expected.items() if _plain(recorded.get(key)) != _plain(value)]
        if wrong:
            raise InputError(f"{source} was built with other settings than this run: " + "; ".join(wrong)
                             + ". Run with the bank's settings, or build a new bank with these.")


    def calibration_changes(self, settings, names: tuple[str, ...] | None = None) -> dict[str, tuple]:
        """Settings (``names``, default all recorded) whose value in ``settings`` differs from the calibration's.

        Returns:
            ``{name: (value the bank was calibrated with, value in settings)}``.
        """
        recorded = self.meta.get("calibration", {})
        names = tuple(recorded) if names is None else names
        return {name: (recorded[name], getattr(settings, name)) for name in names
                if name in recorded and hasattr(settings, name)
                and _plain(recorded[name]) != _plain(getattr(settings, name))}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Sample:
    """One reference slice kept for calibration: its features, foreground, and its row in the bank."""

    cls: torch.Tensor
    layout: torch.Tensor
    stages: tuple[torch.Tensor, ...]
    patch_foreground: torch.Tensor
    foreground: torch.Tensor
    position: float
    group: int
    row: int


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
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in ARRAYS[:6]}
        self.sources: list[dict] = []
        self.kept: list[tuple[float, list[Sample]]] = []
        self.current: list[Sample] = []
        self.current_source: object = None
        self.stride, self.offered = 1, 0
        self.rows = 0
        self.volumes = 0
        self.random = np.random.default_rng(seed)

    def add(self, cls: torch.Tensor, layout: torch.Tensor, stages: tuple[torch.Tensor, ...],
            patch_foreground: torch.Tensor, foreground: torch.Tensor, positions: torch.Tensor, group: object,
            sources: list[dict]) -> None:
        """Add ``B`` reference slices of one volume.

        Args:
            cls, layout, stages: their features (``(B, D)``, ``(B, g*g, D)``, ``L`` grids ``(B, h, w, D)``).
            patch_foreground: foreground patches ``(B, h, w)``; each slice needs at least one.
            foreground: foreground pixels ``(B, H, W)``.
            positions: relative slice positions ``(B,)``.
            group: any key of the reference volume the slices come from (consecutive calls share it).
            sources: one record per slice (file, slice index) for the bank's metadata.
        """
        if group != self.current_source or not self.volumes:
            self._close_volume()
            self.current_source = group
            self.volumes += 1
        index = self.volumes - 1  # dense: volumes without a usable slice take no number
        valid = patch_foreground.flatten(1)
        clustered = [spherical_kmeans(grid.flatten(1, 2), valid, self.k, iterations=self.iterations, seed=self.seed)
                     for grid in stages]
        self.parts["cls"].append(cls.to("cpu", STORAGE_DTYPE))
        self.parts["layout"].append(layout.to("cpu", STORAGE_DTYPE))
        self.parts["centroids"].append(torch.stack([c for c, _ in clustered], dim=1).to("cpu", STORAGE_DTYPE))
        self.parts["sizes"].append(torch.stack([s for _, s in clustered], dim=1).to("cpu", torch.int32))
        self.parts["positions"].append(positions.to("cpu", torch.float32))
        self.parts["groups"].append(torch.full((len(cls),), index, dtype=torch.int64))
        self.sources.extend(sources)
        for row in range(len(cls)):
            if self.offered % self.stride == 0:
                self.current.append(Sample(cls[row].cpu(), layout[row].cpu(),
                                           tuple(grid[row].to("cpu", STORAGE_DTYPE) for grid in stages),
                                           patch_foreground[row].cpu(), foreground[row].cpu(),
                                           float(positions[row]), index, self.rows))
            self.offered += 1
            self.rows += 1
            if len(self.current) > self.capacity:
                # Too long for the budget: keep every other slice from here on, evenly spaced.
                self.current, self.stride = self.current[::2], self.stride * 2

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

    def bank(self, meta: dict) -> Bank:
        """The references gathered so far, not yet calibrated (calibration arrays empty)."""
        if not self.parts["cls"]:
            raise InputError("no usable reference slice: every reference slice lacks foreground or is labelled; "
                             "check the reference files, --foreground and --min-foreground")
        arrays = {name: torch.cat(parts) for name, parts in self.parts.items()}
        stages = arrays["centroids"].shape[1]
        empty = torch.zeros(0)
        return Bank(**arrays, calibration_mean=torch.zeros(stages), calibration_std=torch.ones(stages),
                    calibration_slice_scores=empty, calibration_volume_scores=empty,
                    meta={**meta, "format_version": FORMAT_VERSION, "sources": self.sources})
