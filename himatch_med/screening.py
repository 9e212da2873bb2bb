"""Cohort screening: many studies in, one output folder each, a ranked ``scores.csv`` and a static ``report.html``.

The caller loads the :class:`~himatch_med.detect.Detector` (model and bank) once. Studies stream through a torch
``DataLoader`` whose workers read and prepare the next volumes (:func:`himatch_med.jobs.read`) while the main process
runs detection on the current one. A study that fails anywhere becomes a ``failed`` row with its error; the others
go on. A rerun skips studies whose outputs are complete and were made from the same input (path and content) with the
same model, bank and settings.

Layout of the output folder::

    scores.csv            ranked from most to least anomalous; failed studies last
    report.html           one row per study: score, percentile, thumbnail, links; failed studies with their error
    roc.png               with labels: the ROC curve of the volume scores
    <study>/              what :func:`himatch_med.jobs.analyse` writes for the study, and with the ``viewer``
                          extra its 3D viewer page ``view.html`` (:mod:`himatch_med.viewer`)
"""

from __future__ import annotations

import csv
import html
import io as text_io
import json
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from torch.utils.data import DataLoader, Dataset

from himatch_med import __version__, io, jobs, viewer
from himatch_med.bank.data import Bank
from himatch_med.config import ReadOptions, Settings
from himatch_med.detect import Detector
from himatch_med.errors import InputError
from himatch_med.report import index_ranges
from himatch_med.scoring import stable_volumes

SCORES = "scores.csv"
REPORT = "report.html"
ROC = "roc.png"
COHORT_SUFFIXES = (".csv",)


@dataclass(frozen=True)
class Study:
    """One input of a cohort: its id (names its output folder) and its file or DICOM series folder."""

    id: str
    path: Path

    @property
    def folder(self) -> str:
        """The name of the study's output folder: the id with anything but letters, digits, ``.-_`` replaced."""
        return folder_name(self.id)


@dataclass
class Result:
    """The outcome of one study: a row of ``scores.csv`` and of the report.

    ``status`` is ``ok`` (computed in this run), ``skipped`` (complete from an earlier run) or ``failed``; ``outputs``
    maps ``anomaly``, ``uncertainty``, ``overview``, ``report`` and, when written, ``view`` to paths relative to the
    screening folder; ``findings`` counts the study's findings, ``largest_finding_ml`` and ``largest_finding_peak_z``
    describe its largest (``None`` for a report made before findings existed); ``volume_score_spread`` how far the
    score moves between bank subsets, ``percentile_volumes`` the normal volumes its percentile rests on and
    ``percentile_stable`` whether they are enough, ``slivers`` the file's axis and indices of the slices too small to
    rank (``None`` for a report made before these existed).
    """

    study: Study
    status: str
    volume_score: float | None = None
    volume_percentile: float | None = None
    top_slices: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    details: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label: int | None = None
    findings: int | None = None
    largest_finding_ml: float | None = None
    largest_finding_peak_z: float | None = None
    volume_score_spread: float | None = None
    percentile_volumes: int | None = None
    percentile_stable: bool | None = None
    slivers: str | None = None


@dataclass
class Screening:
    """What a screening run did: the results ranked (failed last), counts, wall time, and the AUC with labels."""

    results: list[Result]
    seconds: float
    auc: float | None = None
    auc_note: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    def count(self, status: str) -> int:
        """How many studies ended with ``status`` (``ok``, ``skipped`` or ``failed``)."""
        return sum(r.status == status for r in self.results)

    @property
    def rate(self) -> float:
        """Studies computed per minute of this run's wall time (skipped and failed ones not counted)."""
        return 60.0 * self.count("ok") / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Loaded:
    """What a reader worker hands over: the study read and prepared, or the error that prevented it."""

    index: int
    job: jobs.Job | None
    error: str
    details: str
    seconds: float


