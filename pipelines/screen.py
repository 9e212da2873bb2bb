"""Screen a cohort: ``python pipelines/screen.py COHORT --bank BANK -o screening/ [--labels labels.csv]``.

COHORT is a folder of NIfTI files or DICOM series folders, a CSV with a ``path`` column (optional ``id``; relative
paths are relative to the CSV), or several of them. Writes one folder per study, ``scores.csv`` ranked from most to
least anomalous, and ``report.html``. Exit code 0: every study done; 1: some failed (recorded in ``scores.csv``);
2: nothing could run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himatch_med.config import Settings
from himatch_med.run import _add_common, _guarded, _read_options


def parser() -> argparse.ArgumentParser:
    """The parser of ``pipelines/screen.py``."""
    result = argparse.ArgumentParser(
        prog="python pipelines/screen.py",
        description="Screen a cohort against normal references: one output folder per study (heatmap, uncertainty, "
                    "report, overview), scores.csv ranked from most to least anomalous, and a static report.html.")
    result.add_argument("cohort", nargs="+", type=Path,
                        help="a folder of NIfTI files or DICOM series folders, a CSV with a 'path' column (optional "
                             "'id'), or NIfTI files / DICOM folders")
    source = result.add_mutually_exclusive_group(required=True)
    source.add_argument("--bank", type=Path, help="a bank folder built with `python -m himatch_med.bank build`")
    source.add_argument("--references", type=Path, nargs="+",
                        help="normal reference files or folders; a bank is built from them and cached")
    result.add_argument("--reference-labels", type=Path, default=None,
                        help="folder of lesion labels named like the references: only lesion-free slices are used")
    result.add_argument("--bank-cache", type=Path, default=None,
                        help="where banks built from --references are cached (default: ~/.cache/himatch-med/banks)")
    result.add_argument("-o", "--output", type=Path, default=Path("screening"),
                        help="screening folder (default: screening)")
    result.add_argument("--labels", type=Path, default=None,
                        help="CSV with columns id,label (1 = abnormal, 0 = normal): adds the ROC AUC and curve")
    result.add_argument("--workers", type=int, default=2,
                        help="processes reading the next volumes while one is analysed; 0 reads in the main process "
                             "(default: 2)")
    result.add_argument("--force", action="store_true", help="redo every study, even those already complete")
    result.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """Screen a cohort; returns the exit code (0 all done, 1 some studies failed, 2 nothing could run)."""
    args = parser().parse_args(argv)
    return _guarded(args, _screen)


def _screen(args: argparse.Namespace, settings: Settings) -> int:
    from himatch_med import engine, screening

    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: use 0 or more")
    studies = screening.read_cohort(args.cohort)
    labels = screening.read_labels(args.labels) if args.labels is not None else None
    screening.check_output_folder(studies, args.output)
    backbone = engine.load(settings, args.device)
    if args.bank is not None:
        bank = engine.open_bank(args.bank, settings, backbone)
    else:
        bank = engine.cached_bank(args.references, args.reference_labels, settings, backbone, args.bank_cache,
                                  options=_read_options(args))
    result = screening.screen(studies, backbone, bank, settings, args.output, options=_read_options(args),
                              workers=args.workers, force=args.force, labels=labels, progress=not args.quiet)
    failed = [r for r in result.results if r.status == "failed"]
    for failure in failed:
        print(f"error: {failure.error}", file=sys.stderr)
        if args.debug and failure.details:
            print(failure.details, file=sys.stderr)
    print(f"screened {len(result.results)} studies in {result.seconds:.1f} s: {result.count('ok')} done, "
          f"{result.count('skipped')} skipped (complete from an earlier run), {len(failed)} failed"
          + (f"; {result.rate:.1f} studies/min" if result.count("ok") else ""))
    if result.auc is not None:
        print(f"ROC AUC {result.auc:.3f} ({result.files['roc']})")
    if result.auc_note:
        print(result.auc_note)
    print(f"scores: {result.files['scores']}\nreport: {result.files['report']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
