"""Cohort screening on Ray: the same files as the local run, failures recorded, dead workers retried, resuming.

A two-CPU Ray instance is started inside the tests (loopback only, no dashboard); the model is the weight-free stand-in.
"""

import csv
import importlib.util
import json
import os
import signal
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
from conftest import FAST, LPS, OBLIQUE, PERMUTED, SETTINGS, StandIn, as_stored, brain_volume, save_nifti

ray = pytest.importorskip("ray")

from himatch_med import distributed, jobs, screening  # noqa: E402
from himatch_med.bank.build import build_bank  # noqa: E402
from himatch_med.detect import Detector  # noqa: E402
from himatch_med.errors import WeightsUnavailableError  # noqa: E402

# Smaller than the other stand-in tests (the same values as FAST): every study goes through Ray several times.
RAY_SETTINGS = replace(SETTINGS, image_size=32, centroids=8, calibration_slices=32, kmeans_iterations=5,
                       references_k=2)
RAY_SHAPE = (36, 40, 10)
STUDIES = {"normal_1": OBLIQUE, "normal_2": PERMUTED, "lesion_a": LPS, "lesion_b": OBLIQUE}
MAPS = ("anomaly", "uncertainty")


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray instance; its workers import the test modules (factories are pickled by reference)."""
    before = {name: os.environ.get(name) for name in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), before["PYTHONPATH"]]))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        # "local": a new instance even when this machine runs a Ray cluster of its own.
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
                 logging_level="ERROR", _node_ip_address="127.0.0.1")
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    (root / "refs").mkdir()
    (root / "cohort").mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS)):
        save_nifti(as_stored(brain_volume(i, RAY_SHAPE)[0], affine), affine, root / "refs" / f"ref{i}.nii.gz")
    for i, (name, affine) in enumerate(STUDIES.items()):
        lesion = (14, 20, 5) if name.startswith("lesion") else None
        array = brain_volume(50 + i, RAY_SHAPE, lesion=lesion, radius=2.5)[0]
        save_nifti(as_stored(array, affine), affine, root / "cohort" / f"{name}.nii.gz")
    (root / "cohort" / "corrupt.nii.gz").write_bytes((root / "cohort" / "normal_1.nii.gz").read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def ray_detector(root, stand_in):
    """The stand-in with a bank of this module's references and :data:`RAY_SETTINGS`."""
    references = sorted((root / "refs").iterdir())
    bank = build_bank(stand_in, ((str(p), jobs.read(p, RAY_SETTINGS).prepared) for p in references), RAY_SETTINGS)
    return Detector(stand_in, bank, RAY_SETTINGS)


@pytest.fixture(scope="module")
def studies(root):
    return screening.read_cohort([root / "cohort"])


@pytest.fixture(scope="module")
def local(root, studies, ray_detector):
    """The cohort screened by the local engine: the reference for every comparison."""
    folder = root / "local"
    screening.screen(studies, ray_detector, folder, workers=0, progress=False)
    return folder


@pytest.fixture(scope="module")
def on_ray(cluster, root, studies, ray_detector):
    """The cohort screened on Ray by two CPU actors, one of which dies on its first study (and is restarted)."""
    flag = root / "crash.flag"
    flag.write_text("the first actor call to find this file ends its process")
    folder = root / "ray"
    result = distributed.screen(studies, ray_detector, folder, factory=partial(Crashing, str(flag)), actors=2,
                                progress=False)
    return folder, result, flag


def stand_in_on(device):
    return StandIn(device=device)


class Crashing(StandIn):
    """The stand-in, but the first call in any actor that finds ``flag`` ends that actor's process."""

    def __init__(self, flag, device="cpu"):
        super().__init__(device=device)
        self.flag = Path(flag)

    def __call__(self, images):
        try:
            os.rename(self.flag, self.flag.with_suffix(".crashed"))  # atomic: exactly one caller claims the crash
        except FileNotFoundError:
            return super().__call__(images)
        os._exit(1)


