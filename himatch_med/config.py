"""Every tunable setting of himatch-med, with its default, documented once; and how files are read.

The CLI builds its options from :class:`Settings`, so ``--help`` always shows these defaults. Library functions take
the few values they need, never the whole object.

Each setting's flags are the one place that says what it matters for (see :data:`FLAGS`): whether a bank records it
and a query must repeat it (``bank``), whether the bank's calibration depends on it so that a query changing it gets
approximate z-units (``calibrated``), whether it is recorded with the calibration because it fixed how the bank was
built (``built``), whether it only changes speed and memory (``speed``), or only the findings (``findings``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

DEFAULT_MODEL = "facebook/dinov3-vitb16-pretrain-lvd1689m"
MODALITIES = ("mri", "ct", "oct")
CT_WINDOWS = {"liver": (40.0, 400.0), "brain": (40.0, 80.0), "abdomen": (50.0, 350.0)}
"""Named CT windows as (level, width) in HU."""
FOREGROUNDS = ("border", "nonzero", "body", "otsu", "all")
INTENSITIES = ("headroom", "clip")
HEADROOM_PERCENTILES = (1.0, 50.0)
"""``headroom`` preset (MRI, OCT): these foreground percentiles are the anchors of the normal range."""
HEADROOM_MEDIAN_LEVEL = 0.4
"""``headroom`` preset: the foreground median maps to this level, so [0, 1] reaches 2.5 times the median's distance
from the low anchor: tissue brighter than any normal tissue keeps its contrast instead of saturating."""
HEADROOM_WINDOW_TOP = 0.75
"""``headroom`` preset (CT): the top of the HU window maps to this level; a third of the width above it keeps
contrast."""
CLIP_PERCENTILES = {"mri": (0.5, 99.5), "oct": (1.0, 99.0)}
"""``clip`` preset (the version 0.1 default): these percentiles map to 0 and 1, everything beyond is clipped."""
BORDER_SHARE = 0.5
"""``border`` foreground: a value is the background when it fills at least this share of the volume's border."""
FULL_FIELD = 0.98
"""A foreground covering this share of the field of view is noted as suspicious for MRI and CT."""
AXES = ("axial", "coronal", "sagittal")
FUSIONS = ("uncertainty", "mean", "max", "last")
METHODS = ("himatch", "anomalydino", "dino-ad")
"""``himatch``: this package's method (docs/method.md); ``anomalydino`` and ``dino-ad``: the published baselines on the
same backbone features (:mod:`himatch_med.baselines`)."""
NAN_POLICIES = ("refuse", "zero")
FINDING_CONNECTIVITIES = (6, 18, 26)
REFERENCE_CHECK_MIN_VOLUMES = 5
"""The reference check flags nothing with fewer calibration volumes: a median and its spread need a few."""
PRECISIONS = ("auto", "float32", "bfloat16")

# Per-modality defaults for the settings left at ``None``. Preprocessed MRI has a constant background, but not always
# 0 (z-scored BraTS: -3.6; conformed or nnU-Net-style volumes alike): the value that fills the border is taken as the
# background, whatever it is. Raw CT is cut at the body outline; OCT has a speckled background that Otsu separates.
MODALITY_DEFAULTS = {
    "mri": {"foreground": "border", "position_window": 0.1},
    "ct": {"foreground": "body", "position_window": 0.0},
    "oct": {"foreground": "otsu", "position_window": 0.0},
}
BODY_THRESHOLD_HU = -500.0


FLAGS = {
    "bank": "recorded in the bank; a query must repeat it, or the bank is refused",
    "calibrated": "the bank's calibration depends on it; a query that changes it gets approximate z-units and "
                  "percentiles (a note in its report; an evaluation recalibrates)",
    "built": "fixed when the bank is built (a query cannot change what it did); recorded with the calibration",
    "speed": "changes speed and memory only, never a result",
    "findings": "changes only the findings (the bank records what its default finding threshold is computed from), "
                "never a bank or a map",
    "baseline": "chooses or tunes a baseline (--method); never changes a bank, and HiMatch-AD ignores the tuning",
    "check": "changes only the check of the references (`bank check`, and its section of `bank build`'s output), "
             "never a bank or a map",
}
"""What each flag of a setting means."""


