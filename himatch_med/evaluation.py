"""Evaluation on BMAD-style 2D sets and on annotated volumes: the metrics of the BMAD tables, one row per setting.

**Layouts** (METHOD.md, "Evaluation definitions"), recognised by :func:`discover` from the folder names alone:

- ``brain``: normals in ``train/good``; ``test/{good,Ungood}/img`` with masks in ``test/{good,Ungood}/label`` (or
  ``anomaly_mask``);
- ``liver``: ``train/good``; ``test/img/{good,Ungood}`` with masks in ``test/label/{good,Ungood}``;
- ``resc``: ``Train/train/good``; ``Test/test/{good,Ungood}`` with masks in ``Test/test_label/{good,Ungood}``;
- ``flat``: ``train/good``; ``test/{good,Ungood}`` holding the images, no masks (BMAD's OCT2017, chest, histopathology);
- ``folders``: no train split, one folder per class, one of them normal (e.g. Kermany OCT: ``NORMAL``, ``CNV``,
  ``DME``, ``DRUSEN``). Without a split, normal test images must be set aside from the references, or the normal class
  of the test would be the references themselves: :func:`holdout_split` holds out a seeded fraction of the normal
  *patients* (the file name without its trailing number: ``NORMAL-9698749-1`` -> ``NORMAL-9698749``), so that no
  patient is both a reference and a test image. The other classes are the anomalous test images.

A validation split (``valid``, ``val`` or ``Val/val``) is counted and reported; the test split is evaluated unless
``split="valid"``. Masks are paired with images by name (``x.png`` with ``x.png``, ``x_mask.png``, ``x_seg.png`` ...)
and binarised with ``> 0``; in a set with masks, a normal image without one has an empty mask. Annotated volumes
(:func:`volume_dataset`) pair ``case.nii.gz`` with ``case.nii.gz``, ``case_seg.nii.gz`` ..., nnU-Net's
``case_0000.nii.gz`` with ``case.nii.gz`` and LiTS' ``volume-N.nii`` with ``segmentation-N.nii``; a volume is anomalous
when its label holds an anomalous voxel (``> 0``, or one of ``anomaly_labels``: LiTS marks the liver 1, tumours 2).

**Metrics** (:mod:`himatch_med.metrics`): image AUROC and AP over image scores (for volumes: over every slice's score,
with a slice anomalous when its label is; slices without enough foreground score 0); pixel AUROC, AP, AUPRO up to a
false-positive rate of 0.3 and the best Dice over all pixels of the test images, 2D regions per image or slice; for
volumes also the voxel-level metrics (3D regions) and the AUROC and AP of volume scores.

**Pixel metrics in bounded memory**: every map is in z-units of the bank's normal variation, so one fixed histogram
range serves every set and no first pass is needed: :data:`PIXEL_RANGE` (-20 to 100 z) in :data:`PIXEL_BINS` bins
(0.0025 z each). Values outside fall into the end bins and count as tied there; the fraction of such pixels is
reported with the metrics (``pixels_outside_range``), so a range that is too narrow is seen, not silently absorbed.

**Ablations**: :func:`ablation_rows` crosses several values of ``stages``, ``fusion``, ``references_k`` and
``cls_weight``. Rows that differ only in retrieval and fusion settings share one backbone and one bank, and the
features of each test image are computed once and reused by all of them; each ``stages`` variant loads its own
backbone and bank. A bank's calibration (z-units, percentiles) depends on retrieval and fusion, so every row whose
settings differ from those the bank was calibrated with is recalibrated as METHOD.md defines it: the backbone runs
again over a seeded sample of at most ``calibration_slices`` of the bank's reference slices (not over all references),
and :func:`himatch_med.detect.calibrate_bank` does the rest. The row the bank was built for uses it as ``run`` would.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from himatch_med import engine, io
from himatch_med.bank import STORAGE_DTYPE, Bank, Sample
from himatch_med.config import Settings
from himatch_med.detect import Detection, Prepared, batches, calibrate_bank, detect
from himatch_med.errors import InputError
from himatch_med.features import Extractor
from himatch_med.metrics import PixelMetrics, average_precision, image_auroc
from himatch_med.volume import to_canonical, to_slices

NORMAL_CLASSES = ("good", "normal")
"""Class folder names (any case) of normal images, unless another is named."""
MASK_FOLDERS = ("label", "anomaly_mask", "mask", "labels", "masks", "ground_truth", "gt")
MASK_SUFFIXES = ("", "_mask", "_label", "_seg", "_gt", "_segmentation")
SPLIT_NAMES = {"train": ("train",), "test": ("test",), "valid": ("valid", "val")}
ABLATION_AXES = ("stages", "fusion", "references_k", "cls_weight")
"""Settings that take several values in one evaluation, outermost first (``stages`` varies the slowest)."""
PIXEL_RANGE = (-20.0, 100.0)
"""Histogram range of the pixel metrics, in z-units."""
PIXEL_BINS = 48_000
GALLERY = ("detected", "missed", "false_alarm")
"""Picture categories: anomalous cases with the highest scores, anomalous with the lowest, normal with the highest."""


@dataclass(frozen=True)
class Case:
    """One test image or volume.

    ``label`` is 1 (anomalous) or 0 (normal), or ``None`` when the mask decides (annotated volumes); ``mask`` the
    ground-truth file (``None``: none); ``group`` the class folder it came from (``good``, ``Ungood``, ``CNV`` ...).
    """

    path: Path
    label: int | None
    mask: Path | None
    group: str


@dataclass(frozen=True)
class Dataset:
    """What to evaluate: normal references, test cases, and what the folders held.

    ``summary`` counts images per split and class (the validation split included); ``skipped`` lists ``(file,
    reason)`` for files found but not evaluable (a volume without a label); ``volumes`` marks annotated 3D volumes.
    """

    layout: str
    references: tuple[Path, ...]
    cases: tuple[Case, ...]
    root: Path | None = None
    split: str = "test"
    reference_labels: Path | None = None
    volumes: bool = False
    summary: dict = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def has_masks(self) -> bool:
        """Whether any test case has a ground-truth mask (pixel metrics are computed only then)."""
        return any(case.mask is not None for case in self.cases)


def discover(root: str | Path, *, split: str = "test", normal_class: str | None = None, holdout: float = 0.5,
             seed: int = 0) -> Dataset:
    """Recognise a BMAD-style folder (or a folder per class) and list its references and test cases.

    Args:
        root: the set's folder (``/data/BMAD/Brain``, ``.../RESC``, ``.../oct_kermany``).
        split: ``test`` or ``valid``: which split is evaluated.
        normal_class: name of the normal class folder; ``None`` takes ``good`` or ``normal`` (any case).
        holdout: ``folders`` layout only: fraction of the normal images held out as normal test images.
        seed: ``folders`` layout only: seed of the held-out choice.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; pass the root of a BMAD set (holding train/ and test/) or a folder "
                         "with one sub-folder per class")
    if split not in ("test", "valid"):
        raise ValueError(f"split={split!r} is not one of test, valid")
    train = _split_folder(root, "train")
    if train is None:
        return _folders_dataset(root, normal_class, holdout, seed)
    normal = next((c for c in _subfolders(train) if _is_normal(c.name, normal_class)), None)
    references = _images(normal if normal is not None else train)
    if not references:
        raise InputError(f"{train}: holds no normal training images (expected {train}/good/ with images)")
    summary: dict = {"train": {(normal or train).name: len(references)}}
    chosen, layout = None, None
    for name in ("test", "valid"):
        folder = _split_folder(root, name)
        if folder is None:
            continue
        cases, pattern = _split_cases(folder, normal_class)
        summary[name] = {"folder": str(folder.relative_to(root)), "layout": pattern,
                         **{group: {"images": sum(c.group == group for c in cases),
                                    "masks": sum(c.group == group and c.mask is not None for c in cases)}
                            for group in dict.fromkeys(c.group for c in cases)}}
        if name == split:
            chosen, layout = cases, pattern
    if chosen is None:
        raise InputError(f"{root}: has no {split} split (looked for {', '.join(SPLIT_NAMES[split])} and "
                         f"{SPLIT_NAMES[split][0].capitalize()}/{SPLIT_NAMES[split][0]})")
    notes = []
    if split == "test" and "valid" in summary:
        notes.append(f"validation split present ({summary['valid']['folder']}): counted, not evaluated")
    return Dataset(layout, tuple(references), tuple(chosen), root=root, split=split, summary=summary,
                   notes=tuple(notes + _class_notes(chosen)))


