"""The package as people install it: the wheel and the sdist built from a clean copy of the tree, the wheel
installed (not editable) into a fresh virtual environment and run from a folder outside the clone.

The fresh environment gets the wheel with ``--no-deps`` and finds its dependencies (torch and the rest) through a
``.pth`` line naming this interpreter's site-packages, so nothing is downloaded and the test takes seconds. That line
adds a path only: this environment's own ``.pth`` files (an editable install of the clone among them) are not run
there, so ``himatch_med`` can only come from the wheel, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import FAST

import himatch_med

ROOT = Path(__file__).resolve().parents[1]
NAME = f"himatch_med-{himatch_med.__version__}"


def clean_env() -> dict[str, str]:
    """This environment without what would make the clone's code win (PYTHONPATH)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The wheel and the sdist, built from a copy of the files git tracks (or would), as a fresh clone has them."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (f"setuptools {setuptools.__version__} cannot build this package (the licence is an SPDX "
                         "expression); pip install 'setuptools>=77' (the test extra has it)")
    work = tmp_path_factory.mktemp("build")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, encoding="utf-8")
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    source = work / "src"
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = work / "dist"
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(dist), str(source)], capture_output=True, text=True, encoding="utf-8",
                           env=clean_env(), timeout=300)
    assert wheel.returncode == 0, wheel.stderr
    sdist = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
                           cwd=source, capture_output=True, text=True, encoding="utf-8", env=clean_env(), timeout=300)
    assert sdist.returncode == 0, sdist.stderr
    return dist


def test_the_wheel_holds_the_package_and_its_metadata_not_the_tests(built):
    with zipfile.ZipFile(built / f"{NAME}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"{NAME}.dist-info/METADATA").decode("utf-8")
        scripts = wheel.read(f"{NAME}.dist-info/entry_points.txt").decode("utf-8")
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "himatch_med").rglob("*.py")}
    assert package <= names, sorted(package - names)
    assert {"himatch_med/__main__.py", "himatch_med/api.py", "himatch_med/screen.py", "himatch_med/evaluate.py",
            "himatch_med/benchmark.py", f"{NAME}.dist-info/licenses/LICENSE"} <= names
    assert not [n for n in names if n.startswith(("tests/", "pipelines/", "sample_data/", "docs/"))]
    assert "himatch-med = himatch_med.__main__:main" in scripts
    assert f"Version: {himatch_med.__version__}\n" in metadata and "License-Expression: Apache-2.0\n" in metadata
    assert "Classifier: Topic :: Scientific/Engineering :: Medical Science Apps." in metadata
    assert "Project-URL: " in metadata and "faiss" not in metadata


def test_the_sdist_holds_what_its_tests_and_the_readme_need(built):
    with tarfile.open(built / f"{NAME}.tar.gz") as sdist:
        names = {n.removeprefix(f"{NAME}/") for n in sdist.getnames()}
    assert {"tests/conftest.py", "tests/test_api.py", "LICENSE", "README.md", "docs/method.md", "MANIFEST.in",
            "pipelines/screen.py", "sample_data/query.nii.gz", "sample_data/references/normal_01.nii.gz",
            "configs/metadata.json", "configs/inference.json"} <= names
    assert not [n for n in names if "__pycache__" in n]


def test_the_license_file_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_the_wheel_installed_in_a_fresh_environment_runs_from_another_folder(built, tiny_dinov3, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, encoding="utf-8", check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(built / f"{NAME}-py3-none-any.whl")],
                             capture_output=True, text=True, encoding="utf-8", env=clean_env(), timeout=300)
    assert install.returncode == 0, install.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def command(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*argv], capture_output=True, text=True, encoding="utf-8", errors="replace",
                              cwd=outside, env=clean_env(), timeout=600)

    where = command(str(python), "-c", "import himatch_med; print(himatch_med.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    version = command(str(venv / "bin" / "himatch-med"), "--version")
    assert (version.returncode, version.stdout) == (0, f"himatch-med {himatch_med.__version__}\n"), version.stderr
    helped = command(str(venv / "bin" / "himatch-med"), "run", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: himatch-med run"), helped.stderr
    # The README's first command, the sample data named by its path in the clone (it is not in the wheel), with a
    # tiny random DINOv3 instead of the gated weights: its figures say nothing about quality.
    sample = ROOT / "sample_data"
    ran = command(str(venv / "bin" / "himatch-med"), "run", str(sample / "query.nii.gz"), "--references",
                  str(sample / "references"), "--model", str(tiny_dinov3), "--bank-cache", str(tmp_path / "cache"),
                  "--device", "cpu", "-q", "-o", "results", *FAST)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(f"{sample / 'query.nii.gz'}: volume score ")
    assert (outside / "results" / "query_anomaly.nii.gz").is_file()
    assert (outside / "results" / "query_report.json").is_file()