def folder_name(study_id: str) -> str:
    """A safe folder name for a study id (path separators and other odd characters become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", study_id.strip()).strip("._") or "study"
    return name


def read_cohort(sources: list[Path]) -> list[Study]:
    """The studies of a cohort given as folders, NIfTI files, DICOM series folders or CSV files.

    A folder stands for the images and DICOM series folders in it (a folder of DICOM files is one series). A CSV has a
    ``path`` column (relative paths are relative to the CSV's folder) and an optional ``id`` column; a path in a CSV
    that does not exist is not refused here: that study fails alone, like an unreadable one.
    """
    studies = []
    for source in sources:
        if source.is_file() and source.name.lower().endswith(COHORT_SUFFIXES):
            studies.extend(_read_csv(source))
        else:
            studies.extend(Study(io.stem(p), p) for p in jobs.expand_inputs([source]))
    if not studies:
        raise InputError(f"{', '.join(map(str, sources))}: no studies found")
    seen: dict[str, Study] = {}
    for study in studies:
        other = seen.setdefault(study.folder, study)
        if other is not study:
            raise InputError(f"studies {other.path} and {study.path} would share the output folder "
                             f"{study.folder!r}; give them distinct ids (a CSV with an id column)")
    return studies


def _read_csv(path: Path) -> list[Study]:
    columns, rows = _csv_rows(path)
    if "path" not in columns:
        raise InputError(f"{path}: a cohort CSV needs a 'path' column (and optionally 'id'); its columns are "
                         f"{', '.join(columns) or 'none'}")
    studies = []
    for line, row in rows:
        text = (row.get("path") or "").strip()
        if not text:
            raise InputError(f"{path}, line {line}: the path is empty")
        study_path = Path(text).expanduser()
        if not study_path.is_absolute():
            study_path = path.absolute().parent / study_path
        studies.append(Study((row.get("id") or "").strip() or io.stem(study_path), study_path))
    return studies


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns of a CSV file and its rows, each with the number of the line it ends on (blank lines counted)."""
    try:
        text = io.read_text(path, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read as a CSV ({error})") from error
    reader = csv.DictReader(text_io.StringIO(text))
    rows = [(reader.line_num, {(k or "").strip(): v for k, v in row.items()}) for row in reader]
    return [f.strip() for f in reader.fieldnames or []], rows


def read_labels(path: Path) -> dict[str, int]:
    """Labels from a CSV with columns ``id`` and ``label`` (1 = abnormal, 0 = normal)."""
    columns, rows = _csv_rows(path)
    if not {"id", "label"} <= set(columns):
        raise InputError(f"{path}: a labels CSV needs the columns 'id' and 'label' (1 = abnormal, 0 = normal)")
    labels = {}
    for line, row in rows:
        if row["id"] is None:
            continue
        value = (row["label"] or "").strip()
        if value not in ("0", "1"):
            raise InputError(f"{path}, line {line}: label {value!r} must be 1 (abnormal) or 0 (normal)")
        labels[row["id"].strip()] = int(value)
    return labels


class StudyReader(Dataset):
    """Reads and prepares one study per item, in a worker; an error becomes part of the item, never an exception."""

    def __init__(self, studies: list[Study], settings: Settings, options: ReadOptions | None = None) -> None:
        self.studies = studies
        self.settings = settings
        self.options = options

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> Loaded:
        return read_study(self.studies[index], self.settings, self.options, index=index)


def read_study(study: Study, settings: Settings, options: ReadOptions | None = None, *, index: int = 0) -> Loaded:
    """Read and prepare one study; an error becomes part of the result, never an exception.

    Args:
        study: the study to read.
        settings: resolved settings (preset, axis, image size).
        options: how the file is read.
        index: the study's position in the caller's list, handed back in :attr:`Loaded.index`.
    """
    started = time.perf_counter()
    try:
        job = jobs.read(study.path, settings, options)
    except Exception as error:  # a reader that raises would end the whole screening
        return Loaded(index, None, jobs.describe_error(study.path, error), traceback.format_exc(),
                      time.perf_counter() - started)
    return Loaded(index, job, "", "", time.perf_counter() - started)


def _pass_through(item: Loaded) -> Loaded:
    # The default collate would turn the numpy arrays inside the job into tensors.
    return item


def screen(studies: list[Study], detector: Detector, folder: Path, *, options: ReadOptions | None = None,
           workers: int = 2, force: bool = False, labels: dict[str, int] | None = None,
           progress: bool = True) -> Screening:
    """Screen a cohort against a bank: write each study's outputs, ``scores.csv`` and ``report.html``.

    Args:
        studies: the cohort, from :func:`read_cohort`.
        detector: the extractor (or a stand-in with the same interface), the bank checked against its settings,
            and the resolved settings, loaded once.
        folder: the screening folder; each study writes into ``folder/<study folder>``.
        options: how the studies' files are read.
        workers: reader processes that prepare the next volumes while one is analysed (0: read in this process).
        force: redo every study, even those complete from an earlier run.
        labels: study id -> 1 (abnormal) or 0 (normal); adds the ROC AUC and ``roc.png``.
        progress: show progress bars (studies/s and ETA).
    """
    if workers < 0:
        raise ValueError(f"workers={workers} must be 0 or more")
    check_study_folders(folder, studies)
    started = time.perf_counter()
    results, todo = resume(studies, detector, folder, force=force)
    readers = min(workers, len(todo))
    # One volume waiting per reader bounds memory: a prepared CT volume can take a gigabyte.
    loader = DataLoader(StudyReader([studies[i] for i in todo], detector.settings, options), batch_size=None,
                        num_workers=readers, collate_fn=_pass_through, prefetch_factor=1 if readers else None)
    bar = progress_bar(len(todo), earlier=len(results), enabled=progress)
    failed = 0
    for loaded in loader:
        study = studies[todo[loaded.index]]
        result = analyse_study(study, loaded, detector, folder, progress=progress)
        results[todo[loaded.index]] = result
        failed += result.status == "failed"
        bar.update()
        if failed:
            bar.set_postfix(failed=failed)
    bar.close()
    return conclude(studies, results, time.perf_counter() - started, detector, folder, labels=labels)


def resume(studies: list[Study], detector: Detector, folder: Path, *, force: bool = False
           ) -> tuple[dict[int, Result], list[int]]:
    """Split a cohort into the studies complete from an earlier run and those to compute.

    Returns:
        The ``skipped`` results by position in ``studies`` (none with ``force``), and the positions to compute.
    """
    results: dict[int, Result] = {}
    todo = []
    for index, study in enumerate(studies):
        previous = None if force else finished(study, folder, detector)
        if previous is not None:
            results[index] = previous
        else:
            todo.append(index)
    return results, todo


def progress_bar(total: int, *, earlier: int, enabled: bool, desc: str = "screening"):
    """The screening's progress bar over ``total`` studies to compute (studies/s and ETA)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="study", desc=desc, disable=not enabled, dynamic_ncols=True)
    if earlier:
        bar.set_postfix_str(f"{earlier} complete from an earlier run")
    return bar


def conclude(studies: list[Study], results: dict[int, Result], seconds: float, detector: Detector, folder: Path, *,
             labels: dict[str, int] | None = None) -> Screening:
    """Rank the results of every study, add the AUC with labels, and write ``scores.csv`` and ``report.html``.

    Args:
        studies: the cohort.
        results: one result per position in ``studies``.
        seconds: the run's wall time.
        detector: the run's detector (its model id, bank id and bank size go into the report; it is never run).
        folder: the screening folder.
        labels: study id -> 1 (abnormal) or 0 (normal); adds the ROC AUC and ``roc.png``.
    """
    if labels is not None:
        for result in results.values():
            result.label = labels.get(result.study.id)
    screening = Screening(ranked([results[i] for i in range(len(studies))]), seconds)
    if labels is not None:
        screening.auc, screening.auc_note = _auc(screening.results, labels, folder / ROC)
        if screening.auc is not None:
            screening.files["roc"] = folder / ROC
    screening.files["scores"] = write_scores(screening, folder / SCORES)
    screening.files["report"] = write_report(screening, folder / REPORT, detector=detector)
    return screening


def check_study_folders(folder: Path, studies: list[Study]) -> None:
    """Refuse a screening folder that cannot be written, or study folders that would lie on or above an input."""
    jobs.check_output_folder(folder, [])
    for study in studies:
        target = (folder / study.folder).resolve()
        source = study.path.resolve()
        if target == source or target in source.parents:
            raise InputError(f"{folder / study.folder}: writing the outputs of {study.path} there would mix them with "
                             "the inputs; choose another output folder with -o")


def finished(study: Study, folder: Path, detector: Detector) -> Result | None:
    """The study's result read back from an earlier run; None when it must be (re)done.

    A study must be redone when its outputs are incomplete (the report, placed last, is missing, damaged or not a
    report), when its input is not the file the report was made from (another path, or other content:
    :func:`himatch_med.io.same_source`), or when they were made with another model, bank or settings.
    """
    target = folder / study.folder
    report = jobs.complete_report(study.path, target)
    if report is None or not _well_formed(report) or not io.same_source(report["source"], study.path):
        return None
    if not _same_run(report, detector):
        return None
    note = viewer.add_page(target, report, title=study.id, replace=False)  # e.g. the extra installed since
    result = _from_report(study, report, folder, "skipped")
    result.notes += [note] if note else []
    return result


REPORT_FIELDS = {"source": dict, "model": str, "stages": list, "bank": dict, "settings": dict, "outputs": dict,
                 "top_slices": list, "notes": list, "timings_seconds": dict}
"""What a report read back from an earlier run must hold, and of which type, to be taken as done."""


def _well_formed(report: dict) -> bool:
    # An earlier report.json is data of unknown shape (damaged, edited, another version): anything that is not a
    # report as this version writes it makes the study be redone, never the rerun fail.
    if not all(isinstance(report.get(key), kind) for key, kind in REPORT_FIELDS.items()):
        return False
    def number(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return (all(value is None or number(value) for value in (report.get("volume_score"),
                                                              report.get("volume_percentile")))
            and all(number(v) for v in report["timings_seconds"].values())
            and all(isinstance(v, str) for v in (*report["outputs"].values(), *report["notes"])))


def _same_run(report: dict, detector: Detector) -> bool:
    # Speed-only settings change no result: a study made with other values of them is still up to date.
    speed = Settings.flagged("speed")
    recorded = {k: v for k, v in report["settings"].items() if k not in speed}
    extractor = detector.extractor
    return (report["model"] == extractor.model_id and report["stages"] == list(extractor.stages)
            and report["bank"].get("id") == detector.bank.id
            and recorded == json.loads(json.dumps(detector.settings.results_fields())))


def _from_report(study: Study, report: dict, folder: Path, status: str) -> Result:
    outputs = {key: f"{study.folder}/{name}" for key, name in report["outputs"].items()}
    if (folder / study.folder / viewer.PAGE).is_file():
        outputs["view"] = f"{study.folder}/{viewer.PAGE}"
    percentile = report.get("volume_percentile")
    basis = report.get("percentile_basis") if isinstance(report.get("percentile_basis"), dict) else {}
    volumes = basis.get("normal_volumes")
    stable = basis.get("stable")
    slivers = report.get("slivers") if isinstance(report.get("slivers"), dict) else {}
    indices = [i for i in slivers.get("file_indices") or [] if isinstance(i, int) and not isinstance(i, bool)] \
        if isinstance(slivers.get("file_indices"), list) else []
    found = [f for f in report.get("findings", []) if isinstance(f, dict)] if "findings" in report else None
    largest = max(found, key=lambda f: _number(f.get("volume_ml")) or 0.0) if found else None
    return Result(study, status, volume_score=_number(report.get("volume_score")),
                  volume_percentile=_number(percentile), top_slices=list(report.get("top_slices", [])),
                  seconds=round(sum(report.get("timings_seconds", {}).values()), 3), outputs=outputs,
                  notes=list(report.get("notes", [])), findings=None if found is None else len(found),
                  largest_finding_ml=None if largest is None else _number(largest.get("volume_ml")),
                  largest_finding_peak_z=None if largest is None else _number(largest.get("peak_z")),
                  volume_score_spread=_number(report.get("volume_score_spread")),
                  percentile_volumes=volumes if isinstance(volumes, int) and not isinstance(volumes, bool) else None,
                  percentile_stable=stable if isinstance(stable, bool) else None,
                  slivers=f"{slivers.get('file_axis')}={index_ranges(indices)}" if indices else
                  ("" if "slivers" in report else None))


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def analyse_study(study: Study, loaded: Loaded, detector: Detector, folder: Path, *, progress: bool = False
                  ) -> Result:
    """Detect anomalies in a study read by :func:`read_study` and write its outputs; a failure becomes a result.

    Returns:
        The study's ``ok`` result, or a ``failed`` one with the reading or analysis error (one line) and traceback.
    """
    if loaded.job is None:
        return Result(study, "failed", error=_one_line(loaded.error), details=loaded.details,
                      seconds=round(loaded.seconds, 3))
    started = time.perf_counter()
    try:
        report = jobs.analyse(loaded.job, detector, folder / study.folder, progress=progress, replaces=viewer.FILES,
                              title=study.id)
    except Exception as error:  # one failing study must not end the screening
        return Result(study, "failed", error=_one_line(jobs.describe_error(study.path, error)),
                      details=traceback.format_exc(), seconds=round(loaded.seconds + time.perf_counter() - started, 3))
    # The page shows the input as read; without the viewer extra no page is written and the input is not needed.
    image = loaded.job.scan.as_read() if viewer.available() else None
    note = viewer.add_page(folder / study.folder, report, title=study.id, image=image)
    result = _from_report(study, report, folder, "ok")
    result.notes += [note] if note else []
    return result


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ranked(results: list[Result]) -> list[Result]:
    """Results from most to least anomalous volume score; failed studies last, in their input order."""
    scored = [r for r in results if r.status != "failed"]
    scored.sort(key=lambda r: -r.volume_score if r.volume_score is not None else math.inf)
    return scored + [r for r in results if r.status == "failed"]


def _auc(results: list[Result], labels: dict[str, int], path: Path) -> tuple[float | None, str]:
    """The ROC AUC of the volume scores of the labelled studies, with ``roc.png``; None and why when it cannot be."""
    from sklearn.metrics import roc_auc_score, roc_curve

    usable = [r for r in results if r.status != "failed" and r.label is not None and r.volume_score is not None]
    unlabelled = sum(r.status != "failed" and r.label is None for r in results)
    notes = []
    if unlabelled:
        notes.append(f"{unlabelled} scored {'study has' if unlabelled == 1 else 'studies have'} no label")
    failed = sum(r.status == "failed" and r.label is not None for r in results)
    if failed:
        notes.append(f"{failed} labelled {'study' if failed == 1 else 'studies'} failed")
    truth = [r.label for r in usable]
    if len(set(truth)) < 2:
        notes.insert(0, "no AUC: the scored studies need both labels, 1 (abnormal) and 0 (normal)")
        return None, "; ".join(notes)
    scores = [r.volume_score for r in usable]
    auc = float(roc_auc_score(truth, scores))
    false_positive, true_positive, _ = roc_curve(truth, scores)
    positives = sum(truth)
    io.write_figure(roc_figure(false_positive, true_positive, auc, positives, len(truth) - positives), path)
    return auc, "; ".join(notes)


def roc_figure(false_positive, true_positive, auc: float, positives: int, negatives: int):
    """The ROC curve of the volume scores (a matplotlib figure)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6, 3.6))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="0.7", linewidth=1)
    axes.step(false_positive, true_positive, where="post", color="#b3261e", linewidth=2)
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_aspect("equal")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"ROC, volume score: AUC {auc:.3f}\n{positives} abnormal, {negatives} normal", fontsize=9)
    axes.grid(alpha=0.3)
    return figure


