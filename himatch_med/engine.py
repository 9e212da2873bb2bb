"""File-level jobs shared by the CLI and the pipelines: read a volume, detect, write its outputs; build banks.

This is where files meet tensors: :mod:`himatch_med.io` on one side, :mod:`himatch_med.detect` on the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from himatch_med import __version__, io
from himatch_med.bank import Bank
from himatch_med.config import Settings
from himatch_med.detect import Detection, Prepared, build_bank, detect, prepare
from himatch_med.errors import InputError
from himatch_med.features import Extractor
from himatch_med.timing import NO_TIMER, Timer
from himatch_med.volume import AXIS_INDEX, from_canonical, to_canonical, to_slices

OUTPUTS = ("anomaly", "uncertainty", "overview", "report")
"""Files written per input; the report is written last, so its presence means the outputs are complete."""
TOP_SLICES = 5
OVERVIEW_SLICES = 4


def output_paths(path: Path, folder: Path) -> dict[str, Path]:
    """Where the outputs of one input go.

    ``<name>_anomaly.nii.gz``, ``<name>_uncertainty.nii.gz``, ``<name>_overview.png`` and ``<name>_report.json``.
    """
    name = io.stem(path)
    return {"anomaly": folder / f"{name}_anomaly.nii.gz", "uncertainty": folder / f"{name}_uncertainty.nii.gz",
            "overview": folder / f"{name}_overview.png", "report": folder / f"{name}_report.json"}


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given, folders replaced by the images in them (a folder of DICOM files is one series)."""
    expanded = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir() and not io.is_dicom_folder(path):
            found = io.list_images(path)
            if not found:
                raise InputError(f"{path}: holds no NIfTI, DICOM or 2D image files")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


def check_output_folder(folder: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that cannot be written, or outputs that would overwrite an input."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise InputError(f"{folder}: the output folder cannot be written ({error.strerror}); choose another with "
                         "-o") from error
    resolved = {p.resolve() for p in inputs}
    seen: dict[str, Path] = {}
    for path in inputs:
        if io.stem(path) in seen:
            raise InputError(f"{path} and {seen[io.stem(path)]} would write the same outputs "
                             f"({io.stem(path)}_*); run them into different output folders")
        seen[io.stem(path)] = path
        for output in output_paths(path, folder).values():
            if output.resolve() in resolved:
                raise InputError(f"{output}: writing it would overwrite an input; choose another output folder "
                                 "with -o")


def device_of(name: str) -> torch.device:
    """The torch device for ``--device`` (``auto``: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def load(settings: Settings, device: str = "auto") -> Extractor:
    """The backbone for ``settings.model`` and ``settings.stages`` on ``device``."""
    from himatch_med.backbone import load_backbone

    return load_backbone(settings.model, stages=settings.stages, device=device_of(device))


def bank_settings(settings: Settings, extractor: Extractor) -> dict:
    """What a bank must share with a query: model, preset, image size, and the stages actually used."""
    return {**settings.bank_fields(), "model": extractor.model_id, "stages": list(extractor.stages)}


def open_bank(folder: Path, settings: Settings, extractor: Extractor) -> Bank:
    """Read a bank and check it was built with this run's model, stages, image size and preset."""
    tensors, meta = io.read_bank(folder)
    bank = Bank.from_stored(tensors, meta, source=str(folder))
    bank.check(bank_settings(settings, extractor), source=str(folder))
    # On a GPU the bank moves there once; on the CPU it stays memory-mapped.
    return bank.to(getattr(extractor, "device", torch.device("cpu")))


