"""The MONAI bundle (``configs/``): ``python -m monai.bundle run`` screens a folder of volumes with a bank.

A tiny random DINOv3 and the bank the command line builds with it: the figures say nothing about quality.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_monai_bundle_run_screens_a_folder_of_volumes(cohort, tiny_bank, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(cohort / "query.nii.gz", data / "query.nii.gz")
    shutil.copy(cohort / "refs" / "normal0.nii.gz", data / "normal0.nii.gz")
    (data / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "inference.json"),
               "--meta_file", str(ROOT / "configs" / "metadata.json"), "--bundle_root", str(ROOT),
               "--bank_dir", str(tiny_bank), "--dataset_dir", str(data), "--output_dir", str(out),
               "--device", "cpu", "--progress", "False"]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"screened 3 volumes into {out}: 2 done, 0 skipped, 1 failed" in done.stdout
    with open(out / "scores.csv", encoding="utf-8", newline="") as handle:
        rows = {row["study"]: row for row in csv.DictReader(handle)}
    assert {k: rows[k]["status"] for k in rows} == {"query": "ok", "normal0": "ok", "broken": "failed"}
    report = json.loads((out / "query" / "query_report.json").read_text(encoding="utf-8"))
    assert report["bank"]["id"] and (out / "query" / "query_anomaly.nii.gz").is_file()
    assert (out / "report.html").is_file()


def test_the_metadata_names_this_version():
    import himatch_med

    meta = json.loads((ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] == himatch_med.__version__ in meta["changelog"]
    assert meta["optional_packages_version"]["himatch-med"] == himatch_med.__version__
    assert {"inputs", "outputs"} <= set(meta["network_data_format"])
