"""What one input writes besides its maps: the JSON report, its notes, the package versions, the overview picture.

Builds them; :mod:`himatch_med.jobs` writes them through :mod:`himatch_med.io`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from himatch_med import __version__
from himatch_med.bank.data import Bank
from himatch_med.config import Settings
from himatch_med.detect import Detection, Detector, Prepared
from himatch_med.scan import Scan
from himatch_med.scoring import foreground_shares, percentile_basis

TOP_SLICES = 5
OVERVIEW_SLICES = 4
VERSIONS = ("torch", "transformers", "monai", "nibabel", "SimpleITK", "numpy", "scipy")
"""Packages whose versions a report records, besides Python and himatch-med."""
SLIVER_RULE = ("scored slices whose foreground is less than sliver_area of the volume's largest slice's: mapped, but "
               "neither among the top slices nor in the volume score")
SPREAD_METHOD = ("the volume score recomputed against bank subsets (a seeded bootstrap over the reference volumes, "
                 "each subset with its own calibration), on the spread_slices most anomalous ranked slices against "
                 "the whole bank and each subset; spread: the root mean square of their differences from the score; "
                 "range: their lowest and highest")


def make_report(scan: Scan, prepared: Prepared, detection: Detection, detector: Detector,
                outputs: dict[str, Path]) -> dict:
    """The JSON report of one input: scores, per-slice scores, top slices, settings, versions.

    Args:
        scan: the input as read.
        prepared: its slices.
        detection: what the detector found.
        detector: the extractor, bank and settings that found it.
        outputs: the files written for the input, by kind (:func:`himatch_med.jobs.output_paths`).
    """
    bank, settings, extractor = detector.bank, detector.settings, detector.extractor
    scores = detection.slice_scores
    slivers = detection.slivers if detection.slivers is not None else torch.zeros_like(detection.scored)
    ranked = detection.scored & ~slivers
    order = [i for i in torch.argsort(scores, descending=True).tolist() if ranked[i]][:TOP_SLICES]
    top = []
    for index in order:
        file_axis, file_index = scan.file_slice_index(index, prepared.axis)
        top.append({"slice": index, "file_axis": "ijk"[file_axis], "file_index": file_index,
                    "score": float(scores[index]), "percentile": float(detection.slice_percentiles[index])})
    sliver_list = [int(i) for i in torch.nonzero(slivers).flatten()]
    sliver_files = [scan.file_slice_index(i, prepared.axis) for i in sliver_list]
    basis = {**percentile_basis(len(bank.calibration_volume_scores), len(bank.calibration_slice_scores),
                                settings.percentile_error),
             "bank_volumes": int(bank.groups.max()) + 1 if len(bank) else 0}
    spread = score_spread(detection.volume_score, detection.replicate_scores)
    return {
        "input": str(scan.path), "kind": scan.kind, "shape": list(scan.shape),
        "affine": np.round(scan.affine, 6).tolist(),
        "notes": list(scan.notes) + list(prepared.notes) + calibration_notes(bank, settings)
        + aspect_notes(scan.pixel_aspect(prepared.axis)) + sliver_notes(sliver_files, settings.sliver_area)
        + percentile_notes(basis, settings.percentile_error) + spread_notes(bank, settings, spread),
        "volume_score": detection.volume_score, "volume_percentile": detection.volume_percentile,
        "volume_score_spread": spread["spread"], "volume_score_range": spread["range"],
        "percentile_basis": basis,
        "spread": {**spread, "replicates": len(detection.replicate_scores), "bank_replicates": bank.replicates,
                   "method": SPREAD_METHOD},
        "slice_axis": settings.axis,
        "slice_order": "slice i lies along the canonical (RAS) axis, from left/posterior/inferior upwards",
        "slice_scores": [round(float(s), 5) for s in scores],
        "slice_percentiles": [round(float(p), 2) for p in detection.slice_percentiles],
        "scored_slices": [int(i) for i in torch.nonzero(detection.scored).flatten()],
        "slice_foreground_shares": [round(float(a), 3) for a in foreground_shares(prepared.foreground)],
        "slivers": {"slices": sliver_list, "file_axis": "ijk"[sliver_files[0][0]] if sliver_files else None,
                    "file_indices": [index for _, index in sliver_files], "rule": SLIVER_RULE,
                    "sliver_area": settings.sliver_area},
        "top_slices": top,
        "outputs": {k: p.name for k, p in outputs.items()},
        "model": extractor.model_id, "stages": list(extractor.stages),
        "bank": {"id": bank.id, "references": len(bank),
                 "volumes": int(bank.groups.max()) + 1 if len(bank) else 0, "calibration": bank.calibration()},
        "settings": asdict(settings), "seed": settings.seed, "versions": versions(),
        "device": str(detector.device),
    }


def score_spread(score: float, replicates: tuple[float, ...]) -> dict:
    """How far a volume score moves between bank subsets: ``spread`` (RMS difference), ``range`` and the ``scores``.

    The RMS difference from the score itself, not the replicates' standard deviation: a subset that shifts every
    score (fewer references, another calibration) moves the score as much as one that scatters it.
    """
    if not replicates:
        return {"spread": None, "range": None, "scores": []}
    values = np.asarray(replicates, dtype=np.float64)
    return {"spread": round(float(np.sqrt(np.mean((values - score) ** 2))), 4),
            "range": [round(float(values.min()), 4), round(float(values.max()), 4)],
            "scores": [round(float(v), 4) for v in values]}


def sliver_notes(files: list[tuple[int, int]], area: float) -> list[str]:
    """A note naming the slivers (the file's voxel axis and indices) that were neither ranked nor scored."""
    if not files:
        return []
    return [f"{len(files)} slices ({'ijk'[files[0][0]]}={index_ranges([index for _, index in files])}) hold less "
            f"than {area:.0%} of the largest slice's foreground (slivers, as at the ends of an organ): mapped, but "
            "neither ranked among the top slices nor counted in the volume score (--sliver-area)"]


def percentile_notes(basis: dict, error: float) -> list[str]:
    """A warning when the volume percentile rests on too few normal volumes to mean much."""
    volumes, needed = basis["normal_volumes"], basis["stable_from_volumes"]
    if basis["stable"] or not volumes:
        return []
    levels = ", ".join(f"{100 * i / volumes:g}" for i in range(volumes + 1)) if volumes <= 4 else \
        f"steps of {100 / volumes:.3g}"
    extra = "" if basis["bank_volumes"] <= volumes else (
        f"; the bank holds {basis['bank_volumes']} volumes but its calibration sampled {volumes}: raise "
        "--calibration-slices to sample more")
    return [f"the volume percentile rests on {volumes} normal volume{'s' if volumes > 1 else ''} (it can only be "
            f"{levels}; standard error up to {basis['standard_error_points']:.0f} points): a stable percentile "
            f"(standard error at most {error:g} points) needs at least {needed} normal volumes{extra}; build the "
            "bank from more normal references"]


def spread_notes(bank: Bank, settings: Settings, spread: dict) -> list[str]:
    """A note when the spread of the score cannot be given (a bank of one volume, or built before spreads)."""
    if spread["spread"] is not None or settings.spread_replicates == 0:
        return []
    volumes = int(bank.groups.max()) + 1 if len(bank) else 0
    if bank.replicates:
        return ["no spread was measured for this run (tri-planar detection, --planes, measures none)"]
    if volumes < 2:
        return ["the bank holds one normal volume: how much the score depends on the bank cannot be measured; build "
                "it from more normal references"]
    return ["the bank was built before score spreads existed: how much the score depends on the bank is not "
            "measured; rebuild it (`python -m himatch_med.bank build`) to get the spread"]


def index_ranges(indices: list[int]) -> str:
    """Indices as ranges: 0, 1, 2, 12, 13 -> '0-2, 12-13'."""
    parts, ordered = [], sorted(set(indices))
    start = previous = ordered[0]
    for index in ordered[1:] + [None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(f"{start}" if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ", ".join(parts)


def calibration_notes(bank: Bank, settings: Settings) -> list[str]:
    """A warning when this run's settings differ from those the bank was calibrated with."""
    changes = bank.calibration_changes(settings, Settings.flagged("calibrated"))
    changed = [f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()]
    older = [] if "sliver_area" in bank.info.calibrated_with or not bank.info.calibrated_with else [
        "the bank was calibrated before slivers were left out of the scores: its normal scores include end slices, "
        "so percentiles are approximate; rebuild it (`python -m himatch_med.bank build`) for exact ones"]
    if not changed:
        return older
    return older + ["the bank was calibrated with other settings (" + ", ".join(changed) + "); z-units and "
                    "percentiles are approximate; build the bank with these settings for exact ones"]


def aspect_notes(aspect: float) -> list[str]:
    """A note when the overview cannot draw the slices' pixels to scale (:func:`himatch_med.figures.shown_aspect`)."""
    from himatch_med.figures import MAX_ASPECT, shown_aspect

    if shown_aspect(aspect) == aspect:
        return []
    how = f"{aspect:g} times taller than wide" if aspect > 1 else f"{1 / aspect:g} times wider than tall"
    return [f"the slices' pixels are {how} (from the voxel sizes in the header); the overview picture draws them "
            f"capped at {MAX_ASPECT:g}:1, so anatomy looks squeezed there; the maps are not affected; check the "
            "voxel sizes in the header"]


def versions() -> dict:
    """Versions of Python, himatch-med and the main packages (``None`` for one that is not installed)."""
    return dict(installed_versions())


@functools.cache
def installed_versions() -> tuple[tuple[str, str | None], ...]:
    """:func:`versions` as pairs, looked up once per process (reading the packages' metadata took 30 ms a report)."""
    import importlib.metadata as metadata

    found = {"python": platform.python_version(), "himatch_med": __version__}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return tuple(found.items())


def overview_figure(prepared: Prepared, detection: Detection, report: dict, *, aspect: float = 1.0,
                    findings: np.ndarray | None = None, title: str | None = None):
    """The overview picture: the most anomalous slices with their heatmaps (``aspect``: pixel height over width).

    ``findings``: the findings' label map as slices ``(S, H, W)``, outlined on the chosen slices; ``title``: what
    the picture is of (a study id; default: the input's file name).
    """
    from himatch_med.figures import overview

    chosen = [t["slice"] for t in report["top_slices"][:OVERVIEW_SLICES]] or [len(prepared.slices) // 2]
    titles = [f"slice {t['file_axis']}={t['file_index']}  score {t['score']:.2f}" for t in report["top_slices"]]
    titles = (titles + [""] * len(chosen))[: len(chosen)]
    name = title or Path(report["input"]).name
    spread = report.get("volume_score_spread")
    heading = f"{name}: volume score {report['volume_score']:.2f}" + ("" if spread is None else f" ± {spread:.2f}")
    basis = report.get("percentile_basis") or {}
    percentile = report.get("volume_percentile")
    if percentile is not None and percentile == percentile and basis.get("normal_volumes"):
        heading += (f" z, percentile {percentile:.0f} of {basis['normal_volumes']} normal volumes"
                    + ("" if basis.get("stable") else " (too few)"))
    else:
        heading += " z"
    slivers = report.get("slivers") or {}
    if slivers.get("file_indices"):
        heading += (f"\nslivers not ranked ({slivers['file_axis']}): {index_ranges(slivers['file_indices'])}")
    return overview(prepared.slices[chosen].numpy(), detection.anomaly[chosen].numpy(),
                    prepared.foreground[chosen].numpy(), titles, title=heading, aspect=aspect,
                    findings=None if findings is None else findings[chosen])
