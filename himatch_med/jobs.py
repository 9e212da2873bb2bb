"""The job for one input, files on both ends: read and prepare it, detect, write its outputs (maps, findings, report).

:func:`read` goes from a file to a :class:`Job` (its :class:`~himatch_med.scan.Scan`, prepared slices and the
identity of the file); :func:`analyse` from a job and a :class:`~himatch_med.detect.Detector` to the files. The
command line, screening, evaluation and bank building read their inputs through :func:`read`.

The four outputs of an input are one set (:func:`himatch_med.io.write_set`): a reader finds all of them or none. They
are written under hidden temporary names while one process holds the input's lock in the output folder, and renamed
into place when all are written, the report last; a failure, Ctrl-C or SIGTERM removes what this attempt wrote.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from himatch_med import exports, findings, io
from himatch_med.config import ReadOptions, Settings
from himatch_med.detect import Detection, Detector, Prepared, prepare
from himatch_med.errors import InputError
from himatch_med.report import make_report, overview_figure
from himatch_med.scan import Scan, read_scan
from himatch_med.timing import NO_TIMER, Timer
from himatch_med.volume import from_slices, to_canonical, to_slices

OUTPUTS = ("anomaly", "uncertainty", "overview", "report")
"""Files written per input, in the order they are placed: the report last, so its presence means they are complete."""


@dataclass(frozen=True, eq=False)
class Job:
    """One input read and prepared for detection.

    ``scan``: the input as read, with the way back to its file; ``prepared``: its slices; ``seconds``: the time
    reading and preparing took; ``source``: what identifies the file's content, taken before it was read
    (:func:`himatch_med.io.source_identity`; None when that failed), which the report records.
    """

    scan: Scan
    prepared: Prepared
    seconds: float = 0.0
    source: dict | None = None


def output_paths(path: Path, folder: Path, planes: tuple[str, ...] = ()) -> dict[str, Path]:
    """Where the outputs of one input go.

    ``<name>_anomaly.nii.gz``, ``<name>_uncertainty.nii.gz``, ``<name>_overview.png``, the findings
    (:func:`himatch_med.exports.finding_paths`) and ``<name>_report.json``; with tri-planar detection (``planes``),
    each plane's own map ``<name>_anomaly_<plane>.nii.gz``. DICOM and 2D inputs also get the files their report lists
    (:func:`himatch_med.exports.write_findings`).
    """
    name = io.stem(path)
    anomaly = folder / f"{name}_anomaly.nii.gz"
    return {"anomaly": anomaly, "uncertainty": folder / f"{name}_uncertainty.nii.gz",
            **{f"anomaly_{plane}": folder / f"{name}_anomaly_{plane}.nii.gz" for plane in planes},
            "overview": folder / f"{name}_overview.png", **exports.finding_paths(anomaly),
            "report": folder / f"{name}_report.json"}


def lock_path(path: Path, folder: Path) -> Path:
    """The lock file a process holds while it writes the outputs of ``path`` into ``folder``: ``.<name>.lock``."""
    return folder / f".{io.stem(path)}.lock"


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


OUTPUT_SUFFIXES = ("_anomaly", "_uncertainty", "_findings", "_overview", "_anomaly_overlay", "_overlay",
                   "_findings_seg", "_anomaly_pm", "_anomaly_axial", "_anomaly_coronal", "_anomaly_sagittal")
"""Name endings of the maps and pictures himatch-med writes: such files are never taken as references."""


def split_outputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """``(others, outputs)``: the paths that are not maps himatch-med wrote, and those that are."""
    outputs = [p for p in paths if p.is_file() and io.stem(p).endswith(OUTPUT_SUFFIXES)]
    return [p for p in paths if p not in outputs], outputs


def check_outside_references(folder: Path, references: list[Path]) -> None:
    """Refuse an output folder inside a folder of references: its maps would become references of the next bank."""
    folder = folder.resolve()
    for parent in sorted({(p if p.is_dir() else p.parent).resolve() for p in references}):
        if folder == parent or parent in folder.parents:
            raise InputError(f"{folder}: the output folder is inside the references folder {parent}; its heatmaps "
                             "would be taken as normal references by the next bank built from it; choose an -o "
                             "outside it")


def check_output_folder(folder: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that cannot be written, or outputs that would overwrite an input."""
    try:
        io.check_writable(folder)
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