def read_volume(path: Path, settings: Settings, *, options: dict | None = None, labels: Path | None = None,
                mask: Path | None = None, timer: Timer = NO_TIMER) -> tuple[io.Image, np.ndarray, Prepared]:
    """Read a file and prepare it: the image as read, its orientation, and the prepared slices."""
    options = {**READ_DEFAULTS, **(options or {})}
    with timer("load"):
        image = io.read_image(path, volume_index=options["volume_index"], series=options["series"])
        image = check_values(image, nan_policy=options["nan_policy"])
        check_geometry(image, settings.axis, allow_shear=options["allow_shear"])
        canonical, orientation = to_canonical(image.array, image.affine)
        check_plane(image, canonical.shape, settings.axis)
    excluded = _aligned(labels, image, "--reference-labels") if labels is not None else None
    foreground = _aligned(mask, image, "--mask") if mask is not None else None
    with timer("preprocess"):
        prepared = prepare(torch.from_numpy(canonical), settings,
                           foreground=None if foreground is None else torch.from_numpy(foreground),
                           excluded=None if excluded is None else torch.from_numpy(excluded))
    if not prepared.scored.any():
        how = "the --mask" if mask is not None else f"--foreground {settings.foreground}"
        raise InputError(f"{path}: no slice has at least {settings.min_foreground:.0%} foreground under {how}; "
                         "choose another --foreground (otsu, all) or --modality, or check the file")
    return image, orientation, prepared


READ_DEFAULTS = {"volume_index": None, "series": None, "nan_policy": "refuse", "allow_shear": False}
"""How files are read unless the user says otherwise (``--volume-index``, ``--series``, ``--nan-policy``,
``--allow-shear``)."""


def check_values(image: io.Image, *, nan_policy: str = "refuse") -> io.Image:
    """Refuse volumes without content: an empty axis, NaN or infinite voxels (or zero them), a constant volume."""
    if min(image.array.shape) == 0:
        raise InputError(f"{image.path}: has an axis of size 0 (shape {image.array.shape}); the file holds no image")
    bad = ~np.isfinite(image.array)
    count = int(np.count_nonzero(bad))
    if count and nan_policy != "zero":
        raise InputError(f"{image.path}: has {count} NaN or infinite voxels; fix the file, or pass --nan-policy zero "
                         "to set them to 0")
    if count:
        image = replace(image, array=np.where(bad, np.float32(0), image.array),
                        notes=image.notes + (f"{count} NaN or infinite voxels set to 0 (--nan-policy zero)",))
    low, high = float(image.array.min()), float(image.array.max())
    if low == high:
        raise InputError(f"{image.path}: is constant (every voxel is {low:g}); there is no image to compare")
    return image


def check_geometry(image: io.Image, axis: str, *, allow_shear: bool = False) -> None:
    """Refuse affines that cannot place a voxel (singular), sheared ones unless allowed, 2D images cut off-axial."""
    linear = image.affine[:3, :3]
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(linear)) < 1e-12:
        raise InputError(f"{image.path}: its affine is singular or not finite, so voxels have no position; fix the "
                         "header (e.g. the pixdim, qform or sform)")
    directions = linear / np.linalg.norm(linear, axis=0)
    shear = float(np.abs(directions.T @ directions - np.eye(3)).max())
    if shear > 1e-3 and not allow_shear:
        raise InputError(f"{image.path}: its affine is sheared (axes {np.degrees(np.arcsin(min(shear, 1))):.1f}° off "
                         "perpendicular, e.g. a CT gantry tilt); resample it to an orthogonal grid, or pass "
                         "--allow-shear to slice along the nearest voxel axes")
    if image.kind == "image" and axis != "axial":
        raise InputError(f"{image.path}: is a 2D image; it can only be sliced along --axis axial")


MIN_SLICE_SIDE = 8
"""Fewest pixels a slice side needs to be a study's (a backbone patch covers 14-16 pixels of the resized slice)."""


def check_plane(image: io.Image, canonical_shape: tuple[int, ...], axis: str) -> None:
    """Refuse slices too small for a study: one pixel wide (another axis may do), or a thumbnail or a crop."""
    plane = [size for index, size in enumerate(canonical_shape) if index != AXIS_INDEX[axis]]
    if min(plane) >= MIN_SLICE_SIDE:
        return
    described = f"{image.path}: its {axis} slices would be {plane[0]} x {plane[1]} pixels (shape {image.array.shape})"
    others = [name for name, index in AXIS_INDEX.items() if name != axis and image.kind != "image"
              and min(size for i, size in enumerate(canonical_shape) if i != index) >= MIN_SLICE_SIDE]
    if others:
        raise InputError(f"{described}; choose another --axis" + (f" ({' or '.join(others)})" if others else ""))
    raise InputError(f"{described}; too small to be a study (a slice needs at least {MIN_SLICE_SIDE} x "
                     f"{MIN_SLICE_SIDE} pixels); pass the full image, not a thumbnail or a crop")


