"""What the command lines share: ``himatch-med run``, ``bank``, ``screen`` and ``evaluate``.

One option per setting of :class:`himatch_med.config.Settings` (with its default shown), the read options, the bank
source, and :func:`guarded`, which turns every error into one line and an exit code. Heavy libraries are imported
only inside functions, after the arguments are parsed, so that ``--help`` is instant.

What a command says goes three ways: results on stdout (so that scripts can parse them), warnings and notes through
:mod:`logging` (the ``himatch_med`` logger; on stderr as ``warning: ...`` and ``note: ...`` while a command runs),
progress bars through tqdm on stderr. ``-q`` keeps warnings and errors only and no progress bars; ``-v`` adds
``debug: ...`` lines (what was loaded, the settings, timings).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from himatch_med import __version__
from himatch_med.config import AXES, NAN_POLICIES, ReadOptions, Settings

LOGGER = logging.getLogger("himatch_med")
"""The package's logger: warnings and notes of the library and of the commands."""
PREFIXES = {logging.DEBUG: "debug", logging.INFO: "note", logging.WARNING: "warning", logging.ERROR: "error",
            logging.CRITICAL: "error"}
"""How a command's stderr line starts, by level (``note: ...``, ``warning: ...``)."""


class StderrLines(logging.Handler):
    """Log records as ``<prefix>: <message>`` lines on whatever ``sys.stderr`` is when each is emitted.

    A record with ``extra={"bare": True}`` is written without the prefix (a traceback, a closing line).
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record."""
        try:
            text = record.getMessage()
            line = text if getattr(record, "bare", False) else f"{PREFIXES.get(record.levelno, 'note')}: {text}"
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:  # a logging failure must not end the job (logging's own rule)
            self.handleError(record)


def verbosity(args: argparse.Namespace) -> int:
    """The logging level of ``-q`` (warnings), the default (notes), ``-v`` or ``--debug`` (debug lines)."""
    if getattr(args, "verbose", False) or getattr(args, "debug", False):
        return logging.DEBUG
    return logging.WARNING if getattr(args, "quiet", False) else logging.INFO


def progress_shown(args: argparse.Namespace) -> bool:
    """Whether progress bars are shown: not with ``-q``."""
    return not getattr(args, "quiet", False)


def add_settings(parser: argparse.ArgumentParser, several: tuple[str, ...] = ()) -> None:
    """Add one option per setting of :class:`Settings`; the settings named in ``several`` take several values.

    A setting in ``several`` collects a list (``--fusion mean max``); ``--stages`` then collects one list of blocks
    per use of the option (``--stages 3 6 9 12 --stages 12``). :func:`settings_from` needs single values.
    """
    group = parser.add_argument_group("method settings (docs/method.md)")
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else None
        option = "--" + f.name.replace("_", "-")
        shown = "modality default" if default is None else ("4 evenly spaced" if default == () else default)
        help_text = f"{f.metadata['help']} (default: {shown})"
        many = f.name in several
        if f.name == "planes":
            group.add_argument(option, nargs="+", default=None, metavar="PLANE", choices=(*AXES, "all"),
                               action="append" if many else "store",
                               help=f"{f.metadata['help']} (default: --axis only)"
                               + ("; repeat the option for several sets" if many else ""))
        elif f.name == "stages":
            group.add_argument(option, type=int, nargs="+", default=None, metavar="BLOCK",
                               action="append" if many else "store",
                               help=help_text + ("; repeat the option for several sets" if many else ""))
        else:
            kind = type(default) if default is not None else (str if f.name == "foreground" else float)
            group.add_argument(option, type=kind, default=None, choices=f.metadata.get("choices"),
                               nargs="+" if many else None, help=help_text + ("; several values allowed" if many
                                                                              else ""))


def settings_from(args: argparse.Namespace) -> Settings:
    """The resolved settings of parsed arguments.

    With ``--bank``, the bank defines the run: every setting it records (model, preset, image size, stages, and the
    settings it was calibrated with) is taken from it unless given explicitly; an explicit one that differs is then
    refused or noted when the bank is opened. Other options not given keep their defaults.
    """
    chosen = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None}
    if getattr(args, "bank", None) is not None:
        chosen = {**bank_defaults(args.bank), **chosen}
    for name in ("stages", "planes"):
        if name in chosen:
            chosen[name] = tuple(chosen[name])
    return Settings(**chosen).resolved()


def bank_defaults(folder: Path) -> dict:
    """The settings a bank folder records (``bank.json``: its settings and those of its calibration)."""
    from himatch_med.preflight import bank_recorded

    names = {f.name for f in fields(Settings)}
    recorded = bank_recorded(folder)  # verified in full when the bank is opened
    return {name: value for name, value in recorded.items() if name in names and value is not None}


def add_common(parser: argparse.ArgumentParser, several: tuple[str, ...] = ()) -> None:
    """Add the options every command has: device, read options, verbosity, ``--debug``, ``--version``, settings."""
    add_verbosity(parser)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--volume-index", type=int, default=None, help="volume to take from a 4D NIfTI")
    parser.add_argument("--series", default=None, help="SeriesInstanceUID to read from a DICOM folder with several")
    parser.add_argument("--nan-policy", choices=NAN_POLICIES, default="refuse",
                        help="NaN or infinite voxels: refuse the file, or set them to 0 with a warning (default: "
                             "refuse)")
    parser.add_argument("--allow-shear", action="store_true",
                        help="accept sheared affines (e.g. CT gantry tilt), slicing along the nearest voxel axes")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_settings(parser, several)


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """Add ``-q/--quiet``, ``-v/--verbose`` and ``--version``."""
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true",
                         help="no progress bars and no notes: warnings and errors only on stderr (results stay on "
                              "stdout)")
    chatter.add_argument("-v", "--verbose", action="store_true",
                         help="also debug lines on stderr: what was loaded, the settings, timings")
    parser.add_argument("--version", action="version", version=f"himatch-med {__version__}")