def read(path: Path, settings: Settings, options: ReadOptions | None = None, *, labels: Path | None = None,
         mask: Path | None = None, timer: Timer = NO_TIMER) -> Job:
    """Read a file and prepare it for detection.

    Args:
        path: a NIfTI file, DICOM series folder or 2D image.
        settings: resolved settings (axis, preset, foreground).
        options: how the file is read.
        labels: lesion labels on its grid: their slices are neither scored nor used as references.
        mask: a foreground mask on its grid, instead of the foreground mode.
        timer: charged with ``load`` and ``preprocess`` (benchmarks).
    """
    started = time.perf_counter()
    with timer("load"):
        try:
            # Before reading: a file replaced meanwhile is then recorded as what it was, and redone by a rerun.
            source = io.source_identity(path)
        except OSError:
            source = None  # reading it says what is wrong with it
        scan = read_scan(path, axis=settings.axis, options=options)
    excluded = scan.aligned(labels, "--reference-labels") if labels is not None else None
    foreground = scan.aligned(mask, "--mask") if mask is not None else None
    job = job_of(scan, settings, foreground=foreground, excluded=excluded, source=source, timer=timer)
    return replace(job, seconds=time.perf_counter() - started)


def job_of(scan: Scan, settings: Settings, *, foreground: np.ndarray | None = None,
           excluded: np.ndarray | None = None, source: dict | None = None, timer: Timer = NO_TIMER) -> Job:
    """Prepare a scan (read from a file, or made in memory) for detection.

    Args:
        scan: the input.
        settings: resolved settings (axis, preset, foreground).
        foreground: a canonical foreground mask, instead of the foreground mode.
        excluded: canonical voxels whose slices are neither scored nor used as references (lesion labels).
        source: what identifies the input's content (:func:`himatch_med.io.source_identity`), for the report.
        timer: charged with ``preprocess``.
    """
    started = time.perf_counter()
    with timer("preprocess"):
        prepared = prepare(torch.from_numpy(scan.canonical), settings,
                           foreground=None if foreground is None else torch.from_numpy(foreground),
                           excluded=None if excluded is None else torch.from_numpy(excluded),
                           spacing=scan.spacing() if settings.planes else None)
    if not prepared.scored.any():
        how = "the --mask" if foreground is not None else f"--foreground {settings.foreground}"
        raise InputError(f"{scan.path}: no slice has at least {settings.min_foreground:.0%} foreground under {how}; "
                         "choose another --foreground (otsu, all) or --modality, or check the file")
    return Job(scan, prepared, time.perf_counter() - started, source)


def process(path: Path, detector: Detector, folder: Path, *, options: ReadOptions | None = None,
            mask: Path | None = None, progress: bool = True) -> dict:
    """Detect anomalies in one input and write its outputs; returns the report."""
    return analyse(read(path, detector.settings, options, mask=mask), detector, folder, progress=progress)


@dataclass(frozen=True, eq=False)
class Outcome:
    """What detection found for one input, in memory, before anything is written (:func:`examine`).

    ``job`` the input; ``detection`` the detector's slice maps and scores; ``maps`` the canonical ``anomaly`` and
    ``uncertainty`` volumes, 0 outside the scored slices' foreground (numpy views of the masked slice maps, not
    contiguous: ``np.ascontiguousarray`` one for torch); ``found`` the findings on the file's grid;
    ``label_slices`` the findings cut into the prepared slices; ``report`` the report (its ``outputs`` name the files
    :func:`analyse` writes); ``seconds`` the time detection and the findings took.
    """

    job: Job
    detection: Detection
    maps: dict[str, np.ndarray]
    found: findings.Findings
    label_slices: np.ndarray
    report: dict
    seconds: float = 0.0

    def on_file_grid(self, name: str) -> np.ndarray:
        """The map ``name`` (``anomaly``, ``uncertainty``) on the file's voxel grid, as :func:`analyse` writes it."""
        return self.job.scan.to_file(self.maps[name])


