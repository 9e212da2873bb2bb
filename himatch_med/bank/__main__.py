"""``python -m himatch_med.bank build REFERENCES -o BANK``: build a reference bank from normal volumes or images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himatch_med import cli
from himatch_med.config import Settings


def bank_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m himatch_med.bank``."""
    parser = argparse.ArgumentParser(prog="himatch-med bank",
                                     description="Build a reference bank from normal volumes or images.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a bank from normal references")
    build.add_argument("references", nargs="+", type=Path, help="normal NIfTI files, DICOM folders, 2D images or "
                                                                "folders of them")
    build.add_argument("-o", "--output", type=Path, required=True, help="bank folder to write")
    cli.add_reference_labels(build)
    cli.add_common(build)
    return parser


def bank_main(argv: list[str] | None = None) -> int:
    """Build a bank; returns the exit code (0 written, 2 nothing could run)."""
    args = bank_parser().parse_args(argv)
    return cli.guarded(args, _build)


def _build(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import preflight

    # Common mistakes first, before torch and MONAI are imported (seconds).
    preflight.existing(args.references)
    preflight.writable(args.output.absolute().parent)
    cli.check_early(args, settings)

    from himatch_med.bank.store import build_bank_folder
    from himatch_med.detect import load_extractor
    from himatch_med.jobs import expand_inputs

    references = expand_inputs(args.references)
    extractor = load_extractor(settings, args.device)
    folder = build_bank_folder(references, args.reference_labels, settings, extractor, args.output,
                               options=cli.read_options(args), progress=cli.progress_shown(args))
    print(f"bank written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(bank_main())