class StuckInPicture(StandIn):
    """The stand-in in an actor whose overview pictures never finish: the maps get written beside, then it waits."""

    def __init__(self, flag, device="cpu"):
        super().__init__(device=device)
        from himatch_med import io

        def stuck(figure, path):
            Path(flag).touch()
            time.sleep(600)

        io.write_figure = stuck  # in the actor's process only


class Poisoned(StandIn):
    """The stand-in, but images twice as wide as high (or higher than wide) end the actor's process, every time."""

    def __init__(self, device="cpu"):
        super().__init__(device=device)

    def __call__(self, images):
        height, width = images.shape[-2:]
        if max(height, width) >= 2 * min(height, width):
            os._exit(1)
        return super().__call__(images)


def no_weights(device):
    raise WeightsUnavailableError("--model /nowhere: no such folder on this node")


def rows(folder):
    with open(folder / "scores.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def report(folder, study):
    data = json.loads((folder / study / f"{study}_report.json").read_text())
    data.pop("timings_seconds")
    return data


def assert_same_outputs(folder, reference, names):
    for name in names:
        assert report(folder, name) == report(reference, name), name
        for kind in MAPS:
            file = f"{name}/{name}_{kind}.nii.gz"
            assert (folder / file).read_bytes() == (reference / file).read_bytes(), file


def test_scores_and_heatmaps_equal_the_local_run(on_ray, local):
    folder, result, _ = on_ray
    assert rows(folder) == rows(local)
    assert result.count("ok") == len(STUDIES) and result.count("failed") == 1
    assert_same_outputs(folder, local, STUDIES)
    assert not list(folder.glob(".himatch-ray-*"))  # the shared-folder marker is cleaned up
    page = (folder / "report.html").read_text()
    assert "cannot be read as NIfTI" in page and "<b>lesion_a</b>" in page


def test_a_worker_that_dies_is_restarted_and_its_study_retried(on_ray):
    _, result, flag = on_ray
    assert not flag.exists() and flag.with_suffix(".crashed").exists()  # an actor did die, on a study
    assert result.count("ok") == len(STUDIES)  # ... which was analysed again, with the same outputs (above)


def test_a_corrupt_study_is_recorded_like_locally(on_ray):
    folder, result, _ = on_ray
    failed = [r for r in rows(folder) if r["status"] == "failed"]
    assert [r["study"] for r in failed] == ["corrupt"] and failed[0]["rank"] == ""
    assert "corrupt.nii.gz: cannot be read as NIfTI" in failed[0]["error"]
    assert "Traceback" in result.results[-1].details


def test_a_rerun_skips_finished_studies_and_redoes_a_half_written_one(cluster, on_ray, local, studies, ray_detector):
    folder, _, _ = on_ray
    (folder / "normal_2" / "normal_2_report.json").unlink()
    kept = folder / "lesion_a" / "lesion_a_anomaly.nii.gz"
    stamp = kept.stat().st_mtime_ns
    result = distributed.screen(studies, ray_detector, folder, factory=stand_in_on, actors=1, progress=False)
    status = {r.study.id: r.status for r in result.results}
    assert status == {"lesion_a": "skipped", "lesion_b": "skipped", "normal_1": "skipped", "normal_2": "ok",
                      "corrupt": "failed"}
    assert kept.stat().st_mtime_ns == stamp
    assert_same_outputs(folder, local, ["normal_2"])
    assert [r["volume_score"] for r in rows(folder)] == [r["volume_score"] for r in rows(local)]


def test_a_study_that_kills_its_worker_every_time_is_recorded_and_the_one_queued_behind_it_is_not(
        cluster, root, local, studies, ray_detector):
    poison = root / "poison" / "poison.nii.gz"
    poison.parent.mkdir()
    save_nifti(as_stored(brain_volume(70, (36, 90, 10))[0], OBLIQUE), OBLIQUE, poison)
    chosen = [s for s in studies if s.id in ("normal_1", "lesion_b")]
    chosen.insert(1, screening.Study("poison", poison))
    folder = root / "ray_poison"
    result = distributed.screen(chosen, ray_detector, folder, factory=Poisoned, actors=1, retries=0, workers=3,
                                progress=False)
    status = {r.study.id: r for r in result.results}
    assert status["poison"].status == "failed" and result.count("ok") == 2
    assert status["poison"].error == f"{poison}: the Ray worker analysing it died on each of its 1 tries"
    assert_same_outputs(folder, local, ["normal_1", "lesion_b"])


def test_an_interrupted_run_stops_its_actors_and_leaves_nothing_half_written(cluster, root, studies, ray_detector):
    flag, folder = root / "stuck.flag", root / "ray_interrupted"
    done = threading.Event()

    def interrupt():
        deadline = time.monotonic() + 120
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # the maps are being written beside the picture
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the driver

    threading.Thread(target=interrupt, daemon=True).start()
    chosen = [s for s in studies if s.id == "normal_1"]
    try:
        with pytest.raises(KeyboardInterrupt):
            distributed.screen(chosen, ray_detector, folder, factory=partial(StuckInPicture, str(flag)), actors=1,
                               progress=False)
    finally:
        done.set()
    assert flag.exists()
    # The study's folder is left empty: no maps without their report, no temporaries, no lock, no run folder.
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["normal_1"]


def test_an_actor_that_cannot_start_stops_the_run_with_its_error(cluster, root, studies, ray_detector):
    with pytest.raises(WeightsUnavailableError, match="no such folder on this node"):
        distributed.screen(studies[:1], ray_detector, root / "ray_no_weights", factory=no_weights, actors=1,
                           progress=False)


def test_an_actor_that_does_not_see_the_output_folder_says_so(cluster, tmp_path, ray_detector):
    # In this process: what a node without the shared folder would find (no run folder of the driver's).
    analyser = distributed.Analyser(stand_in_on, "cpu", [ray.put(ray_detector)], str(tmp_path),
                                    ".himatch-ray-elsewhere", os.getcwd(), None, 2)
    with pytest.raises(ValueError, match="the screening folder is not shared with node .*same path"):
        analyser.identity()


def test_the_command_line_with_engine_ray(cluster, root, tiny_dinov3, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("screen", Path(__file__).parents[1] / "pipelines" / "screen.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    common = [str(root / "cohort" / "normal_1.nii.gz"), str(root / "cohort" / "corrupt.nii.gz"), "--references",
              str(root / "refs"), "--bank-cache", str(tmp_path / "cache"), "--model", str(tiny_dinov3), "--quiet",
              "--device", "cpu", *FAST]
    assert cli.main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--actors", "1"]) == 1
    captured = capsys.readouterr()
    assert "corrupt.nii.gz: cannot be read as NIfTI" in captured.err
    assert "1 done, 0 skipped" in captured.out and "1 failed" in captured.out
    assert cli.main([*common, "-o", str(tmp_path / "local")]) == 1
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    assert_same_outputs(tmp_path / "ray", tmp_path / "local", ["normal_1"])
    assert cli.main([*common, "-o", str(tmp_path / "local"), "--actors", "2"]) == 2
    assert "--actors: only with --engine ray" in capsys.readouterr().err


def test_ray_is_imported_only_by_the_distributed_module_and_only_inside_functions():
    import ast

    project = Path(__file__).parents[1]
    for path in [*(project / "himatch_med").rglob("*.py"), *(project / "pipelines").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                   and any((alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] == "ray"
                           for alias in node.names)]
        if path.name == "distributed.py":
            assert imports and all(node.col_offset > 0 for node in imports), "ray imported at module level"
        else:
            assert not imports, f"{path.name} imports ray"


def test_the_engine_options_are_in_the_help():
    spec = importlib.util.spec_from_file_location("screen", Path(__file__).parents[1] / "pipelines" / "screen.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    text = cli.parser().format_help()
    assert "--engine {local,ray}" in text and "--address" in text and "--actors" in text and "--retries" in text


def test_options_are_checked(root, studies, ray_detector):
    with pytest.raises(ValueError, match="actors=0 must be 1 or more"):
        distributed.screen(studies, ray_detector, root / "x", factory=stand_in_on, actors=0)
    with pytest.raises(ValueError, match="retries=-1 must be 0 or more"):
        distributed.screen(studies, ray_detector, root / "x", factory=stand_in_on, retries=-1)