def _setting(default, help: str, choices=None, *, bank: bool = False, calibrated: bool = False,  # noqa: A002
             built: bool = False, speed: bool = False, findings: bool = False, check: bool = False,
             baseline: bool = False):
    return field(default=default, metadata={"help": help, "choices": choices, "bank": bank, "calibrated": calibrated,
                                            "built": built, "speed": speed, "findings": findings, "check": check,
                                            "baseline": baseline})


@dataclass(frozen=True)
class Settings:
    """The settings of one run; each field's flags (:data:`FLAGS`) say what it matters for."""

    model: str = _setting(DEFAULT_MODEL, "Hub id or local folder of a DINOv3 (or DINOv2) model", bank=True)
    modality: str = _setting("mri", "intensity preset: mri (foreground percentiles), ct (HU window), oct (foreground "
                             "percentiles)", MODALITIES, bank=True)
    intensity: str = _setting("headroom", "intensity mapping: headroom (normal range to part of [0, 1], so bright "
                              "lesions keep their contrast; mri/oct anchored on a 1st percentile and the foreground "
                              "median, CT window to [0, 0.75]) or clip (0.1 behaviour: mri 0.5-99.5, oct 1-99 "
                              "percentiles, CT window to [0, 1])",
                              INTENSITIES, bank=True)
    window: str = _setting("liver", "CT window (level/width HU): liver 40/400, brain 40/80, abdomen 50/350",
                           tuple(CT_WINDOWS), bank=True)
    image_size: int = _setting(448, "shorter side of the backbone image in pixels (a multiple of the patch size)",
                               bank=True)
    stages: tuple[int, ...] = _setting((), "transformer blocks (1-based) whose patch tokens are matched; empty: "
                                       "4 evenly spaced ending at the last", bank=True)
    axis: str = _setting("axial", "slice axis in RAS: axial, coronal or sagittal", AXES, bank=True, built=True)
    planes: tuple[str, ...] = _setting((), "tri-planar detection: the slice planes scored, each against references "
                                       "of its own plane, and fused (axial coronal sagittal, or all); every plane's "
                                       "slices go to the backbone at their physical aspect; empty: --axis only",
                                       bank=True, built=True)
    foreground: str | None = _setting(None, "foreground mode: border (all but the constant value filling the "
                                      "volume's border; Otsu when there is none), nonzero, body (CT > -500 HU), otsu, "
                                      "all; empty: the modality's default (mri border, ct body, oct otsu)",
                                      FOREGROUNDS, calibrated=True)
    min_foreground: float = _setting(0.01, "slices with less foreground than this fraction are not scored")
    patch_foreground: float = _setting(0.5, "a patch is foreground when this fraction of its pixels is")
    layout_cells: int = _setting(4, "cells per side of the coarse layout descriptor (patch branch of retrieval)",
                                 bank=True, built=True)
    centroids: int = _setting(32, "centroids per reference slice and stage (spherical k-means)", built=True)
    kmeans_iterations: int = _setting(20, "spherical k-means iterations")
    calibration_slices: int = _setting(512, "bank slices sampled for the z-unit and percentile calibration")
    references_k: int = _setting(8, "references retrieved per query slice", calibrated=True)
    cls_weight: float = _setting(0.5, "weight of the CLS branch in retrieval (the layout branch gets the rest)",
                                 calibrated=True)
    position_window: float | None = _setting(None, "only retrieve references within this relative slice position "
                                             "(0 = off); empty: the modality's default (mri 0.1, else off)",
                                             calibrated=True)
    fusion: str = _setting("uncertainty", "how stage maps are fused: uncertainty, mean, max, last", FUSIONS,
                           calibrated=True)
    temperature: float = _setting(1.0, "temperature of the uncertainty softmax over stages", calibrated=True)
    smoothing_sigma: float = _setting(4.0, "Gaussian smoothing of the maps, in backbone-image pixels", calibrated=True)
    top_fraction: float = _setting(0.01, "slice/volume score = mean of this top fraction of foreground values",
                                   calibrated=True)
    # Baselines (issue 15): the published methods on the same backbone features, for comparison.
    method: str = _setting("himatch", "himatch (this method), or a baseline on the same features: anomalydino "
                           "(nearest reference patch, last stage, no retrieval, clustering, calibration or fusion; "
                           "maps and scores in cosine distance) or dino-ad (one support slice by CLS similarity, "
                           "distance to its k-means centroids, last stage)", METHODS, baseline=True)
    memory_patches: int = _setting(65536, "anomalydino: the reference patches it matches against; a seeded random "
                                   "subset of the references' foreground patches of the last stage when they are "
                                   "more", baseline=True)
    # Findings (issue 13): connected regions of the fused map above the finding threshold.
    finding_false_positive_fraction: float = _setting(
        1e-4, "the default finding threshold is the fused-map value that this share of the normal references' "
        "foreground voxels exceeds (each reference queried without its own volume, at calibration)", findings=True,
        built=True)
    finding_threshold: float | None = _setting(None, "finding threshold in z-units; empty: the bank's, from "
                                               "--finding-false-positive-fraction", findings=True)
    finding_min_volume: float = _setting(20.0, "smallest finding kept, in cubic millimetres (from the voxel sizes in "
                                         "the header)", findings=True)
    finding_extent: float = _setting(0.0, "a finding keeps only the voxels of its region at or above this share of "
                                     "its 3D peak (e.g. 0.5, half maximum); 0: the whole region above the threshold",
                                     findings=True)
    finding_connectivity: int = _setting(26, "voxels that touch to form one finding: 6 (faces), 18 (edges) or 26 "
                                         "(corners)", FINDING_CONNECTIVITIES, findings=True)
    # Ranking (issue 18): end-of-volume slivers, percentiles from few volumes, scores that depend on the bank.
    sliver_area: float = _setting(0.2, "slices whose foreground is less than this share of the volume's largest "
                                  "slice's (end-of-volume slivers: few patches, their own statistics) are mapped but "
                                  "neither ranked among the top slices nor counted in the volume score; 0: every "
                                  "scored slice counts", calibrated=True)
    percentile_error: float = _setting(10.0, "a percentile is called stable when its standard error at the median, "
                                       "50 / sqrt(n) percentile points from n normal volumes, is at most this many "
                                       "points (10: 25 volumes); fewer get a warning")
    spread_replicates: int = _setting(8, "bank subsets (a seeded bootstrap over the reference volumes, each with its "
                                      "own calibration) that a volume score is recomputed against, to report how "
                                      "much it depends on the bank; 0: off", built=True)
    spread_calibration_slices: int = _setting(64, "calibration slices (evenly spaced in the calibration sample) "
                                              "each bank subset of the spread is calibrated with", built=True)
    spread_slices: int = _setting(8, "the spread is estimated on this many of the volume's most anomalous slices "
                                  "(where its top voxels are), run again against each bank subset")
    # Reference check (issue 15): a reference volume that scores far above the others against them is suspect.
    reference_outlier_z: float = _setting(
        3.5, "a reference volume is flagged when its leave-own-volume-out score lies this many robust standard "
        "deviations (1.4826 x the median absolute deviation of the calibration volumes' scores) above their median",
        check=True)
    seed: int = _setting(0, "seed of every random choice (k-means, calibration sample)", built=True)
    batch_size: int = _setting(16, "slices per backbone batch", speed=True)
    precision: str = _setting("auto", "arithmetic of the backbone and of matching its features: bfloat16 (about twice "
                              "as fast where the device has it natively; unit features move by about 1e-4 in cosine, "
                              "maps by about 0.01 z), float32, or auto (bfloat16 on CUDA and on CPUs with native bf16, "
                              "AVX512_BF16 or AMX; float32 elsewhere)", PRECISIONS)
    chunk_size: int = _setting(4096, "bank rows compared at once (bounds memory)", speed=True)

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not one of {', '.join(map(str, choices))}")
        for name in ("image_size", "layout_cells", "centroids", "kmeans_iterations", "references_k", "batch_size",
                     "chunk_size", "calibration_slices", "memory_patches", "spread_slices",
                     "spread_calibration_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("min_foreground", "patch_foreground", "cls_weight", "top_fraction", "sliver_area"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if not 0 < self.finding_false_positive_fraction < 1:
            raise ValueError(f"finding_false_positive_fraction={self.finding_false_positive_fraction} must lie "
                             "strictly between 0 and 1")
        if not 0 <= self.finding_extent < 1:
            raise ValueError(f"finding_extent={self.finding_extent} must lie in [0, 1)")
        if self.finding_min_volume < 0:
            raise ValueError(f"finding_min_volume={self.finding_min_volume} must not be negative")
        if self.finding_threshold is not None and not math.isfinite(self.finding_threshold):
            raise ValueError(f"finding_threshold={self.finding_threshold} must be a finite z-value")
        if self.percentile_error <= 0 or self.spread_replicates < 0:
            raise ValueError(f"percentile_error={self.percentile_error} must be positive and spread_replicates="
                             f"{self.spread_replicates} not negative")
        if not self.reference_outlier_z > 0:
            raise ValueError(f"reference_outlier_z={self.reference_outlier_z} must be positive (3.5 is the usual "
                             "modified z-score cut)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma={self.smoothing_sigma} must not be negative")
        if any(s < 1 for s in self.stages):
            raise ValueError(f"stages={self.stages}: blocks are numbered from 1")
        # One order for a set of stages: a bank and its queries compare them as recorded.
        object.__setattr__(self, "stages", tuple(sorted(set(self.stages))))
        planes = AXES if "all" in self.planes else tuple(self.planes)
        unknown = [p for p in planes if p not in AXES]
        if unknown:
            raise ValueError(f"planes={self.planes}: {unknown[0]!r} is not one of {', '.join(AXES)} or all")
        planes = tuple(p for p in AXES if p in planes)
        if planes and self.axis not in planes:
            raise ValueError(f"planes={planes} leaves out axis={self.axis!r}, the plane whose slices the outputs "
                             f"show; add it, or pass --axis {planes[0]}")
        # One plane is the plane of --axis: the default path, exactly.
        object.__setattr__(self, "planes", () if planes == (self.axis,) else planes)

    def resolved(self) -> Settings:
        """The same settings with the modality's defaults filled in for those left at ``None``."""
        defaults = MODALITY_DEFAULTS[self.modality]
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    @classmethod
    def flagged(cls, flag: str) -> tuple[str, ...]:
        """Names of the settings with ``flag`` (one of :data:`FLAGS`), in field order."""
        if flag not in FLAGS:
            raise ValueError(f"flag={flag!r} is not one of {', '.join(FLAGS)}")
        return tuple(f.name for f in fields(cls) if f.metadata[flag])

    def bank_fields(self) -> dict:
        """The settings a bank records and a query must repeat (the CT window only for CT)."""
        return {name: getattr(self, name) for name in self.flagged("bank")
                if name != "window" or self.modality == "ct"}

    def calibration_fields(self) -> dict:
        """The settings a bank records with its calibration: those it depends on and those fixed at building."""
        return {f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
                for f in fields(self) if f.metadata["calibrated"] or f.metadata["built"]}

    def results_fields(self) -> dict:
        """Every setting that can change a result (all but the ``speed`` ones), as plain values."""
        return {k: v for k, v in asdict(self).items() if not self.__dataclass_fields__[k].metadata["speed"]}


@dataclass(frozen=True)
class ReadOptions:
    """How input files are read: ``--volume-index``, ``--series``, ``--nan-policy``, ``--allow-shear``.

    ``volume_index`` picks a volume of a 4D NIfTI; ``series`` a SeriesInstanceUID of a DICOM folder holding several;
    ``nan_policy`` is ``refuse`` (NaN or infinite voxels stop the file) or ``zero`` (they are set to 0, with a note);
    ``allow_shear`` accepts sheared affines, slicing along the nearest voxel axes.
    """

    volume_index: int | None = None
    series: str | None = None
    nan_policy: str = "refuse"
    allow_shear: bool = False

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={self.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")


def default_stages(depth: int) -> tuple[int, ...]:
    """Four blocks evenly spaced ending at the last, e.g. 12 -> (3, 6, 9, 12), 24 -> (6, 12, 18, 24)."""
    count = min(4, depth)
    return tuple(round(depth * (i + 1) / count) for i in range(count))
