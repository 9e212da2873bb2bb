"""Screen a cohort: ``himatch-med screen COHORT --bank BANK -o screening/ [--labels labels.csv]``.

COHORT is a folder of NIfTI files or DICOM series folders, a CSV with a ``path`` column (optional ``id``; relative
paths are relative to the CSV), or several of them. Writes one folder per study, ``scores.csv`` ranked from most to
least anomalous, and ``report.html``. Exit code 0: every study done; 1: some failed (recorded in ``scores.csv``);
2: nothing could run; 130 or 143: stopped by Ctrl-C or SIGTERM (finished studies are kept; a rerun goes on from
them).

``--engine ray`` spreads the studies over a Ray cluster (``--address``): one model actor per GPU, reading on the
nodes' CPUs, the same outputs in a folder every node reaches (see the README, "Running on a cluster").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himatch_med import cli
from himatch_med.config import Settings


def parser() -> argparse.ArgumentParser:
    """The parser of ``himatch-med screen``."""
    result = argparse.ArgumentParser(
        prog="himatch-med screen",
        description="Screen a cohort against normal references: one output folder per study (heatmap, uncertainty, "
                    "report, overview), scores.csv ranked from most to least anomalous, and a static report.html.")
    result.add_argument("cohort", nargs="+", type=Path,
                        help="a folder of NIfTI files or DICOM series folders, a CSV with a 'path' column (optional "
                             "'id'), or NIfTI files / DICOM folders")
    cli.add_bank_source(result)
    result.add_argument("-o", "--output", type=Path, default=Path("screening"),
                        help="screening folder (default: screening)")
    result.add_argument("--labels", type=Path, default=None,
                        help="CSV with columns id,label (1 = abnormal, 0 = normal): adds the ROC AUC and curve")
    result.add_argument("--workers", type=int, default=None,
                        help="processes reading the next volumes while one is analysed; 0 reads in the main process "
                             "(default: 2; with --engine ray: studies read at a time, default 2 per actor)")
    result.add_argument("--force", action="store_true", help="redo every study, even those already complete")
    cluster = result.add_argument_group("cluster (--engine ray; pip install 'himatch-med[distributed]')")
    cluster.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="local: this process and its readers; ray: a Ray cluster, one model actor per GPU "
                              "(default: local)")
    cluster.add_argument("--address", default=None,
                         help="the Ray cluster: auto (the cluster this machine belongs to), HOST:6379, or "
                              "ray://HOST:10001 (default: RAY_ADDRESS, else a cluster started on this machine, else a "
                              "new Ray instance on this machine alone)")
    cluster.add_argument("--actors", type=int, default=None,
                         help="model actors, each loading the model and the bank once (default: one per GPU in the "
                              "cluster, or one per node without GPUs)")
    cluster.add_argument("--retries", type=int, default=None,
                         help="times a study is tried again when the worker holding it dies (default: 2)")
    cli.add_common(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """Screen a cohort; returns the exit code (0 all done, 1 some studies failed, 2 nothing could run)."""
    args = parser().parse_args(argv)
    return cli.guarded(args, _screen)


def _screen(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import preflight

    # Common mistakes first, before torch and MONAI are imported (seconds).
    _check_engine_options(args)
    preflight.existing([*args.cohort, *([args.labels] if args.labels is not None else [])])
    preflight.writable(args.output)
    cli.check_early(args, settings)

    from dataclasses import replace

    from himatch_med import screening
    from himatch_med.detect import Detector, load_extractor

    _check_engine_options(args)
    cluster = args.engine == "ray"
    if cluster:
        from himatch_med import distributed

        distributed.require_ray()  # before the model and the bank are loaded
    studies = screening.read_cohort(args.cohort)
    labels = screening.read_labels(args.labels) if args.labels is not None else None
    screening.check_study_folders(args.output, studies)
    # On a cluster the driver only names the model and opens (or builds) the bank: no GPU for an opened one.
    extractor = load_extractor(settings, "cpu" if cluster and args.bank is not None else args.device)
    detector = Detector(extractor, cli.bank_from(args, settings, extractor), settings)
    options = cli.read_options(args)
    if cluster:
        from functools import partial

        # The driver never runs the extractor: only its name stays, and its weights are freed.
        detector = replace(detector, extractor=distributed.RemoteExtractor.of(extractor))
        del extractor
        gpus = {"cpu": False, "auto": None}.get(args.device, True)
        result = distributed.screen(studies, detector, args.output, factory=partial(load_extractor, settings),
                                    actors=args.actors, gpus=gpus, workers=args.workers,
                                    retries=distributed.RETRIES if args.retries is None else args.retries,
                                    address=args.address, options=options, force=args.force, labels=labels,
                                    progress=cli.progress_shown(args))
    else:
        result = screening.screen(studies, detector, args.output, options=options,
                                  workers=2 if args.workers is None else args.workers, force=args.force,
                                  labels=labels, progress=cli.progress_shown(args))
    failed = [r for r in result.results if r.status == "failed"]
    for failure in failed:
        cli.LOGGER.error("%s", failure.error)
        if args.debug and failure.details:
            cli.LOGGER.error("%s", failure.details, extra={"bare": True})
    print(f"screened {len(result.results)} studies in {result.seconds:.1f} s: {result.count('ok')} done, "
          f"{result.count('skipped')} skipped (complete from an earlier run), {len(failed)} failed"
          + (f"; {result.rate:.1f} studies/min" if result.count("ok") else ""))
    if result.auc is not None:
        print(f"ROC AUC {result.auc:.3f} ({result.files['roc']})")
    if result.auc_note:
        print(result.auc_note)
    print(f"scores: {result.files['scores']}\nreport: {result.files['report']}")
    return 1 if failed else 0


def _check_engine_options(args: argparse.Namespace) -> None:
    if args.engine == "local":
        given = [option for option, value in (("--address", args.address), ("--actors", args.actors),
                                              ("--retries", args.retries)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --engine ray")
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers {args.workers}: use 0 or more")
        return
    for option, value, least in (("--workers", args.workers, 1), ("--actors", args.actors, 1),
                                 ("--retries", args.retries, 0)):
        if value is not None and value < least:
            raise ValueError(f"{option} {value}: use {least} or more with --engine ray")


if __name__ == "__main__":
    sys.exit(main())