def read_options(args: argparse.Namespace) -> ReadOptions:
    """How the inputs are read, from the options :func:`add_common` added."""
    return ReadOptions(volume_index=args.volume_index, series=args.series, nan_policy=args.nan_policy,
                       allow_shear=args.allow_shear)


def add_bank_source(parser: argparse.ArgumentParser) -> None:
    """The options that say where the normal references come from: a bank, or reference files (cached bank)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bank", type=Path, help="a bank folder built with `python -m himatch_med.bank build`")
    source.add_argument("--references", type=Path, nargs="+",
                        help="normal reference files or folders; a bank is built from them and cached")
    add_reference_labels(parser)
    parser.add_argument("--bank-cache", type=Path, default=None,
                        help="where banks built from --references are cached (default: ~/.cache/himatch-med/banks)")


def add_reference_labels(parser: argparse.ArgumentParser) -> None:
    """The ``--reference-labels`` option: annotated references whose lesion-free slices are used."""
    parser.add_argument("--reference-labels", type=Path, default=None,
                        help="lesion labels of annotated references (only their lesion-free slices are used): a "
                             "folder of labels named like the references, a CSV with the columns image,label, or a "
                             "file name found in each reference's folder (seg.nii.gz for case/flair.nii.gz with "
                             "case/seg.nii.gz)")


def check_early(args: argparse.Namespace, settings: Settings) -> None:
    """The checks of :mod:`himatch_med.preflight` for the options every command shares, before any heavy import.

    The model folder, and the bank source of :func:`add_bank_source` when the command has one: ``--bank`` fits
    these settings, ``--references`` exist, ``--reference-labels`` names labels in one of its forms; then a Hub id
    that neither this machine's cache nor the Hub can give.
    """
    from himatch_med import preflight
    from himatch_med.errors import InputError

    if settings.method != "himatch":
        raise InputError(f"--method {settings.method} is a baseline for comparison, evaluated beside HiMatch-AD: "
                         f"himatch-med evaluate ... --method himatch {settings.method}")
    preflight.model_folder(settings.model)
    if getattr(args, "bank", None) is not None:
        preflight.bank_fits(args.bank, settings)
    preflight.existing([*(getattr(args, "references", None) or ())])
    if getattr(args, "reference_labels", None):
        preflight.reference_labels(args.reference_labels)
    preflight.model_available(settings.model)  # last: the mistakes above are the user's to fix first


def bank_from(args: argparse.Namespace, settings: Settings, extractor):
    """The bank the options of :func:`add_bank_source` name: ``--bank`` opened, or ``--references`` built and cached."""
    from himatch_med.bank.store import cached_bank, open_bank

    if args.bank is not None:
        return open_bank(args.bank, settings, extractor)
    return cached_bank(args.references, args.reference_labels, settings, extractor, args.bank_cache,
                       options=read_options(args), progress=progress_shown(args))


def quiet_itk() -> None:
    """Keep ITK's C++ warnings (printed straight to stderr) from reaching the user."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def guarded(args: argparse.Namespace, job, *, with_settings: bool = True) -> int:
    """Run ``job(args, settings)`` (or ``job(args)``) so that every error ends in one line and an exit code.

    Tracebacks are shown only with ``--debug``. SIGTERM stops the job as Ctrl-C does (exit codes 143 and 130): the
    outputs being written are removed, those finished are kept.
    """
    import signal
    import threading
    import warnings

    from himatch_med.errors import InputError, Terminated, WeightsUnavailableError

    def terminate(number, frame):
        raise Terminated

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    # The command's lines on stderr for as long as it runs; a library user's own logging setup is left as it was.
    handler, level, propagate = StderrLines(), LOGGER.level, LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.setLevel(verbosity(args))
    LOGGER.propagate = False
    try:
        with warnings.catch_warnings():
            if not args.debug:
                # The libraries' own warnings (numpy, matplotlib, ITK) say nothing a user can act on; what matters
                # reaches them as notes and errors. --debug shows everything.
                warnings.simplefilter("ignore")
                quiet_itk()
            return job(args, settings_from(args)) if with_settings else job(args)
    except (InputError, WeightsUnavailableError, ValueError) as error:
        if args.debug:
            raise
        LOGGER.error("%s", error)
        return 2
    except KeyboardInterrupt as interruption:
        terminated = isinstance(interruption, Terminated)
        LOGGER.error("%s; finished outputs are kept, nothing half-written was left",
                     "terminated (SIGTERM)" if terminated else "interrupted", extra={"bare": True})
        return 143 if terminated else 130
    except Exception as error:  # anything unforeseen still ends in one line, with the way to the details
        if args.debug:
            raise
        LOGGER.error("unexpected %s: %s; run again with --debug for the traceback", type(error).__name__, error)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
        LOGGER.propagate = propagate
