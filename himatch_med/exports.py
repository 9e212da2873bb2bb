"""What viewers and PACS open besides the NIfTI maps: label descriptions, DICOM SEG and Parametric Map, 2D pictures.

Builds text, DICOM datasets and pixel arrays; :mod:`himatch_med.io` writes them. Everything here is a function of
its inputs: the same findings give the same text, datasets (their UIDs derived from the inputs) and pixels.

- ITK-SNAP label description file (``Segmentation > Import Label Descriptions``) and 3D Slicer colour table
  (``.ctbl``: load it, then pick it as the label map's colour table), naming each finding with its size and peak;
- for a DICOM series input, a DICOM SEG of the findings (one segment per finding) and a DICOM Parametric Map of the
  heatmap, both referring to the source series' instances, on its frame of reference and its slices, so that they go
  back to a PACS and open over the source (3D Slicer with QuantitativeReporting, OHIF);
- for a 2D image, the heatmap as a colour PNG and an overlay PNG of the image's own size.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import numpy as np

from himatch_med import __version__
from himatch_med.figures import FINDING_COLOURS
from himatch_med.io import Display

MANUFACTURER = "himatch-med"
SEG_SERIES_NUMBER = 9001
MAP_SERIES_NUMBER = 9002
UID_ROOT = "1.2.826.0.1.3680043.8.498."
"""pydicom's UID root: derived UIDs are ``root`` + a hash of what they identify (pydicom's ``generate_uid``)."""


def colour(label: int) -> tuple[int, int, int]:
    """The RGB colour of finding ``label`` (1..N), the same in every file and in the study page."""
    return FINDING_COLOURS[(label - 1) % len(FINDING_COLOURS)]


def finding_name(record: dict) -> str:
    """A finding's name as viewers show it: number, volume and peak."""
    return f"Finding {record['label']}: {record['volume_ml']:.3g} mL, peak {record['peak_z']:.1f} z"


