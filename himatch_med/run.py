"""Command line: ``himatch-med run VOLUME ... --bank BANK -o OUT`` (also ``python -m himatch_med.run``).

Parse, load, detect, save: one line per input on stdout (its volume score, percentile and heatmap), warnings and
notes on stderr through :mod:`logging` (:mod:`himatch_med.cli`). Heavy libraries are imported only after the
arguments are parsed, so ``--help`` is instant. Every setting of :class:`himatch_med.config.Settings` is an option
with its default shown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himatch_med import cli
from himatch_med.config import Settings


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m himatch_med.run``."""
    parser = argparse.ArgumentParser(
        prog="himatch-med run",
        description="Write an anomaly heatmap NIfTI, an uncertainty NIfTI, a JSON report and an overview PNG for each "
                    "input volume, compared with normal references (a bank, or reference files).")
    parser.add_argument("inputs", nargs="+", type=Path, help="NIfTI files, DICOM series folders or 2D images")
    cli.add_bank_source(parser)
    parser.add_argument("-o", "--output", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument("--mask", type=Path, default=None,
                        help="foreground mask NIfTI on the input's grid (one input only); overrides --foreground")
    cli.add_common(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the main job; returns the exit code.

    0: all done; 1: some inputs failed; 2: nothing could run; 130 or 143: stopped by Ctrl-C or SIGTERM.
    """
    args = run_parser().parse_args(argv)
    return cli.guarded(args, _run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import preflight

    # Common mistakes first, before torch and MONAI are imported (seconds).
    preflight.existing([*args.inputs, *([args.mask] if args.mask is not None else [])])
    if args.mask is not None and len(args.inputs) != 1:
        raise ValueError("--mask applies to a single input; pass one input or drop --mask")
    preflight.writable(args.output)
    cli.check_early(args, settings)

    from himatch_med import io, jobs
    from himatch_med.detect import Detector, load_extractor

    inputs = jobs.expand_inputs(args.inputs)
    if args.mask is not None and len(inputs) != 1:
        raise ValueError("--mask applies to a single input; pass one input or drop --mask")
    if args.references:
        jobs.check_outside_references(args.output, args.references)
    jobs.check_output_folder(args.output, inputs)
    cli.LOGGER.debug("settings: %s", settings)
    extractor = load_extractor(settings, args.device)
    cli.LOGGER.debug("model %s on %s", extractor.model_id, getattr(extractor, "device", "cpu"))
    detector = Detector(extractor, cli.bank_from(args, settings, extractor), settings)
    cli.LOGGER.debug("bank %s: %d references", detector.bank.id, len(detector.bank))
    options = cli.read_options(args)
    failures = 0
    for path in inputs:
        earlier = [p for p in jobs.output_paths(path, args.output).values() if p.exists()]
        try:
            outputs = jobs.process(path, detector, args.output, options=options, mask=args.mask,
                                   progress=cli.progress_shown(args))
            for note in outputs["notes"]:
                cli.LOGGER.warning("%s: %s", path, note)
            if earlier:
                cli.LOGGER.info("%s: replaced the earlier outputs %s_* in %s", path, io.stem(path), args.output)
            cli.LOGGER.debug("%s: %s", path, ", ".join(f"{k} {v:.2f} s" for k, v in outputs["timings_seconds"].items()))
            print(f"{path}: volume score {outputs['volume_score']:.2f} (percentile "
                  f"{_pct(outputs['volume_percentile'])}) -> {args.output / outputs['outputs']['anomaly']}")
        except Exception as error:  # one failing volume must not lose the others
            if args.debug:
                raise
            failures += 1
            cli.LOGGER.error("%s", jobs.describe_error(path, error))
    # 1: some inputs failed and the others are written; 2: nothing could be done.
    return 2 if failures == len(inputs) else 1 if failures else 0


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.0f}"


if __name__ == "__main__":
    sys.exit(main())
