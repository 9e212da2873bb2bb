"""The check of a bank's references: a reference with a planted lesion is flagged, and --exclude leaves it out."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import LESION, LPS, OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume, save_nifti

from himatch_med import io, preflight
from himatch_med.bank.__main__ import bank_main
from himatch_med.bank.check import check_references, robust_z
from himatch_med.bank.data import Bank
from himatch_med.bank.store import build_bank_folder, excluded_references, stored_bank
from himatch_med.errors import InputError

CHECKED = replace(SETTINGS, calibration_slices=256)
"""Every reference volume in the calibration sample (6 volumes of 14 slices)."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five normal references and one, ``suspect``, with a lesion brighter than any tissue."""
    folder = tmp_path_factory.mktemp("check") / "refs"
    folder.mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS, OBLIQUE, PERMUTED)):
        save_nifti(as_stored(brain_volume(i, SHAPE)[0], affine), affine, folder / f"normal{i}.nii.gz")
    suspect = brain_volume(7, SHAPE, lesion=LESION, radius=5.0)[0]
    save_nifti(as_stored(suspect, LPS), LPS, folder / "suspect.nii.gz")
    return folder


@pytest.fixture(scope="module")
def built(cohort, stand_in):
    return build_bank_folder(sorted(cohort.iterdir()), None, CHECKED, stand_in, cohort.parent / "bank")


def test_the_reference_with_a_lesion_is_flagged(built):
    bank = stored_bank(built)
    check = check_references(bank, outlier_z=CHECKED.reference_outlier_z)
    assert len(check.volumes) == 6 and not check.unchecked
    assert [io.stem(name) for name in check.flagged] == ["suspect"]
    top = check.volumes[0]
    assert io.stem(top.source) == "suspect" and top.percentile == 100.0 and top.robust_z > 3.5
    assert all(v.robust_z < 3.5 for v in check.volumes[1:])
    assert sum(v.slices for v in check.volumes) == len(bank)
    # The bank records the check made when it was built.
    recorded = bank.info.reference_check
    assert recorded["outlier_z"] == 3.5 and [io.stem(n) for n in recorded["flagged"]] == ["suspect"]


def test_bank_check_prints_and_writes_the_flagged_list(built, tmp_path, capsys):
    listed = tmp_path / "flagged.txt"
    assert bank_main(["check", str(built), "--json", str(tmp_path / "check.json"), "--flagged-list",
                      str(listed)]) == 1
    out = capsys.readouterr().out
    assert "FLAGGED" in out and "suspect.nii.gz  FLAGGED" in out and out.count("FLAGGED") == 1
    assert [io.stem(line) for line in listed.read_text(encoding="utf-8").splitlines()] == ["suspect"]
    record = json.loads((tmp_path / "check.json").read_text(encoding="utf-8"))
    assert record["outlier_z"] == 3.5 and len(record["volumes"]) == 6
    # A looser cut flags nothing more than the lesion; a cut above its robust z flags nothing.
    assert bank_main(["check", str(built), "--reference-outlier-z", "1000"]) == 0
    assert "no reference flagged" in capsys.readouterr().out


def test_exclude_leaves_the_flagged_reference_out(cohort, built, stand_in, tmp_path, capsys):
    listed = tmp_path / "flagged.txt"
    bank_main(["check", str(built), "--flagged-list", str(listed)])
    capsys.readouterr()
    names = [line for line in listed.read_text(encoding="utf-8").splitlines()]
    folder = build_bank_folder(sorted(cohort.iterdir()), None, CHECKED, stand_in, tmp_path / "clean",
                               exclude=names)
    bank = stored_bank(folder)
    assert not any(s["source"].endswith("suspect.nii.gz") for s in bank.info.sources)
    assert [io.stem(p) for p in bank.info.excluded] == ["suspect"]
    assert json.loads((folder / io.BANK_META).read_text())["excluded"] == list(bank.info.excluded)
    check = check_references(bank, outlier_z=3.5)
    assert len(check.volumes) == 5 and not check.flagged


