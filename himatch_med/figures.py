"""Pictures people look at: the most anomalous slices with the heatmap laid over them. Builds figures, saves none."""

from __future__ import annotations

import numpy as np

OVERLAY_FLOOR = 1.0
"""z-value below which the heatmap is transparent: the bank's normal patches lie around 0 and below."""
FINDING_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                   (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))
"""Label colours of the findings, repeated past ten: the same in pictures, label files and study pages."""
MAX_ASPECT = 8.0
"""Largest pixel aspect (either way) drawn true to scale: beyond it a figure would be metres tall or wide."""
MAX_PANEL_SHAPE = 3.0
"""Largest height over width (either way) of one panel; a longer slice is drawn inside it."""


def shown_aspect(aspect: float) -> float:
    """The pixel aspect a picture is drawn with: the true one, capped at :data:`MAX_ASPECT` either way."""
    return float(np.clip(aspect, 1 / MAX_ASPECT, MAX_ASPECT)) if np.isfinite(aspect) and aspect > 0 else 1.0


def overlay(axes, image: np.ndarray, heat: np.ndarray, *, vmax: float, foreground: np.ndarray | None = None,
            aspect: float = 1.0):
    """Draw a grayscale slice ``(H, W)`` in [0, 1] with its heatmap (z-units) on matplotlib ``axes``.

    ``aspect`` is the pixel height over its width (row spacing / column spacing), so anatomy keeps its shape.
    """
    axes.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
    alpha = np.clip((heat - OVERLAY_FLOOR) / max(vmax - OVERLAY_FLOOR, 1e-6), 0, 1) * 0.75
    if foreground is not None:
        alpha = alpha * foreground
    shown = axes.imshow(heat, cmap="inferno", vmin=OVERLAY_FLOOR, vmax=vmax, alpha=alpha, interpolation="bilinear",
                        aspect=aspect)
    axes.set_axis_off()
    axes.set_xticks([]), axes.set_yticks([])  # none drawn, and none made: placing the title asks for their extents
    return shown


def overview(slices: np.ndarray, maps: np.ndarray, foreground: np.ndarray, titles: list[str], *, title: str,
             contours: np.ndarray | None = None, aspect: float = 1.0, findings: np.ndarray | None = None):
    """A figure with one panel per chosen slice: the slice, its heatmap, and a colour bar in z-units.

    Args:
        slices: the chosen slices ``(n, H, W)`` in [0, 1], display-oriented.
        maps: their anomaly maps ``(n, H, W)``.
        foreground: their foreground ``(n, H, W)``.
        titles: one caption per panel.
        title: the figure's title.
        contours: optional ground-truth masks ``(n, H, W)`` drawn as outlines.
        aspect: pixel height over width in millimetres; drawn capped by :func:`shown_aspect`.
        findings: optional label maps of the findings ``(n, H, W)``, outlined in their colours and numbered.
    """
    from matplotlib.figure import Figure

    count = len(slices)
    aspect = shown_aspect(aspect)
    shape = float(np.clip(slices.shape[1] * aspect / max(slices.shape[2], 1), 1 / MAX_PANEL_SHAPE, MAX_PANEL_SHAPE))
    # A bare Figure, not pyplot: no global backend switch, nothing to close, safe in threads and notebooks.
    figure = Figure(figsize=(3.2 * count + 0.8, 3.2 * shape + 0.6))
    axes = figure.subplots(1, count, squeeze=False)
    vmax = max(float(np.percentile(maps[foreground], 99.5)) if foreground.any() else 0.0, OVERLAY_FLOOR + 2.0)
    shown = None
    for panel, axis in enumerate(axes[0]):
        shown = overlay(axis, slices[panel], maps[panel], vmax=vmax, foreground=foreground[panel], aspect=aspect)
        if contours is not None and contours[panel].any():
            axis.contour(contours[panel], levels=[0.5], colors="cyan", linewidths=0.8)
        if findings is not None:
            outline_findings(axis, findings[panel])
        axis.set_title(titles[panel], fontsize=8)
    figure.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="anomaly (z)")
    figure.suptitle(title, fontsize=9)
    return figure


def outline_findings(axes, labels: np.ndarray) -> None:
    """Outline each finding of a label slice ``(H, W)`` in its colour, its number beside it."""
    for label in np.unique(labels[labels > 0]).tolist():
        region = labels == label
        rgb = tuple(c / 255 for c in FINDING_COLOURS[(label - 1) % len(FINDING_COLOURS)])
        axes.contour(region, levels=[0.5], colors=[rgb], linewidths=1.0)
        rows, columns = np.nonzero(region)
        axes.text(columns.max() + 1.5, rows.min(), str(label), color=rgb, fontsize=7, fontweight="bold",
                  va="top", ha="left")
