"""What an evaluation writes: ``metrics.json``, ``metrics.md``, ``scores.csv``, ``slice_scores.csv``, pictures."""

from __future__ import annotations

import csv
from dataclasses import asdict
from io import StringIO
from pathlib import Path

from himatch_med import io
from himatch_med.evaluation.loop import ABLATION_AXES, BASELINE_RANGE, Evaluation, Panel, Tally
from himatch_med.report import versions

METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("volume_auroc", "volume AUROC"),
    ("volume_ap", "volume AP"), ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("aupro", "AUPRO@0.3"),
    ("best_dice", "best Dice"), ("voxel_auroc", "voxel AUROC"), ("voxel_ap", "voxel AP"),
    ("voxel_aupro", "voxel AUPRO@0.3"), ("voxel_best_dice", "voxel best Dice"),
)


def row_settings(tally: Tally) -> dict:
    """The ablated settings of a row, with the stages the backbone actually used."""
    return {"stages": list(tally.stages), "planes": list(tally.settings.planes or (tally.settings.axis,)),
            "method": tally.settings.method, "fusion": tally.settings.fusion,
            "references_k": tally.settings.references_k, "cls_weight": tally.settings.cls_weight}


def summary(evaluation: Evaluation) -> dict:
    """The content of ``metrics.json``."""
    dataset = evaluation.dataset
    first = evaluation.tallies[0]
    rows = []
    for number, tally in enumerate(evaluation.tallies, 1):
        rows.append({"row": number, **row_settings(tally), "metrics": tally.metrics(),
                     "detect_seconds": round(tally.seconds, 2)})
    return {
        "dataset": {"root": dataset.root, "layout": dataset.layout, "split": dataset.split,
                    "references": len(dataset.references), "cases": len(dataset.cases),
                    "masks": dataset.has_masks, "summary": dataset.summary},
        "model": first.settings.model,
        "settings": asdict(first.settings),
        "ablation": _ablated(evaluation.tallies),
        "rows": rows,
        "pixel_metrics": {"range_z": list(evaluation.pixel_range), "bins": evaluation.bins,
                          "definition": "all pixels of the test images, masks > 0; AUPRO up to FPR 0.3 / 0.3, "
                                        "regions = connected components (2D per image or slice; voxel_*: 3D)"},
        "failures": evaluation.failures,
        "notes": evaluation.notes,
        "timings_seconds": evaluation.timings,
        "versions": versions(),
    }


def _ablated(tallies: list[Tally]) -> dict[str, list]:
    """The values each ablated setting took, in row order (settings with a single value left out)."""
    values = {axis: [] for axis in ABLATION_AXES}
    for tally in tallies:
        for axis, value in row_settings(tally).items():
            if value not in values[axis]:
                values[axis].append(value)
    return {axis: found for axis, found in values.items() if len(found) > 1}


def table(evaluation: Evaluation, metrics: list[dict] | None = None) -> str:
    """The markdown table of the rows: ablated settings, metrics in %, seconds."""
    metrics = metrics or [t.metrics() for t in evaluation.tallies]
    columns = [(key, title) for key, title in METRIC_COLUMNS if any(key in m for m in metrics)]
    header = ["#", "method", "stages", "planes", "fusion", "K", "CLS weight", *[title for _, title in columns],
              "cases", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" ---: "] + [" --- "] * 4 + [" ---: "] *
                                                                 (len(header) - 5)) + "|"]
    for number, (tally, values) in enumerate(zip(evaluation.tallies, metrics, strict=True), 1):
        settings = tally.settings
        # A baseline uses the last stage only, and no fusion, retrieval of K references or CLS weighting.
        own = settings.method == "himatch"
        cells = [str(number), settings.method, ",".join(map(str, tally.stages if own else tally.stages[-1:])),
                 ",".join(settings.planes or (settings.axis,)), settings.fusion if own else "-",
                 str(settings.references_k) if own else "-", f"{settings.cls_weight:g}" if own else "-",
                 *[_percent(values.get(key)) for key, _ in columns], str(values["cases"]), f"{tally.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def markdown(evaluation: Evaluation) -> str:
    """The content of ``metrics.md``: what was evaluated, the table, and how to read it."""
    dataset = evaluation.dataset
    metrics = [t.metrics() for t in evaluation.tallies]
    first = evaluation.tallies[0].settings
    labels = [r["label"] for r in evaluation.tallies[0].records]
    where = f"`{dataset.root}`" if dataset.root else "annotated volumes"
    unit = "volumes" if dataset.volumes else "images"
    lines = [
        "# HiMatch-AD evaluation", "",
        f"- set: {where}, layout `{dataset.layout}`, {dataset.split} split: {len(labels)} {unit} evaluated "
        f"({labels.count(0)} normal, {labels.count(1)} anomalous), {len(evaluation.failures)} failed; masks: "
        f"{'yes' if dataset.has_masks else 'none (image metrics only)'}",
        f"- references: {len(dataset.references)} normal {unit}",
        f"- model `{first.model}`, modality {first.modality}, image size {first.image_size}, seed {first.seed}",
        "",
        table(evaluation, metrics), "",
        "Metrics in %. Image AUROC/AP over image scores"
        + (" (every slice of every volume; a slice is anomalous when its label is)" if dataset.volumes else "")
        + ("; pixel metrics over all pixels of the test images, masks > 0, 2D regions for AUPRO"
           + ("; voxel metrics over whole volumes with 3D regions" if dataset.volumes else "")
           + f"; pixel histograms of {evaluation.bins} bins over [{evaluation.pixel_range[0]:g}, "
             f"{evaluation.pixel_range[1]:g}] z" if dataset.has_masks else "")
        + ". Seconds: detection time of the row (features shared by several rows not included).",
    ]
    if any(t.settings.method != "himatch" for t in evaluation.tallies):
        lines += ["", "Baselines on the same backbone features (their maps and scores are cosine distances, their "
                  f"pixel histograms over [{BASELINE_RANGE[0]:g}, {BASELINE_RANGE[1]:g}]; no percentile, no "
                  "findings): anomalydino = distance to the nearest reference patch of the last stage (a seeded "
                  "subset of at most memory_patches), top-1 % patch score; dino-ad = distance to the k-means "
                  "centroids of the one reference slice most similar by CLS, last stage."]
    if any("lesions" in m for m in metrics):
        lines += ["", lesion_table(evaluation, metrics), "",
                  "Lesion-level detection at each row's finding threshold (the bank's, or --finding-threshold): a "
                  "ground-truth region (3D connected component of the mask) is hit when a finding overlaps it; "
                  "false-positive regions are findings that overlap none; per normal case: all findings of the normal "
                  "cases; Dice: mean over ground-truth regions of the Dice with the findings that overlap it (0 when "
                  "missed)."]
    outside = max((m.get("pixels_outside_range", 0.0) for m in metrics), default=0.0)
    if outside > 0.001:
        lines.append(f"\nWarning: {100 * outside:.2f} % of the map values lie outside the histogram range and count "
                     "as tied at its ends; widen it with --pixel-range.")
    if evaluation.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in evaluation.notes]]
    if evaluation.failures:
        lines += ["", "Failed:", *[f"- {failure['error']}" for failure in evaluation.failures]]
    return "\n".join(lines) + "\n"


