"""Orchestration on tensors: prepare a volume, and the :class:`Detector` that finds its anomalies. Never touches files.

A volume flows as: canonical volume -> :class:`Prepared` slices -> batches through the extractor -> retrieval and
stage maps against the bank -> fused patch maps -> maps on the slice grid (:class:`Detection`). Only the maps of the
whole volume are held at once; stage grids live for one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from himatch_med.bank.data import Bank
from himatch_med.baselines import (
    centroid_distances,
    nearest_patch_distances,
    patch_scores,
    sample_patches,
    support_slices,
)
from himatch_med.config import Settings
from himatch_med.errors import InputError
from himatch_med.features import Extractor, Features, describe
from himatch_med.fusion import calibrate, fuse, stage_uncertainty
from himatch_med.matching import reference_distances
from himatch_med.retrieval import retrieve
from himatch_med.scoring import (
    foreground_counts,
    percentile,
    slice_scores,
    sliver_slices,
    top_mean,
    volume_score,
)
from himatch_med.timing import NO_TIMER, Timer
from himatch_med.transforms import (
    foreground_mask,
    foreground_notes,
    patch_foreground,
    scale_intensity,
    to_backbone_images,
)
from himatch_med.volume import AXIS_INDEX, backbone_size, from_slices, maps_to_slices, relative_positions, to_slices

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Prepared:
    """A volume cut into backbone-ready slices.

    ``slices`` (S, H, W) in [0, 1]; ``foreground`` (S, H, W); ``scored`` (S,) slices with enough foreground;
    ``positions`` (S,) relative positions along the foreground; ``axis`` the canonical slice axis; ``notes`` what a
    user should know about how the foreground was found; ``pixel_aspect``: row over column spacing of the slices, by
    which they are stretched on their way to the backbone (1 unless tri-planar); ``others``: the same volume cut
    along the other planes of tri-planar detection (``settings.planes``).
    """

    slices: torch.Tensor
    foreground: torch.Tensor
    scored: torch.Tensor
    positions: torch.Tensor
    axis: int
    notes: tuple[str, ...] = ()
    pixel_aspect: float = 1.0
    others: tuple[Prepared, ...] = ()


@dataclass(frozen=True)
class Detection:
    """Result for one volume: maps per slice, scores per slice and per volume.

    ``anomaly`` and ``uncertainty`` (S, H, W): the fused maps F and U of the display-oriented slices cut along the
    canonical ``axis``, as the picture and the metrics use them (:meth:`canonical` stacks them into the canonical
    volume); ``slice_scores`` and ``slice_percentiles`` (S,); ``scored`` (S,) the slices that were scored;
    ``volume_score`` and ``volume_percentile``; ``slivers`` (S,) the scored slices too small to rank or count in the
    volume score (:func:`himatch_med.scoring.sliver_slices`); ``replicate_scores`` the volume score against each of
    the bank's subsets (:attr:`himatch_med.bank.data.Bank.replicates`; empty without them); ``planes``: with
    tri-planar detection, each plane's own canonical anomaly map ``(X, Y, Z)`` by plane name, before their fusion
    into ``anomaly``.
    """

    anomaly: torch.Tensor
    uncertainty: torch.Tensor
    axis: int
    slice_scores: torch.Tensor
    slice_percentiles: torch.Tensor
    scored: torch.Tensor
    volume_score: float
    volume_percentile: float
    slivers: torch.Tensor | None = None
    replicate_scores: tuple[float, ...] = ()
    planes: dict[str, torch.Tensor] | None = None

    def canonical(self, name: str) -> torch.Tensor:
        """The map ``name`` (``anomaly`` or ``uncertainty``) as a canonical volume ``(X, Y, Z)``."""
        if name not in ("anomaly", "uncertainty"):
            raise ValueError(f"name={name!r} is not one of anomaly, uncertainty")
        return from_slices(getattr(self, name), self.axis)


def prepare(canonical: torch.Tensor, settings: Settings, *, foreground: torch.Tensor | None = None,
            excluded: torch.Tensor | None = None, spacing: tuple[float, float, float] | None = None) -> Prepared:
    """Scale intensities, find the foreground and cut a canonical volume ``(X, Y, Z)`` into slices.

    Args:
        canonical: raw intensities of the canonical volume.
        settings: resolved settings (modality, window, foreground, axis, planes, min_foreground).
        foreground: a given foreground mask (overrides the foreground mode).
        excluded: voxels whose slices must not be scored nor used as references (lesion labels of annotated
            reference volumes).
        spacing: the canonical voxel sizes in mm; with ``settings.planes``, each plane's slices are stretched to
            their physical aspect on their way to the backbone (``None``: isotropic).
    """
    if foreground is not None:
        mask, notes = foreground, ()
    else:
        mask = foreground_mask(canonical, settings.foreground)
        notes = foreground_notes(canonical, mask, mode=settings.foreground, modality=settings.modality)
    scaled = scale_intensity(canonical, mask, modality=settings.modality, window=settings.window,
                             intensity=settings.intensity)
    if settings.planes and min(canonical.shape) < 2:
        raise InputError(f"--planes {' '.join(settings.planes)}: a volume of shape {tuple(canonical.shape)} has no "
                         "other plane to cut (a 2D image); leave --planes out")

    def cut(plane: str) -> Prepared:
        axis = AXIS_INDEX[plane]
        # The foreground contiguous: every per-slice count and mask over it reads slices whole (16 -> 3 ms a count).
        slices, fg = to_slices(scaled, axis), to_slices(mask.bool(), axis).contiguous()
        scored = foreground_counts(fg).float() / fg[0].numel() >= max(settings.min_foreground, 1e-9)
        if excluded is not None:
            scored &= ~to_slices(excluded.bool(), axis).flatten(1).any(dim=1)
        aspect = 1.0
        if settings.planes and spacing is not None:
            columns, rows = (a for a in range(3) if a != axis)  # to_slices puts the higher axis on the rows
            aspect = float(spacing[rows]) / float(spacing[columns])
        return Prepared(slices, fg, scored, relative_positions(fg.flatten(1).any(dim=1)), axis, notes, aspect)

    prepared = cut(settings.axis)
    others = tuple(cut(plane) for plane in settings.planes if plane != settings.axis)
    return replace(prepared, others=others) if others else prepared


def batches(extractor: Extractor, prepared: Prepared, settings: Settings, device: torch.device,
            timer: Timer = NO_TIMER) -> Iterator[tuple[torch.Tensor, Features, torch.Tensor]]:
    """Yield ``(slice indices, features, patch foreground)`` for the scored slices, one backbone batch at a time.

    Slices whose patch grid holds no foreground patch (a sliver of foreground) are left out.
    """
    height, width = prepared.slices.shape[1:]
    size = backbone_size(height * prepared.pixel_aspect, width, image_size=settings.image_size,
                         patch_size=extractor.patch_size)
    grid = (size[0] // extractor.patch_size, size[1] // extractor.patch_size)
    indices = torch.nonzero(prepared.scored).flatten()
    for part in indices.split(settings.batch_size):
        with timer("preprocess"):
            patches = patch_foreground(prepared.foreground[part].to(device), grid, settings.patch_foreground)
            keep = patches.flatten(1).any(dim=1)
            part, patches = part[keep.cpu()], patches[keep]
            images = to_backbone_images(prepared.slices[part].to(device), size) if len(part) else None
        if images is None:
            continue
        with timer("backbone"):
            cls, grids = extractor(images)
            features = describe(cls, grids, settings.layout_cells)
        yield part, features, patches


def reference_batches(extractor: Extractor, references: Iterable[tuple[str, Prepared]], settings: Settings,
                      device: torch.device, timer: Timer = NO_TIMER
                      ) -> Iterator[tuple[Features, torch.Tensor, list[tuple[int, str, Prepared, torch.Tensor]]]]:
    """Yield backbone batches of the scored slices of consecutive references: ``(features, patch foreground, pieces)``.

    Slices of several references share a batch when their slices have the same size, so a set of 2D images goes
    through the backbone ``batch_size`` images at a time like the slices of a volume. ``pieces`` says whose the rows
    of the batch are, in order: ``(reference number, source, prepared, slice indices)``. Slices whose patch grid
    holds no foreground patch are left out, as in :func:`batches`.
    """
    pending: list[tuple[int, str, Prepared, torch.Tensor]] = []

    def flush():
        height, width = pending[0][2].slices.shape[1:]
        size = backbone_size(height * pending[0][2].pixel_aspect, width, image_size=settings.image_size,
                             patch_size=extractor.patch_size)
        grid = (size[0] // extractor.patch_size, size[1] // extractor.patch_size)
        pieces, patches, images = [], [], []
        with timer("preprocess"):
            for number, source, prepared, part in pending:
                found = patch_foreground(prepared.foreground[part].to(device), grid, settings.patch_foreground)
                keep = found.flatten(1).any(dim=1)
                if bool(keep.any()):
                    part = part[keep.cpu()]
                    pieces.append((number, source, prepared, part))
                    patches.append(found[keep])
                    images.append(to_backbone_images(prepared.slices[part].to(device), size))
        pending.clear()
        if not pieces:
            return None
        with timer("backbone"):
            cls, grids = extractor(torch.cat(images))
            features = describe(cls, grids, settings.layout_cells)
        return features, torch.cat(patches), pieces

    count = 0
    for number, (source, prepared) in enumerate(references):
        if pending and (pending[0][2].slices.shape[1:], pending[0][2].pixel_aspect) != (prepared.slices.shape[1:],
                                                                                         prepared.pixel_aspect):
            if (batch := flush()) is not None:
                yield batch
            count = 0
        indices = torch.nonzero(prepared.scored).flatten()
        while len(indices):
            taken, indices = indices[:settings.batch_size - count], indices[settings.batch_size - count:]
            pending.append((number, source, prepared, taken))
            count += len(taken)
            if count == settings.batch_size:
                if (batch := flush()) is not None:
                    yield batch
                count = 0
    if pending and (batch := flush()) is not None:
        yield batch


def stage_distances(features: Features, bank: Bank, settings: Settings, positions: torch.Tensor,
                    groups: torch.Tensor | None = None, timer: Timer = NO_TIMER, *,
                    allowed: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieve references for a batch and measure each stage against their centroids.

    ``groups``: each query's reference volume, left out of its retrieval; ``allowed``: the bank rows any query may
    retrieve ``(N,)`` (a subset of the bank; with ``groups``, each query leaves its own volume out of the subset);
    ``dtype``: what the patches are compared with the centroids in (:func:`matching_dtype`), float32 results.

    Returns:
        Stage maps ``A`` ``(L, B, h, w)`` and per-reference distances ``d`` ``(L, B, h, w, K)``.
    """
    index = retrieved(features, bank, settings, positions, groups, timer, allowed=allowed)
    return reference_stage_distances(features, bank, index, settings, timer, dtype=dtype)


