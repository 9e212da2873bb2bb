"""The command line as a user runs it: outputs on the input's grid, banks, clear errors."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import FAST, brain_volume

from himatch_med.run import main


def test_heatmap_lies_on_the_input_grid_with_its_header(cohort, tiny_bank, tiny_dinov3, tmp_path):
    out = tmp_path / "out"
    code = main([str(cohort / "query.nii.gz"), "--bank", str(tiny_bank), "--model", str(tiny_dinov3), "-o", str(out), *FAST])
    assert code == 0
    source = nib.load(cohort / "query.nii.gz")
    for name in ("query_anomaly.nii.gz", "query_uncertainty.nii.gz", "query_anomaly_overlay.nii.gz",
                 "query_findings.nii.gz"):
        heat = nib.load(out / name)
        assert heat.shape == source.shape
        assert heat.get_data_dtype() == (np.uint8 if "findings" in name else np.float32)
        np.testing.assert_array_equal(heat.affine, source.affine)
        for coded in ("get_qform", "get_sform"):
            mine, theirs = getattr(heat.header, coded)(coded=True), getattr(source.header, coded)(coded=True)
            np.testing.assert_array_equal(mine[0], theirs[0])
            assert mine[1] == theirs[1]
        for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "pixdim", "xyzt_units", "descrip"):
            assert np.array_equal(heat.header[field], source.header[field]), field
        assert np.isfinite(heat.get_fdata()).all() or "overlay" in name  # the overlay is NaN below the threshold
    report = json.loads((out / "query_report.json").read_text())
    assert report["model"] == str(tiny_dinov3) and report["bank"]["references"] > 0
    assert len(report["slice_scores"]) == source.shape[2]  # OBLIQUE stores the axial axis along k
    assert (out / "query_overview.png").stat().st_size > 1000
    assert not list(out.glob(".*part*"))


def test_references_build_a_cached_bank_once(cohort, tiny_dinov3, tmp_path):
    args = [str(cohort / "query.nii.gz"), "--references", str(cohort / "refs"), "--model", str(tiny_dinov3),
            "--bank-cache", str(tmp_path / "cache"), "-o", str(tmp_path / "out"), *FAST]
    assert main(args) == 0
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    stamp = (cached[0] / "bank.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (cached[0] / "bank.json").stat().st_mtime_ns == stamp


def test_a_bank_built_with_other_settings_is_refused(cohort, tiny_bank, tiny_dinov3, tmp_path, capsys):
    code = main([str(cohort / "query.nii.gz"), "--bank", str(tiny_bank), "--model", str(tiny_dinov3), "-o",
                 str(tmp_path), *FAST[:1], "48", *FAST[2:]])
    assert code == 2
    error = capsys.readouterr().err
    assert "image_size: bank has 32, this run asks for 48" in error and "Traceback" not in error
    assert not list(tmp_path.glob("*.nii.gz"))


def test_missing_weights_give_a_message_not_a_traceback(cohort, tmp_path):
    result = subprocess.run([sys.executable, "-m", "himatch_med.run", str(cohort / "query.nii.gz"), "--references",
                             str(cohort / "refs"), "--model", "facebook/dinov3-vitb16-pretrain-lvd1689m", "-o",
                             str(tmp_path)], capture_output=True, text=True, encoding="utf-8", errors="replace", env={**_env(), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "accept the licence" in result.stderr and "--model" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_setting_without_importing_torch():
    code = ("import sys\nfrom himatch_med.run import run_parser\nfrom himatch_med.bank.__main__ import bank_parser\n"
            "text = run_parser().format_help()\nbank_parser().parse_args(['build', 'x', '-o', 'y'])\n"
            "assert 'torch' not in sys.modules\nprint(text)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", env=_env())
    assert result.returncode == 0, result.stderr
    from dataclasses import fields

    from himatch_med.config import Settings
    for field in fields(Settings):
        assert "--" + field.name.replace("_", "-") in result.stdout
    assert "(default: 448)" in result.stdout and "(default: uncertainty)" in result.stdout


def test_one_bad_volume_does_not_lose_the_others(cohort, tiny_bank, tiny_dinov3, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((cohort / "query.nii.gz").read_bytes()[:200])
    out = tmp_path / "out"
    code = main([str(broken), str(cohort / "query.nii.gz"), "--bank", str(tiny_bank), "--model", str(tiny_dinov3),
                 "-o", str(out), *FAST])
    assert code == 1
    assert "broken.nii.gz: cannot be read as NIfTI" in capsys.readouterr().err
    assert (out / "query_anomaly.nii.gz").exists() and not list(out.glob("broken*"))


def test_folder_of_2d_images(tmp_path, tiny_dinov3):
    import SimpleITK as sitk

    (tmp_path / "normal").mkdir()
    for i in range(3):
        plane = (brain_volume(i, (48, 40, 3))[0][:, :, 1] * 1.5).clip(0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(plane), str(tmp_path / "normal" / f"n{i}.png"))
    plane = (brain_volume(7, (48, 40, 3), lesion=(20, 20, 1))[0][:, :, 1] * 1.5).clip(0, 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(plane), str(tmp_path / "query.png"))
    out = tmp_path / "out"
    assert main([str(tmp_path / "query.png"), "--references", str(tmp_path / "normal"), "--model", str(tiny_dinov3),
                 "--bank-cache", str(tmp_path / "cache"), "-o", str(out), *FAST]) == 0
    heat = nib.load(out / "query_anomaly.nii.gz")
    assert heat.shape == (40, 48, 1)


def _env():
    import os

    return {k: v for k, v in os.environ.items()}


def test_oct_b_scan_stack_is_cut_into_its_b_scans(tmp_path, tiny_dinov3):
    """A 3D NIfTI of OCT B-scans (width, depth, scans) with an identity affine: the B-scans are the axial slices."""
    rng = np.random.default_rng(0)

    def stack(seed):
        width, depth, scans = 64, 48, 5
        depth_axis = np.arange(depth)[None, :, None]
        surface = 20 + 4 * np.sin(np.arange(width) / 9.0 + seed)[:, None, None]
        retina = np.exp(-((depth_axis - surface) / 10.0) ** 2) * 200
        return (retina + rng.gamma(2.0, 10.0, (width, depth, scans))).astype(np.float32)

    (tmp_path / "normal").mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(stack(i), np.eye(4)), tmp_path / "normal" / f"eye{i}.nii.gz")
    nib.save(nib.Nifti1Image(stack(5), np.eye(4)), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main([str(tmp_path / "scan.nii.gz"), "--references", str(tmp_path / "normal"), "--modality", "oct",
                 "--model", str(tiny_dinov3), "--bank-cache", str(tmp_path / "cache"), "-o", str(out), *FAST,
                 "--image-size", "96"]) == 0
    report = json.loads((out / "scan_report.json").read_text())
    assert len(report["slice_scores"]) == 5 and report["settings"]["foreground"] == "otsu"
    assert nib.load(out / "scan_anomaly.nii.gz").shape == (64, 48, 5)


SLOWED = """
import sys, time
from pathlib import Path