def volume_dataset(images: list[Path], labels: Path, references: list[Path], *,
                   reference_labels: Path | None = None) -> Dataset:
    """Annotated test volumes paired with their label volumes by name, and the normal references.

    Args:
        images: test volumes (files or folders of them).
        labels: folder of label volumes named like the test volumes.
        references: normal volumes (files or folders).
        reference_labels: folder of labels of the references, when they are annotated volumes whose lesion-free
            slices are the references.
    """
    files = engine.expand_inputs(list(images))
    normals = engine.expand_inputs(list(references))
    if not Path(labels).is_dir():
        raise InputError(f"{labels}: not a folder; pass the folder of label volumes with --labels")
    shared = {p.resolve() for p in files} & {p.resolve() for p in normals}
    if shared:
        raise InputError(f"{sorted(shared)[0]}: is both a test volume and a reference; keep them apart")
    index = _name_index(Path(labels))
    cases, skipped = [], []
    for path in files:
        mask = _match(path, index, volumes=True)
        if mask is None:
            skipped.append((str(path), f"{path}: no label in {labels} named like it (expected {io.stem(path)}.nii.gz "
                                       f"or {io.stem(path)}_seg.nii.gz)"))
        else:
            cases.append(Case(path, None, mask, "volume"))
    summary = {"references": len(normals), "test volumes": len(files), "with labels": len(cases)}
    return Dataset("volumes", tuple(normals), tuple(cases), split="test", reference_labels=reference_labels,
                   volumes=True, summary=summary, skipped=tuple(skipped))


