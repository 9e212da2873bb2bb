"""The method document tells the truth about the code: every setting, with the default the code has."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from himatch_med.config import Settings

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"


def table_rows() -> dict[str, list[str]]:
    """The settings table of docs/method.md: option -> its cells."""
    rows = {}
    for line in METHOD.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `--") and len(cells) == 5:
            rows[cells[0].strip("`")] = cells
    return rows


@pytest.mark.parametrize("setting", [f.name for f in fields(Settings)])
def test_every_setting_is_in_the_method_document_with_its_default(setting):
    rows = table_rows()
    option = "--" + setting.replace("_", "-")
    assert option in rows, f"{option} is missing from the settings table of docs/method.md"
    default = Settings.__dataclass_fields__[setting].default
    if default not in (None, ()):  # those read "modality default", "4 evenly spaced", "the bank's"
        assert rows[option][1] == f"`{default}`", f"{option}: docs/method.md says {rows[option][1]}, config.py {default}"
    flags = [flag for flag in ("bank", "built", "calibrated", "speed", "findings")
             if Settings.__dataclass_fields__[setting].metadata[flag]]
    assert all(flag in rows[option][2] for flag in flags), (option, rows[option][2], flags)


def test_the_table_names_no_setting_the_code_lacks():
    options = {"--" + f.name.replace("_", "-") for f in fields(Settings)}
    assert set(table_rows()) == options


def test_nothing_points_to_the_method_notes_outside_the_repository():
    sources = [*(ROOT / "himatch_med").rglob("*.py"), *(ROOT / "pipelines").glob("*.py"), ROOT / "README.md"]
    offenders = [str(path.relative_to(ROOT)) for path in sources
                 if re.search(r"\bMETHOD\.md\b", path.read_text(encoding="utf-8"))]
    assert offenders == []
    assert "docs/method.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_example_runs(tiny_dinov3, tmp_path):
    import os
    import subprocess
    import sys

    code = readme_example()
    # A tiny random DINOv3 instead of the gated weights, at the tests' small sizes: the numbers mean nothing.
    for real, stand in (('model="facebook/dinov3-vitb16-pretrain-lvd1689m"', f"model={str(tiny_dinov3)!r}"),
                        ("image_size=224", "image_size=32, centroids=8, calibration_slices=32, kmeans_iterations=5, "
                                           "references_k=2, device='cpu'")):
        assert code.count(real) == 1, real
        code = code.replace(real, stand)
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("volume score ") and lines[1] == "Nifti1Image (75, 93, 44)", lines
    assert lines[-2] == "query_anomaly.nii.gz" and lines[-1] == "True", lines
    assert (tmp_path / "results" / "query_report.json").is_file()
