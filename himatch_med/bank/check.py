"""Checking the normal references themselves: each calibration volume's score against the others, outliers flagged.

"Normal" cohorts hold incidental findings, and one abnormal reference hides the same abnormality in every query
that retrieves it. The calibration already queries each sampled reference volume against the bank without its own
volume (docs/method.md §3); :func:`check_references` reads those leave-own-volume-out volume scores, places each
among the others (percentile) and flags the ones far above them: robust z = (score - median) / (1.4826 · MAD) above
``outlier_z`` (:attr:`himatch_med.config.Settings.reference_outlier_z`, 3.5, the usual modified z-score cut). Only high
scores are flagged: a volume unlike the others scores high against them; a low score is not a finding. Tensors and
the bank's description only; the command line is :mod:`himatch_med.bank.__main__`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from himatch_med.bank.data import Bank
from himatch_med.config import REFERENCE_CHECK_MIN_VOLUMES
from himatch_med.errors import InputError
from himatch_med.scoring import percentile

MAD_SCALE = 1.4826
"""The median absolute deviation times this estimates the standard deviation of normally distributed scores."""


@dataclass(frozen=True)
class VolumeCheck:
    """One reference volume: its source, bank slices, leave-own-volume-out score (z), percentile, robust z, flag.

    ``percentile``: the share (0-100) of the *other* calibration volumes scoring at or below it.
    """

    source: str
    slices: int
    score: float
    percentile: float
    robust_z: float
    flagged: bool


@dataclass(frozen=True)
class ReferenceCheck:
    """The check of a bank's references.

    The checked volumes (highest score first), those the calibration did not sample, the rule and what a user should
    know.
    """

    volumes: tuple[VolumeCheck, ...]
    unchecked: tuple[str, ...]
    outlier_z: float
    notes: tuple[str, ...]

    @property
    def flagged(self) -> tuple[str, ...]:
        """Sources of the flagged volumes."""
        return tuple(v.source for v in self.volumes if v.flagged)


def robust_z(scores: torch.Tensor) -> torch.Tensor:
    """``(score - median) / (1.4826 · MAD)`` of each score ``(V,)``; zeros when the scores do not spread at all.

    A MAD of 0 (more than half the scores equal) falls back to the standard deviation.
    """
    scores = scores.double()
    median = scores.median()
    scale = MAD_SCALE * (scores - median).abs().median()
    if not scale > 0:
        scale = scores.std() if len(scores) > 1 else torch.zeros(())
    if not scale > 0:
        return torch.zeros_like(scores, dtype=torch.float32)
    return ((scores - median) / scale).float()


def check_references(bank: Bank, *, outlier_z: float, source: str = "the bank") -> ReferenceCheck:
    """Each calibration volume's leave-own-volume-out score, percentile among the others, robust z and flag.

    Args:
        bank: a calibrated bank.
        outlier_z: flag volumes whose robust z exceeds this.
        source: how to name the bank in an error (its folder).

    Raises:
        InputError: the bank does not record which volume each calibration score belongs to (built before that was
            recorded) or was never calibrated.
    """
    groups = bank.calibration_volume_groups
    if groups is None:
        raise InputError(f"{source} does not record which reference volume each calibration score belongs to (it was "
                         "built by an earlier himatch-med 0.2); rebuild it with `python -m himatch_med.bank build` "
                         "to check its references")
    if not len(bank.calibration_volume_scores):
        raise InputError(f"{source} is not calibrated; build it with `python -m himatch_med.bank build`")
    sources = bank.info.sources
    names: dict[int, str] = {}
    counts = torch.bincount(bank.groups).tolist()
    for row, group in enumerate(bank.groups.tolist()):
        if group not in names:
            names[group] = str(sources[row]["source"]) if row < len(sources) else f"volume {group}"
    scores = bank.calibration_volume_scores.float()
    z = robust_z(scores)
    enough = len(scores) >= REFERENCE_CHECK_MIN_VOLUMES
    volumes = []
    for index, group in enumerate(groups.tolist()):
        others = torch.cat([scores[:index], scores[index + 1:]])
        volumes.append(VolumeCheck(source=names.get(group, f"volume {group}"), slices=counts[group],
                                   score=float(scores[index]),
                                   percentile=float(percentile(scores[index:index + 1], others)[0]),
                                   robust_z=float(z[index]), flagged=enough and float(z[index]) > outlier_z))
    checked = set(groups.tolist())
    unchecked = tuple(name for group, name in names.items() if group not in checked)
    notes = []
    if not enough:
        notes.append(f"only {len(scores)} calibration volume(s): at least {REFERENCE_CHECK_MIN_VOLUMES} are needed to "
                     "flag outliers; nothing is flagged")
    if unchecked:
        notes.append(f"{len(unchecked)} of {len(names)} reference volumes were not in the calibration sample and are "
                     f"not checked; rebuild with --calibration-slices {len(bank)} (the bank's slice count) to check "
                     "them all")
    if len(names) == 1:
        notes.append("a bank of one volume leaves out only each slice itself: its scores are not leave-own-volume-out")
    return ReferenceCheck(tuple(sorted(volumes, key=lambda v: -v.score)), unchecked, outlier_z, tuple(notes))


def check_text(check: ReferenceCheck) -> str:
    """The check as a table a user reads: one line per volume, highest score first, flagged ones marked."""
    lines = [f"reference check: {len(check.volumes)} volume(s), leave-own-volume-out score (z-units) against the "
             f"others; flagged: robust z > {check.outlier_z:g}",
             f"  {'score':>8} {'pct':>6} {'robust z':>9} {'slices':>6}  reference"]
    for v in check.volumes:
        mark = "  FLAGGED" if v.flagged else ""
        lines.append(f"  {v.score:8.2f} {v.percentile:6.1f} {v.robust_z:9.2f} {v.slices:6d}  {v.source}{mark}")
    lines.extend(f"  note: {note}" for note in check.notes)
    if check.flagged:
        lines.append(f"  {len(check.flagged)} flagged: look at them; to leave them out, rebuild with --exclude "
                     + " ".join(check.flagged))
    else:
        lines.append("  no reference flagged")
    return "\n".join(lines)


def check_record(check: ReferenceCheck) -> dict:
    """The check as plain values (JSON)."""
    return {"outlier_z": check.outlier_z, "flagged": list(check.flagged), "unchecked": list(check.unchecked),
            "notes": list(check.notes),
            "volumes": [{"source": v.source, "slices": v.slices, "score": v.score, "percentile": v.percentile,
                         "robust_z": v.robust_z, "flagged": v.flagged} for v in check.volumes]}
