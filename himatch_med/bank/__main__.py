"""``python -m himatch_med.bank build REFERENCES -o BANK``: build a reference bank from normal volumes or images.

``python -m himatch_med.bank check BANK``: each reference volume's leave-own-volume-out score and percentile from the
calibration, outliers flagged (:mod:`himatch_med.bank.check`); exit code 0 none flagged, 1 some flagged, 2 an error.
``bank build`` ends with the same section; ``--exclude NAME ...`` or ``--exclude-list FILE`` leaves references out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himatch_med import cli
from himatch_med.config import Settings


def bank_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m himatch_med.bank``."""
    parser = argparse.ArgumentParser(prog="himatch-med bank",
                                     description="Build a reference bank from normal volumes or images, or check "
                                                 "the references of one.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a bank from normal references")
    build.add_argument("references", nargs="+", type=Path, help="normal NIfTI files, DICOM folders, 2D images or "
                                                                "folders of them")
    build.add_argument("-o", "--output", type=Path, required=True, help="bank folder to write")
    cli.add_reference_labels(build)
    build.add_argument("--exclude", nargs="+", default=None, metavar="NAME",
                       help="references to leave out: a path, a file name, or the name `bank check` shows")
    build.add_argument("--exclude-list", type=Path, default=None, metavar="FILE",
                       help="a text file of references to leave out, one per line (# comments); `bank check "
                            "--flagged-list` writes one")
    cli.add_common(build)
    check = commands.add_parser("check", help="check a bank's references: leave-own-volume-out scores, outliers")
    check.add_argument("bank", type=Path, help="bank folder")
    default = Settings.__dataclass_fields__["reference_outlier_z"]
    check.add_argument("--reference-outlier-z", type=float, default=default.default,
                       help=f"{default.metadata['help']} (default: {default.default})")
    check.add_argument("--json", type=Path, default=None, help="also write the check as JSON to this file")
    check.add_argument("--flagged-list", type=Path, default=None, metavar="FILE",
                       help="write the flagged references, one per line, for `bank build --exclude-list`")
    check.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def bank_main(argv: list[str] | None = None) -> int:
    """Build a bank; returns the exit code (0 written, 2 nothing could run)."""
    args = bank_parser().parse_args(argv)
    if args.command == "check":
        return cli.guarded(args, _check, with_settings=False)
    return cli.guarded(args, _build)


def _build(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import preflight

    # Common mistakes first, before torch and MONAI are imported (seconds).
    preflight.existing([*args.references, *([args.exclude_list] if args.exclude_list else [])])
    preflight.writable(args.output.absolute().parent)
    cli.check_early(args, settings)

    from himatch_med.bank.check import check_references, check_text
    from himatch_med.bank.store import build_bank_folder, excluded_references, read_name_list, stored_bank
    from himatch_med.detect import load_extractor
    from himatch_med.errors import InputError
    from himatch_med.jobs import expand_inputs

    references = expand_inputs(args.references)
    exclude = None
    if args.exclude is not None or args.exclude_list is not None:
        exclude = [*(args.exclude or ()), *(read_name_list(args.exclude_list) if args.exclude_list else ())]
        excluded_references(references, exclude)  # a name matching nothing stops before the model loads
    extractor = load_extractor(settings, args.device)
    folder = build_bank_folder(references, args.reference_labels, settings, extractor, args.output,
                               options=cli.read_options(args), progress=cli.progress_shown(args),
                               exclude=exclude)
    print(f"bank written to {folder}")
    bank = stored_bank(folder)
    if bank.info.excluded:
        print(f"excluded {len(bank.info.excluded)} reference(s): " + ", ".join(bank.info.excluded))
    try:
        print(check_text(check_references(bank, outlier_z=settings.reference_outlier_z, source=str(folder))))
    except InputError as error:
        print(f"reference check not possible: {error}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from himatch_med import preflight

    preflight.folder(args.bank, "pass a bank folder built with `python -m himatch_med.bank build`")
    Settings(reference_outlier_z=args.reference_outlier_z)  # the value's own check, with its message

    from himatch_med import io
    from himatch_med.bank.check import check_record, check_references, check_text
    from himatch_med.bank.store import stored_bank

    check = check_references(stored_bank(args.bank), outlier_z=args.reference_outlier_z, source=str(args.bank))
    print(check_text(check))
    if args.json is not None:
        io.write_json(check_record(check), args.json)
    if args.flagged_list is not None:
        io.write_text("".join(f"{name}\n" for name in check.flagged), args.flagged_list)
    return 1 if check.flagged else 0


if __name__ == "__main__":
    sys.exit(bank_main())
