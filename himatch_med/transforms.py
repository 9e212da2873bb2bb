"""Intensity presets, foreground masks, and slices to backbone images.

Everything works on canonical volumes or slice stacks as tensors.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from himatch_med.config import (
    BODY_THRESHOLD_HU,
    BORDER_SHARE,
    CLIP_PERCENTILES,
    CT_WINDOWS,
    FULL_FIELD,
    HEADROOM_MEDIAN_LEVEL,
    HEADROOM_PERCENTILES,
    HEADROOM_WINDOW_TOP,
    INTENSITIES,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def border_background(volume: torch.Tensor, share: float = BORDER_SHARE) -> float | None:
    """The constant value that fills at least ``share`` of the volume's border, or None when no value does.

    The border is the outer layer of voxels of every axis longer than two (a 2D image stored as ``(X, Y, 1)`` has
    only its four edges). Preprocessed scans fill the space around the body with one value, 0 or not (z-scored BraTS
    FLAIR: -3.62; CT masked to the body: -1024); raw scans have noise there and no single value.
    """
    faces = [volume.select(axis, end).flatten() for axis in range(volume.ndim) if volume.shape[axis] > 2
             for end in (0, -1)]
    if not faces:
        return None
    border = torch.cat(faces)
    values, counts = torch.unique(border, return_counts=True)
    best = int(counts.argmax())
    return float(values[best]) if counts[best] >= share * border.numel() else None


def foreground_mask(volume: torch.Tensor, mode: str) -> torch.Tensor:
    """Foreground voxels of a volume as a boolean tensor of the same shape.

    Args:
        volume: raw intensities (HU for CT).
        mode: ``border`` (every voxel but the constant background value that fills the border, see
            :func:`border_background`; Otsu when the border holds no such value), ``nonzero`` (exact-zero
            background), ``body`` (raw CT above -500 HU), ``otsu`` or ``all``.
    """
    if mode == "border":
        background = border_background(volume)
        return foreground_mask(volume, "otsu") if background is None else volume != background
    if mode == "nonzero":
        return volume != 0
    if mode == "body":
        return volume > BODY_THRESHOLD_HU
    if mode == "all":
        return torch.ones_like(volume, dtype=torch.bool)
    if mode == "otsu":
        image = sitk.GetImageFromArray(volume.cpu().numpy().astype(np.float32))
        # OtsuThreshold marks the voxels *below* the threshold with the inside value.
        below = sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 1, 0))
        return torch.from_numpy(below == 0).to(volume.device)
    raise ValueError(f"foreground mode {mode!r} is not one of border, nonzero, body, otsu, all")


def foreground_notes(volume: torch.Tensor, foreground: torch.Tensor, *, mode: str, modality: str) -> tuple[str, ...]:
    """What a user should know about a foreground found by ``mode``: a fallback taken, or a suspicious extent.

    A foreground that fills (almost) the whole field of view of an MRI or CT scan usually means the background was
    not recognised (a constant non-zero background under ``nonzero``), so percentiles, patches, calibration and scores
    would all include it.
    """
    notes = []
    if mode == "border" and border_background(volume) is None:
        notes.append("no single value fills the volume's border (a raw scan, not skull-stripped or masked); the "
                     "foreground was found by Otsu's threshold instead")
    # Counted, not averaged as floats: the same share without a float copy of the mask (2 against 20 ms for a
    # 240 x 240 x 155 volume).
    fraction = int(torch.count_nonzero(foreground)) / max(foreground.numel(), 1)
    if modality in ("mri", "ct") and mode != "all" and fraction >= FULL_FIELD:
        notes.append(f"the foreground (--foreground {mode}) covers {fraction:.0%} of the field of view, but the "
                     f"{modality} preset expects a background around the body: if this scan has one, pass --mask "
                     "FILE (a brain or body mask on its grid) or another --foreground (border, otsu); if the field of "
                     "view holds only tissue, pass --foreground all")
    return tuple(notes)


def intensity_range(volume: torch.Tensor, foreground: torch.Tensor, *, modality: str, window: str,
                    intensity: str) -> tuple[float, float]:
    """The raw intensities ``(low, high)`` that :func:`scale_intensity` maps to 0 and 1.

    ``headroom``: the normal range takes only part of [0, 1]. MRI is anchored on the foreground's 1st percentile (0)
    and median (:data:`~himatch_med.config.HEADROOM_MEDIAN_LEVEL`), OCT on the whole image's 1st percentile and the
    foreground's median: a bright lesion stays brighter
    than the tissue around it, and a large one barely moves the median, so it does not darken the rest of the volume
    (an upper percentile would move with it). CT maps its HU window to [0, 0.75], so a third of the width above the
    window (a bleed in the brain window) keeps its contrast. ``clip``: version 0.1's presets (MRI 0.5-99.5 foreground
    percentiles, OCT 1-99 percentiles of the whole image, the CT window) map to [0, 1] and anything beyond is clipped.
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity {intensity!r} is not one of {', '.join(INTENSITIES)}")
    if modality == "ct":
        level, width = CT_WINDOWS[window]
        top = HEADROOM_WINDOW_TOP if intensity == "headroom" else 1.0
        return level - width / 2, level - width / 2 + width / top
    if foreground.dtype != torch.bool or foreground.shape != volume.shape:
        raise ValueError(f"the foreground must be a boolean mask of the volume's shape {tuple(volume.shape)}, not "
                         f"{foreground.dtype} {tuple(foreground.shape)}")
    # Both read in the volume's memory order (a percentile does not depend on the order): a canonical volume in the
    # file's order (Fortran's for NIfTI) is not copied into C's first (25 ms for 240 x 240 x 155).
    order = sorted(range(volume.ndim), key=volume.stride, reverse=True)
    everything = volume.permute(order).flatten().cpu().numpy()
    # numpy's boolean indexing selects the same values in the same order 15 times faster than torch's on the CPU.
    inside = everything[foreground.permute(order).flatten().cpu().numpy()] if foreground.any() else everything
    if intensity == "headroom":
        # OCT's zero is the dark speckle around the retina (the image's 1st percentile): the Otsu foreground starts
        # just above it, and its own 1st percentile would saturate the bright layers.
        if modality == "oct":
            low = float(np.percentile(everything, HEADROOM_PERCENTILES[0]))
            median = float(np.percentile(inside, HEADROOM_PERCENTILES[1]))
        else:  # both of one array in one partition
            low, median = np.percentile(inside, HEADROOM_PERCENTILES).tolist()
        return low, low + (median - low) / HEADROOM_MEDIAN_LEVEL
    values = inside if modality == "mri" else everything
    low, high = np.percentile(values, CLIP_PERCENTILES[modality]).tolist()
    return low, high


