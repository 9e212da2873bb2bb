"""Trust: the bank defines the run, nothing of the user's is lost, nothing stale or silently wrong (issue 12).

Each test here failed on the code before the fix it guards.
"""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import pytest
import torch
from conftest import FAST, LPS, as_stored, brain_volume, save_nifti

from himatch_med import io
from himatch_med.bank.__main__ import bank_main
from himatch_med.run import main


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------------
# 1. The bank defines the run


def test_a_run_on_a_bank_takes_the_bank_settings(cohort, tiny_bank, tmp_path, capsys):
    # No --model, no --image-size: both come from the bank (it was built at 32 px with the tiny model).
    code = main([str(cohort / "query.nii.gz"), "--bank", str(tiny_bank), "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "query_report.json").read_text())
    meta = json.loads((tiny_bank / io.BANK_META).read_text())
    assert report["settings"]["image_size"] == 32
    assert report["settings"]["centroids"] == meta["calibration"]["centroids"]
    assert report["model"] == meta["settings"]["model"]


def test_an_explicit_setting_that_differs_from_the_bank_is_refused(cohort, tiny_bank, tmp_path, capsys):
    code = main([str(cohort / "query.nii.gz"), "--bank", str(tiny_bank), "--image-size", "48", "-o", str(tmp_path)])
    assert code == 2
    assert "image_size: bank has 32, this run asks for 48" in capsys.readouterr().err


def test_a_bank_knows_its_model_by_its_weights_not_its_path(cohort, tiny_dinov3, tmp_path, capsys, monkeypatch):
    model = tmp_path / "models" / "model"
    shutil.copytree(tiny_dinov3, model)
    bank = tmp_path / "bank"
    assert bank_main(["build", str(cohort / "refs"), "-o", str(bank), "--model", str(model), *FAST]) == 0
    # Another spelling of the same folder is the same model.
    monkeypatch.chdir(tmp_path / "models")
    query = str(cohort / "query.nii.gz")
    assert main([query, "--bank", str(bank), "--model", "model/", "-o", str(tmp_path / "a")]) == 0
    assert main([query, "--bank", str(bank), "--model", "../models/model", "-o", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    # Other weights saved at the same path are another model.
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(1)
    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             num_register_tokens=4, patch_size=16, image_size=64)
    DINOv3ViTModel(config).save_pretrained(model)
    assert main([query, "--bank", str(bank), "-o", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert "weights" in error and "differ" in error and "Traceback" not in error
    # Weights of another width: the same clear refusal, not a shape error deep inside.
    config = DINOv3ViTConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             num_register_tokens=4, patch_size=16, image_size=64)
    DINOv3ViTModel(config).save_pretrained(model)
    assert main([query, "--bank", str(bank), "-o", str(tmp_path / "d")]) == 2
    error = capsys.readouterr().err
    assert "weights" in error and "mat1" not in error


# --------------------------------------------------------------------------------------------------------------------
# 2. Nothing of the user's is deleted or overwritten unasked


@pytest.mark.parametrize("where", ["references", "parent", "other"])
def test_bank_build_never_replaces_a_folder_that_is_not_a_bank(cohort, tiny_dinov3, tmp_path, capsys, where):
    refs = tmp_path / "project" / "normals"
    shutil.copytree(cohort / "refs", refs)
    (tmp_path / "project" / "notes.txt").write_text("mine")
    other = tmp_path / "project" / "other"
    other.mkdir()
    (other / "scan.nii.gz").write_bytes(b"keep")
    target = {"references": refs, "parent": refs.parent, "other": other}[where]
    before = _tree(tmp_path / "project")
    code = bank_main(["build", str(refs), "-o", str(target), "--model", str(tiny_dinov3), *FAST])
    assert code == 2
    assert "not a bank" in capsys.readouterr().err
    assert _tree(tmp_path / "project") == before


def test_bank_build_onto_a_file_refuses_and_hides_nothing(cohort, tiny_dinov3, tmp_path, capsys):
    target = tmp_path / "bank"
    target.write_text("a file of mine")
    assert bank_main(["build", str(cohort / "refs"), "-o", str(target), "--model", str(tiny_dinov3), *FAST]) == 2
    assert target.read_text() == "a file of mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def test_bank_build_replaces_an_earlier_bank(cohort, tiny_dinov3, tmp_path):
    target = tmp_path / "bank"
    args = ["build", str(cohort / "refs"), "-o", str(target), "--model", str(tiny_dinov3), *FAST]
    assert bank_main(args) == 0 and bank_main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def test_bank_build_into_the_current_folder_gets_a_clear_message(cohort, tiny_dinov3, tmp_path, capsys,
                                                                  monkeypatch):
    (tmp_path / "x.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert bank_main(["build", str(cohort / "refs"), "-o", ".", "--model", str(tiny_dinov3), *FAST]) == 2
    error = capsys.readouterr().err
    assert "empty name" not in error and "not a bank" in error


def test_a_run_says_when_it_replaces_earlier_outputs(cohort, tiny_bank, tmp_path, capsys):
    args = [str(cohort / "query.nii.gz"), "--bank", str(tiny_bank), "-o", str(tmp_path)]
    assert main(args) == 0
    assert "replac" not in capsys.readouterr().err
    assert main(args) == 0
    assert "replaced the earlier outputs query_*" in capsys.readouterr().err


def test_outputs_inside_the_references_are_refused(cohort, tiny_dinov3, tmp_path, capsys):
    refs = tmp_path / "refs"
    shutil.copytree(cohort / "refs", refs)
    code = main([str(cohort / "query.nii.gz"), "--references", str(refs), "--model", str(tiny_dinov3),
                 "--bank-cache", str(tmp_path / "cache"), "-o", str(refs / "results"), *FAST])
    assert code == 2
    assert "inside the references" in capsys.readouterr().err
    assert not (refs / "results").exists()


def test_the_projects_own_outputs_are_never_references(cohort, tiny_dinov3, tmp_path, capsys):
    refs = tmp_path / "refs"
    shutil.copytree(cohort / "refs", refs)
    image = nib.load(refs / "normal0.nii.gz")
    for name in ("normal0_anomaly.nii.gz", "normal0_uncertainty.nii.gz", "normal0_findings.nii.gz"):
        nib.save(image, refs / name)
    bank = tmp_path / "bank"
    assert bank_main(["build", str(refs), "-o", str(bank), "--model", str(tiny_dinov3), *FAST]) == 0
    sources = {s["source"] for s in json.loads((bank / io.BANK_META).read_text())["sources"]}
    assert {os.path.basename(s) for s in sources} == {"normal0.nii.gz", "normal1.nii.gz", "normal2.nii.gz"}
    assert "left out" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# 7. A bank is checked whole: its description is covered by the checksum, its arrays are validated on open


def test_an_edited_bank_json_is_refused(tiny_bank, tmp_path):
    from himatch_med.errors import InputError

    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank, bank)
    meta = json.loads((bank / io.BANK_META).read_text())
    meta["calibration"]["references_k"] = 99
    (bank / io.BANK_META).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="bank.json.*modified"):
        io.read_bank(bank)


def test_a_crafted_bank_with_bad_arrays_is_refused_on_open(tiny_bank, tmp_path):

    from himatch_med.bank.data import Bank
    from himatch_med.errors import InputError

    tensors, meta = io.read_bank(tiny_bank)
    one_bad_centroid = tensors["centroids"].clone()
    one_bad_centroid[-1, 1, 2, 3] = float("inf")
    for broken in ({**tensors, "cls": torch.full_like(tensors["cls"], float("nan"))},
                   {**tensors, "centroids": one_bad_centroid},
                   {**tensors, "layout": tensors["layout"][..., :5].contiguous()}):
        with pytest.raises(InputError, match="rebuild"):
            Bank.from_stored(broken, meta, source="crafted")


def test_recalibration_never_opens_a_path_because_the_bank_names_it(stand_in, tmp_path, monkeypatch):
    from dataclasses import replace

    from himatch_med.bank.store import cached_bank, calibration_samples
    from himatch_med.config import Settings
    from himatch_med.errors import InputError

    refs = tmp_path / "refs"
    refs.mkdir()
    for seed in (0, 1):
        save_nifti(as_stored(brain_volume(seed)[0], LPS), LPS, refs / f"normal{seed}.nii.gz")
    settings = Settings(model=stand_in.model_id, image_size=32, centroids=8).resolved()
    bank = cached_bank([refs], None, settings, stand_in, tmp_path / "cache")
    secret = tmp_path / "secret.nii.gz"
    save_nifti(brain_volume(5)[0], LPS, secret)
    crafted = replace(bank, info=replace(bank.info, sources=tuple({**s, "source": str(secret)}
                                                                  for s in bank.info.sources)))
    opened = []
    monkeypatch.setattr(io, "read_image", lambda path, **kw: opened.append(path))
    with pytest.raises(InputError, match="not given"):
        calibration_samples(crafted, settings, stand_in, references=[refs])
    assert opened == []


def test_a_bank_json_of_the_wrong_shape_gets_a_clear_message(tiny_bank, tmp_path):
    from himatch_med.errors import InputError

    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank, bank)
    (bank / io.BANK_META).write_text("[]")
    with pytest.raises(InputError, match="bank.json"):
        io.read_bank(bank, verify=False)


# --------------------------------------------------------------------------------------------------------------------
# 8. Messages say the real cause and the real fix


def test_an_unwritable_bank_cache_is_named_as_such(cohort, tiny_dinov3, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a cache below a file cannot be created, even by root
    code = main([str(cohort / "query.nii.gz"), "--references", str(cohort / "refs"), "--model", str(tiny_dinov3),
                 "--bank-cache", str(blocker / "cache"), "-o", str(tmp_path / "out"), *FAST])
    assert code == 2
    error = capsys.readouterr().err
    assert "--bank-cache" in error and "choose another with -o" not in error


def test_a_lone_unreadable_input_exits_2(tiny_bank, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert main([str(bad), "--bank", str(tiny_bank), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "truncated" not in error and "notes.txt" in error


def test_a_hub_id_without_network_fails_in_seconds_with_the_real_cause(monkeypatch):
    import socket
    import time

    from himatch_med import backbone, hub
    from himatch_med.errors import WeightsUnavailableError

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # a proxy would count as reachable
    monkeypatch.setattr(socket, "create_connection", no_network)
    hub.probe.cache_clear()  # an earlier answer in this process would be taken as it is
    assert "Name or service not known" in hub.unreachable()
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="cannot be reached.*check the spelling"):
        backbone.load_backbone("facebook/dinov3-vitb16-typo")
    assert time.perf_counter() - started < 20  # not half a minute of retries (imports included)


def test_a_full_disk_names_the_output_not_the_input(tmp_path):
    import errno

    from himatch_med import jobs

    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / ".query_anomaly.part.nii.gz"))
    message = jobs.describe_error(tmp_path / "query.nii.gz", error)
    assert f"written to {tmp_path / 'out'}" in message and "No space left" in message and "-o" in message


def test_cohort_csv_line_numbers_count_blank_lines(tmp_path):
    from himatch_med import screening
    from himatch_med.errors import InputError

    (tmp_path / "cohort.csv").write_text("id,path\n\na,a.nii.gz\n\nb,\n")
    with pytest.raises(InputError, match="line 5: the path is empty"):
        screening.read_cohort([tmp_path / "cohort.csv"])


def test_library_warnings_do_not_reach_the_user():
    import argparse
    import warnings

    from himatch_med import cli

    def job(args):
        with warnings.catch_warnings(record=True) as shown:  # keeps the filters in force, records what passes them
            warnings.warn("divide by zero encountered", RuntimeWarning, stacklevel=1)
        return len(shown)

    assert cli.guarded(argparse.Namespace(debug=False), job, with_settings=False) == 0
    assert cli.guarded(argparse.Namespace(debug=True), job, with_settings=False) == 1
