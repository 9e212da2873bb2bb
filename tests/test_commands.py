"""The command lines: ``himatch-med COMMAND`` (and ``python -m himatch_med``) and every older entry point.

Each answers ``--help`` without importing torch, and the one command hands its arguments to the same code as the
command's own entry point (the early checks included).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import himatch_med
from himatch_med.__main__ import COMMANDS, main, usage

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "transformers", "nibabel", "SimpleITK")


def launch(target: list[str], argv: list[str]) -> tuple[int, str, str, list[str]]:
    """Run ``python -m MODULE argv`` (``target = ["-m", MODULE]``) or ``python SCRIPT argv`` in a fresh interpreter.

    Returns the exit code, stdout, stderr and the heavy modules imported by the time it exited.
    """
    if target[0] == "-m":
        start = f"runpy.run_module({target[1]!r}, run_name='__main__', alter_sys=True)"
        name = target[1]
    else:
        start = f"runpy.run_path({str(ROOT / target[0])!r}, run_name='__main__')"
        name = target[0]
    code = (f"import runpy, sys\nsys.argv = [{name!r}, *{argv!r}]\ncode = 0\ntry:\n    {start}\n"
            "except SystemExit as stop:\n    code = stop.code if isinstance(stop.code, int) else 1\n"
            "    if isinstance(stop.code, str):\n        print(stop.code, file=sys.stderr)\n"
            f"    print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    heavy = [line for line in done.stderr.splitlines() if line.startswith("HEAVY ")]
    return done.returncode, done.stdout, done.stderr, eval(heavy[-1][6:]) if heavy else ["(did not exit)"]


ENTRY_POINTS = {
    "himatch-med run": (["-m", "himatch_med"], ["run"], "--mask"),
    "himatch-med bank build": (["-m", "himatch_med"], ["bank", "build"], "--reference-labels"),
    "himatch-med screen": (["-m", "himatch_med"], ["screen"], "--engine"),
    "himatch-med evaluate bmad": (["-m", "himatch_med"], ["evaluate", "bmad"], "--holdout"),
    "himatch-med evaluate volumes": (["-m", "himatch_med"], ["evaluate", "volumes"], "--anomaly-labels"),
    "himatch-med benchmark": (["-m", "himatch_med"], ["benchmark"], "--bank-slices"),
    "python -m himatch_med.run": (["-m", "himatch_med.run"], [], "--mask"),
    "python -m himatch_med.bank build": (["-m", "himatch_med.bank"], ["build"], "--reference-labels"),
    "python pipelines/screen.py": (["pipelines/screen.py"], [], "--engine"),
    "python pipelines/evaluate.py bmad": (["pipelines/evaluate.py"], ["bmad"], "--holdout"),
    "python pipelines/benchmark.py": (["pipelines/benchmark.py"], [], "--bank-slices"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_answers_help_without_heavy_imports(entry):
    target, argv, option = ENTRY_POINTS[entry]
    code, out, err, heavy = launch(target, [*argv, "--help"])
    assert code == 0, err
    assert option in out and "usage: himatch-med" in out
    assert heavy == [], f"{entry} --help imported {heavy}"


def test_the_one_command_lists_its_commands_and_its_version():
    code, out, err, heavy = launch(["-m", "himatch_med"], ["--help"])
    assert code == 0 and heavy == [], err
    assert out == usage() and all(f"  {name} " in out for name in COMMANDS) and "docs/method.md" in out
    code, out, _, heavy = launch(["-m", "himatch_med"], ["--version"])
    assert (code, out, heavy) == (0, f"himatch-med {himatch_med.__version__}\n", [])


def test_an_unknown_or_missing_command_is_refused(capsys):
    assert main(["detect", "x.nii.gz"]) == 2
    assert "unknown command 'detect'; choose one of run, bank, screen, evaluate, benchmark" in capsys.readouterr().err
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_each_command_reaches_its_module(monkeypatch):
    import importlib

    seen = []
    for name, (module, function, _) in COMMANDS.items():
        monkeypatch.setattr(importlib.import_module(module), function,
                            lambda argv, name=name: seen.append((name, argv)) or 7)
        assert main([name, "a", "--b"]) == 7
    assert seen == [(name, ["a", "--b"]) for name in COMMANDS]


@pytest.mark.parametrize("command, argv, message", [
    ("run", ["{missing}", "--references", "{tmp}", "-o", "{tmp}/o"], "missing.nii.gz: no such file or folder"),
    ("bank", ["build", "{missing}", "-o", "{tmp}/b"], "missing.nii.gz: no such file or folder"),
    ("screen", ["{missing}", "--references", "{tmp}", "-o", "{tmp}/s"], "missing.nii.gz: no such file or folder"),
    ("evaluate", ["bmad", "{missing}", "-o", "{tmp}/e"], "missing.nii.gz: not a folder"),
    ("benchmark", ["--model", "{missing}"], "not a folder with a config.json"),
])
def test_the_one_command_runs_the_early_checks_before_heavy_imports(tmp_path, command, argv, message):
    argv = [a.format(missing=tmp_path / "missing.nii.gz", tmp=tmp_path) for a in argv]
    code, _, err, heavy = launch(["-m", "himatch_med"], [command, *argv])
    assert code in (1, 2) and message in err, err
    assert not set(heavy) & {"torch", "monai", "transformers"}, heavy


def test_the_installed_command_is_the_dispatcher():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is Python 3.11+; the package is 3.10+
    scripts = text.split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert scripts == 'himatch-med = "himatch_med.__main__:main"'


def test_quiet_and_verbose_change_stderr_only(cohort, tiny_dinov3, tmp_path, capsys):
    from conftest import FAST

    from himatch_med.run import main as run

    query = cohort / "query.nii.gz"
    args = [str(query), "--references", str(cohort / "refs"), "--model", str(tiny_dinov3), "--device", "cpu",
            "--bank-cache", str(tmp_path / "cache"), "-o", str(tmp_path / "out"), *FAST]
    assert run([*args, "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out.startswith(f"{query}: volume score ") and len(quiet.out.splitlines()) == 1
    # The query's qform and sform differ: that warning stays; no progress bar, no note.
    assert quiet.err and all(line.startswith("warning: ") for line in quiet.err.splitlines()), quiet.err
    assert "\r" not in quiet.err
    assert run(args) == 0
    plain = capsys.readouterr()
    assert plain.out.split(" (percentile")[0] == quiet.out.split(" (percentile")[0]
    assert f"note: {query}: replaced the earlier outputs query_* in {tmp_path / 'out'}" in plain.err
    assert "\r" in plain.err and "debug:" not in plain.err  # tqdm's bar
    assert run([*args, "-v"]) == 0
    verbose = capsys.readouterr()
    assert verbose.out == plain.out
    assert "debug: settings: Settings(model=" in verbose.err and "debug: model " in verbose.err
    assert "note: " in verbose.err and f"debug: {query}: read_prepare " in verbose.err


def test_quiet_and_verbose_exclude_each_other_and_every_command_has_version():
    code, _, err, _ = launch(["-m", "himatch_med"], ["run", "x.nii.gz", "--bank", "b", "-q", "-v"])
    assert code == 2 and "not allowed with argument" in err
    for argv in (["run", "--version"], ["bank", "build", "--version"], ["screen", "--version"],
                 ["evaluate", "bmad", "--version"], ["benchmark", "--version"]):
        code, out, err, heavy = launch(["-m", "himatch_med"], argv)
        assert (code, out.strip(), heavy) == (0, f"himatch-med {himatch_med.__version__}", []), (argv, err)


def test_the_benchmark_says_nothing_with_quiet_and_more_with_verbose(capfd):
    """Its figures are the JSON line on stdout whatever the chatter; -q leaves stderr empty (no bar either)."""
    import json

    from himatch_med.benchmark import main as benchmark

    tiny = ["--image-size", "32", "--slices", "8", "--in-plane", "64", "--repeats", "1", "--bank-slices", "8",
            "--device", "cpu"]
    assert benchmark([*tiny, "-q"]) == 0
    quiet = capfd.readouterr()
    figures = json.loads(quiet.out.splitlines()[-1])
    assert figures["end_to_end"]["scored_slices"] >= 1 and figures["bank_building"][0]["slices"] >= 2
    run = figures["end_to_end"]  # the fastest run's whole time against its own backbone phase
    assert 0 < run["outside_backbone_seconds"] == pytest.approx(
        run["end_to_end_seconds"] - run["phases_seconds"]["backbone"], abs=2e-3)
    assert run["ratio_to_own_backbone"] == pytest.approx(
        run["end_to_end_seconds"] / run["phases_seconds"]["backbone"], rel=0.02)  # of phases rounded to 1 ms
    assert quiet.err == ""
    assert benchmark([*tiny, "-v", "--skip-end-to-end"]) == 0
    verbose = capfd.readouterr()
    assert "settings: Settings(model=" in verbose.err and "x the backbone; phases" in verbose.err
    assert "end_to_end" not in json.loads(verbose.out.splitlines()[-1])


def test_the_benchmark_compile_trial_compiles_the_backbone_and_compares_it_with_eager(tiny_dinov3, tmp_path,
                                                                                      monkeypatch, capfd):
    """``--compile-trial`` times inductor's backbone against eager on the same batches and reports their gap."""
    import json

    import torch._dynamo

    from himatch_med.benchmark import main as benchmark

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert benchmark(["--model", str(tiny_dinov3), "--image-size", "32", "--slices", "8", "--in-plane", "64",
                      "--repeats", "1", "--bank-slices", "--skip-end-to-end", "--compile-trial", "--device", "cpu",
                      "--precision", "float32", "-q"]) == 0
    figures = json.loads(capfd.readouterr().out.splitlines()[-1])["compile"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # inductor compiled something
    assert figures["batches"] >= 1 and figures["first_pass_seconds"] > 0 and figures["compiled_seconds"] > 0
    differences = [figures["max_abs_difference"]["cls"], *figures["max_abs_difference"]["stages"]]
    assert len(differences) == 5 and max(differences) < 1e-4  # float32: the same features within rounding
    assert figures["inductor_cache"] == str(tmp_path / "inductor")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_figures_script_refuses_a_machine_without_a_gpu_and_says_where_to_run_it(tmp_path):
    """``pipelines/gpu_figures.sh`` (README, Performance) is valid bash and stops at once, writing nothing, without CUDA.

    Its full run was checked on a CPU with ``GPU_FIGURES_DEVICE=cpu GPU_FIGURES_QUICK=1`` (100 s: the compile trial
    compiles twice), too slow for this suite.
    """
    script = Path(__file__).resolve().parents[1] / "pipelines" / "gpu_figures.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), str(tmp_path / "figures")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 1 and "sees no CUDA device; run this on the GPU machine" in done.stderr
    assert list((tmp_path / "figures").iterdir()) == []
