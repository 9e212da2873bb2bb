"""Anomaly-detection metrics as the BMAD tables report them: numpy in, floats out.

Image level (one score per slice or per volume):

- :func:`image_auroc` and :func:`average_precision` wrap scikit-learn's exact metrics. A per-volume AUROC is
  :func:`image_auroc` over volume scores.

Pixel level (one map per slice or per volume, with its ground-truth mask):

- :class:`PixelMetrics` accumulates fixed-bin histograms one map at a time, so that thousands of 512 x 512 maps fit in
  memory: its state is a few arrays of ``bins`` numbers, whatever the number of images or pixels. ``compute()`` gives
  pixel AUROC, pixel average precision, AUPRO (anomalib's per-region overlap up to a false-positive rate of 0.3,
  divided by 0.3) and the best Dice over thresholds. Fed 3D maps and masks it gives the voxel-level metrics, with
  regions being 3D connected components.
- :func:`score_range` picks the histogram range from a first pass; :func:`pixel_metrics` is the one-call version for
  sets that fit in memory.

The approximation: thresholds are quantised to the bin edges, and scores that share a bin count as tied (the curves
join such points by a straight line, which is how scikit-learn treats tied scores). With scores spread over many bins
the result matches the exact metrics to about ``1 / bins``; scores outside ``[lo, hi]`` are clipped into the end
bins, so a range that is much too wide loses resolution and one that is too narrow ties the extremes together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["PixelMetrics", "average_precision", "image_auroc", "pixel_metrics", "score_range"]


def _image_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1D float scores and boolean labels (``> 0``) for the image-level metrics."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1D of the same length, got shapes {scores.shape} and {labels.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be finite, got {int(np.sum(~np.isfinite(scores)))} NaN or infinite values")
    labels = labels > 0
    n_positive = int(labels.sum())
    if n_positive in (0, labels.size):
        raise ValueError(
            f"labels must contain both classes (0 = normal, > 0 = anomalous), got {n_positive} anomalous of "
            f"{labels.size}; the metric is undefined for a one-class set"
        )
    return scores, labels


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of image scores against image labels (exact, scikit-learn's ``roc_auc_score``).

    Used for slice-level AUROC (slice scores) and for per-volume AUROC (volume scores) alike. Tied scores get half
    credit.

    Args:
        scores: Anomaly score per image ``(N,)``; higher means more anomalous.
        labels: Ground truth per image ``(N,)``; ``> 0`` means anomalous.

    Returns:
        AUROC in ``[0, 1]``.

    Raises:
        ValueError: If the shapes differ, a score is not finite, or only one class is present.
    """
    scores, labels = _image_inputs(scores, labels)
    return float(roc_auc_score(labels, scores))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of image scores against image labels (exact, scikit-learn's ``average_precision_score``).

    Args:
        scores: Anomaly score per image ``(N,)``; higher means more anomalous.
        labels: Ground truth per image ``(N,)``; ``> 0`` means anomalous.

    Returns:
        Average precision in ``[0, 1]`` (the anomalous fraction for uninformative scores).

    Raises:
        ValueError: If the shapes differ, a score is not finite, or only one class is present.
    """
    scores, labels = _image_inputs(scores, labels)
    return float(average_precision_score(labels, scores))


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the piecewise-linear curve through the points ``(x, y)``, in the given order."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


class PixelMetrics:
    """Bounded-memory accumulator of pixel (or voxel) AUROC, average precision, AUPRO and best Dice.

    Feed one score map and its mask per image or volume with :meth:`update`, then call :meth:`compute`. Every pixel
    falls into one of ``bins`` equal bins over ``[lo, hi]`` (values outside are clipped into the end bins); the state
    is, per bin, the count of anomalous pixels, the count of normal pixels, and the sum over ground-truth regions of
    the fraction of the region's pixels in that bin. Because the per-region overlap is only ever averaged over
    regions, that single sum replaces one histogram per region: memory is ``O(bins)``, independent of the number of
    images, pixels and regions.

    Thresholds are the bin edges: a pixel is called anomalous at threshold index ``k`` when its bin is ``>= k``.
    Pixels sharing a bin count as tied, so the metrics match the exact ones to about ``1 / bins`` when the scores
    spread over the range (see :func:`score_range`). Calibrated maps in z-units can use a fixed range such as
    ``lo=-5, hi=50``.

    Definitions (``P`` anomalous pixels, ``N`` normal pixels, over everything fed):

    - ``pixel_auroc``: area under TPR vs FPR (straight lines between thresholds, so ties get half credit).
    - ``pixel_ap``: ``sum_k (R_k - R_{k-1}) * P_k`` over thresholds, as scikit-learn's ``average_precision_score``.
    - ``aupro``: anomalib's AUPRO. Regions are the connected components of each mask (``scipy.ndimage.label`` per
      image or volume; with 3D input they are 3D components). At each threshold, PRO is the mean over all regions of
      the fraction of the region's pixels at or above the threshold, and FPR is the fraction of all normal pixels at
      or above it. The area under PRO vs FPR, with the curve linearly interpolated at ``fpr_limit``, is divided by
      ``fpr_limit``.
    - ``best_dice``: the largest ``2 TP / (2 TP + FP + FN)`` over thresholds, pooled over all pixels fed (not a mean
      of per-image Dice), with ``best_dice_threshold`` the lower edge of the bin where it is reached.

    Undefined values are ``nan`` rather than errors, so that evaluating a set without masks does not stop a run:
    without anomalous pixels, every metric is ``nan``; without normal pixels, ``pixel_auroc`` and ``aupro`` are
    ``nan``.

    Args:
        lo: Lower end of the score range; lower scores fall into the first bin.
        hi: Upper end of the score range; higher scores fall into the last bin. Must exceed ``lo``.
        bins: Number of equal-width bins (threshold resolution).
        fpr_limit: False-positive rate up to which AUPRO integrates (0.3 in BMAD and anomalib).
        connectivity: Neighbourhood of the connected-component labelling, as in
            ``scipy.ndimage.generate_binary_structure``: 1 joins pixels sharing a face, ``None`` (the default) joins
            pixels sharing any corner (8-connectivity in 2D, 26 in 3D), as the MVTec AD and anomalib code do.
    """

    def __init__(
        self,
        *,
        lo: float,
        hi: float,
        bins: int = 10_000,
        fpr_limit: float = 0.3,
        connectivity: int | None = None,
    ) -> None:
        """Start empty accumulators; see the class docstring for the arguments."""
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}; score_range() picks them from the maps")
        if int(bins) != bins or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if connectivity is not None and (int(connectivity) != connectivity or connectivity < 1):
            raise ValueError(f"connectivity must be None or a positive integer, got {connectivity}")
        self.lo = float(lo)
        self.hi = float(hi)
        self.bins = int(bins)
        self.fpr_limit = float(fpr_limit)
        self.connectivity = connectivity
        self._positive = np.zeros(self.bins, dtype=np.int64)
        self._negative = np.zeros(self.bins, dtype=np.int64)
        self._region_fraction = np.zeros(self.bins, dtype=np.float64)
        self._n_regions = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulated state; fixed by ``bins``, whatever has been fed."""
        return self._positive.nbytes + self._negative.nbytes + self._region_fraction.nbytes

    def _bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score, with out-of-range scores clipped into the end bins."""
        scaled = (scores.astype(np.float64) - self.lo) * (self.bins / (self.hi - self.lo))
        return np.clip(np.floor(np.clip(scaled, -1.0, self.bins)), 0, self.bins - 1).astype(np.intp)

    def update(self, score_map: np.ndarray, mask: np.ndarray) -> None:
        """Add one image's (2D) or one volume's (3D) scores and ground truth.

        An image without anomalous pixels adds only normal pixels (and no region). Regions are labelled within this
        call, so a region never spans two calls: pass a volume whole to get 3D components.

        Args:
            score_map: Anomaly map ``(H, W)`` or ``(X, Y, Z)``; higher means more anomalous.
            mask: Ground truth of the same shape; ``> 0`` means anomalous.

        Raises:
            ValueError: If the map is not 2D or 3D, the shapes differ, or a score is NaN.
        """
        score_map = np.asarray(score_map)
        mask = np.asarray(mask)
        if score_map.ndim not in (2, 3):
            raise ValueError(f"score_map must be 2D (H, W) or 3D (X, Y, Z), got shape {score_map.shape}")
        if mask.shape != score_map.shape:
            raise ValueError(f"mask shape {mask.shape} must equal score_map shape {score_map.shape}")
        if np.isnan(score_map).any():
            raise ValueError(f"score_map has {int(np.isnan(score_map).sum())} NaN values; fill them before scoring")
        anomalous = mask > 0
        index = self._bin_index(score_map)
        self._positive += np.bincount(index[anomalous], minlength=self.bins)
        self._negative += np.bincount(index[~anomalous], minlength=self.bins)
        if not anomalous.any():
            return
        connectivity = score_map.ndim if self.connectivity is None else min(self.connectivity, score_map.ndim)
        structure = ndimage.generate_binary_structure(score_map.ndim, connectivity)
        regions, n_regions = ndimage.label(anomalous, structure=structure)
        region_of_pixel = regions[anomalous]
        sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
        # Each pixel weighs 1 / its region's size, so a region contributes a total of 1 spread over its bins.
        self._region_fraction += np.bincount(
            index[anomalous], weights=1.0 / sizes[region_of_pixel], minlength=self.bins
        )
        self._n_regions += n_regions

    def _curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative TP, FP and summed region overlap from the highest threshold down, starting at ``(0, 0, 0)``."""
        zero = np.zeros(1)
        tp = np.concatenate([zero, np.cumsum(self._positive[::-1])])
        fp = np.concatenate([zero, np.cumsum(self._negative[::-1])])
        overlap = np.concatenate([zero, np.cumsum(self._region_fraction[::-1])])
        return tp, fp, overlap

    def _aupro(self, fpr: np.ndarray, pro: np.ndarray) -> float:
        """Area under PRO vs FPR up to ``fpr_limit`` (interpolated there), divided by ``fpr_limit``."""
        end = int(np.searchsorted(fpr, self.fpr_limit, side="right"))
        x, y = fpr[:end], pro[:end]
        if x[-1] < self.fpr_limit and end < fpr.size:
            step = (self.fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
            x = np.append(x, self.fpr_limit)
            y = np.append(y, pro[end - 1] + step * (pro[end] - pro[end - 1]))
        return _trapezoid(x, y) / self.fpr_limit

    def compute(self) -> dict[str, float]:
        """Metrics over everything fed so far; the accumulators are left as they are.

        Returns:
            ``pixel_auroc``, ``pixel_ap``, ``aupro``, ``best_dice``, ``best_dice_threshold`` (see the class docstring;
            ``nan`` where undefined), and the counts ``n_positive`` (anomalous pixels), ``n_negative`` (normal
            pixels) and ``n_regions`` (ground-truth connected components), as floats.
        """
        n_positive = int(self._positive.sum())
        n_negative = int(self._negative.sum())
        nan = float("nan")
        result = {
            "pixel_auroc": nan,
            "pixel_ap": nan,
            "aupro": nan,
            "best_dice": nan,
            "best_dice_threshold": nan,
            "n_positive": float(n_positive),
            "n_negative": float(n_negative),
            "n_regions": float(self._n_regions),
        }
        if n_positive == 0:
            return result
        tp, fp, overlap = self._curves()
        recall = tp / n_positive
        called = tp + fp
        precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
        result["pixel_ap"] = float(np.sum(np.diff(recall) * precision[1:]))
        dice = 2.0 * tp / (called + n_positive)
        best = int(np.argmax(dice))
        result["best_dice"] = float(dice[best])
        # Point ``best`` counts the top ``best`` bins, so its threshold is the lower edge of bin ``bins - best``.
        result["best_dice_threshold"] = self.lo + (self.bins - best) * (self.hi - self.lo) / self.bins
        if n_negative == 0:
            return result
        fpr = fp / n_negative
        result["pixel_auroc"] = _trapezoid(fpr, recall)
        result["aupro"] = self._aupro(fpr, overlap / self._n_regions)
        return result


def score_range(score_maps: Iterable[np.ndarray], *, margin: float = 0.0) -> tuple[float, float]:
    """Range ``(lo, hi)`` for :class:`PixelMetrics` from a first pass over the maps.

    Args:
        score_maps: The maps that will be evaluated (any shapes); NaN values are ignored.
        margin: Fraction of the span added below and above, for maps not in the first pass.

    Returns:
        The smallest and largest finite score, widened by ``margin``; a constant set gets ``value -/+ 0.5``.

    Raises:
        ValueError: If there is no finite score or ``margin`` is negative.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    lo, hi = np.inf, -np.inf
    for score_map in score_maps:
        values = np.asarray(score_map, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if not np.isfinite(lo):
        raise ValueError("score_maps hold no finite score; cannot choose a range")
    if hi == lo:
        return lo - 0.5, hi + 0.5
    span = hi - lo
    return lo - margin * span, hi + margin * span


def pixel_metrics(
    score_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    lo: float | None = None,
    hi: float | None = None,
    bins: int = 10_000,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Pixel metrics of a whole set in one call: :class:`PixelMetrics` fed every map, range from the maps if not given.

    Args:
        score_maps: Anomaly maps, each ``(H, W)`` or ``(X, Y, Z)``.
        masks: Ground-truth masks matching ``score_maps`` one to one; ``> 0`` means anomalous.
        lo: Lower end of the histogram range; ``None`` takes the smallest score.
        hi: Upper end of the histogram range; ``None`` takes the largest score.
        bins: Number of histogram bins.
        fpr_limit: False-positive rate up to which AUPRO integrates.

    Returns:
        The dictionary of :meth:`PixelMetrics.compute`.

    Raises:
        ValueError: If the numbers of maps and masks differ, or as :class:`PixelMetrics` does.
    """
    if len(score_maps) != len(masks):
        raise ValueError(f"got {len(score_maps)} score maps but {len(masks)} masks; pass one mask per map")
    if lo is None or hi is None:
        auto_lo, auto_hi = score_range(score_maps)
        lo = auto_lo if lo is None else lo
        hi = auto_hi if hi is None else hi
    metrics = PixelMetrics(lo=lo, hi=hi, bins=bins, fpr_limit=fpr_limit)
    for score_map, mask in zip(score_maps, masks, strict=True):
        metrics.update(score_map, mask)
    return metrics.compute()
