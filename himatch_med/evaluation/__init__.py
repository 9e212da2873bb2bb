"""Evaluation on BMAD-style 2D sets and on annotated volumes: the metrics of the BMAD tables, one row per setting.

**Layouts** (docs/method.md, "Evaluation definitions"), recognised by :func:`discover` from the folder names alone:

- ``brain``: normals in ``train/good``; ``test/{good,Ungood}/img`` with masks in ``test/{good,Ungood}/label`` (or
  ``anomaly_mask``);
- ``liver``: ``train/good``; ``test/img/{good,Ungood}`` with masks in ``test/label/{good,Ungood}``;
- ``resc``: ``Train/train/good``; ``Test/test/{good,Ungood}`` with masks in ``Test/test_label/{good,Ungood}``;
- ``flat``: ``train/good``; ``test/{good,Ungood}`` holding the images, no masks (BMAD's OCT2017, chest, histopathology);
- ``folders``: no train split, one folder per class, one of them normal (e.g. Kermany OCT: ``NORMAL``, ``CNV``,
  ``DME``, ``DRUSEN``). Without a split, normal test images must be set aside from the references, or the normal class
  of the test would be the references themselves: :func:`holdout_split` holds out a seeded fraction of the normal
  *patients* (the file name without its trailing number: ``NORMAL-9698749-1`` -> ``NORMAL-9698749``), so that no
  patient is both a reference and a test image. The other classes are the anomalous test images.

A validation split (``valid``, ``val`` or ``Val/val``) is counted and reported; the test split is evaluated unless
``split="valid"``. Masks are paired with images by name (``x.png`` with ``x.png``, ``x_mask.png``, ``x_seg.png`` ...)
and binarised with ``> 0``; in a set with masks, a normal image without one has an empty mask. Annotated volumes
(:func:`volume_dataset`) pair ``case.nii.gz`` with ``case.nii.gz``, ``case_seg.nii.gz`` ..., nnU-Net's
``case_0000.nii.gz`` with ``case.nii.gz`` and LiTS' ``volume-N.nii`` with ``segmentation-N.nii``; a volume is anomalous
when its label holds an anomalous voxel (``> 0``, or one of ``anomaly_labels``: LiTS marks the liver 1, tumours 2).

**Metrics** (:mod:`himatch_med.metrics`): image AUROC and AP over image scores (for volumes: over every slice's score,
with a slice anomalous when its label is; slices without enough foreground score 0); pixel AUROC, AP, AUPRO up to a
false-positive rate of 0.3 and the best Dice over all pixels of the test images, 2D regions per image or slice; for
volumes also the voxel-level metrics (3D regions) and the AUROC and AP of volume scores.

**Pixel metrics in bounded memory**: every map is in z-units of the bank's normal variation, so one fixed histogram
range serves every set and no first pass is needed: :data:`PIXEL_RANGE` (-20 to 100 z) in :data:`PIXEL_BINS` bins
(0.0025 z each). Values outside fall into the end bins and count as tied there; the fraction of such pixels is
reported with the metrics (``pixels_outside_range``), so a range that is too narrow is seen, not silently absorbed.

**Ablations**: :func:`ablation_rows` crosses several values of ``stages``, ``fusion``, ``references_k`` and
``cls_weight``. Rows that differ only in retrieval and fusion settings share one extractor and one bank, and the
features of each test image are computed once and reused by all of them; each ``stages`` variant loads its own
extractor and bank. A bank's calibration (z-units, percentiles) depends on retrieval and fusion, so every row whose
settings differ from those the bank was calibrated with is recalibrated as docs/method.md defines it: the backbone runs
again over a seeded sample of at most ``calibration_slices`` of the bank's reference slices (not over all references),
and :func:`himatch_med.bank.build.calibrate_bank` does the rest (:func:`himatch_med.bank.store.recalibrated`). The row
the bank was built for uses it as ``run`` would.

**Rooms**: :mod:`~himatch_med.evaluation.datasets` (layouts, cases), :mod:`~himatch_med.evaluation.loop` (rows, the
scoring loop, tallies, the gallery), :mod:`~himatch_med.evaluation.outputs` (what is written). Their public names are
re-exported here.
"""

from __future__ import annotations

from himatch_med.evaluation.datasets import (
    MASK_FOLDERS,
    MASK_SUFFIXES,
    NORMAL_CLASSES,
    SPLIT_NAMES,
    Case,
    Dataset,
    discover,
    holdout_split,
    patient_key,
    volume_dataset,
)
from himatch_med.evaluation.loop import (
    ABLATION_AXES,
    GALLERY,
    PIXEL_BINS,
    PIXEL_RANGE,
    Evaluation,
    Gallery,
    Loader,
    Panel,
    Tally,
    ablation_rows,
    evaluate,
)
from himatch_med.evaluation.outputs import (
    METRIC_COLUMNS,
    markdown,
    picture,
    row_settings,
    scores_csv,
    slice_scores_csv,
    summary,
    table,
    write_outputs,
)

__all__ = [
    "ABLATION_AXES", "GALLERY", "MASK_FOLDERS", "MASK_SUFFIXES", "METRIC_COLUMNS", "NORMAL_CLASSES", "PIXEL_BINS",
    "PIXEL_RANGE", "SPLIT_NAMES", "Case", "Dataset", "Evaluation", "Gallery", "Loader", "Panel", "Tally",
    "ablation_rows", "discover", "evaluate", "holdout_split", "markdown", "patient_key", "picture", "row_settings",
    "scores_csv", "slice_scores_csv", "summary", "table", "volume_dataset", "write_outputs",
]