def holdout_split(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split normal images into references and held-out normal test images, whole patients at a time.

    Patients are shuffled with ``seed`` and held out until ``fraction`` of the images are; a patient's images all go to
    one side (see :func:`patient_key`).

    Returns:
        The references and the held-out images, each in the order given.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout={fraction} must lie strictly between 0 and 1")
    patients: dict[str, list[Path]] = {}
    for path in paths:
        patients.setdefault(patient_key(path), []).append(path)
    keys = sorted(patients)
    target = round(fraction * len(paths))
    held: set[Path] = set()
    for index in np.random.default_rng(seed).permutation(len(keys)).tolist():
        if len(held) >= max(target, 1):
            break
        held.update(patients[keys[index]])
    references = [p for p in paths if p not in held]
    if len(references) < 2:
        raise InputError(f"{len(paths)} normal images of {len(keys)} patients leave {len(references)} reference(s) "
                         f"after holding out {len(held)}; a bank needs two: lower --holdout or add normal images")
    return references, [p for p in paths if p in held]


def patient_key(path: Path) -> str:
    """The patient of a file: its name without a trailing ``-N`` or ``_N`` (``CNV-9333524-1`` -> ``CNV-9333524``)."""
    return re.sub(r"[-_]\d+$", "", io.stem(path))


def _folders_dataset(root: Path, normal_class: str | None, holdout: float, seed: int) -> Dataset:
    classes = [c for c in _subfolders(root) if _images(c)]
    normal = [c for c in classes if _is_normal(c.name, normal_class)]
    if len(normal) != 1 or len(classes) < 2:
        found = ", ".join(c.name for c in classes) or "none"
        raise InputError(f"{root}: no BMAD layout (no train/ or Train/train/ folder) and not one folder per class with "
                         f"exactly one normal class (class folders with images: {found}); name the normal class with "
                         "--normal-class")
    normals = _images(normal[0])
    references, held = holdout_split(normals, holdout, seed)
    cases = [Case(p, 0, None, normal[0].name) for p in held]
    cases += [Case(p, 1, None, c.name) for c in classes if c != normal[0] for p in _images(c)]
    patients = {patient_key(p) for p in held}
    summary = {normal[0].name: {"images": len(normals), "references": len(references), "held out": len(held),
                                "held-out patients": len(patients)},
               **{c.name: {"images": len(_images(c))} for c in classes if c != normal[0]}}
    note = (f"no train split: {len(held)} of {len(normals)} {normal[0].name} images ({len(patients)} patients, "
            f"holdout {holdout}, seed {seed}) are the normal test images; the other {len(references)}, from other "
            "patients, are the references")
    return Dataset("folders", tuple(references), tuple(cases), root=root, summary=summary,
                   notes=(note, *_class_notes(cases)))


def _class_notes(cases: list[Case]) -> list[str]:
    labels = {c.label for c in cases}
    if len(labels) < 2:
        return [f"the evaluated split holds only {'anomalous' if 1 in labels else 'normal'} images: image AUROC and "
                "AP are undefined"]
    return []


def _split_folder(root: Path, name: str) -> Path | None:
    for alias in SPLIT_NAMES[name]:
        for candidate in (root / alias.capitalize() / alias, root / alias):
            if candidate.is_dir():
                return candidate
    return None


def _split_cases(folder: Path, normal_class: str | None) -> tuple[list[Case], str]:
    """Cases of one split folder, and the layout name it follows."""
    sources: list[tuple[Path, str, Path | None]] = []
    by_class = _subfolders(folder / "img") if (folder / "img").is_dir() else []
    if by_class:
        masks = _first_folder(folder, MASK_FOLDERS)
        sources = [(c, c.name, masks / c.name if masks else None) for c in by_class]
        layout = "liver"
    else:
        labels = _first_folder(folder.parent, [f"{folder.name}_{s}" for s in ("label", "labels", "mask", "masks")])
        nested = False
        for group in _subfolders(folder):
            if (group / "img").is_dir():
                nested = True
                sources.append((group / "img", group.name, _first_folder(group, MASK_FOLDERS)))
            else:
                sources.append((group, group.name, labels / group.name if labels else None))
        layout = "brain" if nested else ("resc" if labels else "flat")
    cases = []
    for images, group, masks in sources:
        label = 0 if _is_normal(group, normal_class) else 1
        index = _name_index(masks) if masks is not None and masks.is_dir() else {}
        cases.extend(Case(path, label, _match(path, index), group) for path in _images(images))
    if not cases:
        raise InputError(f"{folder}: no test images found (expected good/ and Ungood/ with images, or img/ inside "
                         "them, or img/good/ and img/Ungood/)")
    return cases, layout


def _is_normal(name: str, normal_class: str | None) -> bool:
    return name.lower() == normal_class.lower() if normal_class else name.lower() in NORMAL_CLASSES


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_folder(parent: Path, names) -> Path | None:
    return next((parent / n for n in names if (parent / n).is_dir()), None)


def _images(folder: Path) -> list[Path]:
    return [p for p in io.list_images(folder) if p.is_file()]


def _name_index(folder: Path) -> dict[str, Path]:
    return {io.stem(p): p for p in _images(folder)}


def _match(path: Path, index: dict[str, Path], *, volumes: bool = False) -> Path | None:
    """The mask or label in ``index`` (stem -> file) named like ``path``, or ``None``."""
    stem = io.stem(path)
    stems = [stem]
    if volumes:
        stems += [re.sub(r"_0000$", "", stem), stem.replace("volume", "segmentation")]
    for candidate in stems:
        for suffix in MASK_SUFFIXES:
            if candidate + suffix in index:
                return index[candidate + suffix]
    return None


def ablation_rows(base: Settings, **values: list | None) -> list[Settings]:
    """One settings per combination of the values given for :data:`ABLATION_AXES` (``None``: the base's value).

    Args:
        base: resolved settings of everything else.
        values: e.g. ``fusion=["mean", "max"]``, ``stages=[[3, 6, 9, 12], [12]]``.

    Returns:
        Rows in product order (``stages`` varying slowest), duplicates dropped.
    """
    unknown = sorted(set(values) - set(ABLATION_AXES))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} cannot be ablated; choose among {', '.join(ABLATION_AXES)}")
    choices = [values.get(axis) or [getattr(base, axis)] for axis in ABLATION_AXES]
    rows: list[Settings] = []
    for combination in itertools.product(*choices):
        changes = dict(zip(ABLATION_AXES, combination, strict=True))
        changes["stages"] = tuple(changes["stages"])
        row = replace(base, **changes)
        if row not in rows:
            rows.append(row)
    return rows


