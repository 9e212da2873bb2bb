"""The evaluation harness: BMAD layouts, planted lesions found at pixel level, volumes, ablation rows, outputs, CLI."""

import csv
import importlib.util
import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import FAST, LESION, LPS, OBLIQUE, PERMUTED, SETTINGS, SHAPE, StandIn, as_stored, brain_volume, save_nifti

from himatch_med import evaluation, io
from himatch_med.bank.build import calibrate_bank
from himatch_med.bank.store import cached_bank, calibration_samples
from himatch_med.config import Settings
from himatch_med.errors import InputError
from himatch_med.scan import read_scan

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SETTINGS = replace(SETTINGS, image_size=96)
"""The 2D sets' images (96 x 88) go through the backbone at about their own size."""
PLANE = (96, 88)
# Under 0.5 % of the foreground, so that the mri preset's 99.5th percentile stays in normal tissue (see test_detect).
RADIUS = 2.5


def png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array)), str(path))
    return path


def plane(seed: int, lesion: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 2D 'brain' slice as uint8 and its lesion mask."""
    volume, mask = brain_volume(seed, (*PLANE, 3), lesion=None if lesion is None else (*lesion, 1), radius=RADIUS)
    return volume[:, :, 1].clip(0, 255).astype(np.uint8), mask[:, :, 1]


def dot(path: Path, value: int = 50) -> Path:
    return png(np.full((6, 5), value, dtype=np.uint8), path)


def loader(counter: list | None = None):
    """A load function giving the stand-in (with as many stages as asked); ``counter`` collects batch sizes."""

    def load(settings, device):
        stand_in = StandIn(stages=len(settings.stages) or 3)
        return stand_in if counter is None else Counted(stand_in, counter)

    return load


class Counted:
    """The stand-in, counting the slices that go through it."""

    def __init__(self, inner: StandIn, counter: list) -> None:
        self.inner, self.counter = inner, counter
        self.model_id, self.patch_size, self.stages, self.device = (inner.model_id, inner.patch_size, inner.stages,
                                                                    inner.device)

    def __call__(self, images):
        self.counter.append(len(images))
        return self.inner(images)


# ---------------------------------------------------------------- layouts


def test_brain_layout_pairs_images_with_masks_and_reports_valid(tmp_path):
    for name in ("a", "b"):
        dot(tmp_path / "train" / "good" / f"{name}.png")
    dot(tmp_path / "test" / "good" / "img" / "g1.png")
    dot(tmp_path / "test" / "good" / "label" / "g1.png", 0)
    for name in ("u1", "u2"):
        dot(tmp_path / "test" / "Ungood" / "img" / f"{name}.png")
    dot(tmp_path / "test" / "Ungood" / "label" / "u1.png")
    dot(tmp_path / "test" / "Ungood" / "label" / "u2_mask.png")
    dot(tmp_path / "test" / "Ungood" / "label" / "unrelated.png")
    dot(tmp_path / "valid" / "Ungood" / "img" / "v.png")
    dataset = evaluation.discover(tmp_path)
    assert dataset.layout == "brain" and dataset.split == "test" and dataset.has_masks
    assert [p.name for p in dataset.references] == ["a.png", "b.png"]
    pairs = {c.path.name: (c.label, c.group, c.mask.name) for c in dataset.cases}
    assert pairs == {"g1.png": (0, "good", "g1.png"), "u1.png": (1, "Ungood", "u1.png"),
                     "u2.png": (1, "Ungood", "u2_mask.png")}
    assert dataset.summary["valid"]["Ungood"] == {"images": 1, "masks": 0}
    assert any("validation split present" in note for note in dataset.notes)
    valid = evaluation.discover(tmp_path, split="valid")
    assert [c.path.name for c in valid.cases] == ["v.png"] and valid.split == "valid"


def test_brain_layout_with_anomaly_mask_folders(tmp_path):
    dot(tmp_path / "train" / "good" / "a.png")
    dot(tmp_path / "test" / "good" / "img" / "g.png")
    dot(tmp_path / "test" / "Ungood" / "img" / "u.png")
    dot(tmp_path / "test" / "Ungood" / "anomaly_mask" / "u.png")
    dataset = evaluation.discover(tmp_path)
    masks = {c.path.name: c.mask for c in dataset.cases}
    assert dataset.layout == "brain"
    assert masks["g.png"] is None and masks["u.png"].parent.name == "anomaly_mask"


def test_liver_layout(tmp_path):
    dot(tmp_path / "train" / "good" / "a.png")
    for group in ("good", "Ungood"):
        for name in ("1", "2"):
            dot(tmp_path / "test" / "img" / group / f"{group}{name}.png")
            dot(tmp_path / "test" / "label" / group / f"{group}{name}.png")
    dataset = evaluation.discover(tmp_path)
    assert dataset.layout == "liver"
    assert sorted((c.group, c.label) for c in dataset.cases) == [("Ungood", 1)] * 2 + [("good", 0)] * 2
    assert all(c.mask.parent == tmp_path / "test" / "label" / c.group and c.mask.name == c.path.name
               for c in dataset.cases)


def test_resc_layout(tmp_path):
    dot(tmp_path / "Train" / "train" / "good" / "a.png")
    dot(tmp_path / "Test" / "test" / "good" / "g.png")
    dot(tmp_path / "Test" / "test" / "Ungood" / "u.png")
    dot(tmp_path / "Test" / "test_label" / "Ungood" / "u.png")
    dot(tmp_path / "Val" / "val" / "good" / "v.png")
    dataset = evaluation.discover(tmp_path)
    assert dataset.layout == "resc" and [p.name for p in dataset.references] == ["a.png"]
    masks = {c.path.name: c.mask for c in dataset.cases}
    assert masks["g.png"] is None and masks["u.png"] == tmp_path / "Test" / "test_label" / "Ungood" / "u.png"
    assert dataset.summary["valid"]["folder"] == "Val/val"


def test_flat_layout_without_masks(tmp_path):
    dot(tmp_path / "train" / "good" / "a.png")
    dot(tmp_path / "test" / "good" / "g.png")
    dot(tmp_path / "test" / "Ungood" / "u.png")
    dataset = evaluation.discover(tmp_path)
    assert dataset.layout == "flat" and not dataset.has_masks
    assert {c.path.name: c.label for c in dataset.cases} == {"g.png": 0, "u.png": 1}


def test_folders_layout_holds_out_whole_normal_patients(tmp_path):
    names = ["NORMAL-1-1", "NORMAL-1-2", "NORMAL-2-1", "NORMAL-3-4", "NORMAL-3-5", "NORMAL-4-1", "NORMAL-5-1",
             "NORMAL-6-2"]
    for name in names:
        dot(tmp_path / "NORMAL" / f"{name}.jpeg")
    for group in ("CNV", "DME"):
        dot(tmp_path / group / f"{group}-9-1.jpeg")
    (tmp_path / "README.md").write_text("not a class")
    dataset = evaluation.discover(tmp_path, holdout=0.5, seed=3)
    assert dataset.layout == "folders" and not dataset.has_masks
    held = [c.path for c in dataset.cases if c.label == 0]
    assert {c.group for c in dataset.cases if c.label == 1} == {"CNV", "DME"}
    patients = {evaluation.patient_key(p) for p in held}
    assert patients.isdisjoint({evaluation.patient_key(p) for p in dataset.references})
    assert len(held) + len(dataset.references) == len(names) and 4 <= len(held) <= 5
    assert dataset.summary["NORMAL"]["held out"] == len(held)
    again = evaluation.discover(tmp_path, holdout=0.5, seed=3)
    assert again.references == dataset.references
    other = {evaluation.discover(tmp_path, holdout=0.5, seed=s).references for s in range(6)}
    assert len(other) > 1  # the seed decides


def test_holdout_needs_references_left(tmp_path):
    paths = [tmp_path / "N-1-1.png", tmp_path / "N-1-2.png", tmp_path / "N-2-1.png"]
    with pytest.raises(InputError, match="a bank needs two"):
        evaluation.holdout_split(paths, 0.5, 0)
    with pytest.raises(ValueError, match="holdout=1"):
        evaluation.holdout_split(paths, 1.0, 0)
    assert evaluation.patient_key(Path("CNV-9333524-12.jpeg")) == "CNV-9333524"
    assert evaluation.patient_key(Path("scan.png")) == "scan"


def test_unknown_layout_says_what_was_expected(tmp_path):
    dot(tmp_path / "images" / "a.png")
    with pytest.raises(InputError, match="no BMAD layout"):
        evaluation.discover(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        evaluation.discover(tmp_path / "missing")


def test_ablation_rows_cross_the_values_given():
    rows = evaluation.ablation_rows(IMAGE_SETTINGS, fusion=["mean", "last"], stages=[[1, 2], [3]], references_k=[2, 2])
    assert [(r.stages, r.fusion, r.references_k) for r in rows] == [
        ((1, 2), "mean", 2), ((1, 2), "last", 2), ((3,), "mean", 2), ((3,), "last", 2)]
    assert all(r.cls_weight == IMAGE_SETTINGS.cls_weight and r.image_size == 96 for r in rows)
    assert evaluation.ablation_rows(IMAGE_SETTINGS) == [IMAGE_SETTINGS]
    with pytest.raises(ValueError, match="cannot be ablated"):
        evaluation.ablation_rows(IMAGE_SETTINGS, image_size=[32, 64])
    with pytest.raises(ValueError, match="fusion='median'"):
        evaluation.ablation_rows(IMAGE_SETTINGS, fusion=["median"])


# ---------------------------------------------------------------- end to end on 2D images


@pytest.fixture(scope="module")
def brain_set(tmp_path_factory):
    """BMAD brain layout: 6 normal training slices, 3 normal and 4 lesioned test slices with masks."""
    root = tmp_path_factory.mktemp("Brain")
    for i in range(6):
        png(plane(i)[0], root / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        image, mask = plane(100 + i)
        png(image, root / "test" / "good" / "img" / f"n{i}.png")
        png(mask.astype(np.uint8) * 255, root / "test" / "good" / "label" / f"n{i}.png")
    for i, centre in enumerate([(34, 30), (60, 50), (45, 62), (55, 36)]):
        image, mask = plane(200 + i, lesion=centre)
        png(image, root / "test" / "Ungood" / "img" / f"a{i}.png")
        png(mask.astype(np.uint8) * 255, root / "test" / "Ungood" / "label" / f"a{i}.png")
    return root


@pytest.fixture(scope="module")
def brain_result(brain_set, tmp_path_factory):
    dataset = evaluation.discover(brain_set)
    result = evaluation.evaluate(dataset, [IMAGE_SETTINGS], cache=tmp_path_factory.mktemp("cache"), load=loader(),
                                 progress=False)
    out = tmp_path_factory.mktemp("out")
    return result, evaluation.write_outputs(result, out), out


def test_planted_lesions_are_found_at_pixel_and_image_level(brain_result):
    result, _, _ = brain_result
    metrics = result.tallies[0].metrics()
    assert metrics["cases"] == 7 and metrics["anomalous_cases"] == 4 and metrics["masked_cases"] == 7
    # Masks flipped by mistake would still give ~0.84 pixel AUROC (the background ranks lowest), but AUPRO ~0.46 and
    # best Dice ~0.01: these bounds catch a mask that does not lie where the map is.
    assert metrics["pixel_auroc"] >= 0.95
    assert metrics["aupro"] >= 0.8
    assert metrics["best_dice"] >= 0.1
    assert metrics["image_auroc"] >= 0.9
    assert metrics["pixels_outside_range"] == 0.0
    assert not result.failures


def test_outputs_are_written_and_agree(brain_result):
    result, written, out = brain_result
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["dataset"]["layout"] == "brain" and summary["dataset"]["references"] == 6
    assert summary["rows"][0]["metrics"]["pixel_auroc"] == pytest.approx(result.tallies[0].metrics()["pixel_auroc"])
    assert summary["pixel_metrics"]["range_z"] == list(evaluation.PIXEL_RANGE)
    text = (out / "metrics.md").read_text()
    assert "| # | method | stages | planes | fusion | K | CLS weight | image AUROC |" in text and "pixel AUROC" in text
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and {r["label"] for r in rows} == {"0", "1"}
    lesioned = [r for r in rows if r["label"] == "1"]
    assert all(int(r["anomalous_pixels"]) > 0 for r in lesioned)
    # The CSV's scores are the ones the image AUROC was computed from.
    scores = {r["name"]: float(r["score"]) for r in rows}
    assert min(scores[r["name"]] for r in lesioned) > max(scores[r["name"]] for r in rows if r["label"] == "0")
    pictures = sorted(p.name for p in (out / "figures").iterdir())
    assert len(pictures) == 6 and pictures[0].startswith("detected_1_a")
    assert all((out / "figures" / p).stat().st_size > 1000 for p in pictures)
    assert not list(out.rglob(".*part*"))


def test_gallery_shows_the_lesion_slice_with_its_outline(brain_result):
    result, _, _ = brain_result
    panels = result.tallies[0].gallery.panels()
    best = panels["detected"][0]
    assert best.truth is not None and best.truth.any()
    # The map is hottest in the lesion: its mean there exceeds its mean over the rest of the foreground.
    inside = best.heat[best.truth].mean()
    outside = best.heat[best.foreground & ~best.truth].mean()
    assert inside > outside + 1.0
    normal = sorted((r for r in result.tallies[0].records if r["label"] == 0), key=lambda r: -r["score"])
    assert [p.name for p in panels["false_alarm"]] == [r["name"] for r in normal[:2]]
    assert [p.name for p in panels["missed"]][0] == min(
        (r for r in result.tallies[0].records if r["label"] == 1), key=lambda r: r["score"])["name"]


def test_ablation_rows_share_features_and_get_their_own_calibration(brain_set, tmp_path):
    dataset = evaluation.discover(brain_set)
    single, several = [], []
    evaluation.evaluate(dataset, [IMAGE_SETTINGS], cache=tmp_path / "a", load=loader(single), progress=False,
                        pictures=0)
    rows = evaluation.ablation_rows(IMAGE_SETTINGS, fusion=["uncertainty", "last"], references_k=[4, 2])
    result = evaluation.evaluate(dataset, rows, cache=tmp_path / "b", load=loader(several), progress=False,
                                 pictures=0)
    assert len(result.tallies) == 4 and result.timings["groups"][0]["recalibrated_rows"] == [2, 3, 4]
    # Test images went through the backbone once for all four rows; the only extra pass is over the bank's
    # references drawn for recalibration (all 6 here, fewer than calibration_slices).
    assert sum(several) == sum(single) + 6
    scores = [tuple(r["score"] for r in t.records) for t in result.tallies]
    assert len(set(scores)) == 4
    metrics = [t.metrics() for t in result.tallies]
    assert all(m["cases"] == 7 and m["pixel_auroc"] >= 0.9 for m in metrics)
    lines = evaluation.table(result).splitlines()
    assert len(lines) == 2 + 4 and "| 2 | himatch | 1,2,3 | axial | uncertainty | 2 |" in lines[3]


def test_baselines_share_the_bank_and_features_in_one_table(volume_set, tmp_path):
    dataset = evaluation.volume_dataset([volume_set / "images"], volume_set / "labels", [volume_set / "normals"])
    single, several = [], []
    evaluation.evaluate(dataset, [SETTINGS], cache=tmp_path / "a", load=loader(single), progress=False, pictures=0,
                        anomaly_labels=(2,))
    rows = evaluation.ablation_rows(SETTINGS, method=["himatch", "anomalydino", "dino-ad"], fusion=["uncertainty",
                                                                                                   "mean"])
    # A baseline has no fusion: one row each, not one per fusion.
    assert [(r.method, r.fusion) for r in rows] == [("himatch", "uncertainty"), ("himatch", "mean"),
                                                    ("anomalydino", "uncertainty"), ("dino-ad", "uncertainty")]
    result = evaluation.evaluate(dataset, rows, cache=tmp_path / "b", load=loader(several), progress=False,
                                 pictures=0, anomaly_labels=(2,))
    group = result.timings["groups"][0]
    assert len(result.timings["groups"]) == 1 and group["recalibrated_rows"] == [2]
    # One backbone pass per test image for the whole table; the extra passes: the recalibration sample of the mean
    # row, and AnomalyDINO's memory (every reference slice once).
    references = group["references"]
    calibration = min(SETTINGS.calibration_slices, references)
    assert sum(several) == sum(single) + calibration + references
    assert group["anomalydino_memory_patches"] > 0
    for tally in result.tallies[2:]:
        metrics = tally.metrics()
        assert metrics["volume_auroc"] == 1.0 and metrics["voxel_auroc"] >= 0.9, tally.settings.method
        assert metrics["pixels_outside_range"] == 0.0 and "lesions" not in metrics
        assert all(r["percentile"] != r["percentile"] for r in tally.records)  # no calibration percentile
    text = evaluation.markdown(result)
    assert "| 3 | anomalydino | 3 | axial | - | - | - |" in text and "| 4 | dino-ad | 3 | axial | - | - | - |" in text
    assert "Baselines on the same backbone features" in text
    written = evaluation.write_outputs(result, tmp_path / "out")
    summary = json.loads(written["metrics"].read_text())
    assert [r["method"] for r in summary["rows"]] == ["himatch", "himatch", "anomalydino", "dino-ad"]
    assert summary["ablation"]["method"] == ["himatch", "anomalydino", "dino-ad"]


def test_recalibration_equals_a_bank_built_with_those_settings(brain_set, tmp_path):
    dataset = evaluation.discover(brain_set)
    stand_in = StandIn()
    base = cached_bank(list(dataset.references), None, IMAGE_SETTINGS, stand_in, tmp_path)
    other = replace(IMAGE_SETTINGS, fusion="max", references_k=2, cls_weight=1.0)
    samples = calibration_samples(base, other, stand_in, references=list(dataset.references))
    assert len(samples) == len(base)
    recalibrated = calibrate_bank(base, samples, other, stand_in.patch_size, torch.device("cpu"))
    direct = cached_bank(list(dataset.references), None, other, stand_in, tmp_path)
    assert not torch.allclose(base.calibration_mean, direct.calibration_mean)
    torch.testing.assert_close(recalibrated.calibration_mean, direct.calibration_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recalibrated.calibration_std, direct.calibration_std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recalibrated.calibration_slice_scores.sort().values,
                               direct.calibration_slice_scores.sort().values, atol=1e-4, rtol=1e-4)


def test_stages_variants_get_their_own_backbone_and_bank(brain_set, tmp_path):
    dataset = evaluation.discover(brain_set)
    rows = evaluation.ablation_rows(IMAGE_SETTINGS, stages=[[1, 2, 3], [1, 2]], fusion=["mean", "last"])
    result = evaluation.evaluate(dataset, rows, cache=tmp_path, load=loader(), progress=False, pictures=0)
    groups = result.timings["groups"]
    assert [g["rows"] for g in groups] == [[1, 2], [3, 4]]
    assert [t.stages for t in result.tallies] == [(1, 2, 3), (1, 2, 3), (1, 2), (1, 2)]
    assert len(list(tmp_path.iterdir())) == 2  # one cached bank per stages variant
    assert evaluation.summary(result)["ablation"] == {"stages": [[1, 2, 3], [1, 2]], "fusion": ["mean", "last"]}


def test_a_broken_image_is_recorded_and_the_others_are_evaluated(brain_set, tmp_path):
    import shutil

    root = tmp_path / "Brain"
    shutil.copytree(brain_set, root)
    (root / "test" / "Ungood" / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    png(plane(7)[0][::4, ::4], root / "test" / "Ungood" / "img" / "small.png")
    dot(root / "test" / "Ungood" / "label" / "small.png").write_bytes(
        (root / "test" / "Ungood" / "label" / "a0.png").read_bytes())  # a mask of another size
    result = evaluation.evaluate(evaluation.discover(root), [IMAGE_SETTINGS], cache=tmp_path / "cache", load=loader(),
                                 progress=False, pictures=0)
    errors = {Path(f["path"]).name: f["error"] for f in result.failures}
    assert set(errors) == {"broken.png", "small.png"}
    assert "cannot be read" in errors["broken.png"] and "must lie on the grid" in errors["small.png"]
    assert result.tallies[0].metrics()["cases"] == 7
    text = evaluation.scores_csv(result)
    assert "broken.png" in text and "cannot be read" in text
    with pytest.raises(InputError):
        evaluation.evaluate(evaluation.discover(root), [IMAGE_SETTINGS], cache=tmp_path / "cache", load=loader(),
                            progress=False, pictures=0, strict=True)


def test_a_set_without_masks_gives_image_metrics_only(tmp_path):
    for i in range(6):
        png(plane(i)[0], tmp_path / "NORMAL" / f"NORMAL-{i}-1.png")
    for i, centre in enumerate([(34, 30), (60, 50)]):
        image, _ = plane(200 + i, lesion=centre)
        png(image, tmp_path / "LESION" / f"LESION-{i}-1.png")
    dataset = evaluation.discover(tmp_path, holdout=0.34, seed=0)
    result = evaluation.evaluate(dataset, [IMAGE_SETTINGS], cache=tmp_path / "cache", load=loader(), progress=False)
    metrics = result.tallies[0].metrics()
    assert metrics["cases"] == 4 and metrics["anomalous_cases"] == 2
    assert metrics["image_auroc"] == 1.0 and "pixel_auroc" not in metrics
    text = evaluation.markdown(result)
    assert "pixel AUROC" not in text and "are the normal test images" in text
    assert result.tallies[0].gallery.panels()["missed"][0].truth is None


# ---------------------------------------------------------------- annotated volumes

@pytest.fixture(scope="module")
def volume_set(tmp_path_factory):
    """LiTS-style labels (1 = organ, 2 = lesion) with oblique, permuted and LPS affines; mixed naming conventions."""
    root = tmp_path_factory.mktemp("volumes")
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS)):
        save_nifti(as_stored(brain_volume(i, SHAPE)[0], affine), affine, _folder(root / "normals") / f"n{i}.nii.gz")
    cases = [("volume-0", "segmentation-0", LESION, OBLIQUE), ("case1_0000", "case1", (34, 30, 6), LPS),
             ("case2", "case2_seg", None, PERMUTED), ("case3", "case3", None, OBLIQUE)]
    for i, (name, label_name, lesion, affine) in enumerate(cases):
        array, mask = brain_volume(40 + i, SHAPE, lesion=lesion, radius=3.0)
        label = (array > 0).astype(np.uint8) + mask.astype(np.uint8)
        save_nifti(as_stored(array, affine), affine, _folder(root / "images") / f"{name}.nii.gz")
        save_nifti(as_stored(label, affine), affine, _folder(root / "labels") / f"{label_name}.nii.gz")
    save_nifti(as_stored(brain_volume(50, SHAPE)[0], OBLIQUE), OBLIQUE, root / "images" / "unlabelled.nii.gz")
    return root


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_volume_dataset_pairs_labels_by_name(volume_set):
    dataset = evaluation.volume_dataset([volume_set / "images"], volume_set / "labels", [volume_set / "normals"])
    pairs = {io.stem(c.path): io.stem(c.mask) for c in dataset.cases}
    assert pairs == {"volume-0": "segmentation-0", "case1_0000": "case1", "case2": "case2_seg", "case3": "case3"}
    assert [Path(p).name for p, _ in dataset.skipped] == ["unlabelled.nii.gz"]
    assert dataset.volumes and len(dataset.references) == 3
    with pytest.raises(InputError, match="both a test volume and a reference"):
        evaluation.volume_dataset([volume_set / "images"], volume_set / "labels", [volume_set / "images"])


def test_volumes_reach_voxel_slice_and_volume_metrics(volume_set, tmp_path):
    dataset = evaluation.volume_dataset([volume_set / "images"], volume_set / "labels", [volume_set / "normals"])
    rows = evaluation.ablation_rows(SETTINGS, fusion=["uncertainty", "mean"])
    result = evaluation.evaluate(dataset, rows, cache=tmp_path / "cache", load=loader(), anomaly_labels=(2,),
                                 progress=False)
    for tally in result.tallies:
        metrics = tally.metrics()
        assert metrics["cases"] == 4 and metrics["anomalous_cases"] == 2
        assert metrics["volume_auroc"] == 1.0
        assert metrics["voxel_auroc"] >= 0.95 and metrics["pixel_auroc"] == pytest.approx(metrics["voxel_auroc"],
                                                                                          abs=1e-9)
        assert metrics["image_auroc"] >= 0.8
        assert metrics["slices"] == 4 * SHAPE[2] and 0 < metrics["anomalous_slices"] < 12
    # The skipped volume is named; the lesion volumes' label counted only value 2, not the organ.
    assert [Path(f["path"]).name for f in result.failures] == ["unlabelled.nii.gz"]
    records = {r["name"]: r for r in result.tallies[0].records}
    assert records["case2"]["label"] == 0 and records["case2"]["anomalous_pixels"] == 0
    written = evaluation.write_outputs(result, tmp_path / "out")
    with open(written["slice_scores"]) as handle:
        slices = list(csv.DictReader(handle))
    assert len(slices) == 2 * 4 * SHAPE[2]
    lesion_slices = [int(s["slice"]) for s in slices if s["row"] == "1" and s["name"] == "volume-0"
                     and s["label"] == "1"]
    assert LESION[2] in lesion_slices  # OBLIQUE stores the axial axis along k
    assert "voxel AUROC" in (tmp_path / "out" / "metrics.md").read_text()


def test_volumes_get_a_lesion_level_detection_table(volume_set, tmp_path):
    dataset = evaluation.volume_dataset([volume_set / "images"], volume_set / "labels", [volume_set / "normals"])
    result = evaluation.evaluate(dataset, [SETTINGS], cache=tmp_path / "cache", load=loader(), anomaly_labels=(2,),
                                 progress=False)
    lesions = result.tallies[0].metrics()["lesions"]
    # Two planted lesions, one per anomalous volume; the two lesion-free volumes are the normal cases.
    assert lesions["regions"] == 2 and lesions["hit"] == 2 and lesions["missed"] == 0
    assert lesions["sensitivity"] == 1.0 and lesions["normal_cases"] == 2
    assert lesions["false_positive_regions_per_normal_case"] == 0.0
    assert 0.05 < lesions["dice"] <= 1.0
    records = {r["name"]: r for r in result.tallies[0].records}
    assert records["volume-0"]["lesions_hit"] == 1 and records["case2"]["findings"] == 0
    written = evaluation.write_outputs(result, tmp_path / "out")
    text = (tmp_path / "out" / "metrics.md").read_text()
    assert "| # | regions | hit | missed | sensitivity % |" in text and "| 1 | 2 | 2 | 0 | 100.0 |" in text
    assert json.loads(written["metrics"].read_text())["rows"][0]["metrics"]["lesions"]["hit"] == 2
    with open(written["scores"]) as handle:
        assert {r["name"]: r["lesions_hit"] for r in csv.DictReader(handle)}["volume-0"] == "1"


def test_a_mask_is_read_on_the_scan_grid_and_selects_label_values(volume_set):
    scan = read_scan(volume_set / "images" / "volume-0.nii.gz", axis="axial")
    label = volume_set / "labels" / "segmentation-0.nii.gz"
    anything = scan.aligned(label, "the mask")
    lesion = scan.aligned(label, "the mask", values=(2,))
    assert anything.sum() > 20 * lesion.sum() > 0
    other = read_scan(volume_set / "images" / "case1_0000.nii.gz", axis="axial")
    with pytest.raises(InputError, match="the mask must lie on the grid"):
        other.aligned(label, "the mask")


# ---------------------------------------------------------------- command line


def pipeline():
    spec = importlib.util.spec_from_file_location("evaluate_pipeline", ROOT / "pipelines" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_on_a_bmad_tree_with_a_broken_image(brain_set, tiny_dinov3, tmp_path, capsys):
    import shutil

    root = tmp_path / "Brain"
    shutil.copytree(brain_set, root)
    (root / "test" / "good" / "img" / "broken.png").write_bytes(b"broken")
    out = tmp_path / "out"
    code = pipeline().main(["bmad", str(root), "--modality", "mri", "--model", str(tiny_dinov3), "-o", str(out),
                            "--bank-cache", str(tmp_path / "cache"), "--fusion", "mean", "last", "--device", "cpu",
                            *FAST])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in captured.err and "| 2 |" in captured.out
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["fusion"] for r in summary["rows"]] == ["mean", "last"]
    assert summary["settings"]["image_size"] == 32 and summary["model"] == str(tiny_dinov3)
    assert all(r["metrics"]["cases"] == 7 for r in summary["rows"])
    assert (out / "metrics.md").is_file() and (out / "scores.csv").is_file()


def test_command_line_on_volumes(volume_set, tiny_dinov3, tmp_path, capsys):
    out = tmp_path / "out"
    code = pipeline().main(["volumes", "--images", str(volume_set / "images" / "case2.nii.gz"),
                            str(volume_set / "images" / "volume-0.nii.gz"), "--labels", str(volume_set / "labels"),
                            "--references", str(volume_set / "normals"), "--anomaly-labels", "2", "--model",
                            str(tiny_dinov3), "-o", str(out), "--bank-cache", str(tmp_path / "cache"), "--stages",
                            "2", "4", "--stages", "4", "--figures", "0", *FAST])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["stages"] for r in summary["rows"]] == [[2, 4], [4]]
    assert all(r["metrics"]["anomalous_cases"] == 1 for r in summary["rows"])
    assert (out / "slice_scores.csv").is_file() and not (out / "figures").exists()


def test_command_line_errors_are_one_line(tmp_path, capsys):
    code = pipeline().main(["bmad", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert "not a folder" in error and "Traceback" not in error


def test_help_lists_every_setting_without_importing_torch():
    code = ("import sys, importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('ev', {str(ROOT / 'pipelines' / 'evaluate.py')!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "parser = module.parser()\n"
            "sub = parser._subparsers._group_actions[0].choices\n"
            "print(sub['bmad'].format_help()); print(sub['volumes'].format_help())\n"
            "args = parser.parse_args(['bmad', 'x', '-o', 'y', '--stages', '3', '6', '--stages', '12', '--fusion', "
            "'mean', 'max'])\n"
            "print('PARSED', args.stages, args.fusion)\n"
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr
    for field in fields(Settings):
        assert result.stdout.count("--" + field.name.replace("_", "-") + " ") >= 2, field.name
    assert "PARSED [[3, 6], [12]] ['mean', 'max']" in result.stdout
    lo, hi = evaluation.PIXEL_RANGE
    assert f"(default: {lo:g} {hi:g})" in result.stdout and f"(default: {evaluation.PIXEL_BINS})" in result.stdout