def _top(result: Result, count: int = 3) -> str:
    return "; ".join(f"{t.get('file_axis')}={t.get('file_index')}:{_shown(t.get('score'))}"
                     for t in _entries(result.top_slices[:count]))


def _entries(top_slices: list) -> list[dict]:
    # Top slices may come from an earlier report.json on disk: take them as data of unknown shape.
    return [t for t in top_slices if isinstance(t, dict)]


def _shown(value) -> str:
    """A score as written in the table: two decimals for a number, anything else as its text."""
    return f"{value:.2f}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _format(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""How a spreadsheet recognises a formula (or DDE command) in a cell: OWASP's list for CSV injection."""


def spreadsheet_safe(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: a leading ``'`` when it would start a formula (OWASP)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_scores(screening: Screening, path: Path) -> Path:
    """Write ``scores.csv``: one row per study, most anomalous first, failed last with their error."""
    labelled = any(r.label is not None for r in screening.results)
    buffer = text_io.StringIO()
    # Every cell quoted (OWASP): a carriage return or comma inside an id stays inside its cell.
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(["rank", "study", "volume_score", "volume_score_spread", "volume_percentile",
                     "percentile_volumes", "percentile_stable", "findings", "largest_finding_ml",
                     "largest_finding_peak_z", "top_slices", "slivers_not_ranked", "status", "error", "seconds",
                     *(["label"] if labelled else []), "input", "outputs", "notes"])
    for rank, result in enumerate(screening.results, start=1):
        # Text that comes from users or files is neutralised; the numbers written here are left as numbers.
        text = [spreadsheet_safe(value) for value in (
            result.study.id, _top(result), result.error, str(result.study.path), " | ".join(map(str, result.notes)),
            result.slivers or "")]
        writer.writerow([rank if result.status != "failed" else "", text[0],
                         _format(result.volume_score, 4), _format(result.volume_score_spread, 4),
                         _format(result.volume_percentile, 1),
                         "" if result.percentile_volumes is None else result.percentile_volumes,
                         "" if result.percentile_stable is None else "yes" if result.percentile_stable else "no",
                         "" if result.findings is None else result.findings, _format(result.largest_finding_ml, 3),
                         _format(result.largest_finding_peak_z, 2), text[1], text[5],
                         result.status, text[2], f"{result.seconds:.2f}",
                         *([("" if result.label is None else result.label)] if labelled else []),
                         text[3], f"{result.study.folder}/" if result.outputs else "", text[4]])
    return io.write_text(buffer.getvalue(), path)


def write_report(screening: Screening, path: Path, *, detector: Detector) -> Path:
    """Write ``report.html``: a static page (inline CSS, relative links, nothing fetched) over the screening."""
    page = report_html(screening, model=detector.extractor.model_id, bank=detector.bank,
                       percentile_error=detector.settings.percentile_error)
    # Pure ASCII (other characters as references): the page reads the same whatever encoding writes or serves it.
    return io.write_text(page.encode("ascii", "xmlcharrefreplace").decode("ascii"), path)


def report_html(screening: Screening, *, model: str, bank: Bank, percentile_error: float | None = None) -> str:
    """The HTML of the screening report (``percentile_error``: the setting's, default its default)."""
    error = Settings().percentile_error if percentile_error is None else percentile_error
    scored = [r for r in screening.results if r.status != "failed"]
    failed = [r for r in screening.results if r.status == "failed"]
    labelled = any(r.label is not None for r in screening.results)
    e = html.escape
    bank_id = bank.id or "in memory"
    facts = [f"<b>{len(screening.results)}</b> studies", f"<b>{screening.count('ok')}</b> computed",
             f"<b>{screening.count('skipped')}</b> from an earlier run",
             f"<b class='{'bad' if failed else ''}'>{len(failed)}</b> failed",
             f"{screening.seconds:.1f} s" + (f" ({screening.rate:.1f} studies/min)" if screening.count("ok") else "")]
    parts = [_HEAD, "<h1>Cohort screening</h1>",
             f"<p class='facts'>{' · '.join(facts)}</p>",
             f"<p class='meta'>model <code>{e(model)}</code> · bank <code>{e(bank_id)}</code> ({len(bank)} reference "
             f"slices) · himatch-med {e(__version__)} · {datetime.now():%Y-%m-%d %H:%M}</p>",
             "<p class='meta'>Score: the mean of the top 1 % of a volume's anomaly map, in z-units of the bank's "
             "normal variation (0 is typical normal tissue). Percentile: among the bank's normal volumes. "
             "Top slices: the file's own voxel axis and index, with the slice score; slivers (end slices with "
             "little foreground) are mapped but not ranked. ± : how far the score moves between banks of different "
             "subsets of the normal references. Findings: regions above the "
             "finding threshold (outlined in the pictures), with the largest one's volume and peak.</p>"]
    unstable = sorted({r.percentile_volumes for r in scored if r.percentile_stable is False
                       and r.percentile_volumes is not None})
    if unstable:
        needed = stable_volumes(error)
        parts.append(f"<p class='warn'>The percentiles rest on {', '.join(map(str, unstable))} normal volume"
                     f"{'s' if unstable != [1] else ''} only: an empirical percentile from n volumes moves in steps "
                     f"of 100/n points and has a standard error up to 50/&radic;n points; a stable one (at most "
                     f"{error:g} points) needs at least {needed} normal volumes. Build the bank "
                     "from more normal references.</p>")
    if scored and not any("view" in r.outputs for r in scored):
        parts.append(f"<p class='meta'>No 3D viewer pages: they need NiiVue, <code>{e(viewer.INSTALL)}</code>; then "
                     "run the screening again (finished studies are not recomputed, their pages are added).</p>")
    if labelled:
        parts.append("<section class='roc'>")
        if screening.auc is not None:
            parts.append(f"<img src='{quote(ROC)}' alt='ROC curve' width='260'>")
            parts.append(f"<div><p><b>ROC AUC {screening.auc:.3f}</b> of the volume scores over the labelled studies "
                         "(1 = abnormal).</p>")
        else:
            parts.append("<div>")
        if screening.auc_note:
            parts.append(f"<p class='meta'>{e(screening.auc_note)}</p>")
        parts.append("</div></section>")
    if failed:
        parts.append(f"<h2 class='bad'>Failed ({len(failed)})</h2><table class='failed'><thead><tr><th>study</th>"
                     "<th>input</th><th>error</th></tr></thead><tbody>")
        for result in failed:
            parts.append(f"<tr><td>{e(result.study.id)}</td><td><code>{e(str(result.study.path))}</code></td>"
                         f"<td class='error'>{e(result.error)}</td></tr>")
        parts.append("</tbody></table>")
    parts.append(f"<h2>Ranking ({len(scored)} studies, most anomalous first)</h2>")
    parts.append("<table><thead><tr><th>rank</th><th>study</th><th>score (z)</th><th>percentile</th>"
                 "<th>findings</th>"
                 + ("<th>label</th>" if labelled else "") + "<th>most anomalous slices</th><th>top slices</th>"
                 "<th>outputs</th></tr></thead><tbody>")
    for rank, result in enumerate(scored, start=1):
        parts.append(_row(rank, result, labelled))
    parts.append("</tbody></table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _row(rank: int, result: Result, labelled: bool) -> str:
    e = html.escape
    links = {key: quote(value) for key, value in result.outputs.items()}
    percentile = result.volume_percentile
    spread = "" if result.volume_score_spread is None else \
        f"<div class='meta'>&plusmn; {result.volume_score_spread:.2f}</div>"
    basis = "" if result.percentile_volumes is None else (
        f"<div class='{'meta' if result.percentile_stable else 'warn'}'>of {result.percentile_volumes} normal"
        f"{'' if result.percentile_stable else ', too few'}</div>")
    slivers = f"<div class='meta'>slivers not ranked: {e(result.slivers)}</div>" if result.slivers else ""
    level = "" if percentile is None else "high" if percentile >= 99 else "mid" if percentile >= 90 else ""
    label = "" if not labelled else f"<td>{_LABELS.get(result.label, '')}</td>"
    thumbnail = (f"<a href='{links['overview']}'><img class='thumb' src='{links['overview']}' loading='lazy' "
                 f"alt='overview of {e(result.study.id)}'></a>") if "overview" in links else ""
    top = "<br>".join(f"{e(str(t.get('file_axis')))}={e(str(t.get('file_index')))}: {e(_shown(t.get('score')))}"
                      for t in _entries(result.top_slices[:3]))
    outputs = " ".join(f"<a href='{links[key]}'>{name}</a>" for key, name in (
        ("view", "3D viewer"), ("report", "report"), ("anomaly", "heatmap"), ("findings", "findings"),
        ("uncertainty", "uncertainty"))
        if key in links)
    folder = quote(f"{result.study.folder}/")
    status = "" if result.status == "ok" else "<div class='meta'>from an earlier run</div>"
    status += "".join(f"<div class='note'>{e(str(note))}</div>" for note in result.notes)
    return (f"<tr><td class='num'>{rank}</td><td><a href='{folder}'><b>{e(result.study.id)}</b></a>{status}</td>"
            f"<td class='num score {level}'>{_format(result.volume_score, 2)}{spread}</td>"
            f"<td class='num'>{_format(percentile, 0)}{basis}</td><td class='top'>{_findings_cell(result)}</td>"
            f"{label}<td>{thumbnail}</td><td class='top'>{top}{slivers}</td>"
            f"<td class='links'>{outputs}<br><a href='{folder}'>folder</a></td></tr>")


def _findings_cell(result: Result) -> str:
    if result.findings is None:
        return ""
    if not result.findings or result.largest_finding_ml is None:
        return str(result.findings)
    return (f"<b>{result.findings}</b><br>largest {result.largest_finding_ml:.3g} mL<br>peak "
            f"{_format(result.largest_finding_peak_z, 1)} z")


_LABELS = {1: "abnormal", 0: "normal"}
_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Cohort screening</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 17px; margin: 20px 0 0; } h2.bad { color: #b3261e; }
.facts { font-size: 15px; margin: 4px 0; } .meta { color: #666; font-size: 12px; margin: 2px 0; }
.bad { color: #b3261e; } .note { color: #8a5300; font-size: 12px; max-width: 260px; } code { font-size: 12px; }
.warn { color: #8a5300; font-size: 12px; }
.roc { display: flex; align-items: center; gap: 16px; margin: 12px 0; }
.roc img { border: 1px solid #ddd; }
table { border-collapse: collapse; margin-top: 14px; }
th { text-align: left; font-weight: 600; background: #f2f2f4; position: sticky; top: 0; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e4e4e8; vertical-align: middle; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.score { font-weight: 600; } td.score.high { color: #b3261e; } td.score.mid { color: #c26a00; }
img.thumb { width: 440px; max-width: 45vw; height: auto; display: block; background: #000; }
td.top { font-size: 12px; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.links a { margin-right: 6px; white-space: nowrap; }
table.failed td.error { color: #b3261e; max-width: 720px; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
</style></head><body>"""