def retrieved(features: Features, bank: Bank, settings: Settings, positions: torch.Tensor,
              groups: torch.Tensor | None = None, timer: Timer = NO_TIMER, *,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The bank rows ``(B, K)`` each query of a batch retrieves, best first.

    ``groups`` and ``allowed``: as in :func:`stage_distances`.
    """
    device = features.cls.device
    if allowed is None:
        available = len(bank) - (int(torch.bincount(bank.groups).max()) if groups is not None else 0)
    elif groups is None:
        available = int(allowed.sum())
    else:  # the fewest rows any query of the batch has left in the subset
        subset = allowed.to(bank.groups.device)
        available = min(int((subset & (bank.groups != group)).sum()) for group in groups.unique().tolist())
    with timer("retrieval"):
        k = min(settings.references_k, available)
        if k < 1:
            raise InputError("no reference is left to compare with once a volume leaves itself out; add references")
        index, _ = retrieve(features.cls, features.layout, bank.cls, bank.layout, k=k,
                            cls_weight=settings.cls_weight, chunk=settings.chunk_size,
                            query_positions=positions.to(device), bank_positions=bank.positions,
                            window=settings.position_window,
                            query_groups=None if groups is None else groups.to(device),
                            bank_groups=None if groups is None else bank.groups, allowed=allowed)
    return index


def reference_stage_distances(features: Features, bank: Bank, index: torch.Tensor, settings: Settings,
                              timer: Timer = NO_TIMER, *, dtype: torch.dtype = torch.float32
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stage of a batch against the centroids of the bank rows ``index`` ``(B, K)``.

    Returns ``(A, d)`` as :func:`stage_distances` does.
    """
    with timer("matching"):
        device = features.cls.device
        distances = torch.stack([reference_distances(grid.flatten(1, 2).to(dtype),
                                                     bank.memory(index, stage, device, dtype),
                                                     chunk=settings.chunk_size)
                                 for stage, grid in enumerate(features.grids)])
        per_reference = distances.unflatten(2, features.grid)
        return per_reference.amin(dim=-1), per_reference


def shared_references(indices: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The bank rows any of several retrievals ``(B, K_i)`` chose for each query, and where each one's rows are.

    Several subsets of a bank retrieve mostly the same references for a slice, and a slice's distances to a
    reference's centroids do not depend on the subset: measured once against the union of its references, each
    subset's distances are gathered from those.

    Returns:
        ``rows`` ``(B, U)``: each query's distinct rows in ascending order, padded with its last one; and for each
        retrieval its ``columns`` ``(B, K_i)`` in ``rows``: ``rows.gather(1, columns[i])`` is ``indices[i]``.
    """
    distinct = [row.unique_consecutive() for row in torch.cat(indices, dim=1).sort(dim=1).values]
    width = max(len(row) for row in distinct)
    rows = torch.stack([torch.cat([row, row[-1:].expand(width - len(row))]) for row in distinct])
    return rows, [torch.searchsorted(rows, index.to(rows.device)) for index in indices]


def fused_maps(stage_maps: torch.Tensor, per_reference: torch.Tensor, bank: Bank, settings: Settings
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated, fused patch maps ``F`` and ``U`` ``(B, h, w)`` from :func:`stage_distances`' output."""
    mean = bank.calibration_mean.to(stage_maps)
    std = bank.calibration_std.to(stage_maps)
    return fuse(calibrate(stage_maps, mean, std), stage_uncertainty(per_reference, std),
                mode=settings.fusion, temperature=settings.temperature)


def reference_patches(extractor: Extractor, references: Iterable[tuple[str, Prepared]], settings: Settings,
                      device: torch.device, progress: Progress | None = None) -> torch.Tensor:
    """AnomalyDINO's memory: the last stage's foreground patches of the references, at most ``memory_patches``.

    When the references hold more, a uniform random subset is kept (:func:`himatch_med.baselines.sample_patches`);
    each slice's keys come from a generator seeded by ``seed`` and the slice's place in the references, so the
    subset does not depend on the batch size.

    Returns:
        Unit-norm patches ``(M, D)`` on ``device``, float32.
    """
    kept, keys = None, None
    number = 0
    for features, patches, _ in reference_batches(extractor, references, settings, device):
        grid = features.grids[-1].float()
        if kept is None:
            kept = grid.new_zeros((0, grid.shape[-1]))
            keys = torch.zeros(0, dtype=torch.float64)
        for row in range(len(grid)):
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + number)
            found = grid[row][patches[row]]
            kept, keys = sample_patches(kept, keys, found, torch.rand(len(found), generator=generator,
                                                                       dtype=torch.float64),
                                        settings.memory_patches)
            number += 1
        if progress:
            progress(len(grid))
    if kept is None or not len(kept):
        raise InputError("no reference slice with foreground for the anomalydino memory; check the references")
    return kept


def baseline_maps(features: Features, patches: torch.Tensor, bank: Bank, settings: Settings,
                  memory: torch.Tensor | None, timer: Timer = NO_TIMER) -> torch.Tensor:
    """Patch maps ``(B, h, w)`` of a baseline (``settings.method``), in cosine distance, on the last stage.

    ``memory``: the references' patches for ``anomalydino`` (:func:`reference_patches`).
    """
    grid = features.grids[-1].float()
    with timer("matching"):
        if settings.method == "anomalydino":
            if memory is None:
                raise ValueError("method='anomalydino' needs the references' patches: pass memory="
                                 "reference_patches(...) to the Detector")
            return nearest_patch_distances(grid, memory, chunk=settings.chunk_size)
        if settings.method == "dino-ad":
            support = support_slices(features.cls, bank.cls, chunk=settings.chunk_size)
            centroids = bank.centroids[support.to(bank.centroids.device), -1]
            return centroid_distances(grid, centroids.to(grid.device, torch.float32))
    raise ValueError(f"method={settings.method!r} is not a baseline; choose anomalydino or dino-ad")


def fill_background(maps: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Patch maps ``(B, h, w)`` with background patches set to their slice's foreground minimum."""
    low = maps.masked_fill(~patches, torch.inf).flatten(1).amin(dim=1)
    return torch.where(patches, maps, low[:, None, None])


def slice_sigma(settings: Settings, height: int, width: int, patch_size: int, aspect: float = 1.0) -> float:
    """The smoothing sigma in slice pixels (the setting is in backbone-image pixels).

    With a ``pixel_aspect`` other than 1 the slice is stretched unequally; the sigma follows its columns (the finer
    direction when the rows are coarse, as in a coronal cut of thick axial slices), so the maps are not over-smoothed.
    """
    size = backbone_size(height * aspect, width, image_size=settings.image_size, patch_size=patch_size)
    if aspect == 1.0:
        return settings.smoothing_sigma * height / size[0]
    return settings.smoothing_sigma * width / size[1]


def slice_maps(maps: list[torch.Tensor | None], size: tuple[int, int], sigma: float, chunk: int = 64
               ) -> torch.Tensor:
    """Patch maps of every slice (None where not scored) -> smoothed slice maps ``(S, H, W)``.

    Slices that were not scored take the lowest value of the scored ones, so they read as normal.
    """
    present = [m for m in maps if m is not None]
    if not present:
        return torch.zeros((len(maps), *size))
    low = torch.stack([m.min() for m in present]).min()
    stack = torch.stack([m if m is not None else torch.full_like(present[0], low) for m in maps])
    return torch.cat([maps_to_slices(part, size, sigma=sigma) for part in stack.split(chunk)])


def filled(canvas: torch.Tensor, scored: torch.Tensor, maps: list[torch.Tensor], sigma: float) -> torch.Tensor:
    """``canvas`` ``(S, H, W)``, made batch by batch for the ``scored`` slices ``(S,)``, with the others filled.

    They take the slice map of the lowest value of the scored slices' patch ``maps``, as in :func:`slice_maps`: the
    result is :func:`slice_maps` of all of them (:func:`maps_to_slices` treats each slice alone).
    """
    if not bool(scored.all()):
        low = torch.stack([m.min() for m in maps]).min()
        lowest = maps_to_slices(torch.full_like(maps[0], low)[None], tuple(canvas.shape[1:]), sigma=sigma)[0]
        canvas[~scored.to(canvas.device)] = lowest
    return canvas


def device_of_extractor(extractor: Extractor) -> torch.device:
    """Where an extractor computes (the CPU for one that does not say)."""
    return getattr(extractor, "device", torch.device("cpu"))


def matching_dtype(extractor: Extractor) -> torch.dtype:
    """What patches are compared with centroids in: bfloat16 when the extractor computes its features in it.

    Features from a bfloat16 backbone carry its rounding already; comparing them in bfloat16 too about halves the
    matching where the device has it (AVX512_BF16, CUDA). Measured on a 240 x 240 x 155 volume (random ViT-S/16,
    bf16 backbone, :func:`himatch_med.matching.reference_distances` taking cos - 1 in bfloat16): the anomaly map
    moves by 0.002 z on average (at most 0.02), the volume score by 4e-4 z, while the bf16 backbone itself moves
    them from float32's by 0.009 on average (at most 1.3) and 1e-3. Float32 features (``--precision float32``, an
    extractor that does not say) are compared in float32, exactly as before.
    """
    return torch.bfloat16 if getattr(extractor, "arithmetic", "float32") == "bfloat16" else torch.float32


@dataclass(frozen=True, eq=False)
class Detector:
    """What detection needs, loaded once: the extractor, a calibrated bank, and the method settings.

    ``bank`` was built with the extractor's model and stages and the settings' image size and preset (as
    :func:`himatch_med.bank.store.open_bank` checks); ``settings`` are resolved. The command line, screening,
    evaluation and the Ray actors pass this one object around.
    """

    extractor: Extractor
    bank: Bank
    settings: Settings
    memory: torch.Tensor | None = None
    """AnomalyDINO's reference patches (:func:`reference_patches`), for ``method="anomalydino"`` only."""

    @property
    def device(self) -> torch.device:
        """Where the extractor computes."""
        return device_of_extractor(self.extractor)

    @property
    def dtype(self) -> torch.dtype:
        """What its patches are compared with the bank's centroids in (:func:`matching_dtype`)."""
        return matching_dtype(self.extractor)

    def batches(self, prepared: Prepared, timer: Timer = NO_TIMER
                ) -> Iterator[tuple[torch.Tensor, Features, torch.Tensor]]:
        """The features of a prepared volume's scored slices, batch by batch (see :func:`batches`)."""
        return batches(self.extractor, prepared, self.settings, self.device, timer)

    def with_bank(self, bank: Bank, settings: Settings, memory: torch.Tensor | None = None) -> Detector:
        """The same extractor with another bank and settings (an evaluation row), and AnomalyDINO's memory."""
        return replace(self, bank=bank, settings=settings, memory=memory)

    def detect(self, prepared: Prepared, *, progress: Progress | None = None,
               computed: Iterable[tuple[torch.Tensor, Features, torch.Tensor]] | None = None,
               timer: Timer = NO_TIMER, spread: bool = True) -> Detection:
        """Anomaly and uncertainty maps and scores of one prepared volume against the bank.

        Args:
            prepared: the volume from :func:`prepare`.
            progress: called with the number of slices finished after each batch.
            computed: the output of :meth:`batches` for this volume when already at hand (an evaluation that tries
                several settings on the same features, which needs no spread: none is computed then); computed here
                otherwise.
            timer: charged with the time of each phase (benchmarks).
            spread: measure the volume score's spread over the bank's subsets (an evaluation needs none).
        """
        if prepared.others:
            return self._detect_planes(prepared, progress=progress, computed=computed, timer=timer)
        bank, settings = self.bank, self.settings
        count, height, width = prepared.slices.shape
        grid_maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        baseline = settings.method != "himatch"
        patch_values: dict[int, tuple[float, torch.Tensor]] = {}  # baselines score on their patch distances
        pending = computed if computed is not None else self.batches(prepared, timer)
        # The spread rescores the most anomalous slices: a volume of no more slices than it uses (a 2D image) keeps
        # all its features, a larger one those of its top slices (by slice score, as the spread ranks them), so that
        # the backbone does not see a slice twice.
        kept: list[tuple[torch.Tensor, Features, torch.Tensor]] | None = \
            [] if int(prepared.scored.sum()) <= settings.spread_slices else None
        likely = Candidates(settings.spread_slices) \
            if not baseline and kept is None and spread and computed is None and self.subsets() else None
        rankable = None if likely is None else \
            prepared.scored & ~sliver_slices(prepared.foreground, prepared.scored, settings.sliver_area)
        # The anomaly maps go to the slice grid, and are scored, batch by batch: the candidates are chosen by score.
        sigma = slice_sigma(settings, height, width, self.extractor.patch_size, prepared.pixel_aspect)
        canvas: torch.Tensor | None = None  # the slice maps, made batch by batch
        scores = torch.zeros(count)
        for part, features, patches in pending:
            if baseline:
                anomaly = baseline_maps(features, patches, bank, settings, self.memory, timer)
                uncertainty = torch.zeros_like(anomaly)
                values = patch_scores(anomaly, patches, settings.top_fraction)
                for row, index in enumerate(part.tolist()):
                    patch_values[index] = (float(values[row]), anomaly[row][patches[row]])
                anomaly = fill_background(anomaly, patches)
            else:
                if kept is not None:
                    kept.append((part, features, patches))
                stage_maps, per_reference = stage_distances(features, bank, settings, prepared.positions[part],
                                                            timer=timer, dtype=self.dtype)
                with timer("fusion"):
                    anomaly, uncertainty = fused_maps(stage_maps, per_reference, bank, settings)
                    anomaly, uncertainty = fill_background(anomaly, patches), fill_background(uncertainty, patches)
            with timer("resample"):
                smooth = maps_to_slices(anomaly, (height, width), sigma=sigma)
                if canvas is None:
                    canvas = smooth.new_empty((count, height, width))
                canvas[part.to(canvas.device)] = smooth
                if not baseline:  # each slice's score is of its own map: the same scored in any batch
                    found = slice_scores(smooth, prepared.foreground[part].to(smooth.device),
                                         torch.ones(len(part), dtype=torch.bool), settings.top_fraction)
                    scores[part] = found.cpu()
                    if likely is not None:
                        likely.add(part, features, patches, found.masked_fill(~rankable[part].to(found.device),
                                                                              -torch.inf))
            for row, index in enumerate(part.tolist()):
                grid_maps[index] = (anomaly[row], uncertainty[row])
            if progress:
                progress(len(part))
        with timer("resample"):
            scored = torch.zeros(count, dtype=torch.bool)
            scored[list(grid_maps)] = True
            anomaly = torch.zeros((count, height, width)) if canvas is None else \
                filled(canvas, scored, [a for a, _ in grid_maps.values()], sigma)
            uncertainty = slice_maps([grid_maps.get(i, (None, None))[1] for i in range(count)], (height, width),
                                     sigma)
            foreground = prepared.foreground.to(anomaly.device)
            if baseline:
                for index, (value, _) in patch_values.items():
                    scores[index] = value
                score = float(top_mean(torch.cat([v for _, v in patch_values.values()]), settings.top_fraction)) \
                    if patch_values else 0.0
            else:
                slivers = sliver_slices(prepared.foreground, scored, settings.sliver_area).cpu()
                ranked = scored & ~slivers
                score = volume_score(anomaly, foreground, ranked.to(anomaly.device), settings.top_fraction) \
                    if scored.any() else 0.0
            anomaly, uncertainty = anomaly.cpu(), uncertainty.cpu()
        replicate_scores = ()
        if not baseline:
            with timer("spread"):
                replicate_scores = self.subset_scores(prepared, score, scores, ranked, sigma,
                                                      computed is not None or not spread,
                                                      kept=kept if likely is None else likely.batches())
        # A baseline's distances are not in the calibration's units: no percentile.
        calibration = (torch.zeros(0), torch.zeros(0)) if baseline else (bank.calibration_slice_scores,
                                                                          bank.calibration_volume_scores)
        return Detection(
            anomaly=anomaly, uncertainty=uncertainty, axis=prepared.axis, slice_scores=scores,
            slice_percentiles=percentile(scores, calibration[0]), scored=scored, volume_score=score,
            volume_percentile=float(percentile(torch.tensor([score]), calibration[1])[0]),
            slivers=None if baseline else slivers, replicate_scores=replicate_scores)

    def subsets(self) -> list[tuple[torch.Tensor | None, Bank]]:
        """The bank subsets a volume score is recomputed against: ``(rows it may retrieve, bank calibrated so)``.

        The first ``settings.spread_replicates`` of the bank's (:attr:`Bank.replicates`); ``None`` rows for a
        replicate that draws every reference volume (its retrieval is the whole bank's).
        """
        bank, count = self.bank, min(self.settings.spread_replicates, self.bank.replicates)
        if not count:
            return []
        subsets = []
        for draws, mean, std in zip(bank.spread_draws[:count], bank.spread_mean[:count], bank.spread_std[:count]):
            allowed = draws.to(bank.groups.device)[bank.groups] > 0
            subsets.append((None if bool(allowed.all()) else allowed,
                            replace(bank, calibration_mean=mean, calibration_std=std)))
        return subsets

    def subset_scores(self, prepared: Prepared, score: float, scores: torch.Tensor, ranked: torch.Tensor,
                      sigma: float, given: bool = False, *,
                      kept: list[tuple[torch.Tensor, Features, torch.Tensor]] | None = None) -> tuple[float, ...]:
        """The volume score against each bank subset (:meth:`subsets`), estimated on the most anomalous slices.

        The top ``settings.spread_slices`` ranked slices by score go through the backbone again and are scored
        against each subset and against the whole bank, over the same voxels and with the volume's count of top
        voxels; each subset's score is the volume score moved by the difference. The volume's top voxels lie in its
        most anomalous slices, so this costs a few slices per subset instead of the volume.

        Args:
            prepared: the volume.
            score: its volume score.
            scores: its slice scores ``(S,)``.
            ranked: the slices that count in the volume score ``(S,)``.
            sigma: the smoothing in slice pixels.
            given: the features were handed to :meth:`detect`, or it was asked for no spread (an evaluation): none
                is computed.
            kept: batches of :meth:`batches` over some scored slices, when at hand: only the chosen slices not in
                them go through the backbone again.
        """
        subsets = self.subsets()
        if not subsets or given or not bool(ranked.any()):
            return ()
        settings = self.settings
        order = [i for i in torch.argsort(scores, descending=True, stable=True).tolist() if ranked[i]][
            :settings.spread_slices]  # stable: of tied slices the first, as the candidates keep them
        chosen = torch.zeros_like(ranked)
        chosen[order] = True
        count = int(foreground_counts(prepared.foreground)[ranked].sum())  # counted per slice: 3 against 20 ms
        maps: list[dict[int, torch.Tensor]] = [{} for _ in range(len(subsets) + 1)]
        missing = chosen.clone()
        for part, _, _ in kept or ():
            missing[part] = False
        pending = list(_chosen(kept or [], chosen))
        if bool(missing.any()):
            pending += list(self.batches(replace(prepared, scored=missing)))
        targets = [(None, self.bank), *subsets]
        for part, features, patches in pending:
            positions = prepared.positions[part]
            # Each slice measured once against every reference any subset retrieves (16 instead of 9 x 8 references
            # a slice on the README's volume), each subset's distances gathered from those. A subset that draws
            # every volume retrieves what the whole bank does: retrieved once.
            whole = retrieved(features, self.bank, settings, positions)
            rows, columns = shared_references([whole if allowed is None else
                                               retrieved(features, self.bank, settings, positions, allowed=allowed)
                                               for allowed, _ in targets])
            _, measured = reference_stage_distances(features, self.bank, rows, settings, dtype=self.dtype)
            for target, (_, calibrated), where in zip(maps, targets, columns):
                per_reference = measured.gather(-1, where.to(measured.device)[None, :, None, None, :].expand(
                    *measured.shape[:-1], where.shape[1]))
                fused = fused_maps(per_reference.amin(dim=-1), per_reference, calibrated, settings)[0]
                target.update(zip(part.tolist(), fill_background(fused, patches)))
        indices = sorted(maps[0])
        if not indices:
            return ()
        size = tuple(prepared.slices.shape[1:])
        foreground = prepared.foreground[indices]
        estimates = []
        for target in maps:
            stack = torch.stack([target[i] for i in indices])
            resampled = torch.cat([maps_to_slices(part, size, sigma=sigma) for part in stack.split(64)])
            estimates.append(volume_score(resampled, foreground.to(resampled.device),
                                          torch.ones(len(indices), dtype=torch.bool), settings.top_fraction,
                                          count=count))
        return tuple(score + e - estimates[0] for e in estimates[1:])


    def _detect_planes(self, prepared: Prepared, *, progress: Progress | None,
                       computed: Iterable[tuple[torch.Tensor, Features, torch.Tensor]] | None,
                       timer: Timer) -> Detection:
        """Tri-planar detection: each plane against its own references, the canonical maps fused as the stages are.

        The planes' maps ``(P, X, Y, Z)`` (the outputs' plane last, so that ``fusion="last"`` keeps it alone) are
        fused with ``settings.fusion``: with ``uncertainty``, a plane whose references disagree at a voxel counts
        less there. Scores are those of the fused map on the outputs' plane; their percentiles are against that
        plane's calibration (the fused map's own is not calibrated, so they are approximate).
        """
        settings = self.settings
        if settings.method != "himatch":
            raise ValueError(f"method={settings.method!r} scores one plane; leave --planes out for a baseline")
        names = {index: name for name, index in AXIS_INDEX.items()}
        maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for other in prepared.others:
            plane = names[other.axis]
            # Progress counts the outputs' plane (its slices are the total); the others take as long again each.
            # No spread for the planes: theirs would not be the fused score's.
            found = replace(self, bank=self.bank.of_plane(plane),
                            settings=replace(settings, axis=plane, spread_replicates=0)).detect(other, timer=timer)
            maps[plane] = (found.canonical("anomaly"), found.canonical("uncertainty"))
        own = replace(self, settings=replace(settings, spread_replicates=0)).detect(
            replace(prepared, others=()), progress=progress, computed=computed, timer=timer)
        maps[names[prepared.axis]] = (own.canonical("anomaly"), own.canonical("uncertainty"))
        with timer("fusion"):
            anomaly, uncertainty = fuse(torch.stack([a for a, _ in maps.values()]),
                                        torch.stack([u for _, u in maps.values()]), mode=settings.fusion,
                                        temperature=settings.temperature)
            anomaly, uncertainty = to_slices(anomaly, prepared.axis), to_slices(uncertainty, prepared.axis)
            foreground, scored = prepared.foreground, own.scored
            scores = slice_scores(anomaly, foreground, scored, settings.top_fraction)
            slivers = own.slivers if own.slivers is not None else torch.zeros_like(scored)
            score = volume_score(anomaly, foreground, scored & ~slivers, settings.top_fraction) \
                if scored.any() else 0.0
        bank = self.bank
        return Detection(
            anomaly=anomaly.contiguous(), uncertainty=uncertainty.contiguous(), axis=prepared.axis,
            slice_scores=scores, slice_percentiles=percentile(scores, bank.calibration_slice_scores), scored=scored,
            volume_score=score,
            volume_percentile=float(percentile(torch.tensor([score]), bank.calibration_volume_scores)[0]),
            planes={plane: anomaly_map for plane, (anomaly_map, _) in maps.items()}, slivers=slivers)


class Candidates:
    """The features of the ``size`` slices with the highest scores seen so far, batch after batch.

    Rows are copied out of their batches, so that the batches themselves are freed.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[tuple[float, int, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []

    def add(self, part: torch.Tensor, features: Features, patches: torch.Tensor, scores: torch.Tensor) -> None:
        """Offer a batch's slices ``part`` with their scores ``(B,)``; keeps the ``size`` highest (ties: first).

        A slice scored ``-inf`` is never kept.
        """
        for row, (index, score) in enumerate(zip(part.tolist(), scores.tolist())):
            if score == -float("inf") or (len(self.rows) >= self.size and score <= self.rows[-1][0]):
                continue  # not among the highest: nothing copied
            self.rows.append((score, index, features.cls[row].clone(), features.layout[row].clone(),
                              tuple(grid[row].clone() for grid in features.grids), patches[row].clone()))
            self.rows.sort(key=lambda r: (-r[0], r[1]))
            del self.rows[self.size:]

    def batches(self) -> list[tuple[torch.Tensor, Features, torch.Tensor]]:
        """The kept slices as one batch (in slice order), as :meth:`Detector.batches` gives them; none when empty."""
        if not self.rows:
            return []
        rows = sorted(self.rows, key=lambda r: r[1])
        grids = tuple(torch.stack([r[4][stage] for r in rows]) for stage in range(len(rows[0][4])))
        return [(torch.tensor([r[1] for r in rows]), Features(torch.stack([r[2] for r in rows]),
                                                              torch.stack([r[3] for r in rows]), grids),
                 torch.stack([r[5] for r in rows]))]


def _chosen(batches: list[tuple[torch.Tensor, Features, torch.Tensor]], chosen: torch.Tensor
            ) -> Iterator[tuple[torch.Tensor, Features, torch.Tensor]]:
    """The rows of ``batches`` (slice indices, features, patch foreground) whose slices are ``chosen`` ``(S,)``."""
    for part, features, patches in batches:
        rows = chosen[part]
        if bool(rows.any()):
            where = rows.to(features.cls.device)
            yield part[rows], Features(features.cls[where], features.layout[where],
                                       tuple(grid[where] for grid in features.grids)), patches[where]


def device_of(name: str) -> torch.device:
    """The torch device for ``--device`` (``auto``: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def load_extractor(settings: Settings, device: str = "auto") -> Extractor:
    """The backbone for ``settings.model`` and ``settings.stages`` on ``device`` (``auto``, ``cpu``, ``cuda:N``)."""
    from himatch_med.backbone import load_backbone

    return load_backbone(settings.model, stages=settings.stages, device=device_of(device),
                         precision=settings.precision)