def test_exclude_names_that_match_nothing_or_several_are_refused(cohort, tmp_path, capsys, monkeypatch):
    files = sorted(cohort.iterdir())
    kept, removed = excluded_references(files, ["suspect"])
    assert [p.name for p in removed] == ["suspect.nii.gz"] and len(kept) == 5
    assert excluded_references(files, [str(files[0]), "normal1.nii.gz"])[1] == files[:2]
    with pytest.raises(InputError, match="--exclude nobody: no reference is named so .*normal0"):
        excluded_references(files, ["nobody"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "suspect.nii.gz").write_bytes((cohort / "suspect.nii.gz").read_bytes())
    with pytest.raises(InputError, match="2 references are named so .* give the path"):
        excluded_references([*files, other / "suspect.nii.gz"], ["suspect"])
    listed = tmp_path / "list.txt"
    listed.write_text("# from bank check\nnobody\n", encoding="utf-8")
    monkeypatch.setattr(preflight, "model_available", lambda model: None)  # the stand-in needs no weights
    assert bank_main(["build", str(cohort), "-o", str(tmp_path / "b"), "--model", "stand-in",
                      "--exclude-list", str(listed)]) == 2
    assert "--exclude nobody: no reference is named so" in capsys.readouterr().err


def test_a_bank_without_volume_groups_still_opens_and_check_asks_for_a_rebuild(built, tmp_path, capsys):
    bank = stored_bank(built)
    older = replace(bank, calibration_volume_groups=None)
    assert "calibration_volume_groups" not in older.tensors()
    folder = io.write_bank(older.tensors(), older.metadata, tmp_path / "older")
    opened = Bank.from_stored(*io.read_bank(folder), source=str(folder))
    assert opened.calibration_volume_groups is None and len(opened) == len(bank)
    with pytest.raises(InputError, match="rebuild it"):
        check_references(opened, outlier_z=3.5)
    assert bank_main(["check", str(folder)]) == 2
    assert "rebuild it with `python -m himatch_med.bank build`" in capsys.readouterr().err


def test_robust_z_of_a_hand_computed_set():
    # median 2, absolute deviations 1 1 0 0 8 -> MAD 1, scale 1.4826.
    z = robust_z(torch.tensor([1.0, 3.0, 2.0, 2.0, 10.0]))
    assert torch.allclose(z, torch.tensor([-1.0, 1.0, 0.0, 0.0, 8.0]) / 1.4826)
    assert torch.equal(robust_z(torch.full((5,), 2.0)), torch.zeros(5))


def test_bank_build_ends_with_the_check_section(cohort, tiny_dinov3, tmp_path, capsys):
    from conftest import FAST

    assert bank_main(["build", str(cohort), "-o", str(tmp_path / "bank"), "--model", str(tiny_dinov3), *FAST,
                      "--calibration-slices", "256", "--exclude", "normal4"]) == 0
    out = capsys.readouterr().out
    assert "reference check: 5 volume(s)" in out and "excluded 1 reference(s)" in out
    assert "normal4" not in out.split("excluded 1 reference(s)")[1].split("\n", 1)[1]


def test_references_are_read_ahead_on_an_accelerator_only(cohort, stand_in, tmp_path, monkeypatch):
    """On the CPU the backbone has every core: references are read in the building thread. With an accelerator the
    next one is read in a background thread meanwhile; the bank is the same either way."""
    import threading

    from himatch_med import jobs
    from himatch_med.bank import store

    readers = []
    read = jobs.read

    def recording(*args, **kwargs):
        readers.append(threading.current_thread())
        return read(*args, **kwargs)

    monkeypatch.setattr(jobs, "read", recording)
    files = sorted(cohort.iterdir())[:3]
    here = stored_bank(build_bank_folder(files, None, CHECKED, stand_in, tmp_path / "cpu"))
    assert len(readers) == 3 and all(thread is threading.current_thread() for thread in readers)
    readers.clear()
    monkeypatch.setattr(store, "device_of_extractor", lambda extractor: torch.device("cuda"))
    ahead = stored_bank(build_bank_folder(files, None, CHECKED, stand_in, tmp_path / "ahead"))
    assert len(readers) == 3 and all(thread is not threading.current_thread() for thread in readers)
    for name, tensor in here.tensors().items():
        assert torch.equal(tensor, ahead.tensors()[name]), name
