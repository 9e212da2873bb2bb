"""Tri-planar detection: a planted lesion is found in all three planes at the same place; an artefact seen along one
slice direction only is damped by the fusion; one bank holds the three planes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import LPS, OBLIQUE, PERMUTED, SETTINGS, StandIn, as_stored, brain_volume, save_nifti

from himatch_med import io, jobs
from himatch_med.bank.store import build_bank_folder, open_bank, stored_bank
from himatch_med.config import AXES, Settings
from himatch_med.detect import Detector, prepare
from himatch_med.errors import InputError

SHAPE = (40, 44, 30)
"""Enough slices along every axis for each plane to see the anatomy."""
CENTRE = (14, 26, 12)
STRIPE = 20
"""The axial slice whose intensity jumps (a slice-wise artefact: the whole slice 20 % brighter)."""
PLANES = replace(SETTINGS, planes=("all",))


@pytest.fixture(scope="module")
def triplanar(tmp_path_factory, stand_in):
    """A tri-planar bank of four references and a query with a lesion and a bright axial slice (OBLIQUE: 1.5 x 2 x 3 mm)."""
    root = tmp_path_factory.mktemp("planes")
    (root / "refs").mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS, OBLIQUE)):
        save_nifti(as_stored(brain_volume(i, SHAPE)[0], affine), affine, root / "refs" / f"r{i}.nii.gz")
    volume, lesion = brain_volume(9, SHAPE, lesion=CENTRE, radius=4.0)
    volume[:, :, STRIPE] *= 1.2
    save_nifti(as_stored(volume, OBLIQUE), OBLIQUE, root / "query.nii.gz")
    folder = build_bank_folder(sorted((root / "refs").iterdir()), None, PLANES, stand_in, root / "bank")
    job = jobs.read(root / "query.nii.gz", PLANES)
    detection = Detector(stand_in, open_bank(folder, PLANES, stand_in), PLANES).detect(job.prepared)
    return root, folder, job, detection, torch.from_numpy(lesion)


def test_planes_setting():
    assert Settings(planes=("all",)).planes == AXES
    assert Settings(planes=("sagittal", "axial")).planes == ("axial", "sagittal")
    assert Settings().planes == () and Settings(planes=("axial",)).planes == ()  # one plane: the default path
    with pytest.raises(ValueError, match="leaves out axis='axial'"):
        Settings(planes=("coronal",))
    with pytest.raises(ValueError, match="'oblique' is not one of"):
        Settings(planes=("oblique",))
    from himatch_med.cli import settings_from
    from himatch_med.run import run_parser

    args = run_parser().parse_args(["q.nii.gz", "--references", "r", "--planes", "all"])
    assert settings_from(args).planes == AXES


def test_one_bank_holds_the_three_planes(triplanar, stand_in):
    _, folder, _, _, _ = triplanar
    bank = stored_bank(folder)
    assert bank.planes == AXES and bank.of_plane("coronal").plane == "coronal"
    meta = json.loads((folder / io.BANK_META).read_text())
    assert set(meta["planes"]) == {"coronal", "sagittal"} and meta["settings"]["planes"] == list(AXES)
    # Each plane has its own references (its slices) and its own calibration.
    assert [len(bank.of_plane(p)) for p in AXES] == [len(bank), *(len(o) for o in bank.others)]
    assert len({len(bank.of_plane(p)) for p in AXES}) == 3
    assert all(len(bank.of_plane(p).calibration_volume_scores) >= 1 for p in AXES)
    assert not torch.equal(bank.calibration_mean, bank.of_plane("coronal").calibration_mean)
    assert "coronal.centroids" in bank.tensors()
    with pytest.raises(InputError, match="planes: bank has"):
        open_bank(folder, SETTINGS, stand_in)  # a single-plane run on a tri-planar bank: the bank defines the run


def test_an_axial_bank_refuses_a_triplanar_query(bank):
    with pytest.raises(InputError, match="not coronal; build it with --planes coronal"):
        bank.of_plane("coronal")


def test_a_planted_lesion_is_found_in_all_three_planes_at_the_same_place(triplanar):
    _, _, job, detection, lesion = triplanar
    assert set(detection.planes) == set(AXES)
    foreground = torch.from_numpy(job.scan.canonical != 0)
    for plane, anomaly in detection.planes.items():
        assert anomaly.shape == SHAPE
        peak = np.unravel_index(int(anomaly.argmax()), SHAPE)
        assert np.linalg.norm(np.subtract(peak, CENTRE)) <= 4.0, (plane, peak)
        normal = anomaly[:, :, 3:9][foreground[:, :, 3:9]].mean()
        assert anomaly[lesion].mean() > normal + 5, plane
    fused = detection.canonical("anomaly")
    assert np.linalg.norm(np.subtract(np.unravel_index(int(fused.argmax()), SHAPE), CENTRE)) <= 4.0


def test_an_artefact_along_one_slice_direction_is_damped_by_the_fusion(triplanar):
    _, _, job, detection, _ = triplanar
    foreground = torch.from_numpy(job.scan.canonical != 0)

    def excess(anomaly):
        normal = anomaly[:, :, 3:9][foreground[:, :, 3:9]].mean()
        return float(anomaly[:, :, STRIPE][foreground[:, :, STRIPE]].mean() - normal)

    # Axial slices see the whole slice changed; coronal and sagittal slices see one thin band of it.
    axial = excess(detection.planes["axial"])
    assert axial > 2.0
    assert excess(detection.planes["coronal"]) < 0.6 * axial and excess(detection.planes["sagittal"]) < 0.6 * axial
    assert excess(detection.canonical("anomaly")) < 0.7 * axial


def test_coarse_planes_go_to_the_backbone_at_their_physical_aspect(triplanar, stand_in):
    _, _, job, _, _ = triplanar
    prepared = job.prepared
    spacing = job.scan.spacing()
    assert prepared.pixel_aspect == pytest.approx(spacing[1] / spacing[0])
    coronal, sagittal = prepared.others
    assert coronal.pixel_aspect == pytest.approx(spacing[2] / spacing[0])
    assert sagittal.pixel_aspect == pytest.approx(spacing[2] / spacing[1])
    # The default path keeps the pixel grid as it is, and cuts one plane only.
    plain = prepare(torch.from_numpy(job.scan.canonical), SETTINGS, spacing=spacing)
    assert plain.pixel_aspect == 1.0 and plain.others == ()
    from himatch_med.detect import batches

    _, features, _ = next(batches(stand_in, coronal, PLANES, torch.device("cpu")))
    rows, columns = features.grids[0].shape[1:3]
    height, width = coronal.slices.shape[1:]  # 30 slices of 3 mm by 40 columns of 1.5 mm: 90 x 60 mm
    assert rows / columns == pytest.approx(height * coronal.pixel_aspect / width, rel=0.2)


def test_baselines_and_2d_images_refuse_planes(triplanar, stand_in):
    _, folder, job, _, _ = triplanar
    with pytest.raises(ValueError, match="scores one plane"):
        Detector(stand_in, stored_bank(folder), replace(PLANES, method="dino-ad")).detect(job.prepared)
    with pytest.raises(InputError, match="has no other plane to cut"):
        prepare(torch.rand(20, 24, 1) + 1, PLANES)


def test_run_writes_each_planes_map_beside_the_fused_one(triplanar, stand_in, tmp_path):
    root, folder, _, detection, _ = triplanar
    from himatch_med.jobs import analyse, read

    detector = Detector(stand_in, open_bank(folder, PLANES, stand_in), PLANES)
    report = analyse(read(root / "query.nii.gz", PLANES), detector, tmp_path, progress=False)
    written = {plane: tmp_path / f"query_anomaly_{plane}.nii.gz" for plane in AXES}
    assert all(path.exists() for path in written.values())
    assert {report["outputs"][f"anomaly_{plane}"] for plane in AXES} == {p.name for p in written.values()}
    import nibabel as nib

    fused = nib.load(tmp_path / "query_anomaly.nii.gz")
    coronal = nib.load(written["coronal"])
    assert np.allclose(coronal.affine, fused.affine) and coronal.shape == fused.shape
    assert tuple(report["settings"]["planes"]) == AXES


def test_an_evaluation_compares_one_plane_with_three_in_one_table(triplanar, tmp_path):
    from himatch_med import evaluation
    from himatch_med.evaluate import parser

    root, _, _, _, _ = triplanar
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, lesion in enumerate((CENTRE, None)):
        volume, mask = brain_volume(20 + i, SHAPE, lesion=lesion, radius=4.0)
        save_nifti(as_stored(volume, LPS), LPS, tmp_path / "images" / f"case{i}.nii.gz")
        save_nifti(as_stored(mask.astype(np.uint8), LPS), LPS, tmp_path / "labels" / f"case{i}.nii.gz")
    args = parser().parse_args(["volumes", "--images", "i", "--labels", "l", "--references", "r", "-o", "o",
                                "--planes", "axial", "--planes", "all"])
    rows = evaluation.ablation_rows(SETTINGS, planes=args.planes, method=["himatch", "dino-ad"])
    assert [(r.planes, r.method) for r in rows] == [((), "himatch"), ((), "dino-ad"), (AXES, "himatch")]
    dataset = evaluation.volume_dataset([tmp_path / "images"], tmp_path / "labels", [root / "refs"])
    result = evaluation.evaluate(dataset, rows, cache=tmp_path / "cache", load=lambda s, d: StandIn(),
                                 progress=False, pictures=0)
    assert not result.failures
    assert all(t.metrics()["volume_auroc"] == 1.0 for t in result.tallies)
    table = evaluation.table(result)
    assert "| 3 | himatch | 1,2,3 | axial,coronal,sagittal | uncertainty |" in table


def test_a_bank_built_before_planes_existed_still_opens(bank, stand_in, tmp_path):
    older = replace(bank, info=replace(bank.info, settings={k: v for k, v in bank.info.settings.items()
                                                            if k != "planes"}))
    folder = io.write_bank(older.tensors(), older.metadata, tmp_path / "older")
    assert len(open_bank(folder, SETTINGS, stand_in)) == len(bank)
    with pytest.raises(InputError, match="planes: bank has None"):
        open_bank(folder, PLANES, stand_in)