def examine(job: Job, detector: Detector, *, progress: bool = True, timer: Timer = NO_TIMER,
            maps_made: Callable[[dict[str, np.ndarray]], None] | None = None) -> Outcome:
    """Detect anomalies in an input read by :func:`read` and find its findings, in memory; nothing is written.

    Args:
        job: the input read and prepared.
        detector: the extractor, bank and settings.
        progress: show a progress bar over the slices (stderr).
        timer: charged with the detector's steps and ``save`` (benchmarks).
        maps_made: called with the outcome's ``maps`` as soon as they are made, before the findings are looked for
            (:func:`analyse` starts writing them then).
    """
    from tqdm.auto import tqdm

    scan, prepared = job.scan, job.prepared
    bar = tqdm(total=int(prepared.scored.sum()), unit="slice", desc=io.stem(scan.path), leave=False,
               disable=not progress)
    started = time.perf_counter()
    try:
        detection = detector.detect(prepared, progress=bar.update, timer=timer)
    finally:
        bar.close()  # before any message: an error must not print on the bar's line
    with timer("save"):
        report = make_report(scan, prepared, detection, detector, output_paths(scan.path, Path(".")))
        # Findings and viewer-ready maps (issue 13): the logic is in findings.py and exports.py.
        # Masked as slices and stacked back as views: one pass over each map (flipping a tensor would copy it).
        inside = prepared.foreground & detection.scored[:, None, None]
        region = from_slices(inside.numpy(), prepared.axis)
        maps = {name: from_slices(torch.where(inside, getattr(detection, name), 0.0).numpy(), prepared.axis)
                for name in ("anomaly", "uncertainty")}
        if maps_made is not None:
            maps_made(maps)
        # Views on the file's grid: the findings read any strides (two copies of the volume saved, 30 ms).
        found = find_findings(scan.to_file(maps["anomaly"], order=None), scan.to_file(region, order=None), scan,
                              prepared, detector)
        report.update(exports.report_block(found, detector.settings))
        report["notes"] += list(found.notes)
        label_slices = to_slices(torch.from_numpy(to_canonical(found.labels, scan.affine)[0]), prepared.axis).numpy()
    return Outcome(job, detection, maps, found, label_slices, report, time.perf_counter() - started)


def analyse(job: Job, detector: Detector, folder: Path, *, progress: bool = True, timer: Timer = NO_TIMER,
            replaces: tuple[str, ...] = (), outcome: Outcome | None = None, title: str | None = None) -> dict:
    """Detect anomalies in an input read by :func:`read` and write its outputs; returns the report.

    The outputs are written as one set while this process holds the input's lock in ``folder``: all of them
    appear, the report last, or none (an earlier complete set then stays as it was).

    Args:
        job: the input read and prepared.
        detector: the extractor, bank and settings.
        folder: the output folder.
        progress: show a progress bar over the slices.
        timer: charged with the detector's steps and ``save`` (benchmarks).
        replaces: names of other files in ``folder`` made from the outputs (a viewer page), removed when the
            outputs are replaced so that none is left showing the earlier ones.
        outcome: what :func:`examine` found for this job with this detector, when already at hand (the Python
            API's ``save``); examined here otherwise.
        title: what the overview picture is titled with (a study id; default: the input's file name).

    Raises:
        InputError: another process is writing the outputs of this input into ``folder``.
    """
    scan, prepared = job.scan, job.prepared
    timings = {"read_prepare": job.seconds}
    paths = output_paths(scan.path, folder, detector.settings.planes)
    # The findings' threshold, known before they are found: the maps' headers and overlay are made with it.
    threshold = outcome.found.threshold if outcome is not None else run_threshold(detector)
    with io.write_set(paths, lock=lock_path(scan.path, folder), owner=str(scan.path),
                      replaces=tuple(folder / name for name in replaces)) as staged, \
            map_writers() as pool:
        # The maps are written in the pool from the moment they are made: the findings are looked for meanwhile, and
        # gzip releases the GIL, so they compress in parallel while the findings and the picture are written.
        writes = []

        def write_maps(maps: dict[str, np.ndarray]) -> None:
            """Start writing the maps; each is made ready for its file in its worker."""
            def anomaly() -> Path:
                return scan.write_map(maps["anomaly"], staged["anomaly"],
                                      display=exports.anomaly_display(maps["anomaly"], threshold))

            def uncertainty() -> Path:
                return scan.write_map(maps["uncertainty"], staged["uncertainty"],
                                      display=exports.uncertainty_display(maps["uncertainty"]))

            def overlay() -> Path:
                return scan.write_map(exports.overlay_map(maps["anomaly"], threshold), staged["anomaly_overlay"],
                                      display=exports.anomaly_display(maps["anomaly"], threshold))

            writes.extend(pool.submit(write) for write in (anomaly, uncertainty, overlay))

        if outcome is None:
            outcome = examine(job, detector, progress=progress, timer=timer, maps_made=write_maps)
        else:
            write_maps(outcome.maps)
        detection, maps, found, label_slices = outcome.detection, outcome.maps, outcome.found, outcome.label_slices
        report = {**outcome.report, "notes": list(outcome.report["notes"]),
                  "outputs": {k: p.name for k, p in paths.items()}}
        timings["detect"] = outcome.seconds
        started = time.perf_counter()
        with timer("save"):
            # Tri-planar: each plane's own map, for inspection, on the same grid as the fused one.
            if detection.planes:
                display = exports.anomaly_display(maps["anomaly"], threshold)
                region = from_slices(prepared.foreground & detection.scored[:, None, None], prepared.axis).numpy()
                writes.extend(pool.submit(scan.write_map, np.where(region, plane_map.numpy(), np.float32(0)),
                                          staged[f"anomaly_{plane}"], display=display)
                              for plane, plane_map in detection.planes.items())
            # The set's findings files go to their temporaries; the files only some kinds of input get (DICOM
            # SEG and Parametric Map, 2D PNGs) are named after the final heatmap and written whole each.
            written, notes = exports.write_findings(
                found, scan, maps["anomaly"], {**staged, "anomaly": paths["anomaly"]},
                created=exports.creation_time(), slices=prepared.slices.numpy(),
                heat_slices=detection.anomaly.numpy(), label_slices=label_slices)
            report["outputs"].update({key: paths[key].name if key in paths else path.name
                                      for key, path in written.items()})
            report["notes"] += notes
            figure = overview_figure(prepared, detection, report, aspect=scan.pixel_aspect(prepared.axis),
                                     findings=label_slices, title=title)
            io.write_figure(figure, staged["overview"])
            for write in writes:
                write.result()
        timings["write"] = time.perf_counter() - started
        report["source"] = job.source
        report["timings_seconds"] = {k: round(v, 3) for k, v in timings.items()}
        io.write_json(report, staged["report"])
    return report