def _aligned(path: Path, image: io.Image, option: str) -> np.ndarray:
    other = io.read_image(path)
    if other.array.shape != image.array.shape or not np.allclose(other.affine, image.affine, atol=1e-3):
        raise InputError(f"{path}: {option} must lie on the grid of {image.path} (shape {image.array.shape}, same "
                         f"affine); it has shape {other.array.shape}")
    return to_canonical(other.array > 0, other.affine)[0]


def reference_volumes(references: list[Path], labels: Path | None, settings: Settings, options: dict | None,
                      warn=None):
    """Yield ``(name, prepared)`` for each readable reference.

    Unreadable references, and notes on how a reference's foreground was found, are reported through ``warn``.
    """
    for path in references:
        try:
            label = _label_for(path, labels) if labels is not None else None
            _, _, prepared = read_volume(path, settings, options=options, labels=label)
        except InputError as error:
            if warn:
                warn(f"skipping reference {error}")
            continue
        for note in prepared.notes if warn else ():
            warn(f"reference {path}: {note}")
        yield str(path.resolve()), prepared


def _label_for(path: Path, labels: Path) -> Path:
    if not labels.is_dir():
        raise InputError(f"{labels}: --reference-labels must be a folder of label files named like the references")
    name = io.stem(path)
    for candidate in sorted(labels.iterdir()):
        if io.stem(candidate) in (name, f"{name}_seg", f"{name}_label", f"{name}_mask"):
            return candidate
    raise InputError(f"{path}: no label named like it in {labels} (expected {name}.nii.gz or {name}_seg.nii.gz)")


def build_bank_folder(references: list[Path], labels: Path | None, settings: Settings, extractor: Extractor,
                      folder: Path, *, options: dict | None = None) -> Path:
    """Build a bank from reference files and write it to ``folder``."""
    from tqdm.auto import tqdm

    if not references:
        raise InputError("no reference files given")
    if folder.resolve() in {p.resolve() for p in references}:
        raise InputError(f"{folder}: the bank would overwrite a reference; choose another -o")
    warnings: list[str] = []
    check_output_folder(folder.parent, [])
    bar = tqdm(total=None, unit="slice", desc="building bank", leave=False)
    started = time.perf_counter()
    try:
        bank = build_bank(extractor, reference_volumes(references, labels, settings, options, warnings.append),
                          settings, progress=bar.update)
    except InputError as error:
        if warnings:
            raise InputError(f"{error}. Skipped references:\n  " + "\n  ".join(warnings)) from error
        raise
    finally:
        bar.close()
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    meta = {**bank.meta, "created_by": f"himatch-med {__version__}", "warnings": warnings,
            "build_seconds": round(time.perf_counter() - started, 2)}
    return io.write_bank(bank.tensors(), meta, folder)


def cached_bank(references: list[Path], labels: Path | None, settings: Settings, extractor: Extractor,
                cache: Path | None, *, options: dict | None = None) -> Bank:
    """The bank of these references and settings, built on first use and reused from the cache afterwards."""
    files = expand_inputs(references)
    key = _cache_key(files, labels, settings, extractor)
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "himatch-med" / "banks"
    folder = cache / key
    if not (folder / io.BANK_META).exists():
        build_bank_folder(files, labels, settings, extractor, folder, options=options)
    return open_bank(folder, settings, extractor)


