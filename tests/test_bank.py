"""The bank: its description round-trips through bank.json, it is never changed in place, labels remove slices."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch
from conftest import OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume, save_nifti

from himatch_med import io, jobs
from himatch_med.bank.build import BankBuilder, calibrate_bank
from himatch_med.bank.data import FORMAT_VERSION, Bank, BankInfo
from himatch_med.bank.store import cached_bank, open_bank
from himatch_med.detect import batches
from himatch_med.errors import InputError
from himatch_med.run import run_parser

LABELLED = (5, 6, 7)
"""Axial slices (canonical order) of the annotated reference that hold a lesion label."""


def test_the_description_round_trips_through_bank_json(bank, stand_in, tmp_path):
    folder = io.write_bank(bank.tensors(), bank.metadata, tmp_path / "bank")
    stored = json.loads((folder / io.BANK_META).read_text())
    # io adds the checksum of the description itself; everything else is Bank.metadata's.
    assert stored.pop("meta_sha256") == io.meta_sha256(stored)
    assert stored == json.loads(json.dumps({**bank.metadata(), "arrays_sha256": stored["arrays_sha256"]}))
    assert stored["format_version"] == FORMAT_VERSION and len(stored["sources"]) == len(bank)
    assert stored["calibration"]["sampled_slices"] == len(bank.calibration_slice_scores)
    assert stored["calibration"]["volumes"] == len(bank.calibration_volume_scores) == 4
    assert {k: stored["calibration"][k] for k in SETTINGS.calibration_fields()} == json.loads(
        json.dumps(SETTINGS.calibration_fields()))
    opened = open_bank(folder, SETTINGS, stand_in)
    assert opened.id == stored["arrays_sha256"][:16] and len(opened.id) == 16
    assert opened.info == replace(bank.info, arrays_sha256=stored["arrays_sha256"])
    assert opened.metadata() == stored


def test_another_format_version_is_refused(bank, tmp_path):
    folder = io.write_bank(bank.tensors(), lambda digest: {**bank.metadata(digest), "format_version": 0},
                           tmp_path / "bank")
    with pytest.raises(InputError, match="bank format version 0 was built by an older himatch-med .* rebuild it"):
        Bank.from_stored(*io.read_bank(folder), source=str(folder))


def test_a_bank_and_its_description_cannot_be_changed_in_place(bank):
    with pytest.raises(FrozenInstanceError):
        bank.calibration_mean = torch.zeros(3)
    with pytest.raises(FrozenInstanceError):
        bank.info.calibrated_with = {}


def test_calibrating_makes_a_new_bank_and_leaves_the_old_one(stand_in, references):
    builder = BankBuilder(centroids=SETTINGS.centroids, iterations=SETTINGS.kmeans_iterations, seed=SETTINGS.seed,
                          calibration_slices=SETTINGS.calibration_slices)
    for group, path in enumerate(sorted(references.iterdir())[:2]):
        prepared = jobs.read(path, SETTINGS).prepared
        for part, features, patches in batches(stand_in, prepared, SETTINGS, torch.device("cpu")):
            builder.add(features.cls, features.layout, features.grids, patches, prepared.foreground[part],
                        prepared.positions[part], group, [{"source": str(path), "slice": i} for i in part.tolist()])
    raw = builder.bank(BankInfo(settings={"model": "stand-in"}))
    calibrated = calibrate_bank(raw, builder.samples, SETTINGS, stand_in.patch_size, torch.device("cpu"))
    assert calibrated is not raw and len(calibrated.calibration_slice_scores) > 0
    assert len(raw.calibration_slice_scores) == 0 and torch.equal(raw.calibration_std, torch.ones(3))
    assert "sampled_slices" not in raw.calibration() and calibrated.calibration()["volumes"] == 2
    # Calibration adds only the findings' threshold and the normal values it comes from (issue 13).
    assert replace(calibrated.info, findings=None) == raw.info and calibrated.cls is raw.cls
    assert raw.info.findings is None and calibrated.info.findings["threshold"] > 0


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Two references, one with a lesion label on :data:`LABELLED` slices, and their label folder."""
    root = tmp_path_factory.mktemp("annotated")
    (root / "refs").mkdir()
    (root / "labels").mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED)):
        save_nifti(as_stored(brain_volume(i, SHAPE)[0], affine), affine, root / "refs" / f"case{i}.nii.gz")
        label = np.zeros(SHAPE, np.float32)
        if i == 1:
            label[20:30, 20:30, LABELLED[0]:LABELLED[-1] + 1] = 1
        save_nifti(as_stored(label, affine), affine, root / "labels" / f"case{i}_seg.nii.gz")
    return root


def sliced(bank: Bank, name: str) -> set[int]:
    return {s["slice"] for s in bank.info.sources if s["source"].endswith(name)}


def test_reference_labels_remove_the_lesion_slices_from_the_bank(annotated, stand_in, tmp_path):
    def bank_of(*options):
        args = run_parser().parse_args(["query.nii.gz", "--references", str(annotated / "refs"), "--bank-cache",
                                        str(tmp_path / "cache"), *options])
        from himatch_med import cli

        return cli.bank_from(args, SETTINGS, stand_in)

    plain = bank_of()
    labelled = bank_of("--reference-labels", str(annotated / "labels"))
    assert set(LABELLED) <= sliced(plain, "case1.nii.gz")
    assert sliced(labelled, "case1.nii.gz") == sliced(plain, "case1.nii.gz") - set(LABELLED)
    assert sliced(labelled, "case0.nii.gz") == sliced(plain, "case0.nii.gz")  # an empty label removes nothing
    assert len(labelled) == len(plain) - len(LABELLED)


def test_a_reference_without_its_label_is_skipped_with_a_warning(annotated, stand_in, tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "case0_seg.nii.gz").write_bytes((annotated / "labels" / "case0_seg.nii.gz").read_bytes())
    bank = cached_bank([annotated / "refs"], labels, SETTINGS, stand_in, tmp_path / "cache")
    assert sliced(bank, "case1.nii.gz") == set() and sliced(bank, "case0.nii.gz")
    assert "skipping reference" in capsys.readouterr().err and "no label named like it" in bank.info.warnings[0]


def test_the_cache_ignores_speed_settings_only(annotated, stand_in, tmp_path):
    refs = [annotated / "refs"]
    first = cached_bank(refs, None, SETTINGS, stand_in, tmp_path)
    again = cached_bank(refs, None, replace(SETTINGS, batch_size=3, chunk_size=7), stand_in, tmp_path)
    assert again.id == first.id and len(list(tmp_path.iterdir())) == 1
