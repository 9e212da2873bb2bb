"""What one input writes besides its maps: the JSON report, its notes, the package versions, the overview picture.

Builds them; :mod:`himatch_med.jobs` writes them through :mod:`himatch_med.io`.
"""

from __future__ import annotations

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

TOP_SLICES = 5
OVERVIEW_SLICES = 4
VERSIONS = ("torch", "transformers", "monai", "nibabel", "SimpleITK", "numpy", "scipy")
"""Packages whose versions a report records, besides Python and himatch-med."""


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
    order = [i for i in torch.argsort(scores, descending=True).tolist() if detection.scored[i]][:TOP_SLICES]
    top = []
    for index in order:
        file_axis, file_index = scan.file_slice_index(index, prepared.axis)
        top.append({"slice": index, "file_axis": "ijk"[file_axis], "file_index": file_index,
                    "score": float(scores[index]), "percentile": float(detection.slice_percentiles[index])})
    return {
        "input": str(scan.path), "kind": scan.kind, "shape": list(scan.shape),
        "affine": np.round(scan.affine, 6).tolist(),
        "notes": list(scan.notes) + list(prepared.notes) + calibration_notes(bank, settings)
        + aspect_notes(scan.pixel_aspect(prepared.axis)),
        "volume_score": detection.volume_score, "volume_percentile": detection.volume_percentile,
        "slice_axis": settings.axis,
        "slice_order": "slice i lies along the canonical (RAS) axis, from left/posterior/inferior upwards",
        "slice_scores": [round(float(s), 5) for s in scores],
        "slice_percentiles": [round(float(p), 2) for p in detection.slice_percentiles],
        "scored_slices": [int(i) for i in torch.nonzero(detection.scored).flatten()],
        "top_slices": top,
        "outputs": {k: p.name for k, p in outputs.items()},
        "model": extractor.model_id, "stages": list(extractor.stages),
        "bank": {"id": bank.id, "references": len(bank),
                 "volumes": int(bank.groups.max()) + 1 if len(bank) else 0, "calibration": bank.calibration()},
        "settings": asdict(settings), "seed": settings.seed, "versions": versions(),
        "device": str(detector.device),
    }


def calibration_notes(bank: Bank, settings: Settings) -> list[str]:
    """A warning when this run's settings differ from those the bank was calibrated with."""
    changes = bank.calibration_changes(settings, Settings.flagged("calibrated"))
    changed = [f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()]
    if not changed:
        return []
    return ["the bank was calibrated with other settings (" + ", ".join(changed) + "); z-units and percentiles are "
            "approximate; build the bank with these settings for exact ones"]


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
    import importlib.metadata as metadata

    found = {"python": platform.python_version(), "himatch_med": __version__}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def overview_figure(prepared: Prepared, detection: Detection, report: dict, *, aspect: float = 1.0,
                    findings: np.ndarray | None = None):
    """The overview picture: the most anomalous slices with their heatmaps (``aspect``: pixel height over width).

    ``findings``: the findings' label map as slices ``(S, H, W)``, outlined on the chosen slices.
    """
    from himatch_med.figures import overview

    chosen = [t["slice"] for t in report["top_slices"][:OVERVIEW_SLICES]] or [len(prepared.slices) // 2]
    titles = [f"slice {t['file_axis']}={t['file_index']}  score {t['score']:.2f}" for t in report["top_slices"]]
    titles = (titles + [""] * len(chosen))[: len(chosen)]
    name = Path(report["input"]).name
    return overview(prepared.slices[chosen].numpy(), detection.anomaly[chosen].numpy(),
                    prepared.foreground[chosen].numpy(), titles,
                    title=f"{name}: volume score {report['volume_score']:.2f} z", aspect=aspect,
                    findings=None if findings is None else findings[chosen])
