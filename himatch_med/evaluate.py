"""Evaluate himatch-med on a BMAD-style set or on annotated volumes: metrics.json, metrics.md, scores.csv, pictures.

    himatch-med evaluate bmad /data/BMAD/Brain --modality mri -o eval/brain/
    himatch-med evaluate bmad data/oct_kermany --modality oct -o eval/oct/     # one folder per class
    himatch-med evaluate volumes --images imgs/ --labels labels/ --references normals/ -o eval/liver/
    himatch-med evaluate bmad /data/BMAD/Brain --fusion mean max last uncertainty -o eval/fusion/

Several values of --fusion, --references-k and --cls-weight, and --stages given more than once, give one row each
of the same table (every combination). The layouts, the metrics and the pixel histogram are described in
``himatch_med/evaluation/``. Heavy libraries are imported after parsing, so ``--help`` is instant.

Exit code 0: every case evaluated; 1: some cases failed (named on stderr and in metrics.md; the others are
evaluated); 2: nothing could run. ``--debug`` stops at the first failing case with its traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himatch_med import cli

SEVERAL = ("stages", "planes", "method", "fusion", "references_k", "cls_weight")


def parser() -> argparse.ArgumentParser:
    """The parser of ``himatch-med evaluate``."""
    main_parser = argparse.ArgumentParser(
        prog="himatch-med evaluate",
        description="Evaluate anomaly detection on a BMAD-style set or on annotated volumes; one table row per "
                    "combination of the ablated settings.")
    commands = main_parser.add_subparsers(dest="command", required=True)
    bmad = commands.add_parser(
        "bmad", help="a BMAD-style 2D set (train/good, test/...) or a folder per class (NORMAL, CNV, ...)",
        description="Layouts: brain test/{good,Ungood}/img + label|anomaly_mask; liver test/img/{good,Ungood} + "
                    "test/label; RESC Train/train/good, Test/test + Test/test_label; flat test/{good,Ungood}; or one "
                    "folder per class without a train split (normal images split by patient into references and "
                    "held-out normal test images).")
    bmad.add_argument("root", type=Path, help="the set's folder, e.g. /data/BMAD/Brain")
    bmad.add_argument("--split", choices=("test", "valid"), default="test", help="split to evaluate (default: test)")
    bmad.add_argument("--normal-class", default=None,
                      help="name of the normal class folder (default: good or normal, in any case)")
    bmad.add_argument("--holdout", type=float, default=0.5,
                      help="sets without a train split: fraction of the normal images held out (whole patients) as "
                           "normal test images; the rest are the references (default: 0.5, seeded by --seed)")
    volumes = commands.add_parser("volumes", help="annotated 3D volumes with label volumes, against normal volumes")
    volumes.add_argument("--images", type=Path, nargs="+", required=True, help="test volumes (files or folders)")
    volumes.add_argument("--labels", type=Path, required=True,
                         help="folder of label volumes named like the test volumes (case_seg.nii.gz, ...)")
    volumes.add_argument("--references", type=Path, nargs="+", required=True, help="normal volumes (files or folders)")
    volumes.add_argument("--reference-labels", type=Path, default=None,
                         help="labels of annotated references (only their lesion-free slices are used): a folder "
                              "named like them, a CSV with the columns image,label, or a file name beside each "
                              "(seg.nii.gz)")
    volumes.add_argument("--anomaly-labels", type=int, nargs="+", default=None,
                         help="label values that are anomalous (default: any value > 0; LiTS tumours: 2)")
    for sub in (bmad, volumes):
        sub.add_argument("-o", "--output", type=Path, required=True, help="output folder")
        sub.add_argument("--bank-cache", type=Path, default=None,
                         help="where banks are cached (default: ~/.cache/himatch-med/banks, shared with run)")
        sub.add_argument("--figures", type=int, default=2,
                         help="pictures of the first row per category: best detected, most missed, worst false "
                              "alarm (default: 2; 0: none)")
        sub.add_argument("--pixel-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                         help="histogram range of the pixel metrics in z-units (default: -20 100)")
        sub.add_argument("--pixel-bins", type=int, default=None, help="histogram bins (default: 48000)")
        cli.add_common(sub, several=SEVERAL)
    return main_parser


def main(argv: list[str] | None = None) -> int:
    """Run an evaluation; returns the exit code (0 all done, 1 some cases failed, 2 nothing could run)."""
    args = parser().parse_args(argv)
    return cli.guarded(args, _evaluate, with_settings=False)


def _evaluate(args: argparse.Namespace) -> int:
    from himatch_med import preflight

    base = cli.settings_from(argparse.Namespace(**{**vars(args), **{axis: None for axis in SEVERAL}}))
    # Common mistakes first, before torch and MONAI are imported (seconds).
    if args.command == "bmad":
        preflight.folder(args.root, "pass the root of a BMAD set (holding train/ and test/) or a folder with one "
                                    "sub-folder per class")
    else:
        preflight.existing(args.images)
        preflight.folder(args.labels, "pass the folder of label volumes with --labels")
    preflight.writable(args.output)
    cli.check_early(args, base)

    from himatch_med import evaluation, jobs

    rows = evaluation.ablation_rows(base, **{axis: getattr(args, axis) for axis in SEVERAL})
    jobs.check_output_folder(args.output, [])
    if args.command == "bmad":
        dataset = evaluation.discover(args.root, split=args.split, normal_class=args.normal_class,
                                      holdout=args.holdout, seed=base.seed)
    else:
        dataset = evaluation.volume_dataset(args.images, args.labels, args.references,
                                            reference_labels=args.reference_labels)
    print(f"{dataset.layout} layout: {len(dataset.references)} references, {len(dataset.cases)} test cases, "
          f"{len(rows)} row(s)")
    result = evaluation.evaluate(
        dataset, rows, device=args.device, cache=args.bank_cache, options=cli.read_options(args),
        anomaly_labels=tuple(args.anomaly_labels) if getattr(args, "anomaly_labels", None) else None,
        pixel_range=tuple(args.pixel_range) if args.pixel_range else evaluation.PIXEL_RANGE,
        bins=args.pixel_bins or evaluation.PIXEL_BINS, pictures=args.figures, strict=args.debug,
        progress=cli.progress_shown(args))
    written = evaluation.write_outputs(result, args.output)
    print(evaluation.table(result))
    print(f"{len(written)} files written to {args.output} in {result.timings['total_seconds']:.1f} s")
    for failure in result.failures:
        cli.LOGGER.error("%s", failure["error"])
    if not result.failures:
        return 0
    return 1 if result.evaluated else 2


if __name__ == "__main__":
    sys.exit(main())