def lesion_table(evaluation: Evaluation, metrics: list[dict]) -> str:
    """The markdown table of lesion-level detection, one line per row."""
    lines = ["| # | regions | hit | missed | sensitivity % | FP regions / case | FP regions / normal case | Dice % |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for number, values in enumerate(metrics, 1):
        found = values.get("lesions")
        if found is None:
            continue
        lines.append(f"| {number} | {found['regions']} | {found['hit']} | {found['missed']} | "
                     f"{_percent(found['sensitivity'])} | {found['false_positive_regions_per_case']:.2f} | "
                     f"{_number(found['false_positive_regions_per_normal_case'])} | {_percent(found['dice'])} |")
    return "\n".join(lines)


def _number(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def scores_csv(evaluation: Evaluation) -> str:
    """Per-case scores of every row, and the failures, as CSV text."""
    buffer = StringIO()
    fields = ["row", "stages", "planes", "method", "fusion", "references_k", "cls_weight", "class", "name", "label",
              "score", "percentile", "anomalous_pixels", "slices", "anomalous_slices", "findings", "lesions",
              "lesions_hit", "false_positive_regions", "path", "error"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for number, tally in enumerate(evaluation.tallies, 1):
        settings = {**row_settings(tally), "stages": " ".join(map(str, tally.stages)),
                    "planes": " ".join(row_settings(tally)["planes"])}
        for record in tally.records:
            writer.writerow({"row": number, **settings, **record, "score": f"{record['score']:.5f}",
                             "percentile": f"{record['percentile']:.2f}"})
    for failure in evaluation.failures:
        writer.writerow({"row": failure["rows"] if isinstance(failure["rows"], str) else
                         " ".join(map(str, failure["rows"])), "name": io.stem(failure["path"]),
                         "path": failure["path"], "error": failure["error"]})
    return buffer.getvalue()


def slice_scores_csv(evaluation: Evaluation) -> str:
    """Every slice's score and label for every row (annotated volumes), as CSV text."""
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "name", "slice", "label", "score"])
    for number, tally in enumerate(evaluation.tallies, 1):
        for name, scores, labels in tally.slices:
            writer.writerows([number, name, index, int(label), f"{score:.5f}"]
                             for index, (score, label) in enumerate(zip(scores.tolist(), labels.tolist(), strict=True)))
    return buffer.getvalue()


def picture(panel: Panel, category: str, rank: int):
    """A figure of one gallery panel: the slice, its heatmap and, when known, the ground truth outlined."""
    from himatch_med.figures import overview

    titles = {"detected": "anomalous, highest score", "missed": "anomalous, lowest score",
              "false_alarm": "normal, highest score"}
    return overview(panel.image[None], panel.heat[None], panel.foreground[None], [panel.caption],
                    title=f"{panel.name} ({titles[category]} #{rank})",
                    contours=None if panel.truth is None else panel.truth[None])


def write_outputs(evaluation: Evaluation, folder: str | Path) -> dict[str, Path]:
    """Write the outputs of an evaluation to ``folder``; returns the paths written.

    ``metrics.json``, ``metrics.md``, ``scores.csv`` (and ``slice_scores.csv`` for volumes), and the gallery pictures
    of the first row as ``figures/<category>_<rank>_<name>.png``.
    """
    folder = Path(folder)
    written = {"metrics": io.write_json(summary(evaluation), folder / "metrics.json"),
               "table": io.write_text(markdown(evaluation), folder / "metrics.md"),
               "scores": io.write_text(scores_csv(evaluation), folder / "scores.csv")}
    if evaluation.dataset.volumes:
        written["slice_scores"] = io.write_text(slice_scores_csv(evaluation), folder / "slice_scores.csv")
    gallery = evaluation.tallies[0].gallery
    if gallery is not None:
        for category, panels in gallery.panels().items():
            for rank, panel in enumerate(panels, 1):
                path = folder / "figures" / f"{category}_{rank}_{panel.name}.png"
                written[f"{category}_{rank}"] = io.write_figure(picture(panel, category, rank), path)
    return written