def read_mask(path: Path, image: io.Image, *, values: tuple[int, ...] | None = None) -> np.ndarray:
    """Ground truth of ``image`` as a canonical boolean volume (``> 0``, or one of ``values``).

    Raises:
        InputError: when the mask does not lie on the image's grid.
    """
    mask = io.read_image(path)
    if mask.array.shape != image.array.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InputError(f"{path}: the mask must lie on the grid of {image.path} (shape {image.array.shape}, same "
                         f"affine); it has shape {mask.array.shape}")
    truth = mask.array > 0 if values is None else np.isin(np.rint(mask.array), values)
    return to_canonical(truth, mask.affine)[0]


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

    def add(self, case: Case, prepared: Prepared, detection: Detection, truth: np.ndarray | None, label: int) -> None:
        """Add one case's detection and ground truth (``truth`` canonical boolean, or ``None`` without a mask)."""
        maps = to_slices(detection.anomaly, prepared.axis).numpy()
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
                self.voxels.update(detection.anomaly.numpy(), truth)
            self.outside += int(np.count_nonzero((maps < self.range[0]) | (maps > self.range[1])))
            self.counted += maps.size
        if self.volumes:
            labels = truths.reshape(len(truths), -1).any(axis=1) if truths is not None else np.full(len(scores), label)
            self.slices.append((record["name"], scores.copy(), labels.astype(np.int64)))
            record["slices"] = len(scores)
            record["anomalous_slices"] = int(labels.sum())
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
        return result


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
             options: dict | None = None, anomaly_labels: tuple[int, ...] | None = None,
             pixel_range: tuple[float, float] = PIXEL_RANGE, bins: int = PIXEL_BINS, pictures: int = 2,
             load: Loader = engine.load, progress: bool = True, strict: bool = False) -> Evaluation:
    """Score every test case with every row's settings and gather the metrics.

    Args:
        dataset: from :func:`discover` or :func:`volume_dataset`.
        rows: resolved settings, one per table row (:func:`ablation_rows`).
        device: ``auto``, ``cpu``, ``cuda``...
        cache: bank cache folder (``None``: the user cache, as ``run`` uses).
        options: how files are read (:data:`himatch_med.engine.READ_DEFAULTS`: ``volume_index``, ``series``,
            ``nan_policy``, ``allow_shear``).
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
    tallies = [Tally(row, volumes=dataset.volumes, pixel_range=pixel_range, bins=bins,
                     pictures=pictures if number == 0 else 0) for number, row in enumerate(rows)]
    failures = [{"path": path, "rows": "all", "error": reason} for path, reason in dataset.skipped]
    notes = list(dataset.notes)
    # Rows that differ only in calibrated settings share the features and the bank's references (recalibrated).
    shared = [axis for axis in ABLATION_AXES if axis in Settings.flagged("calibrated")]
    groups: dict[Settings, list[int]] = {}
    for number, row in enumerate(rows):
        groups.setdefault(replace(row, **{k: getattr(rows[0], k) for k in shared}), []).append(number)
    timings: dict = {"groups": []}
    for members in groups.values():
        members_rows = [rows[i] for i in members]
        clock = time.perf_counter()
        extractor = load(members_rows[0], device)
        bank = engine.cached_bank(list(dataset.references), dataset.reference_labels, members_rows[0], extractor,
                                  cache, options=options)
        banks, recalibrated = _calibrated(bank, members_rows, extractor, options, progress)
        group = {"rows": [i + 1 for i in members], "stages": list(extractor.stages), "references": len(bank),
                 "recalibrated_rows": [members[i] + 1 for i in recalibrated],
                 "bank_seconds": round(time.perf_counter() - clock, 2), "features_seconds": 0.0}
        for i in members:
            tallies[i].stages = tuple(extractor.stages)
        unit = "volume" if dataset.volumes else "image"
        for case in tqdm(dataset.cases, desc=f"rows {group['rows'][0]}-{group['rows'][-1]}", unit=unit, leave=False,
                         disable=not progress):
            try:
                outcome = _score_case(case, extractor, banks, members_rows, dataset.has_masks, options, anomaly_labels)
            except Exception as error:  # one failing case must not lose the others
                if strict:
                    raise
                failures.append({"path": str(case.path), "rows": group["rows"],
                                 "error": engine.describe_error(case.path, error)})
                continue
            prepared, detections, seconds, truth, label, shared = outcome
            group["features_seconds"] += shared
            for i, detection, spent in zip(members, detections, seconds, strict=True):
                tallies[i].add(case, prepared, detection, truth, label)
                tallies[i].seconds += spent
        group["features_seconds"] = round(group["features_seconds"], 2)
        timings["groups"].append(group)
    if not dataset.volumes and rows[0].modality == "ct":
        notes.append("modality ct applies a HU window; 2D PNG sets store display intensities, for which the mri "
                     "preset (percentiles of the non-zero foreground) is the usual choice")
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    return Evaluation(dataset, tallies, failures, timings, notes, tuple(pixel_range), bins)


def _score_case(case: Case, extractor: Extractor, banks: list[Bank], rows: list[Settings], has_masks: bool,
                options: dict | None, anomaly_labels: tuple[int, ...] | None):
    """Read one case and detect with every row of a group, computing the backbone features once."""
    image, _, prepared = engine.read_volume(case.path, rows[0], options=options)
    truth = read_mask(case.mask, image, values=anomaly_labels) if case.mask is not None else None
    shared = 0.0
    computed = None
    if len(rows) > 1:
        clock = time.perf_counter()
        computed = list(batches(extractor, prepared, rows[0], getattr(extractor, "device", torch.device("cpu"))))
        shared = time.perf_counter() - clock
    detections, seconds = [], []
    for bank, row in zip(banks, rows, strict=True):
        clock = time.perf_counter()
        detections.append(detect(extractor, bank, prepared, row, computed=computed))
        seconds.append(time.perf_counter() - clock)
    if truth is None and has_masks and case.label == 0:
        truth = np.zeros(detections[0].anomaly.shape, dtype=bool)
    label = case.label if case.label is not None else int(truth is not None and truth.any())
    return prepared, detections, seconds, truth, label, shared


def _calibrated(bank: Bank, rows: list[Settings], extractor: Extractor, options: dict | None, progress: bool
                ) -> tuple[list[Bank], list[int]]:
    """The bank for each row, recalibrated for rows whose retrieval or fusion settings differ from its own."""
    keys = [k for k in bank.meta.get("calibration", {}) if k in Settings.__dataclass_fields__]
    differ = [i for i, row in enumerate(rows) if bank.calibration_changes(row, tuple(keys))]
    if not differ:
        return [bank] * len(rows), []
    samples = calibration_samples(bank, rows[0], extractor, options=options, progress=progress)
    device = getattr(extractor, "device", torch.device("cpu"))
    banks = []
    for i, row in enumerate(rows):
        if i not in differ:
            banks.append(bank)
            continue
        calibrated = calibrate_bank(bank, samples, row, extractor.patch_size, device)
        calibrated.meta = {**calibrated.meta, "calibration": {**calibrated.meta["calibration"],
                                                              **{k: getattr(row, k) for k in keys},
                                                              "recalibrated_for_evaluation": True}}
        banks.append(calibrated)
    return banks, differ


def calibration_samples(bank: Bank, settings: Settings, extractor: Extractor, *, options: dict | None = None,
                        progress: bool = False) -> list[Sample]:
    """Features of a seeded sample of the bank's references, for :func:`himatch_med.detect.calibrate_bank`.

    At most ``settings.calibration_slices`` bank rows are drawn; only their slices go through the backbone again.
    """
    from tqdm.auto import tqdm

    sources = bank.meta.get("sources", [])
    if len(sources) != len(bank):
        raise RuntimeError(f"the bank lists {len(sources)} sources for {len(bank)} references")
    count = min(settings.calibration_slices, len(bank))
    drawn = np.sort(np.random.default_rng(settings.seed).choice(len(bank), size=count, replace=False))
    wanted: dict[str, dict[int, int]] = {}
    for row in drawn.tolist():
        wanted.setdefault(sources[row]["source"], {})[int(sources[row]["slice"])] = row
    device = getattr(extractor, "device", torch.device("cpu"))
    samples = []
    for source, slices in tqdm(wanted.items(), desc="recalibration sample", unit="file", leave=False,
                               disable=not progress):
        try:
            _, _, prepared = engine.read_volume(Path(source), settings, options=options)
        except InputError as error:
            raise InputError(f"cannot recalibrate the bank for another fusion or retrieval setting: {error}; remove "
                             "the cached bank or pass --bank-cache to build a new one") from error
        chosen = torch.zeros(len(prepared.slices), dtype=torch.bool)
        chosen[list(slices)] = True
        for part, features, patches in batches(extractor, replace(prepared, scored=chosen), settings, device):
            for position, index in enumerate(part.tolist()):
                samples.append(Sample(features.cls[position].cpu(), features.layout[position].cpu(),
                                      tuple(g[position].to("cpu", STORAGE_DTYPE) for g in features.stages),
                                      patches[position].cpu(), prepared.foreground[index].cpu(),
                                      float(prepared.positions[index]), int(bank.groups[slices[index]]),
                                      slices[index]))
    return samples


METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("volume_auroc", "volume AUROC"),
    ("volume_ap", "volume AP"), ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("aupro", "AUPRO@0.3"),
    ("best_dice", "best Dice"), ("voxel_auroc", "voxel AUROC"), ("voxel_ap", "voxel AP"),
    ("voxel_aupro", "voxel AUPRO@0.3"), ("voxel_best_dice", "voxel best Dice"),
)


def row_settings(tally: Tally) -> dict:
    """The ablated settings of a row, with the stages the backbone actually used."""
    return {"stages": list(tally.stages), "fusion": tally.settings.fusion,
            "references_k": tally.settings.references_k, "cls_weight": tally.settings.cls_weight}


def summary(evaluation: Evaluation) -> dict:
    """The content of ``metrics.json``."""
    dataset = evaluation.dataset
    first = evaluation.tallies[0]
    rows = []
    for number, tally in enumerate(evaluation.tallies, 1):
        rows.append({"row": number, **row_settings(tally), "metrics": tally.metrics(),
                     "detect_seconds": round(tally.seconds, 2)})
    return {
        "dataset": {"root": dataset.root, "layout": dataset.layout, "split": dataset.split,
                    "references": len(dataset.references), "cases": len(dataset.cases),
                    "masks": dataset.has_masks, "summary": dataset.summary},
        "model": first.settings.model,
        "settings": asdict(first.settings),
        "ablation": _ablated(evaluation.tallies),
        "rows": rows,
        "pixel_metrics": {"range_z": list(evaluation.pixel_range), "bins": evaluation.bins,
                          "definition": "all pixels of the test images, masks > 0; AUPRO up to FPR 0.3 / 0.3, "
                                        "regions = connected components (2D per image or slice; voxel_*: 3D)"},
        "failures": evaluation.failures,
        "notes": evaluation.notes,
        "timings_seconds": evaluation.timings,
        "versions": engine.versions(),
    }


def _ablated(tallies: list[Tally]) -> dict[str, list]:
    """The values each ablated setting took, in row order (settings with a single value left out)."""
    values = {axis: [] for axis in ABLATION_AXES}
    for tally in tallies:
        for axis, value in row_settings(tally).items():
            if value not in values[axis]:
                values[axis].append(value)
    return {axis: found for axis, found in values.items() if len(found) > 1}


def table(evaluation: Evaluation, metrics: list[dict] | None = None) -> str:
    """The markdown table of the rows: ablated settings, metrics in %, seconds."""
    metrics = metrics or [t.metrics() for t in evaluation.tallies]
    columns = [(key, title) for key, title in METRIC_COLUMNS if any(key in m for m in metrics)]
    header = ["#", "stages", "fusion", "K", "CLS weight", *[title for _, title in columns], "cases", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" ---: "] + [" --- "] * 2 + [" ---: "] *
                                                                 (len(header) - 3)) + "|"]
    for number, (tally, values) in enumerate(zip(evaluation.tallies, metrics, strict=True), 1):
        cells = [str(number), ",".join(map(str, tally.stages)), tally.settings.fusion,
                 str(tally.settings.references_k), f"{tally.settings.cls_weight:g}",
                 *[_percent(values.get(key)) for key, _ in columns], str(values["cases"]), f"{tally.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def markdown(evaluation: Evaluation) -> str:
    """The content of ``metrics.md``: what was evaluated, the table, and how to read it."""
    dataset = evaluation.dataset
    metrics = [t.metrics() for t in evaluation.tallies]
    first = evaluation.tallies[0].settings
    labels = [r["label"] for r in evaluation.tallies[0].records]
    where = f"`{dataset.root}`" if dataset.root else "annotated volumes"
    unit = "volumes" if dataset.volumes else "images"
    lines = [
        "# HiMatch-AD evaluation", "",
        f"- set: {where}, layout `{dataset.layout}`, {dataset.split} split: {len(labels)} {unit} evaluated "
        f"({labels.count(0)} normal, {labels.count(1)} anomalous), {len(evaluation.failures)} failed; masks: "
        f"{'yes' if dataset.has_masks else 'none (image metrics only)'}",
        f"- references: {len(dataset.references)} normal {unit}",
        f"- model `{first.model}`, modality {first.modality}, image size {first.image_size}, seed {first.seed}",
        "",
        table(evaluation, metrics), "",
        "Metrics in %. Image AUROC/AP over image scores"
        + (" (every slice of every volume; a slice is anomalous when its label is)" if dataset.volumes else "")
        + ("; pixel metrics over all pixels of the test images, masks > 0, 2D regions for AUPRO"
           + ("; voxel metrics over whole volumes with 3D regions" if dataset.volumes else "")
           + f"; pixel histograms of {evaluation.bins} bins over [{evaluation.pixel_range[0]:g}, "
             f"{evaluation.pixel_range[1]:g}] z" if dataset.has_masks else "")
        + ". Seconds: detection time of the row (features shared by several rows not included).",
    ]
    outside = max((m.get("pixels_outside_range", 0.0) for m in metrics), default=0.0)
    if outside > 0.001:
        lines.append(f"\nWarning: {100 * outside:.2f} % of the map values lie outside the histogram range and count "
                     "as tied at its ends; widen it with --pixel-range.")
    if evaluation.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in evaluation.notes]]
    if evaluation.failures:
        lines += ["", "Failed:", *[f"- {failure['error']}" for failure in evaluation.failures]]
    return "\n".join(lines) + "\n"


def scores_csv(evaluation: Evaluation) -> str:
    """Per-case scores of every row, and the failures, as CSV text."""
    buffer = StringIO()
    fields = ["row", "stages", "fusion", "references_k", "cls_weight", "class", "name", "label", "score",
              "percentile", "anomalous_pixels", "slices", "anomalous_slices", "path", "error"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for number, tally in enumerate(evaluation.tallies, 1):
        settings = {**row_settings(tally), "stages": " ".join(map(str, tally.stages))}
        for record in tally.records:
            writer.writerow({"row": number, **settings, **record, "score": f"{record['score']:.5f}",
                             "percentile": f"{record['percentile']:.2f}"})
    for failure in evaluation.failures:
        writer.writerow({"row": failure["rows"] if isinstance(failure["rows"], str) else
                         " ".join(map(str, failure["rows"])), "name": io.stem(failure["path"]),
                         "path": failure["path"], "error": failure["error"]})
    return buffer.getvalue()


def slice_scores_csv(evaluation: Evaluation) -> str:
    """Every slice's score and label for every row (annotated volumes), as CSV text."""
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "name", "slice", "label", "score"])
    for number, tally in enumerate(evaluation.tallies, 1):
        for name, scores, labels in tally.slices:
            writer.writerows([number, name, index, int(label), f"{score:.5f}"]
                             for index, (score, label) in enumerate(zip(scores.tolist(), labels.tolist(), strict=True)))
    return buffer.getvalue()