def _cache_key(files: list[Path], labels: Path | None, settings: Settings, extractor: Extractor) -> str:
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if labels is not None and labels.is_dir():
        stamp += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(labels.iterdir())]
    text = json.dumps([stamp, settings.results_fields(), list(extractor.stages), extractor.model_id], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def process(path: Path, extractor: Extractor, bank: Bank, settings: Settings, folder: Path, *,
            options: dict | None = None, mask: Path | None = None, progress: bool = True) -> dict:
    """Detect anomalies in one input and write its four outputs; returns the report."""
    started = time.perf_counter()
    volume = read_volume(path, settings, options=options, mask=mask)
    return analyse(volume, extractor, bank, settings, folder, progress=progress,
                   read_seconds=time.perf_counter() - started)


def analyse(volume: tuple[io.Image, np.ndarray, Prepared], extractor: Extractor, bank: Bank, settings: Settings,
            folder: Path, *, progress: bool = True, read_seconds: float = 0.0, timer: Timer = NO_TIMER) -> dict:
    """Detect anomalies in a volume already read by :func:`read_volume` and write its outputs; returns the report.

    The report is written last: its presence means the other outputs are complete.
    """
    from tqdm.auto import tqdm

    image, orientation, prepared = volume
    timings = {"read_prepare": read_seconds}
    bar = tqdm(total=int(prepared.scored.sum()), unit="slice", desc=io.stem(image.path), leave=False,
               disable=not progress)
    started = time.perf_counter()
    detection = detect(extractor, bank, prepared, settings, progress=bar.update, timer=timer)
    bar.close()
    timings["detect"] = time.perf_counter() - started
    started = time.perf_counter()
    paths = output_paths(image.path, folder)
    with timer("save"):
        report = make_report(image, orientation, prepared, detection, bank, settings, extractor, paths)
        aspect = pixel_aspect(image.affine, orientation, prepared.axis)
        report["notes"] += aspect_notes(aspect)
        # gzip releases the GIL: the two maps compress in parallel while the picture is drawn.
        with ThreadPoolExecutor(max_workers=2) as pool:
            writes = [pool.submit(io.write_map, from_canonical(getattr(detection, name).numpy(), orientation), image,
                                  paths[name]) for name in ("anomaly", "uncertainty")]
            io.write_figure(overview_figure(prepared, detection, report, aspect=aspect), paths["overview"])
            for write in writes:
                write.result()
    timings["write"] = time.perf_counter() - started
    report["timings_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    io.write_json(report, paths["report"])
    return report


def is_complete(path: Path, folder: Path) -> bool:
    """Whether every output of ``path`` is in ``folder`` (the report, written last, is checked to parse)."""
    paths = output_paths(path, folder)
    if not all(p.is_file() for p in paths.values()):
        return False
    try:
        json.loads(paths["report"].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return True


def file_slice_index(index: int, axis: int, orientation: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int]:
    """The file's own (voxel axis, voxel index) of canonical slice ``index`` along canonical ``axis``."""
    file_axis = int(np.flatnonzero(orientation[:, 0] == axis)[0])
    flipped = orientation[file_axis, 1] < 0
    return file_axis, (shape[file_axis] - 1 - index) if flipped else index


def make_report(image: io.Image, orientation: np.ndarray, prepared: Prepared, detection: Detection, bank: Bank,
                settings: Settings, extractor: Extractor, paths: dict[str, Path]) -> dict:
    """The JSON report of one input: scores, per-slice scores, top slices, settings, versions."""
    scores = detection.slice_scores
    order = [i for i in torch.argsort(scores, descending=True).tolist() if detection.scored[i]][:TOP_SLICES]
    top = []
    for index in order:
        file_axis, file_index = file_slice_index(index, prepared.axis, orientation, image.array.shape)
        top.append({"slice": index, "file_axis": "ijk"[file_axis], "file_index": file_index,
                    "score": float(scores[index]), "percentile": float(detection.slice_percentiles[index])})
    return {
        "input": str(image.path), "kind": image.kind, "shape": list(image.array.shape),
        "affine": np.round(image.affine, 6).tolist(),
        "notes": list(image.notes) + list(prepared.notes) + calibration_notes(bank, settings),
        "volume_score": detection.volume_score, "volume_percentile": detection.volume_percentile,
        "slice_axis": settings.axis,
        "slice_order": "slice i lies along the canonical (RAS) axis, from left/posterior/inferior upwards",
        "slice_scores": [round(float(s), 5) for s in scores],
        "slice_percentiles": [round(float(p), 2) for p in detection.slice_percentiles],
        "scored_slices": [int(i) for i in torch.nonzero(detection.scored).flatten()],
        "top_slices": top,
        "outputs": {k: p.name for k, p in paths.items()},
        "model": extractor.model_id, "stages": list(extractor.stages),
        "bank": {"id": str(bank.meta.get("arrays_sha256", ""))[:16], "references": len(bank),
                 "volumes": int(bank.groups.max()) + 1 if len(bank) else 0,
                 "calibration": bank.meta.get("calibration", {})},
        "settings": asdict(settings), "seed": settings.seed, "versions": versions(),
        "device": str(getattr(extractor, "device", "cpu")),
    }


def calibration_notes(bank: Bank, settings: Settings) -> list[str]:
    """A warning when this run's settings differ from those the bank was calibrated with."""
    changes = bank.calibration_changes(settings, Settings.flagged("calibrated"))
    changed = [f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()]
    if not changed:
        return []
    return ["the bank was calibrated with other settings (" + ", ".join(changed) + "); z-units and percentiles are "
            "approximate; build the bank with these settings for exact ones"]


def versions() -> dict:
    """Versions of Python and the main packages, for reports."""
    import importlib.metadata as metadata

    found = {"python": platform.python_version(), "himatch_med": __version__}
    for name in ("torch", "transformers", "monai", "nibabel", "SimpleITK", "numpy", "scipy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def pixel_aspect(affine: np.ndarray, orientation: np.ndarray, axis: int) -> float:
    """Row over column spacing of display-oriented slices cut along canonical ``axis``.

    Args:
        affine: the file's affine; orientation: its orientation from :func:`himatch_med.volume.to_canonical`.
        axis: the canonical slice axis.
    """
    zooms = np.zeros(3)
    zooms[orientation[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    columns, rows = (a for a in range(3) if a != axis)  # to_slices puts the higher axis on the rows
    return float(zooms[rows] / zooms[columns])


def aspect_notes(aspect: float) -> list[str]:
    """A note when the overview cannot draw the slices' pixels to scale (:func:`himatch_med.figures.shown_aspect`)."""
    from himatch_med.figures import MAX_ASPECT, shown_aspect

    if shown_aspect(aspect) == aspect:
        return []
    how = f"{aspect:g} times taller than wide" if aspect > 1 else f"{1 / aspect:g} times wider than tall"
    return [f"the slices' pixels are {how} (from the voxel sizes in the header); the overview picture draws them "
            f"capped at {MAX_ASPECT:g}:1, so anatomy looks squeezed there; the maps are not affected; check the "
            "voxel sizes in the header"]


def overview_figure(prepared: Prepared, detection: Detection, report: dict, contours: np.ndarray | None = None,
                    aspect: float = 1.0):
    """The overview picture: the most anomalous slices with their heatmaps."""
    from himatch_med.figures import overview

    chosen = [t["slice"] for t in report["top_slices"][:OVERVIEW_SLICES]] or [len(prepared.slices) // 2]
    maps = to_slices(detection.anomaly, prepared.axis)[chosen].numpy()
    titles = [f"slice {t['file_axis']}={t['file_index']}  score {t['score']:.2f}" for t in report["top_slices"]]
    titles = (titles + [""] * len(chosen))[: len(chosen)]
    name = Path(report["input"]).name
    return overview(prepared.slices[chosen].numpy(), maps, prepared.foreground[chosen].numpy(), titles,
                    title=f"{name}: volume score {report['volume_score']:.2f} z", contours=contours, aspect=aspect)


def describe_error(path: Path, error: Exception) -> str:
    """A one-line message for a failed input, naming the file."""
    if isinstance(error, InputError):
        return str(error)
    return f"{path}: {type(error).__name__}: {error}"


__all__ = ["AXIS_INDEX", "OUTPUTS", "process", "build_bank_folder", "cached_bank", "open_bank", "load"]