def itksnap_labels(records: list[dict]) -> str:
    """The ITK-SNAP label description file of the findings (label 0 is ITK-SNAP's clear label)."""
    lines = ["################################################",
             "# ITK-SnAP Label Description File",
             "# written by himatch-med: the findings of a heatmap, most anomalous first",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
             "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    for record in records:
        red, green, blue = colour(record["label"])
        name = finding_name(record).replace('"', "'")
        lines.append(f'{record["label"]:5d} {red:5d} {green:4d} {blue:4d}        1  1  1    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_colour_table(records: list[dict]) -> str:
    """The 3D Slicer colour table (``.ctbl``) of the findings; names carry no spaces (Slicer splits on them)."""
    lines = ["# Color table file written by himatch-med: the findings of a heatmap, most anomalous first",
             f"# {len(records) + 1} values", "0 background 0 0 0 0"]
    for record in records:
        red, green, blue = colour(record["label"])
        name = f"finding_{record['label']}_{record['volume_ml']:.3g}mL_peak_{record['peak_z']:.1f}z"
        lines.append(f"{record['label']} {name} {red} {green} {blue} 255")
    return "\n".join(lines) + "\n"


def derived_uid(*parts: object) -> str:
    """A DICOM UID derived from ``parts`` (pydicom's root and a hash): the same inputs give the same UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[str(part) for part in parts]))


def content_digest(*arrays: np.ndarray) -> str:
    """A short hash of arrays' shapes, types and bytes, for deriving UIDs from the content they identify."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def frames(volume: np.ndarray) -> np.ndarray:
    """A map on a DICOM series' voxel grid ``(columns, rows, slices)`` as frames ``(slices, rows, columns)``.

    The inverse of how :func:`himatch_med.io.read_image` stacks a series: its third axis follows the series' files
    in :attr:`himatch_med.io.Image.sources` order.
    """
    return np.ascontiguousarray(volume.transpose(2, 1, 0))


TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "ReferringPhysicianName", "AccessionNumber")
"""Patient and study attributes a SEG or Parametric Map must carry, empty when unknown (DICOM type 2)."""


def _completed(sources: list) -> list:
    """Copies of the source headers with the type 2 attributes an export copies from them, empty where missing."""
    import copy

    completed = []
    for source in sources:
        source = copy.deepcopy(source)
        for keyword in TYPE_2:
            if keyword not in source:
                setattr(source, keyword, "")
        completed.append(source)
    return completed


def _stamp(dataset, created: datetime) -> None:
    # highdicom stamps the time of writing; a given time (e.g. from SOURCE_DATE_EPOCH) makes the bytes reproducible.
    for prefix in ("Content", "InstanceCreation", "Series"):
        if f"{prefix}Date" in dataset:
            setattr(dataset, f"{prefix}Date", created.strftime("%Y%m%d"))
            setattr(dataset, f"{prefix}Time", created.strftime("%H%M%S"))
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")


def _derived(dataset, seed: str) -> None:
    """Replace the UIDs highdicom draws at random (dimension organisation) by ones derived from ``seed``."""
    if "DimensionOrganizationSequence" in dataset:
        uid = derived_uid(seed, "dimension organisation")
        for item in dataset.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = uid
        for item in dataset.get("DimensionIndexSequence", []):
            item.DimensionOrganizationUID = uid


def segmentation(labels: np.ndarray, records: list[dict], sources: list, *, created: datetime):
    """A DICOM SEG of the findings over a source series, one segment per finding (binary, empty frames omitted).

    Args:
        labels: the label map on the series' voxel grid ``(columns, rows, slices)``.
        records: the findings' records (:func:`himatch_med.findings.describe_findings`), in label order.
        sources: the series' pydicom datasets (headers), in the order of the map's third axis.
        created: the content date and time written into the dataset.

    Raises:
        ValueError: when there is no finding (a SEG needs at least one segment).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not records:
        raise ValueError("no findings: a DICOM SEG needs at least one segment")
    seed = derived_uid(sources[0].SeriesInstanceUID, "seg", __version__, content_digest(labels))
    algorithm = hd.AlgorithmIdentificationSequence(name="himatch-med HiMatch-AD", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = []
    for record in records:
        segments.append(hd.seg.SegmentDescription(
            segment_number=record["label"], segment_label=finding_name(record)[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=f"finding {record['label']}",
            tracking_uid=derived_uid(seed, "finding", record["label"]),
            display_color=hd.color.CIELabColor.from_rgb(*colour(record["label"]))
            if hasattr(hd.color.CIELabColor, "from_rgb") else None))
    dataset = hd.seg.Segmentation(
        source_images=_completed(sources), pixel_array=frames(labels).astype(np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=derived_uid(seed, "series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(seed, "instance"), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="himatch-med findings", software_versions=__version__, device_serial_number="0",
        content_description="regions of the anomaly heatmap above the finding threshold",
        content_label="FINDINGS", series_description="himatch-med findings")
    _stamp(dataset, created)
    _derived(dataset, seed)
    return dataset


def parametric_map(anomaly: np.ndarray, sources: list, *, created: datetime, threshold: float | None = None):
    """A DICOM Parametric Map of the heatmap (float32 z-units) over a source series.

    Args:
        anomaly: the heatmap on the series' voxel grid ``(columns, rows, slices)``.
        sources: the series' pydicom datasets (headers), in the order of the map's third axis.
        created: the content date and time written into the dataset.
        threshold: the finding threshold, the lower end of the suggested display window (0 when ``None``).
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    values = frames(anomaly).astype(np.float32)
    seed = derived_uid(sources[0].SeriesInstanceUID, "parametric map", __version__, content_digest(values))
    low, high = float(values.min()), float(values.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY_Z", lut_explanation="HiMatch-AD anomaly, z-units of the bank's normal variation",
        unit=Code("{z-score}", "UCUM", "z-score"), value_range=(low, high), slope=1, intercept=0)
    bottom = 0.0 if threshold is None else float(threshold)
    top = max(high, bottom + 1.0)
    dataset = hd.pm.ParametricMap(
        source_images=_completed(sources), pixel_array=values, series_instance_uid=derived_uid(seed, "series"),
        series_number=MAP_SERIES_NUMBER, sop_instance_uid=derived_uid(seed, "instance"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="himatch-med heatmap", software_versions=__version__,
        device_serial_number="0", contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(bottom + top) / 2,
                                                         window_width=top - bottom)], content_label="ANOMALY",
        content_description="himatch-med anomaly heatmap (z-units)", series_description="himatch-med heatmap")
    _stamp(dataset, created)
    _derived(dataset, seed)
    return dataset


