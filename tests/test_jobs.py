"""One input through: its outputs appear as a complete set or not at all, one writer at a time, with its identity.

The stand-in extractor and the conftest bank; a failure is planted where a full disk, a failed picture or an
interruption would strike.
"""

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import OBLIQUE, SHAPE, as_stored, brain_volume, save_nifti

from himatch_med import io, jobs
from himatch_med.errors import InputError
from himatch_med.scan import Scan


@pytest.fixture
def query(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    return save_nifti(as_stored(brain_volume(7, SHAPE)[0], OBLIQUE), OBLIQUE, folder / "query.nii.gz")


def listing(folder: Path) -> list[str]:
    """Every name in a folder, hidden ones included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def names(folder: Path, stem: str = "query") -> list[str]:
    return [p.name for p in jobs.output_paths(Path(f"{stem}.nii.gz"), folder).values()]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_picture_leaves_no_output_of_the_input_and_no_hidden_file(query, detector, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "write_figure", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        jobs.process(query, detector, out, progress=False)
    assert listing(out) == []


def test_a_failure_while_the_maps_are_being_written_leaves_nothing(query, detector, tmp_path, monkeypatch):
    # The maps start writing as soon as they are made, before the findings are looked for: a failure there waits for
    # them and removes them, and one in a map's writer fails the input.
    started = threading.Event()
    real_write_map = Scan.write_map

    def writing(*args, **kwargs):
        started.set()
        return real_write_map(*args, **kwargs)

    def failing_findings(*args, **kwargs):
        assert started.wait(10)  # the maps are on their way
        raise RuntimeError("findings failed")

    monkeypatch.setattr(Scan, "write_map", writing)
    monkeypatch.setattr(jobs, "find_findings", failing_findings)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="findings failed"):
        jobs.process(query, detector, out, progress=False)
    assert listing(out) == []
    # With one writer, the maps not yet being written when it fails are dropped, not written for nothing.
    release, calls = threading.Event(), []

    def held(*args, **kwargs):
        calls.append(args[2])
        started.set()
        assert release.wait(10)
        return real_write_map(*args, **kwargs)

    def failing_later(*args, **kwargs):
        assert started.wait(10)
        threading.Timer(0.5, release.set).start()  # the running write ends after the failure has been raised
        raise RuntimeError("findings failed")

    started.clear()
    monkeypatch.setattr(jobs, "MAP_WRITERS", 1)
    monkeypatch.setattr(Scan, "write_map", held)
    monkeypatch.setattr(jobs, "find_findings", failing_later)
    with pytest.raises(RuntimeError, match="findings failed"):
        jobs.process(query, detector, out, progress=False)
    assert len(calls) == 1 and listing(out) == []
    monkeypatch.undo()
    monkeypatch.setattr(Scan, "write_map", full_disk)
    with pytest.raises(OSError, match="No space left"):
        jobs.process(query, detector, out, progress=False)
    assert listing(out) == []


def test_a_failed_attempt_keeps_the_earlier_complete_set_as_it_was(query, detector, tmp_path, monkeypatch):
    out = tmp_path / "out"
    jobs.process(query, detector, out, progress=False)
    before = {name: (out / name).stat().st_ino for name in names(out)}
    monkeypatch.setattr(io, "write_figure", full_disk)
    with pytest.raises(OSError):
        jobs.process(query, detector, out, progress=False)
    # Not the new maps beside the old report: the earlier outputs, every one the file it was.
    assert {name: (out / name).stat().st_ino for name in names(out)} == before
    assert listing(out) == sorted(before)
    assert jobs.is_complete(query, out)


def test_a_failure_while_placing_the_set_removes_what_this_attempt_placed(query, detector, tmp_path, monkeypatch):
    real = os.replace

    def replace(source, target):
        if str(target).endswith("_report.json"):
            raise OSError(errno.EIO, "Input/output error")
        return real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="Input/output"):
        jobs.process(query, detector, out, progress=False)
    assert listing(out) == []


def test_leftovers_of_a_killed_attempt_are_cleared_by_the_next(query, detector, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # What a process killed outright (SIGKILL, power loss) leaves: maps without their report, temporaries, its lock.
    (out / "query_anomaly.nii.gz").write_bytes(b"an orphan map of another run")
    (out / ".query_uncertainty.nii.gz.x1y2z3.part.nii.gz").write_bytes(b"half")
    (out / ".query.lock").write_text("4242\n")
    (out / "other_anomaly.nii.gz").write_bytes(b"another input's: not touched")
    jobs.process(query, detector, out, progress=False)
    assert listing(out) == sorted([*names(out), "other_anomaly.nii.gz"])
    assert (out / "query_anomaly.nii.gz").read_bytes() != b"an orphan map of another run"


def test_a_second_writer_of_the_same_outputs_is_refused_while_the_first_works(query, detector, tmp_path,
                                                                                monkeypatch):
    out = tmp_path / "out"
    started, release = threading.Event(), threading.Event()
    real = type(detector).detect

    def slow(self, *args, **kwargs):
        if threading.current_thread().name == "first":
            started.set()
            release.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(detector), "detect", slow)
    outcome = {}

    def first():
        try:
            outcome["report"] = jobs.process(query, detector, out, progress=False)
        except Exception as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(InputError) as refused:
            jobs.process(query, detector, out, progress=False)
    finally:
        release.set()
        thread.join(60)
    message = str(refused.value)
    assert message.startswith(f"{query}: another run (process {os.getpid()}) is writing its outputs into {out}")
    assert "wait for it to finish" in message
    assert "error" not in outcome and jobs.is_complete(query, out)
    assert listing(out) == sorted(names(out))  # no lock file left behind


def test_the_report_records_the_identity_of_its_input(query, detector, tmp_path):
    report = jobs.process(query, detector, tmp_path / "out", progress=False)
    source = report["source"]
    stat = query.stat()
    assert source["path"] == str(query.resolve())
    assert (source["size"], source["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    assert source["sha256"] == io.file_sha256(query)
    assert io.read_json(tmp_path / "out" / "query_report.json")["source"] == source


def test_an_input_is_the_same_while_its_content_is(query, tmp_path, monkeypatch):
    recorded = io.source_identity(query)
    assert io.same_source(recorded, query)
    # Rewritten with the same bytes (a copy that kept the time): the checksum, computed again, decides.
    data = query.read_bytes()
    query.unlink()
    query.write_bytes(data)
    os.utime(query, ns=(recorded["mtime_ns"], recorded["mtime_ns"]))
    assert io.same_source(recorded, query)
    # Other bytes of the same size under the same time: not the same input.
    changed = bytearray(data)
    changed[-1] ^= 1
    query.write_bytes(bytes(changed))
    os.utime(query, ns=(recorded["mtime_ns"], recorded["mtime_ns"]))
    assert query.stat().st_size == recorded["size"] and not io.same_source(recorded, query)
    # Untouched since it was recorded: not read again.
    recorded = io.source_identity(query)
    monkeypatch.setattr(io, "file_sha256", full_disk)
    assert io.same_source(recorded, query)
    assert not io.same_source(recorded, tmp_path / "elsewhere.nii.gz")
    for damaged in ([], "text", {"path": 3}, {}, None):
        assert not io.same_source(damaged, query)


def test_a_dicom_folder_is_identified_by_its_file_list(tmp_path):
    from conftest import write_dicom

    folder = tmp_path / "series"
    write_dicom(folder, np.zeros((3, 8, 8)))
    recorded = io.source_identity(folder)
    assert recorded["path"] == str(folder.resolve()) and len(recorded["sha256"]) == 64
    assert io.same_source(recorded, folder)
    write_dicom(folder, np.ones((4, 8, 8)))  # a slice more, the others rewritten
    assert not io.same_source(recorded, folder)
