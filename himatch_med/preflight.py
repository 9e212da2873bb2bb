"""Checks that answer before the heavy imports: the inputs exist, the output folder can be written, a bank fits.

Standard library only (besides :mod:`himatch_med.config`, :mod:`himatch_med.errors` and :mod:`himatch_med.hub`,
which imports huggingface_hub's cache lookup, 0.15 s, only when the Hub cannot be reached), so that the common
mistakes (a missing file, an unwritable folder, a bank built with other settings, a model folder that is not there,
weights neither cached nor downloadable) are reported within a second, not after the ten seconds or more that
importing torch and MONAI takes. The complete checks still run later where the files are opened; these only make the
common mistakes fast.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from himatch_med import hub
from himatch_med.config import Settings
from himatch_med.errors import InputError, WeightsUnavailableError

BANK_META = "bank.json"
"""The bank's description (as :data:`himatch_med.io.BANK_META`)."""
BANK_ARRAYS = "bank.safetensors"
"""The bank's arrays (as :data:`himatch_med.io.BANK_ARRAYS`)."""


def existing(paths: list[Path]) -> None:
    """Raise :class:`InputError` for the first of ``paths`` that does not exist."""
    for path in paths:
        if not Path(path).exists():
            raise InputError(f"{path}: no such file or folder")


def reference_labels(path: Path) -> None:
    """Raise :class:`InputError` unless ``--reference-labels`` is an existing folder or CSV, or a bare file name.

    A bare name (``seg.nii.gz``) stands for the file of that name in each reference's own folder.
    """
    path = Path(path)
    if path.name.lower().endswith(".csv") or len(path.parts) > 1:
        if not path.exists():
            raise InputError(f"{path}: no such file or folder (--reference-labels)")


def folder(path: Path, hint: str) -> None:
    """Raise :class:`InputError` when ``path`` is not a folder; ``hint`` says what to pass instead."""
    if not Path(path).is_dir():
        raise InputError(f"{path}: not a folder; {hint}")


def writable(folder: Path, option: str = "-o") -> None:
    """Raise :class:`InputError` when ``folder`` (or, if it does not exist yet, its nearest parent) is not writable.

    Judged from permissions (``os.access``: read-only file systems included), then by a probe file created and
    removed at once in the nearest existing folder: permissions say nothing to root, nor of folders like ``/proc``.
    """
    folder = Path(folder).absolute()
    existing_part = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing_part is None or not existing_part.is_dir() or not os.access(existing_part, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: the output folder cannot be written (permission denied); choose another with "
                         f"{option}")
    try:
        with tempfile.TemporaryFile(dir=existing_part, prefix=".himatch-probe-"):
            pass
    except OSError as error:
        raise InputError(f"{folder}: the output folder cannot be written ({error.strerror or error}); choose "
                         f"another with {option}") from error


def model_folder(model: str) -> None:
    """Raise :class:`InputError` for a model given as a path (``.``, ``/``, ``~``) that is not a folder."""
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise InputError(f"--model {model}: no such folder; pass a folder saved with `save_pretrained` or a Hub id "
                         "such as facebook/dinov2-base")


def model_available(model: str) -> None:
    """Raise :class:`WeightsUnavailableError` for a Hub id out of reach: the Hub cannot be asked, the cache lacks it.

    Without network (or with ``HF_HUB_OFFLINE`` set) only the cache can give the weights: a first run of the quick
    start then says so in half a second instead of after six of imports. A folder, or a reachable Hub, passes (the
    model is loaded, and its errors explained, by :func:`himatch_med.backbone.load_backbone`).
    """
    if model.startswith((".", "/", "~")) or Path(model).is_dir():
        return
    reason = "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set" if hub.offline() else hub.unreachable()
    if reason is not None and not hub.cached(model):
        raise WeightsUnavailableError(hub.offline_help(model, reason))


def bank_fits(folder: Path, settings: Settings) -> None:
    """Raise :class:`InputError` when ``folder`` is not a bank, or one built with other settings than ``settings``.

    Compares what ``bank.json`` records with :meth:`Settings.bank_fields` (but the model and the stages, which need
    the loaded model: they are checked when the bank is opened).
    """
    meta_path = Path(folder) / BANK_META
    lacking = [name for name in (BANK_META, BANK_ARRAYS) if not (Path(folder) / name).is_file()]
    if lacking:
        missing = " and ".join(lacking) if Path(folder).is_dir() else "the folder"
        raise InputError(f"{folder}: not a complete bank (missing {missing}); build it with "
                         "`python -m himatch_med.bank build`")
    try:
        recorded = json.loads(meta_path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # a damaged description is reported, with its cause, when the bank is opened
    wrong = [f"{key}: bank has {recorded.get(key)!r}, this run asks for {value!r}"
             for key, value in settings.bank_fields().items()
             if key not in ("model", "stages") and key in recorded and _plain(recorded[key]) != _plain(value)]
    if wrong:
        raise InputError(f"{folder} was built with other settings than this run: " + "; ".join(wrong)
                         + ". Run with the bank's settings, or build a new bank with these.")


def bank_recorded(folder: Path) -> dict:
    """The settings a bank's ``bank.json`` records (its settings and its calibration's), read without heavy imports.

    Empty when the description cannot be read: that is reported, with its cause, when the bank is opened.
    """
    try:
        meta = json.loads((Path(folder) / BANK_META).read_text(encoding="utf-8"))
        return {**(meta.get("calibration") or {}), **(meta.get("settings") or {})}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        return {}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