def scale_intensity(volume: torch.Tensor, foreground: torch.Tensor, *, modality: str, window: str,
                    intensity: str) -> torch.Tensor:
    """Intensities mapped to [0, 1] by the modality's preset (docs/method.md §1), clipped.

    Args:
        volume: raw intensities ``(X, Y, Z)``.
        foreground: where the percentiles of the ``mri`` and ``oct`` presets are taken.
        modality: ``mri``, ``ct`` (HU window) or ``oct``.
        window: the CT window name, one of :data:`himatch_med.config.CT_WINDOWS`.
        intensity: ``headroom`` or ``clip``, see :func:`intensity_range`.
    """
    volume = volume.float()
    low, high = intensity_range(volume, foreground, modality=modality, window=window, intensity=intensity)
    if high <= low:
        high = low + 1.0
    # MONAI's ScaleIntensityRange(a_min=low, a_max=high, b_min=0, b_max=1, clip=True) does this arithmetic (and an
    # identity * 1 + 0, which only turns a -0.0 into +0.0) through a MetaTensor: 80 ms against 30 for a
    # 240 x 240 x 155 volume, a third of preparing it. tests/test_transforms.py pins the equal values.
    # One new tensor, divided and clipped in place: the same values as ((volume - low) / (high - low)).clamp(0, 1).
    return torch.sub(volume, low).div_(high - low).clamp_(0.0, 1.0)


def to_backbone_images(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Slices ``(S, H, W)`` in [0, 1] to backbone input ``(S, 3, H', W')``: resized, 3 channels, ImageNet-normalised."""
    images = F.interpolate(slices[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)[:, None, None]
    # Divided in place: the same values as (images - mean) / std without a second 3-channel tensor.
    return (images - mean).div_(std)


def patch_foreground(foreground: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """Foreground patches ``(S, h, w)``: those with at least ``threshold`` of the area they cover in the foreground."""
    fraction = F.interpolate(foreground[:, None].float(), size=grid, mode="area")[:, 0]
    return fraction >= max(threshold, 1e-6)