@contextmanager
def map_writers() -> Iterator[ThreadPoolExecutor]:
    """The threads an input's maps are written in (:data:`MAP_WRITERS`); on leaving, they finish their writes.

    On an error (or an interruption) the writes not yet started are dropped: only the running ones are waited for,
    and then the write set removes what they wrote.
    """
    pool = ThreadPoolExecutor(max_workers=MAP_WRITERS)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run_threshold(detector: Detector) -> float | None:
    """The finding threshold of a run with ``detector``: its setting's, or its bank's (None without either)."""
    settings = detector.settings
    return findings.threshold_of(detector.bank.info.findings, fraction=settings.finding_false_positive_fraction,
                                 override=settings.finding_threshold)[0]


def find_findings(anomaly: np.ndarray, region: np.ndarray, scan: Scan, prepared: Prepared,
                  detector: Detector) -> findings.Findings:
    """The findings of one input on its file's grid, with the threshold of the run or of its bank.

    Args:
        anomaly: the heatmap on the file's grid.
        region: the voxels that may hold a finding (the scored slices' foreground), on the file's grid.
        scan: the input.
        prepared: its slices (for the slice axis).
        detector: the run's bank and settings.
    """
    settings = detector.settings
    return findings.find(anomaly, region, scan.affine, slice_axis=scan.file_slice_index(0, prepared.axis)[0],
                         record=detector.bank.info.findings, fraction=settings.finding_false_positive_fraction,
                         override=settings.finding_threshold, min_volume=settings.finding_min_volume,
                         connectivity=settings.finding_connectivity, extent=settings.finding_extent)


def clear_leftovers(path: Path, folder: Path, *, replaces: tuple[str, ...] = ()) -> None:
    """Remove what a process killed while writing the outputs of ``path`` left in ``folder``, unless one writes now.

    That is its hidden temporaries and lock, and outputs without their report.
    """
    io.clear_set(output_paths(path, folder), lock=lock_path(path, folder), owner=str(path),
                 replaces=tuple(folder / name for name in replaces))


def is_complete(path: Path, folder: Path) -> bool:
    """Whether every output of ``path`` is in ``folder`` (the report, placed last, is checked to parse)."""
    return complete_report(path, folder) is not None


def complete_report(path: Path, folder: Path) -> dict | None:
    """The report of ``path`` in ``folder``; None unless every output is there and the report parses as an object."""
    paths = output_paths(path, folder)
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        report = io.read_json(paths["report"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def describe_error(path: Path, error: Exception) -> str:
    """A one-line message for a failed input, naming the file."""
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        # The cause is where the outputs go (a full or read-only disk), not the input.
        where = Path(error.filename).parent if error.filename else "the output folder"
        return f"{path}: its outputs could not be written to {where} ({error.strerror}); free space there or choose " \
               "another -o"
    return f"{path}: {type(error).__name__}: {error}"


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
MAP_WRITERS = max(1, min(3, CORES - 1))
"""Threads writing an input's maps: one per map, leaving a core to the main thread (which looks for the findings and
draws the picture meanwhile); on two cores one writer (two made both threads wait: 0.59 against 0.53 s of writing)."""
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
"""Errors of the disk an output goes to."""
