"""The bank: its description round-trips through bank.json, it is never changed in place, labels remove slices."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LPS, OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume, save_nifti

from himatch_med import io, jobs
from himatch_med.bank.build import BankBuilder, build_bank, calibrate_bank
from himatch_med.bank.data import FORMAT_VERSION, Bank, BankInfo
from himatch_med.bank.store import cached_bank, open_bank
from himatch_med.config import Settings
from himatch_med.detect import batches, prepare, stage_distances
from himatch_med.errors import InputError
from himatch_med.features import Features
from himatch_med.run import run_parser
from himatch_med.volume import to_canonical

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
                        prepared.positions[part], [group] * len(part),
                        [{"source": str(path), "slice": i} for i in part.tolist()])
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


def test_a_reference_without_its_label_is_skipped_with_a_warning(annotated, stand_in, tmp_path, caplog):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "case0_seg.nii.gz").write_bytes((annotated / "labels" / "case0_seg.nii.gz").read_bytes())
    bank = cached_bank([annotated / "refs"], labels, SETTINGS, stand_in, tmp_path / "cache")
    assert sliced(bank, "case1.nii.gz") == set() and sliced(bank, "case0.nii.gz")
    # A warning of the himatch_med logger (the commands show it on stderr as "warning: ...").
    assert [r.levelname for r in caplog.records if "skipping reference" in r.getMessage()] == ["WARNING"]
    assert "no label named like it" in bank.info.warnings[0]


def test_the_cache_ignores_speed_settings_only(annotated, stand_in, tmp_path):
    refs = [annotated / "refs"]
    first = cached_bank(refs, None, SETTINGS, stand_in, tmp_path)
    again = cached_bank(refs, None, replace(SETTINGS, batch_size=3, chunk_size=7), stand_in, tmp_path)
    assert again.id == first.id and len(list(tmp_path.iterdir())) == 1


# --------------------------------------------------------------------------------------------------------------------
# a bank made ready for queries


def unit_rows(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def stored_bank(n: int = 40, stages: int = 2, dim: int = 16) -> Bank:
    """A bank as read from disk: fp16 descriptors and centroids, read-only."""
    return Bank(cls=unit_rows(n, dim, seed=1).half(), layout=unit_rows(n, 4, dim, seed=2).half(),
                centroids=unit_rows(n, stages, 3, dim, seed=3).half(), sizes=torch.ones(n, stages, 3, dtype=torch.int32),
                positions=torch.rand(n, generator=torch.Generator().manual_seed(4)), groups=torch.arange(n) // 10,
                calibration_mean=torch.zeros(stages), calibration_std=torch.ones(stages),
                calibration_slice_scores=torch.zeros(0), calibration_volume_scores=torch.zeros(0))


def test_bank_for_queries_converts_its_descriptors_once():
    bank = stored_bank()
    ready = bank.to("cpu")
    assert ready.cls.dtype == ready.layout.dtype == torch.float32
    assert torch.equal(ready.cls, bank.cls.float()) and torch.equal(ready.layout, bank.layout.float())
    # The rest stays as stored (memory-mapped on the host): nothing else is copied.
    for name in ("centroids", "sizes", "positions", "groups", "calibration_mean"):
        assert getattr(ready, name) is getattr(bank, name), name
    assert bank.cls.dtype == torch.float16  # the stored bank is left alone


def test_bank_over_the_descriptor_budget_stays_as_stored():
    bank = stored_bank()
    ready = bank.to("cpu", descriptor_budget=100)
    assert ready.cls is bank.cls and ready.layout is bank.layout


def test_queries_answer_alike_with_descriptors_converted_or_not():
    bank = stored_bank()
    settings = Settings(model="m", references_k=4, position_window=0.2, chunk_size=7).resolved()
    features = Features(unit_rows(3, 16, seed=5), unit_rows(3, 4, 16, seed=6), tuple(unit_rows(3, 2, 2, 16, seed=s) for s in (7, 8)))
    positions = torch.tensor([0.2, 0.5, 0.8])
    stored = stage_distances(features, bank, settings, positions)
    ready = stage_distances(features, bank.to("cpu"), settings, positions)
    assert torch.equal(stored[0], ready[0]) and torch.equal(stored[1], ready[1])


def test_a_batch_of_several_volumes_leaves_each_its_own_out_of_a_subset():
    """The spread's calibration queries samples of several volumes at once against a bank subset: each query gets
    what it gets alone against the subset without its own volume (how they were queried before, volume by volume)."""
    bank = stored_bank().to("cpu")  # 4 volumes of 10 slices
    settings = Settings(model="m", references_k=4, position_window=0.2, chunk_size=7).resolved()
    features = Features(unit_rows(6, 16, seed=5), unit_rows(6, 4, 16, seed=6),
                        tuple(unit_rows(6, 2, 2, 16, seed=s) for s in (7, 8)))
    positions = torch.linspace(0.1, 0.9, 6)
    groups = torch.tensor([0, 0, 1, 2, 3, 3])
    subset = torch.arange(len(bank)) % 4 != 1  # every fourth row out, as a bootstrap leaves volumes out
    maps, per_reference = stage_distances(features, bank, settings, positions, groups, allowed=subset)
    for row, group in enumerate(groups.tolist()):
        alone = Features(features.cls[row:row + 1], features.layout[row:row + 1],
                         tuple(grid[row:row + 1] for grid in features.grids))
        expected = stage_distances(alone, bank, settings, positions[row:row + 1],
                                   allowed=subset & (bank.groups != group))
        torch.testing.assert_close(maps[:, row:row + 1], expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(per_reference[:, row:row + 1], expected[1], rtol=0, atol=1e-6)



def test_the_spread_calibration_equals_querying_each_sample_alone():
    """Batched across volumes, each replicate's calibration is what the samples give one by one against the subset
    without their own volume, also where a volume has fewer than K references left (K is then its own count)."""
    import math

    from himatch_med.bank.build import Sample, spread_calibration
    from himatch_med.scoring import bootstrap_draws

    probe = stored_bank().to("cpu")  # 4 volumes of 10 slices: with K = 12, a subset of 2 volumes leaves one 10
    settings = Settings(model="m", references_k=12, position_window=0.2, chunk_size=7, batch_size=16,
                        spread_calibration_slices=40).resolved()
    grids = [unit_rows(len(probe), 2, 2, 16, seed=s) for s in (11, 12)]
    samples = [Sample(probe.cls[row].float(), probe.layout[row].float(), tuple(g[row] for g in grids),
                      torch.ones(2, 2, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool),
                      float(probe.positions[row]), int(probe.groups[row]), row) for row in range(len(probe))]
    mean, std = torch.zeros(2), torch.ones(2)
    spread = spread_calibration(probe, samples, settings, mean, std)
    draws = bootstrap_draws(4, settings.spread_replicates, settings.seed)
    assert torch.equal(spread["spread_draws"], draws)
    short = 0
    for replicate, drawn in enumerate(draws):
        kept = drawn[probe.groups] > 0
        values = []
        for sample in samples:
            allowed = kept & (probe.groups != sample.group)
            if not bool(allowed.any()):
                continue
            short += int(allowed.sum()) < settings.references_k
            alone = Features(sample.cls[None], sample.layout[None], tuple(grid[None] for grid in sample.grids))
            maps, _ = stage_distances(alone, probe, settings, torch.tensor([sample.position]), allowed=allowed)
            values.append(maps[:, 0].flatten(1))
        if values:
            every = torch.cat(values, dim=1)
            torch.testing.assert_close(spread["spread_mean"][replicate], every.mean(dim=1), rtol=0, atol=1e-6)
            torch.testing.assert_close(spread["spread_std"][replicate], every.std(dim=1), rtol=0, atol=1e-6)
    assert short > 0 and math.isfinite(float(spread["spread_mean"].sum()))  # the case the runs are keyed for

def test_a_subset_holding_every_other_volume_takes_the_full_calibrations_values(monkeypatch):
    """Such a sample retrieves what it retrieved in the full calibration: its values are reused, not computed again,
    and the subsets' calibrations are bit for bit those computed from scratch (2 volumes: nothing is computed)."""
    import himatch_med.bank.build as build
    from himatch_med.bank.build import Sample, spread_calibration

    settings = Settings(model="m", references_k=8, position_window=0.2, chunk_size=7, batch_size=16,
                        spread_calibration_slices=40).resolved()
    computed = []

    def counted(features, *args, **kwargs):
        computed.append(len(features.cls))
        return stage_distances(features, *args, **kwargs)

    for volumes in (2, 4):
        stored = stored_bank()  # 40 slices
        probe = replace(stored, groups=torch.arange(len(stored)) * volumes // len(stored)).to("cpu")
        grids = [unit_rows(len(probe), 2, 2, 16, seed=s) for s in (11, 12)]
        foreground = torch.rand(len(probe), 2, 2, generator=torch.Generator().manual_seed(3)) > 0.3
        samples = [Sample(probe.cls[row].float(), probe.layout[row].float(), tuple(g[row] for g in grids),
                          foreground[row], torch.ones(4, 4, dtype=torch.bool), float(probe.positions[row]),
                          int(probe.groups[row]), row) for row in range(len(probe))]
        full = []  # as calibrate_bank finds them: its batches, each sample without its own volume
        for start in range(0, len(samples), settings.batch_size):  # one grid shape: runs of batch_size
            part = samples[start:start + settings.batch_size]
            features = Features(torch.stack([s.cls for s in part]), torch.stack([s.layout for s in part]),
                                tuple(torch.stack([s.grids[stage] for s in part]) for stage in range(2)))
            maps, _ = stage_distances(features, probe, settings,
                                      torch.tensor([s.position for s in part]), torch.tensor([s.group for s in part]))
            full.extend(maps[:, row][:, s.patch_foreground] for row, s in enumerate(part))
        mean, std = torch.zeros(2), torch.ones(2)
        monkeypatch.setattr(build, "stage_distances", counted)
        scratch = spread_calibration(probe, samples, settings, mean, std)
        from_scratch, computed[:] = sum(computed), []
        reused = spread_calibration(probe, samples, settings, mean, std, full=full)
        monkeypatch.setattr(build, "stage_distances", stage_distances)
        for name in ("spread_draws", "spread_mean", "spread_std"):
            assert torch.equal(reused[name], scratch[name]), (volumes, name)
        assert 0 < from_scratch and sum(computed) < from_scratch  # of 4 volumes too, some subsets hold the others
        if volumes == 2:
            assert sum(computed) == 0


# --------------------------------------------------------------------------------------------------------------------
# building in full backbone batches, calibrating in batches


class CountingExtractor:
    """The stand-in, counting its backbone calls and the images in each."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.model_id, self.patch_size, self.stages, self.device = (inner.model_id, inner.patch_size, inner.stages,
                                                                    inner.device)

    def __call__(self, images):
        self.calls.append(len(images))
        return self.inner(images)


def images_2d(count: int):
    """``count`` 2D normal images (one-slice volumes) of one size, as a 2D set is read."""
    return [(f"image{i}", prepare(torch.from_numpy(brain_volume(40 + i, (56, 60, 3))[0][..., 1:2].copy()), SETTINGS))
            for i in range(count)]


def assert_banks_close(a, b):
    assert torch.equal(a.groups, b.groups) and a.info.sources == b.info.sources
    for name in ("cls", "layout", "centroids"):
        torch.testing.assert_close(a.tensors()[name].float(), b.tensors()[name].float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(a.sizes, b.sizes, rtol=0, atol=0)
    for name in ("calibration_mean", "calibration_std", "calibration_slice_scores", "calibration_volume_scores"):
        torch.testing.assert_close(a.tensors()[name], b.tensors()[name], rtol=1e-5, atol=1e-5)


def test_a_2d_set_goes_through_the_backbone_in_batches(stand_in):
    counting = CountingExtractor(stand_in)
    batched = build_bank(counting, images_2d(10), replace(SETTINGS, batch_size=4))
    assert counting.calls == [4, 4, 2]
    assert len(batched) == 10 and batched.groups.tolist() == list(range(10))
    # Each image is a calibration volume of one slice: its volume score is its slice score.
    assert torch.equal(batched.calibration_volume_scores, batched.calibration_slice_scores)
    one_by_one = build_bank(stand_in, images_2d(10), replace(SETTINGS, batch_size=1))
    assert_banks_close(batched, one_by_one)


def test_images_of_two_sizes_on_one_patch_grid_calibrate_in_runs_like_one_at_a_time(stand_in):
    # 56 x 60 and 58 x 62 both become 64 x 72 backbone images (an 8 x 9 grid): their samples share calibration runs,
    # but each is resampled to its own size.
    images = [(f"image{i}", prepare(torch.from_numpy(brain_volume(40 + i, (56 + 2 * (i % 2), 60 + 2 * (i % 2), 3))[0]
                                                     [..., 1:2].copy()), SETTINGS)) for i in range(8)]
    batched = build_bank(stand_in, images, replace(SETTINGS, batch_size=4))
    assert len(batched) == 8
    one_by_one = build_bank(stand_in, images, replace(SETTINGS, batch_size=1))
    assert_banks_close(batched, one_by_one)


def test_volumes_share_batches_and_calibrate_in_batches_like_one_slice_at_a_time(stand_in):
    volumes = [(f"normal{i}", prepare(torch.from_numpy(to_canonical(as_stored(brain_volume(i, SHAPE)[0], affine),
                                                                    affine)[0]), SETTINGS))
               for i, affine in enumerate((OBLIQUE, LPS, PERMUTED))]
    counting = CountingExtractor(stand_in)
    batched = build_bank(counting, volumes, replace(SETTINGS, batch_size=8))
    scored = sum(int(p.scored.sum()) for _, p in volumes)
    assert sum(counting.calls) == len(batched) == scored
    assert len(counting.calls) == -(-scored // 8)  # the remainder of a volume fills up with the next one's slices
    one_by_one = build_bank(stand_in, volumes, replace(SETTINGS, batch_size=1))
    assert_banks_close(batched, one_by_one)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_finite_finds_one_nan_or_infinity_anywhere_as_isfinite_does(dtype):
    from himatch_med.bank.data import finite

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(70, 4, 8, 16, generator=generator).to(dtype)
    assert finite(values, chunk=16) and finite(values[:0])
    for position in (0, 1, 511, 4096, values.numel() - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = values.clone()
            broken.view(-1)[position] = bad
            assert finite(broken, chunk=16) is False
            assert bool(torch.isfinite(broken).all()) is False


def test_centroids_for_bfloat16_matching_are_the_stored_ones_rounded_once(bank):
    index = torch.tensor([[0, 3, 7], [5, 1, 2]])
    assert bank.centroids.dtype == torch.float16  # stored so: float32 holds them exactly, bfloat16 rounds them
    for stage in range(bank.centroids.shape[1]):
        exact = bank.memory(index, stage, torch.device("cpu"))
        half = bank.memory(index, stage, torch.device("cpu"), torch.bfloat16)
        assert exact.dtype == torch.float32 and half.dtype == torch.bfloat16 and half.is_contiguous()
        stored = bank.centroids[index.flatten(), stage].unflatten(0, index.shape)
        assert torch.equal(exact, stored.float()) and torch.equal(half, stored.float().bfloat16())
