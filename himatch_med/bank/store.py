"""Banks and files: open a stored bank, build one from reference files, cache it, recalibrate it for an evaluation.

Reference files are read through :func:`himatch_med.jobs.read`; banks are stored through
:func:`himatch_med.io.write_bank` with :meth:`~himatch_med.bank.data.Bank.metadata` as ``bank.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from himatch_med import __version__, io, jobs
from himatch_med.bank.build import Sample, bank_settings, build_planes, calibrate_bank
from himatch_med.bank.check import check_record, check_references
from himatch_med.bank.data import STORAGE_DTYPE, Bank
from himatch_med.config import ReadOptions, Settings
from himatch_med.detect import batches, device_of_extractor, matching_dtype, reference_patches
from himatch_med.errors import InputError
from himatch_med.features import Extractor
from himatch_med.readahead import read_ahead
from himatch_med.scoring import foreground_shares

LABEL_SUFFIXES = ("", "_seg", "_label", "_mask")
"""A reference ``case.nii.gz`` takes the label ``case<suffix>.nii.gz`` of ``--reference-labels``."""


def open_bank(folder: Path, settings: Settings, extractor: Extractor) -> Bank:
    """Read a bank and check it was built with this run's model, stages, image size and preset."""
    tensors, meta = io.read_bank(folder)
    bank = Bank.from_stored(tensors, meta, source=str(folder))
    bank.check(bank_settings(settings, extractor), source=str(folder))
    for plane in settings.planes:
        bank.of_plane(plane, source=str(folder))
    # On a GPU the bank moves there once; on the CPU it stays memory-mapped.
    return bank.to(device_of_extractor(extractor))


def stored_bank(folder: Path) -> Bank:
    """A stored bank as it is, checked for damage but not against a run's settings (to inspect it)."""
    tensors, meta = io.read_bank(folder)
    return Bank.from_stored(tensors, meta, source=str(folder))