def anomaly_display(anomaly: np.ndarray, threshold: float | None) -> Display:
    """How viewers show the heatmap by default: from the finding threshold (or 1 z) to its maximum, as z-scores."""
    from himatch_med.figures import OVERLAY_FLOOR

    bottom = float(threshold) if threshold is not None else OVERLAY_FLOOR
    top = max(float(anomaly.max()) if anomaly.size else 0.0, bottom + 1.0)
    return Display(bottom, top, "z score", "anomaly z")


def overlay_map(anomaly: np.ndarray, threshold: float | None) -> np.ndarray:
    """The heatmap above the finding threshold (or 1 z), NaN elsewhere: what viewers' defaults draw as an overlay.

    MRtrix3's mrview and FSLeyes ignore ``cal_min``/``cal_max`` and the intent code and draw an overlay opaque over
    its whole data range; both leave NaN voxels transparent (checked with their screenshots). The heatmap itself keeps
    every value (background 0) for analysis.
    """
    from himatch_med.figures import OVERLAY_FLOOR

    bottom = float(threshold) if threshold is not None else OVERLAY_FLOOR
    return np.where(anomaly > bottom, anomaly, np.float32(np.nan)).astype(np.float32, copy=False)


def uncertainty_display(uncertainty: np.ndarray) -> Display:
    """How viewers show the uncertainty map by default: 0 to its 99.5th percentile."""
    values = _in_memory_order(uncertainty)
    inside = values[values > 0]
    top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    return Display(0.0, max(top, 1e-3), "none", "")


def _in_memory_order(array: np.ndarray) -> np.ndarray:
    """The elements of ``array`` as one row in the order they lie in memory: a view of a transposed or flipped volume.

    For what does not depend on the order (a percentile of a mask's values): the maps handed in are views on the
    file's grid, and masking one through its strides took 30 ms where its memory, read in order, takes 8 (240 x 240
    x 155). The same elements, so the same percentile exactly; a copy where they do not fill one block of memory.
    """
    flipped = tuple(axis for axis, stride in enumerate(array.strides) if stride < 0)
    return np.ravel(np.flip(array, flipped) if flipped else array, order="K")


def labels_display(count: int) -> Display:
    """The label map's header: label intent, display range 0..N."""
    return Display(0.0, float(max(count, 1)), "label", "findings")


