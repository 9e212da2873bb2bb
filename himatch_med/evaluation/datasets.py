"""Evaluation sets: BMAD-style 2D folders and annotated volumes, as references and test cases.

The layouts :func:`discover` recognises and how masks and labels are paired are described in
:mod:`himatch_med.evaluation`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from himatch_med import io, jobs
from himatch_med.errors import InputError

NORMAL_CLASSES = ("good", "normal")
"""Class folder names (any case) of normal images, unless another is named."""
MASK_FOLDERS = ("label", "anomaly_mask", "mask", "labels", "masks", "ground_truth", "gt")
MASK_SUFFIXES = ("", "_mask", "_label", "_seg", "_gt", "_segmentation")
SPLIT_NAMES = {"train": ("train",), "test": ("test",), "valid": ("valid", "val")}


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
        reference_labels: the labels of the references (a folder named like them, a CSV of image,label pairs, or a
            file name beside each: :class:`himatch_med.bank.store.ReferenceLabels`), when they are annotated
            volumes whose lesion-free slices are the references.
    """
    files = jobs.expand_inputs(list(images))
    normals = jobs.expand_inputs(list(references))
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
