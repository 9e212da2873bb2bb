"""Intensity presets, foreground masks, and slices to backbone images.

Everything works on canonical volumes or slice stacks as tensors; MONAI does the intensity scaling.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.transforms import ScaleIntensityRange
from monai.utils import convert_to_tensor

from himatch_med.config import BODY_THRESHOLD_HU, CT_WINDOWS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MRI_PERCENTILES = (0.5, 99.5)
OCT_PERCENTILES = (1.0, 99.0)


def foreground_mask(volume: torch.Tensor, mode: str) -> torch.Tensor:
    """Foreground voxels of a volume as a boolean tensor of the same shape.

    Args:
        volume: raw intensities (HU for CT).
        mode: ``nonzero`` (skull-stripped MRI, masked CT), ``body`` (raw CT above -500 HU), ``otsu`` or ``all``.
    """
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
    raise ValueError(f"foreground mode {mode!r} is not one of nonzero, body, otsu, all")


def scale_intensity(volume: torch.Tensor, foreground: torch.Tensor, *, modality: str, window: str) -> torch.Tensor:
    """Intensities mapped to [0, 1] by the modality's preset (METHOD.md §1).

    Args:
        volume: raw intensities ``(X, Y, Z)``.
        foreground: where the percentiles of the ``mri`` preset are taken.
        modality: ``mri`` (0.5-99.5 foreground percentiles), ``ct`` (HU window), ``oct`` (1-99 percentiles).
        window: the CT window name, one of :data:`himatch_med.config.CT_WINDOWS`.
    """
    volume = volume.float()
    if modality == "ct":
        level, width = CT_WINDOWS[window]
        low, high = level - width / 2, level + width / 2
    else:
        values = volume[foreground] if modality == "mri" and foreground.any() else volume.flatten()
        percentiles = MRI_PERCENTILES if modality == "mri" else OCT_PERCENTILES
        low, high = np.percentile(values.cpu().numpy(), percentiles).tolist()
    if high <= low:
        high = low + 1.0
    scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(volume)
    return convert_to_tensor(scaled, track_meta=False)


def to_backbone_images(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Slices ``(S, H, W)`` in [0, 1] to backbone input ``(S, 3, H', W')``: resized, 3 channels, ImageNet-normalised."""
    images = F.interpolate(slices[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images.expand(-1, 3, -1, -1) - mean) / std


def patch_foreground(foreground: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """Foreground patches ``(S, h, w)``: those with at least ``threshold`` of the area they cover in the foreground."""
    fraction = F.interpolate(foreground[:, None].float(), size=grid, mode="area")[:, 0]
    return fraction >= max(threshold, 1e-6)