def read_name_list(path: Path) -> list[str]:
    """The names in a list file: one per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = io.read_text(path)
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: the list of references to exclude cannot be read ({error}); pass a UTF-8 text "
                         "file with one reference name or path per line") from error
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def excluded_references(references: list[Path], names: list[str]) -> tuple[list[Path], list[Path]]:
    """Split references into those kept and those ``names`` exclude.

    A name matches a reference by its path (as given or resolved), its file name, or its name without the image
    suffix (:func:`himatch_med.io.stem`, the name ``bank check`` and the reports show).

    Raises:
        InputError: a name matches no reference, or a bare name matches several (give the path then).
    """
    chosen: set[Path] = set()
    for name in names:
        resolved = Path(name).expanduser().resolve()
        matches = [p for p in references if p.resolve() == resolved or str(p) == name]
        if not matches:
            matches = [p for p in references if name in (p.name, io.stem(p))]
        if not matches:
            shown = ", ".join(io.stem(p) for p in references[:5]) + (" ..." if len(references) > 5 else "")
            raise InputError(f"--exclude {name}: no reference is named so (the references are {shown}); give a "
                             "reference's path, file name or name as `bank check` shows it")
        if len(matches) > 1:
            raise InputError(f"--exclude {name}: {len(matches)} references are named so ({matches[0]}, {matches[1]}"
                             f"{' ...' if len(matches) > 2 else ''}); give the path of the one to exclude")
        chosen.update(matches)
    return [p for p in references if p not in chosen], [p for p in references if p in chosen]


LABEL_PAIRS_COLUMNS = ("image", "label")
"""Columns of a ``--reference-labels`` CSV: a reference and its label file (relative to the CSV's folder)."""


@dataclass(frozen=True)
class ReferenceLabels:
    """Where the lesion label of each annotated reference is (``--reference-labels``), in one of three forms.

    ``folder``: a folder of label files named like the references (:data:`LABEL_SUFFIXES`); ``pairs``: a CSV with
    the columns ``image,label``, one row per reference; ``beside``: a file name, found in each reference's own folder
    (per-case folders: ``case/flair.nii.gz`` with ``case/seg.nii.gz``).
    """

    kind: str
    source: Path
    pairs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, labels: Path) -> ReferenceLabels:
        """The form ``labels`` names: a CSV file, a folder, or a bare file name (``seg.nii.gz``)."""
        labels = Path(labels)
        if labels.name.lower().endswith(".csv"):
            return cls("pairs", labels, read_label_pairs(labels))
        if labels.is_dir():
            return cls("folder", labels)
        if len(labels.parts) == 1:
            return cls("beside", labels)
        raise InputError(f"{labels}: --reference-labels must be a folder of label files named like the references, "
                         "a CSV with the columns image,label, or a file name found in each reference's folder (e.g. "
                         "seg.nii.gz for case/flair.nii.gz with case/seg.nii.gz)")

    def label_for(self, path: Path) -> Path:
        """The label file of reference ``path``; :class:`InputError` naming the file and the fix when there is none."""
        if self.kind == "folder":
            return label_for(path, self.source)
        if self.kind == "beside":
            label = path.parent / self.source.name
            if not label.is_file():
                raise InputError(f"{path}: no {self.source.name} beside it in {path.parent}; put its label there, or "
                                 "pass a CSV of image,label pairs with --reference-labels")
            return label
        label = self.pairs.get(str(path.resolve()))
        if label is None:
            raise InputError(f"{path}: not listed in {self.source}; add a row '{path},<its label file>' (columns "
                             "image,label)")
        return label

    def is_label(self, path: Path) -> bool:
        """Whether ``path``, found among the references (a case folder's files), is one of the labels itself."""
        if self.kind == "beside":
            return path.name == self.source.name
        if self.kind == "pairs":
            return str(path.resolve()) in {str(label.resolve()) for label in self.pairs.values()}
        return False

    def files(self, references: list[Path]) -> list[Path]:
        """The label files of ``references`` that exist (what a cached bank's key depends on)."""
        if self.kind == "folder":
            return sorted(p for p in self.source.iterdir() if p.is_file())
        found = [self.source] if self.kind == "pairs" else []
        for path in references:
            try:
                found.append(self.label_for(path))
            except InputError:
                continue
        return [p for p in found if p.is_file()]