import conftest
from himatch_med import detect, io, preflight, run

flag, where = Path(sys.argv[1]), sys.argv[2]
detect.load_extractor = lambda settings, device="auto": conftest.StandIn()
preflight.model_available = lambda model: None  # the stand-in needs no weights from the Hub


def slowed(real):
    def slow(*args, **kwargs):
        flag.touch()
        time.sleep(120)
        return real(*args, **kwargs)
    return slow


if where == "detect":
    detect.Detector.detect = slowed(detect.Detector.detect)
else:
    io.write_figure = slowed(io.write_figure)
sys.exit(run.main(sys.argv[3:]))
"""
"""``python -m himatch_med.run`` with the stand-in, stopping for two minutes in detection or in writing the picture
(when the two maps are being written beside it)."""

STAND_IN = ["--model", "stand-in", "--image-size", "64", "--centroids", "16", "--calibration-slices", "64",
            "--kmeans-iterations", "10", "--references-k", "4"]


def _slowed_run(where, flag, query, references, out, cache):
    import os
    from pathlib import Path

    tests = str(Path(__file__).parent)
    env = {**_env(), "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", SLOWED, str(flag), where, str(query), "--references",
                             str(references), "--bank-cache", str(cache), "-o", str(out), *STAND_IN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env)


def _wait_for(flag, process, seconds=120):
    import time

    deadline = time.monotonic() + seconds
    while not flag.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached the slowed step"
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["detect", "picture"])
@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_run_leaves_nothing_of_the_input_and_no_hidden_file(where, signal_name, code, cohort, tmp_path):
    import signal

    out, flag = tmp_path / "out", tmp_path / "slowed"
    process = _slowed_run(where, flag, cohort / "query.nii.gz", cohort / "refs", out, tmp_path / "cache")
    try:
        _wait_for(flag, process)
        process.send_signal(getattr(signal, signal_name))
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, err
    assert "finished outputs are kept, nothing half-written was left" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []  # no maps without their report, no .part, no lock
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]


def test_a_second_run_into_the_same_outputs_is_refused_while_the_first_writes(cohort, tmp_path, capsys, monkeypatch):
    import signal

    from conftest import StandIn

    from himatch_med import detect, preflight

    out, flag, cache = tmp_path / "out", tmp_path / "slowed", tmp_path / "cache"
    query = cohort / "query.nii.gz"
    first = _slowed_run("detect", flag, query, cohort / "refs", out, cache)
    try:
        _wait_for(flag, first)
        monkeypatch.setattr(detect, "load_extractor", lambda settings, device="auto": StandIn())
        monkeypatch.setattr(preflight, "model_available", lambda model: None)  # the stand-in needs no weights
        code = main([str(query), "--references", str(cohort / "refs"), "--bank-cache", str(cache), "-o", str(out),
                     *STAND_IN])
        err = capsys.readouterr().err
        assert code == 2  # its only input failed
        assert (f"error: {query}: another run (process {first.pid}) is writing its outputs into {out} now; wait for "
                "it to finish") in err, err
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143
    assert sorted(p.name for p in out.iterdir()) == []