def heat_picture(heat: np.ndarray, *, low: float, high: float) -> np.ndarray:
    """A heatmap slice ``(H, W)`` as RGB pixels: ``low`` and below black, ``high`` and above white-hot (inferno)."""
    from matplotlib import colormaps

    scaled = np.clip((heat - low) / max(high - low, 1e-6), 0, 1)
    return (colormaps["inferno"](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay_picture(image: np.ndarray, heat: np.ndarray, labels: np.ndarray, *, low: float, high: float
                    ) -> np.ndarray:
    """An image slice ``(H, W)`` in [0, 1] with its heatmap above ``low`` blended in and the findings outlined.

    Same size as the slice: one pixel per pixel, so it lies over the input in any image viewer.
    """
    from scipy import ndimage

    grey = np.repeat((np.clip(image, 0, 1) * 255)[..., None], 3, axis=-1)
    alpha = np.clip((heat - low) / max(high - low, 1e-6), 0, 1)[..., None] * 0.75
    alpha = np.where(heat[..., None] > low, np.maximum(alpha, 0.25), 0.0)
    blended = grey * (1 - alpha) + heat_picture(heat, low=low, high=high) * alpha
    for label in range(1, int(labels.max()) + 1 if labels.size else 1):
        region = labels == label
        edge = region & ~ndimage.binary_erosion(region)
        blended[edge] = colour(label)
    return blended.round().astype(np.uint8)


def creation_time() -> datetime:
    """When DICOM outputs say they were made: ``SOURCE_DATE_EPOCH`` when set (reproducible outputs), else now (UTC)."""
    import os
    from datetime import timezone

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return datetime.fromtimestamp(int(epoch), tz=timezone.utc)
    return datetime.now(tz=timezone.utc)


def finding_paths(anomaly: Path) -> dict[str, Path]:
    """Where the findings of an input go, beside its heatmap ``<name>_anomaly.nii.gz``.

    ``<name>_anomaly_overlay.nii.gz`` (:func:`overlay_map`), ``<name>_findings.nii.gz`` (label map),
    ``<name>_findings.txt`` (ITK-SNAP), ``<name>_findings.ctbl`` (Slicer).
    """
    name = anomaly.name.removesuffix("_anomaly.nii.gz")
    return {"anomaly_overlay": anomaly.with_name(f"{name}_anomaly_overlay.nii.gz"),
            "findings": anomaly.with_name(f"{name}_findings.nii.gz"),
            "findings_itksnap": anomaly.with_name(f"{name}_findings.txt"),
            "findings_slicer": anomaly.with_name(f"{name}_findings.ctbl")}


def write_findings(found, scan, anomaly: np.ndarray, folder_paths: dict[str, Path], *, slices: np.ndarray | None,
                   heat_slices: np.ndarray | None, label_slices: np.ndarray | None, created: datetime
                   ) -> tuple[dict[str, Path], list[str]]:
    """Write the findings of one input and the files made for its kind of input; returns them and notes.

    Always the label map (on the input's grid and header) with its ITK-SNAP and Slicer colour files; for a DICOM
    series also a SEG of the findings (when there is one) and a Parametric Map of the heatmap; for a 2D image the
    heatmap and an overlay as PNGs of the image's size.

    Args:
        found: the :class:`himatch_med.findings.Findings` of the input.
        scan: the input as read (:class:`himatch_med.scan.Scan`).
        anomaly: the heatmap as written, canonical (put on the file's grid only for a DICOM series' outputs).
        folder_paths: the input's output paths (:func:`finding_paths` keys, and ``anomaly``).
        slices, heat_slices, label_slices: for a 2D image, its display-oriented slice, heatmap and findings
            ``(1, H, W)``.
        created: the content date and time of DICOM outputs.
    """
    from himatch_med import io

    records, notes = found.records, []
    written = {"findings": io.write_map(found.labels, scan.header, folder_paths["findings"],
                                        display=labels_display(len(records)), dtype=found.labels.dtype),
               "findings_itksnap": io.write_text(itksnap_labels(records), folder_paths["findings_itksnap"]),
               "findings_slicer": io.write_text(slicer_colour_table(records), folder_paths["findings_slicer"])}
    anomaly_path = folder_paths["anomaly"]
    stem = anomaly_path.name.removesuffix("_anomaly.nii.gz")
    if scan.kind == "dicom" and scan.sources:
        sources = io.read_dicom_headers(scan.sources)
        # The NIfTI outputs stand on their own: a series highdicom cannot refer to costs only its DICOM outputs.
        try:
            written["parametric_map"] = io.write_dicom(
                parametric_map(scan.to_file(anomaly), sources, created=created, threshold=found.threshold),
                anomaly_path.with_name(f"{stem}_anomaly_pm.dcm"))
            if records:
                written["seg"] = io.write_dicom(segmentation(found.labels, records, sources, created=created),
                                                anomaly_path.with_name(f"{stem}_findings_seg.dcm"))
            else:
                notes.append("no DICOM SEG written: there is no finding (a SEG needs at least one segment)")
        except (ValueError, AttributeError, TypeError) as error:
            notes.append(f"no DICOM SEG or Parametric Map written: the source series' headers do not allow one "
                         f"({error}); the NIfTI outputs are complete")
    if scan.kind == "image" and slices is not None:
        low = found.threshold if found.threshold is not None else 1.0
        high = max(float(heat_slices.max()), low + 1.0)
        written["anomaly_png"] = io.write_png(heat_picture(heat_slices[0], low=0.0, high=high),
                                              anomaly_path.with_name(f"{stem}_anomaly.png"))
        written["overlay_png"] = io.write_png(overlay_picture(slices[0], heat_slices[0], label_slices[0], low=low,
                                                              high=high),
                                              anomaly_path.with_name(f"{stem}_overlay.png"))
    return written, notes


def report_block(found, settings) -> dict:
    """The report's part on findings: the threshold used, where it came from and how findings are cut, the findings.

    Args:
        found: the :class:`himatch_med.findings.Findings` of the input.
        settings: the run's settings (its ``finding_*`` ones are recorded).
    """
    return {"finding_threshold": {"z": None if found.threshold is None else round(found.threshold, 4),
                                  "source": found.source,
                                  "false_positive_fraction": settings.finding_false_positive_fraction,
                                  "min_volume_mm3": settings.finding_min_volume,
                                  "extent_of_peak": settings.finding_extent,
                                  "connectivity": settings.finding_connectivity},
            "findings": found.records}