def read_label_pairs(path: Path) -> dict[str, Path]:
    """The ``image,label`` rows of a CSV: each resolved reference path -> its label file (both relative to the CSV).

    Raises:
        InputError: a missing file or column, an empty cell, a label file that does not exist, or a reference listed
            twice with different labels; naming the file and line.
    """
    import csv
    import io as text_io

    if not path.is_file():
        raise InputError(f"{path}: no such file; --reference-labels takes a CSV with the columns image,label")
    try:
        text = io.read_text(path, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read as a CSV ({error})") from error
    reader = csv.DictReader(text_io.StringIO(text))
    columns = [(name or "").strip() for name in reader.fieldnames or []]
    if not set(LABEL_PAIRS_COLUMNS) <= set(columns):
        raise InputError(f"{path}: a --reference-labels CSV needs the columns image,label (one row per reference and "
                         f"its label file); its columns are {', '.join(columns) or 'none'}")
    pairs: dict[str, Path] = {}
    for row in reader:
        cells = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
        image, label = cells.get("image", ""), cells.get("label", "")
        if not image and not label:
            continue
        if not image or not label:
            raise InputError(f"{path}, line {reader.line_num}: both image and label are needed (got image "
                             f"{image!r}, label {label!r})")
        image_path, label_path = (p if p.is_absolute() else path.absolute().parent / p
                                  for p in (Path(image).expanduser(), Path(label).expanduser()))
        if not label_path.exists():
            raise InputError(f"{path}, line {reader.line_num}: the label {label_path} does not exist; fix the path "
                             "(relative paths are relative to the CSV's folder)")
        key = str(image_path.resolve())
        if key in pairs and pairs[key].resolve() != label_path.resolve():
            raise InputError(f"{path}, line {reader.line_num}: {image} is listed again with another label "
                             f"({pairs[key]} and {label_path}); keep one row per reference")
        pairs[key] = label_path
    if not pairs:
        raise InputError(f"{path}: no image,label rows")
    return pairs


def reference_volumes(references: list[Path], labels: Path | ReferenceLabels | None, settings: Settings,
                      options: ReadOptions | None, warn=None):
    """Yield ``(name, prepared)`` for each readable reference.

    Unreadable references, and notes on how a reference's foreground was found, are reported through ``warn``.
    ``labels``: where the references' lesion labels are (:class:`ReferenceLabels` or the ``--reference-labels``
    path); a reference that is itself one of the labels is left out.
    """
    if labels is not None and not isinstance(labels, ReferenceLabels):
        labels = ReferenceLabels.of(labels)
    for path in references:
        if labels is not None and labels.is_label(path):
            if warn:
                warn(f"left out {path}: a label of --reference-labels, not a reference")
            continue
        label = None
        try:
            label = labels.label_for(path) if labels is not None else None
            job = jobs.read(path, settings, options, labels=label)
        except InputError as error:
            if warn:
                paired = "" if label is None else (f" (paired with the label {label}: check that they belong "
                                                   "together, or pair them in a CSV of image,label rows)")
                warn(f"skipping reference {error}{paired}")
            continue
        for note in job.prepared.notes if warn else ():
            warn(f"reference {path}: {note}")
        yield str(path.resolve()), job.prepared


def label_for(path: Path, labels: Path) -> Path:
    """The label file of reference ``path`` in the folder ``labels`` (named like it, see :data:`LABEL_SUFFIXES`)."""
    if not labels.is_dir():
        raise InputError(f"{labels}: --reference-labels must be a folder of label files named like the references")
    name = io.stem(path)
    for candidate in sorted(labels.iterdir()):
        if io.stem(candidate) in tuple(name + suffix for suffix in LABEL_SUFFIXES):
            return candidate
    raise InputError(f"{path}: no label named like it in {labels} (expected {name}.nii.gz or {name}_seg.nii.gz); "
                     "name it so, or pass a CSV of image,label pairs with --reference-labels")


def build_bank_folder(references: list[Path], labels: Path | ReferenceLabels | None, settings: Settings,
                      extractor: Extractor, folder: Path, *, options: ReadOptions | None = None, progress: bool = True,
                      exclude: list[str] | None = None) -> Path:
    """Build a bank from reference files and write it to ``folder``; skipped references are warned about.

    ``progress``: show a progress bar over the slices (stderr). ``exclude``: references to leave out
    (:func:`excluded_references`), recorded in the bank.
    """
    from tqdm.auto import tqdm

    references, left_out = jobs.split_outputs(references)
    removed: list[Path] = []
    if exclude is not None:
        references, removed = excluded_references(references, exclude)
    if not references:
        raise InputError("no reference files given" + (f" (left out {len(left_out)} himatch-med outputs)"
                                                       if left_out else ""))
    if labels is not None:
        labels = ReferenceLabels.of(labels)  # a CSV's mistakes before the work
    folder = folder.resolve()
    if folder in {p.resolve() for p in references}:
        raise InputError(f"{folder}: the bank would overwrite a reference; choose another -o")
    io.check_bank_target(folder)  # before the work, not only when writing
    jobs.check_outside_references(folder, references)
    warnings: list[str] = [f"left out {path}: a himatch-med output, not a reference" for path in left_out]
    jobs.check_output_folder(folder.parent, [])
    bar = tqdm(total=None, unit="slice", desc="building bank", leave=False, disable=not progress)
    readers: list = []
    started = time.perf_counter()
    try:
        # Skipped references and notes are reported once, from the plane the outputs show. On an accelerator the
        # next reference is read and prepared while the backbone works on this one; on the CPU the backbone uses
        # every core, and reading ahead only competes with it (8 volumes of 240 x 240 x 155 on 2 cores: 16.3-17.5 s
        # without, 17.8-20.5 s with).
        ahead = 0 if device_of_extractor(extractor).type == "cpu" else 1

        def read(plane: Settings):
            readers.append(read_ahead(reference_volumes(references, labels, plane, options,
                                                        warnings.append if plane is settings else None), depth=ahead))
            return readers[-1]

        try:
            bank = build_planes(extractor, read, settings, progress=bar.update)
        finally:
            for reader in readers:  # stopped before their warnings are read
                reader.close()
    except InputError as error:
        if warnings:
            raise InputError(f"{error}. Skipped references:\n  " + "\n  ".join(warnings)) from error
        raise
    finally:
        bar.close()
    for warning in warnings:
        logging.getLogger("himatch_med").warning("%s", warning)
    check = check_record(check_references(bank, outlier_z=settings.reference_outlier_z))
    bank = replace(bank, info=replace(bank.info, created_by=f"himatch-med {__version__}", warnings=tuple(warnings),
                                      build_seconds=round(time.perf_counter() - started, 2),
                                      excluded=None if exclude is None else tuple(str(p.resolve()) for p in removed),
                                      reference_check=check))
    return io.write_bank(bank.tensors(), bank.metadata, folder)


def reference_memory(references: list[Path], labels: Path | None, settings: Settings, extractor: Extractor, *,
                     options: ReadOptions | None = None, progress: bool = False) -> torch.Tensor:
    """AnomalyDINO's memory from reference files: :func:`himatch_med.detect.reference_patches` over them.

    A bank keeps clustered centroids, not patches, so the baseline reads its references again: one more backbone
    pass over the references (not over the test images), and a HiMatch-AD bank stays as it is.
    """
    from tqdm.auto import tqdm

    files, _ = jobs.split_outputs(jobs.expand_inputs(references))
    bar = tqdm(total=None, unit="slice", desc="anomalydino memory", leave=False, disable=not progress)
    try:
        return reference_patches(extractor, reference_volumes(files, labels, settings, options), settings,
                                 device_of_extractor(extractor), progress=bar.update)
    finally:
        bar.close()


def cached_bank(references: list[Path], labels: Path | None, settings: Settings, extractor: Extractor,
                cache: Path | None, *, options: ReadOptions | None = None, progress: bool = True) -> Bank:
    """The bank of these references and settings, built on first use and reused from the cache afterwards."""
    files = jobs.expand_inputs(references)
    key = _cache_key(files, labels, settings, extractor)
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "himatch-med" / "banks"
    try:
        io.check_writable(cache)
    except OSError as error:
        raise InputError(f"{cache}: the bank cache cannot be written ({error.strerror or error}); choose another "
                         "with --bank-cache, or build a bank once with `python -m himatch_med.bank build` "
                         "and pass it with --bank") from error
    folder = cache / key
    if not (folder / io.BANK_META).exists():
        build_bank_folder(files, labels, settings, extractor, folder, options=options, progress=progress)
    return open_bank(folder, settings, extractor)


def _cache_key(files: list[Path], labels: Path | None, settings: Settings, extractor: Extractor) -> str:
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if labels is not None:
        stamp += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in ReferenceLabels.of(labels).files(files)]
    # Findings, check and baseline settings change no reference: the bank records what any finding threshold is
    # computed from, and a baseline reads the bank as it is.
    ignored = {*Settings.flagged("findings"), *Settings.flagged("check"), *Settings.flagged("baseline")}
    relevant = {k: v for k, v in settings.results_fields().items() if k not in ignored}
    text = json.dumps([stamp, relevant, list(extractor.stages), extractor.model_id], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recalibrated(bank: Bank, rows: list[Settings], extractor: Extractor, *, references: list[Path],
                 options: ReadOptions | None = None, progress: bool = False) -> tuple[list[Bank], list[int]]:
    """The bank for each row, recalibrated for the rows whose calibrated settings differ from its own.

    Only the files among ``references`` (the ones the user gave) are read again: a path is never opened because a
    bank's metadata names it.

    Returns:
        One bank per row, and the positions of the rows that were recalibrated.
    """
    keys = tuple(k for k in bank.info.calibrated_with if k in Settings.__dataclass_fields__)
    differ = [i for i, row in enumerate(rows) if bank.calibration_changes(row, keys)]
    if not differ:
        return [bank] * len(rows), []
    samples = calibration_samples(bank, rows[0], extractor, references=references, options=options,
                                  progress=progress)
    # Tri-planar: every plane's bank is recalibrated from its own sample.
    plane_samples = {other.plane: calibration_samples(other, replace(rows[0], axis=other.plane), extractor,
                                                      references=references, options=options, progress=progress)
                     for other in bank.others}
    device = device_of_extractor(extractor)
    banks = []
    for i, row in enumerate(rows):
        if i not in differ:
            banks.append(bank)
            continue
        # An evaluation gives no spread: the subsets' calibrations would only cost time.
        quiet = replace(row, spread_replicates=0)
        dtype = matching_dtype(extractor)
        others = tuple(calibrate_bank(other, plane_samples[other.plane], replace(quiet, axis=other.plane),
                                      extractor.patch_size, device, dtype=dtype) for other in bank.others)
        calibrated = replace(calibrate_bank(bank, samples, quiet, extractor.patch_size, device, dtype=dtype),
                             others=others)
        info = replace(calibrated.info, calibrated_with={**calibrated.info.calibrated_with,
                                                         **{k: getattr(row, k) for k in keys}}, recalibrated=True)
        banks.append(replace(calibrated, info=info))
    return banks, differ


def calibration_samples(bank: Bank, settings: Settings, extractor: Extractor, *, references: list[Path],
                        options: ReadOptions | None = None, progress: bool = False) -> list[Sample]:
    """Features of a seeded sample of the bank's references, for :func:`himatch_med.bank.build.calibrate_bank`.

    At most ``settings.calibration_slices`` bank rows are drawn; only their slices go through the backbone again.
    """
    from tqdm.auto import tqdm

    sources = bank.info.sources
    if len(sources) != len(bank):
        raise RuntimeError(f"the bank lists {len(sources)} sources for {len(bank)} references")
    count = min(settings.calibration_slices, len(bank))
    drawn = np.sort(np.random.default_rng(settings.seed).choice(len(bank), size=count, replace=False))
    wanted: dict[str, dict[int, int]] = {}
    for row in drawn.tolist():
        wanted.setdefault(sources[row]["source"], {})[int(sources[row]["slice"])] = row
    given = {str(Path(p).resolve()) for p in jobs.expand_inputs(references)}
    unknown = sorted(source for source in wanted if str(Path(source).resolve()) not in given)
    if unknown:
        raise InputError(f"the bank lists references that were not given ({unknown[0]}"
                         f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}); recalibration reads only "
                         "the reference files passed with --references; pass them, or remove the cached bank")
    device = device_of_extractor(extractor)
    samples = []
    for source, slices in tqdm(wanted.items(), desc="recalibration sample", unit="file", leave=False,
                               disable=not progress):
        try:
            prepared = jobs.read(Path(source), settings, options).prepared
        except InputError as error:
            raise InputError(f"cannot recalibrate the bank for another fusion or retrieval setting: {error}; remove "
                             "the cached bank or pass --bank-cache to build a new one") from error
        shares = foreground_shares(prepared.foreground)
        chosen = torch.zeros(len(prepared.slices), dtype=torch.bool)
        chosen[list(slices)] = True
        for part, features, patches in batches(extractor, replace(prepared, scored=chosen), settings, device):
            for position, index in enumerate(part.tolist()):
                samples.append(Sample(features.cls[position].cpu(), features.layout[position].cpu(),
                                      tuple(g[position].to("cpu", STORAGE_DTYPE) for g in features.grids),
                                      patches[position].cpu(), prepared.foreground[index].cpu(),
                                      float(prepared.positions[index]), int(bank.groups[slices[index]]),
                                      slices[index], prepared.pixel_aspect, float(shares[index])))
    return samples