def picture(panel: Panel, category: str, rank: int):
    """A figure of one gallery panel: the slice, its heatmap and, when known, the ground truth outlined."""
    from himatch_med.figures import overview

    titles = {"detected": "anomalous, highest score", "missed": "anomalous, lowest score",
              "false_alarm": "normal, highest score"}
    return overview(panel.image[None], panel.heat[None], panel.foreground[None], [panel.caption],
                    title=f"{panel.name} ({titles[category]} #{rank})",
                    contours=None if panel.truth is None else panel.truth[None])


def write_outputs(evaluation: Evaluation, folder: str | Path) -> dict[str, Path]:
    """Write the outputs of an evaluation to ``folder``; returns the paths written.

    ``metrics.json``, ``metrics.md``, ``scores.csv`` (and ``slice_scores.csv`` for volumes), and the gallery pictures
    of the first row as ``figures/<category>_<rank>_<name>.png``.
    """
    folder = Path(folder)
    written = {"metrics": io.write_json(summary(evaluation), folder / "metrics.json"),
               "table": io.write_text(markdown(evaluation), folder / "metrics.md"),
               "scores": io.write_text(scores_csv(evaluation), folder / "scores.csv")}
    if evaluation.dataset.volumes:
        written["slice_scores"] = io.write_text(slice_scores_csv(evaluation), folder / "slice_scores.csv")
    gallery = evaluation.tallies[0].gallery
    if gallery is not None:
        for category, panels in gallery.panels().items():
            for rank, panel in enumerate(panels, 1):
                path = folder / "figures" / f"{category}_{rank}_{panel.name}.png"
                written[f"{category}_{rank}"] = io.write_figure(picture(panel, category, rank), path)
    return written
