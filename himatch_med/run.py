"""Command line: ``python -m himatch_med.run VOLUME ... --bank BANK -o OUT`` and ``python -m himatch_med.bank build``.

Parse, load, detect, save. Heavy libraries are imported only after the arguments are parsed, so ``--help`` is
instant. Every setting of :class:`himatch_med.config.Settings` is an option with its default shown.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from himatch_med.config import Settings


def _add_settings(parser: argparse.ArgumentParser, several: tuple[str, ...] = ()) -> None:
    """Add one option per setting of :class:`Settings`; the settings named in ``several`` take several values.

    A setting in ``several`` collects a list (``--fusion mean max``); ``--stages`` then collects one list of blocks
    per use of the option (``--stages 3 6 9 12 --stages 12``). :func:`_settings` needs single values.
    """
    group = parser.add_argument_group("method settings (METHOD.md)")
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else None
        option = "--" + f.name.replace("_", "-")
        shown = "modality default" if default is None else ("4 evenly spaced" if default == () else default)
        help_text = f"{f.metadata['help']} (default: {shown})"
        many = f.name in several
        if f.name == "stages":
            group.add_argument(option, type=int, nargs="+", default=None, metavar="BLOCK",
                               action="append" if many else "store",
                               help=help_text + ("; repeat the option for several sets" if many else ""))
        else:
            kind = type(default) if default is not None else (str if f.name == "foreground" else float)
            group.add_argument(option, type=kind, default=None, choices=f.metadata.get("choices"),
                               nargs="+" if many else None, help=help_text + ("; several values allowed" if many
                                                                              else ""))


def _settings(args: argparse.Namespace) -> Settings:
    chosen = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None}
    if "stages" in chosen:
        chosen["stages"] = tuple(chosen["stages"])
    return Settings(**chosen).resolved()


def _add_common(parser: argparse.ArgumentParser, several: tuple[str, ...] = ()) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--volume-index", type=int, default=None, help="volume to take from a 4D NIfTI")
    parser.add_argument("--series", default=None, help="SeriesInstanceUID to read from a DICOM folder with several")
    parser.add_argument("--nan-policy", choices=("refuse", "zero"), default="refuse",
                        help="NaN or infinite voxels: refuse the file, or set them to 0 with a warning (default: "
                             "refuse)")
    parser.add_argument("--allow-shear", action="store_true",
                        help="accept sheared affines (e.g. CT gantry tilt), slicing along the nearest voxel axes")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    _add_settings(parser, several)


def _add_bank_source(parser: argparse.ArgumentParser) -> None:
    """The options that say where the normal references come from: a bank, or reference files (cached bank)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bank", type=Path, help="a bank folder built with `python -m himatch_med.bank build`")
    source.add_argument("--references", type=Path, nargs="+",
                        help="normal reference files or folders; a bank is built from them and cached")
    parser.add_argument("--reference-labels", type=Path, default=None,
                        help="folder of lesion labels named like the references: only lesion-free slices are used")
    parser.add_argument("--bank-cache", type=Path, default=None,
                        help="where banks built from --references are cached (default: ~/.cache/himatch-med/banks)")


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m himatch_med.run``."""
    parser = argparse.ArgumentParser(
        prog="python -m himatch_med.run",
        description="Write an anomaly heatmap NIfTI, an uncertainty NIfTI, a JSON report and an overview PNG for each "
                    "input volume, compared with normal references (a bank, or reference files).")
    parser.add_argument("inputs", nargs="+", type=Path, help="NIfTI files, DICOM series folders or 2D images")
    _add_bank_source(parser)
    parser.add_argument("-o", "--output", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument("--mask", type=Path, default=None,
                        help="foreground mask NIfTI on the input's grid (one input only); overrides --foreground")
    _add_common(parser)
    return parser


def bank_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m himatch_med.bank``."""
    parser = argparse.ArgumentParser(prog="python -m himatch_med.bank",
                                     description="Build a reference bank from normal volumes or images.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a bank from normal references")
    build.add_argument("references", nargs="+", type=Path, help="normal NIfTI files, DICOM folders, 2D images or "
                                                                "folders of them")
    build.add_argument("-o", "--output", type=Path, required=True, help="bank folder to write")
    build.add_argument("--reference-labels", type=Path, default=None,
                       help="folder of lesion labels named like the references: only lesion-free slices are used")
    _add_common(build)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the main job; returns the exit code (0 all done, 1 some inputs failed, 2 nothing could run)."""
    args = run_parser().parse_args(argv)
    return _guarded(args, _run)


def bank_main(argv: list[str] | None = None) -> int:
    """Build a bank; returns the exit code."""
    args = bank_parser().parse_args(argv)
    return _guarded(args, _build)


def _guarded(args: argparse.Namespace, job, *, with_settings: bool = True) -> int:
    """Run ``job(args, settings)`` (or ``job(args)``) so that every error ends in one line and an exit code.

    Tracebacks are shown only with ``--debug``.
    """
    from himatch_med.errors import InputError, WeightsUnavailableError

    try:
        return job(args, _settings(args)) if with_settings else job(args)
    except (InputError, WeightsUnavailableError, ValueError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, nothing half-written was left", file=sys.stderr)
        return 130
    except Exception as error:  # anything unforeseen still ends in one line, with the way to the details
        if args.debug:
            raise
        print(f"error: unexpected {type(error).__name__}: {error}; run again with --debug for the traceback",
              file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import engine

    inputs = engine.expand_inputs(args.inputs)
    if args.mask is not None and len(inputs) != 1:
        raise ValueError("--mask applies to a single input; pass one input or drop --mask")
    engine.check_output_folder(args.output, inputs)
    backbone = engine.load(settings, args.device)
    if args.bank is not None:
        bank = engine.open_bank(args.bank, settings, backbone)
    else:
        bank = engine.cached_bank(args.references, args.reference_labels, settings, backbone, args.bank_cache,
                                  options=_read_options(args))
    failures = 0
    for path in inputs:
        try:
            outputs = engine.process(path, backbone, bank, settings, args.output, options=_read_options(args),
                                     mask=args.mask)
            for note in outputs["notes"]:
                print(f"warning: {path}: {note}", file=sys.stderr)
            print(f"{path}: volume score {outputs['volume_score']:.2f} (percentile "
                  f"{_pct(outputs['volume_percentile'])}) -> {args.output / outputs['outputs']['anomaly']}")
        except Exception as error:  # one failing volume must not lose the others
            if args.debug:
                raise
            failures += 1
            print(f"error: {engine.describe_error(path, error)}", file=sys.stderr)
    return 1 if failures else 0


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.0f}"


def _read_options(args: argparse.Namespace) -> dict:
    return {"volume_index": args.volume_index, "series": args.series, "nan_policy": args.nan_policy,
            "allow_shear": args.allow_shear}


def _build(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import engine

    references = engine.expand_inputs(args.references)
    backbone = engine.load(settings, args.device)
    folder = engine.build_bank_folder(references, args.reference_labels, settings, backbone, args.output,
                                      options=_read_options(args))
    print(f"bank written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
