"""Known-answer tests for himatch_med.transforms: foreground masks, intensity presets, backbone images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import brain_volume

from himatch_med.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    border_background,
    foreground_mask,
    intensity_range,
    patch_foreground,
    scale_intensity,
    to_backbone_images,
)

# --------------------------------------------------------------------------------------------------------------------
# foreground_mask


def test_nonzero_foreground_is_exactly_the_nonzero_voxels():
    volume = torch.tensor([[[0.0, 1.0], [-2.0, 0.0]], [[1e-6, 0.0], [0.0, 5.0]]])
    expected = torch.tensor([[[False, True], [True, False]], [[True, False], [False, True]]])
    mask = foreground_mask(volume, "nonzero")
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_nonzero_foreground_of_brain_volume():
    volume, _ = brain_volume(0)
    mask = foreground_mask(torch.from_numpy(volume), "nonzero")
    assert torch.equal(mask, torch.from_numpy(volume != 0))


def test_body_foreground_is_above_minus_500_hu():
    volume = torch.tensor([-1024.0, -600.0, -500.0, -499.0, 0.0, 40.0, 1500.0])
    assert torch.equal(foreground_mask(volume, "body"), torch.tensor([False, False, False, True, True, True, True]))


def test_all_foreground():
    volume = torch.zeros(3, 4, 5)
    mask = foreground_mask(volume, "all")
    assert mask.dtype == torch.bool and mask.shape == volume.shape and bool(mask.all())


def test_otsu_foreground_separates_bimodal_volume():
    rng = np.random.default_rng(0)
    volume = rng.normal(10, 2, (12, 14, 10))
    planted = np.zeros(volume.shape, dtype=bool)
    planted[2:8, 3:11, 2:7] = True
    volume[planted] = rng.normal(100, 3, int(planted.sum()))
    mask = foreground_mask(torch.tensor(volume, dtype=torch.float32), "otsu")
    assert mask.dtype == torch.bool and mask.shape == volume.shape
    # The bright mode is the foreground (not the dark one: SimpleITK's inside value marks the voxels below).
    assert torch.equal(mask, torch.from_numpy(planted))


def test_otsu_foreground_on_float64_input():
    volume = torch.zeros(6, 6, 6, dtype=torch.float64)
    volume[1:4, 1:4, 1:4] = 50.0
    assert torch.equal(foreground_mask(volume, "otsu"), volume > 25)


def test_border_background_is_the_value_filling_the_border():
    volume = torch.full((6, 7, 5), -3.62)
    volume[1:5, 1:6, 1:4] = torch.arange(60, dtype=torch.float32).reshape(4, 5, 3)
    assert border_background(volume) == pytest.approx(-3.62)
    assert torch.equal(foreground_mask(volume, "border"), volume != volume[0, 0, 0])


def test_border_background_needs_most_of_the_border():
    volume = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(4, 4, 4)  # every border voxel differs
    assert border_background(volume) is None
    volume[0] = 7.0  # one face of six: about a fifth of the border
    assert border_background(volume) is None
    volume[:, 0] = volume[:, -1] = volume[-1] = 7.0
    assert border_background(volume) == 7.0


def test_border_background_of_a_2d_image_uses_its_edges_only():
    image = torch.full((5, 6, 1), 12.0)
    image[1:4, 1:5, 0] = 99.0
    assert border_background(image) == 12.0  # the single-slice axis is not a border (it would be the whole image)


def test_border_foreground_without_a_constant_border_is_otsu():
    rng = np.random.default_rng(1)
    volume = torch.tensor(rng.normal(10, 2, (10, 10, 8)), dtype=torch.float32)
    volume[3:7, 3:7, 2:6] += 100
    assert torch.equal(foreground_mask(volume, "border"), foreground_mask(volume, "otsu"))


def test_unknown_foreground_mode_raises():
    with pytest.raises(ValueError, match="'threshold'"):
        foreground_mask(torch.zeros(2, 2, 2), "threshold")


# --------------------------------------------------------------------------------------------------------------------
# scale_intensity


def test_headroom_maps_foreground_1st_percentile_to_0_and_median_to_0_4():
    values = 10.0 + torch.arange(201, dtype=torch.float32)  # foreground 10..210: P1 = 12, median = 110
    volume = torch.full((201, 2), -3.6)
    volume[:, 0] = values
    foreground = volume != -3.6
    low, high = intensity_range(volume, foreground, modality="mri", window="liver", intensity="headroom")
    assert (low, high) == pytest.approx((12.0, 12.0 + 98.0 / 0.4))
    scaled = scale_intensity(volume, foreground, modality="mri", window="liver", intensity="headroom")
    assert float(scaled[100, 0]) == pytest.approx(0.4, abs=1e-6)
    assert float(scaled[200, 0]) == pytest.approx(198 / 245, abs=1e-6)  # the brightest value is not clipped
    assert float(scaled[:, 1].max()) == 0.0
    # OCT: the low anchor is the whole image's 1st percentile (its dark speckle), the median the foreground's.
    low, high = intensity_range(volume, foreground, modality="oct", window="liver", intensity="headroom")
    assert (low, high) == pytest.approx((-3.6, -3.6 + 113.6 / 0.4))


@pytest.mark.parametrize(("modality", "intensity"), [("mri", "headroom"), ("mri", "clip"), ("ct", "headroom"),
                                                     ("oct", "headroom"), ("oct", "clip")])
def test_scaling_equals_monai_scale_intensity_range(modality, intensity):
    """scale_intensity does MONAI's ScaleIntensityRange arithmetic itself (faster): the same values, bit for bit,
    on a z-scored brain on its -3.62 background with a lesion brighter than any tissue, and on HU."""
    from monai.transforms import ScaleIntensityRange

    generator = torch.Generator().manual_seed(3)
    if modality == "ct":
        volume = -1024 + 1100 * torch.rand(30, 28, 9, generator=generator)
    else:
        volume = torch.full((30, 28, 9), -3.62)
        volume[5:25, 4:24] = torch.randn(20, 20, 9, generator=generator)
        volume[12:15, 12:15, 4] = 9.0
    foreground = volume != -3.62
    low, high = intensity_range(volume, foreground, modality=modality, window="brain", intensity=intensity)
    expected = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(volume)
    scaled = scale_intensity(volume, foreground, modality=modality, window="brain", intensity=intensity)
    assert type(scaled) is torch.Tensor and torch.equal(scaled, torch.as_tensor(expected))
    assert 0 < float(scaled.max()) <= 1  # not all clipped away


def test_a_foreground_that_is_not_a_mask_of_the_volume_is_refused():
    volume = torch.randn(4, 5, 6)
    for foreground in ((volume > 0).flatten(), (volume > 0).to(torch.uint8)):
        with pytest.raises(ValueError, match="boolean mask of the volume's shape"):
            intensity_range(volume, foreground, modality="mri", window="brain", intensity="headroom")


def test_headroom_ct_window_leaves_a_third_of_the_width_above():
    hu = torch.tensor([-1024.0, 0.0, 40.0, 80.0, 100.0, 500.0])
    scaled = scale_intensity(hu, torch.ones(6, dtype=torch.bool), modality="ct", window="brain", intensity="headroom")
    torch.testing.assert_close(scaled, torch.tensor([0.0, 0.0, 0.375, 0.75, 0.9375, 1.0]))


def test_unknown_intensity_preset_raises():
    with pytest.raises(ValueError, match="'stretch'"):
        scale_intensity(torch.arange(8.0), torch.ones(8, dtype=torch.bool), modality="mri", window="liver",
                        intensity="stretch")


def test_mri_preset_maps_foreground_percentiles_to_0_and_1():
    # Foreground values 10..210 (201 values): with linear interpolation the 0.5 and 99.5 percentiles are exactly the
    # second and second-to-last values, 11 and 209. Many background zeros must not move them.
    values = 10.0 + torch.arange(201, dtype=torch.float32)
    volume = torch.zeros(201, 3, 2)
    volume[:, 1, 1] = values
    foreground = volume != 0
    scaled = scale_intensity(volume, foreground, modality="mri", window="liver", intensity="clip")
    line = scaled[:, 1, 1]
    assert float(line[1]) == 0.0  # 11 -> 0
    assert float(line[199]) == pytest.approx(1.0, abs=1e-6)  # 209 -> 1
    assert float(line[100]) == pytest.approx(0.5, abs=1e-6)  # 110 -> (110 - 11) / 198
    assert float(line[0]) == 0.0 and float(line[200]) == 1.0  # clipped
    assert float(scaled[~foreground].abs().max()) == 0.0  # background 0 < 11 is clipped to 0
    assert float(scaled.min()) >= 0.0 and float(scaled.max()) <= 1.0


def test_mri_preset_uses_only_the_foreground():
    values = 10.0 + torch.arange(201, dtype=torch.float32)
    volume = torch.zeros(201, 2)
    volume[:, 0] = values
    volume[:, 1] = 5000.0  # bright, but outside the given foreground
    foreground = torch.zeros_like(volume, dtype=torch.bool)
    foreground[:, 0] = True
    scaled = scale_intensity(volume, foreground, modality="mri", window="liver", intensity="clip")
    assert float(scaled[100, 0]) == pytest.approx(0.5, abs=1e-6)


def test_mri_preset_without_foreground_falls_back_to_whole_volume():
    volume = torch.arange(101, dtype=torch.float32)
    scaled = scale_intensity(volume, torch.zeros(101, dtype=torch.bool), modality="mri", window="liver", intensity="clip")
    low, high = np.percentile(np.arange(101.0), (0.5, 99.5))
    assert float(scaled[50]) == pytest.approx((50 - low) / (high - low), abs=1e-6)


@pytest.mark.parametrize(("window", "level", "width"), [("liver", 40, 400), ("brain", 40, 80), ("abdomen", 50, 350)])
def test_ct_windows(window, level, width):
    low, high = level - width / 2, level + width / 2
    hu = torch.tensor([-1024.0, low, level, high, 3000.0, low + width / 4])
    scaled = scale_intensity(hu, torch.ones_like(hu, dtype=torch.bool), modality="ct", window=window, intensity="clip")
    torch.testing.assert_close(scaled, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 0.25]))


def test_ct_liver_window_known_answer():
    hu = torch.tensor([-160.0, 240.0, 40.0])
    scaled = scale_intensity(hu, torch.ones(3, dtype=torch.bool), modality="ct", window="liver", intensity="clip")
    torch.testing.assert_close(scaled, torch.tensor([0.0, 1.0, 0.5]))


def test_ct_window_ignores_foreground():
    hu = torch.tensor([-160.0, 240.0, 40.0])
    a = scale_intensity(hu, torch.ones(3, dtype=torch.bool), modality="ct", window="liver", intensity="clip")
    b = scale_intensity(hu, torch.tensor([False, False, True]), modality="ct", window="liver", intensity="clip")
    assert torch.equal(a, b)


def test_oct_preset_maps_whole_volume_1_99_percentiles():
    # 0..100: the 1st and 99th percentiles are exactly 1 and 99; the foreground plays no part for OCT.
    volume = torch.arange(101, dtype=torch.float32).reshape(101, 1)
    foreground = torch.zeros_like(volume, dtype=torch.bool)
    foreground[60:] = True
    scaled = scale_intensity(volume, foreground, modality="oct", window="liver", intensity="clip")[:, 0]
    assert float(scaled[1]) == 0.0
    assert float(scaled[99]) == pytest.approx(1.0, abs=1e-6)
    assert float(scaled[50]) == pytest.approx(0.5, abs=1e-6)
    assert float(scaled[0]) == 0.0 and float(scaled[100]) == 1.0


@pytest.mark.parametrize("modality", ["mri", "oct"])
def test_constant_volume_scales_without_nan(modality):
    volume = torch.full((4, 4, 4), 7.0)
    scaled = scale_intensity(volume, volume != 0, modality=modality, window="liver", intensity="clip")
    assert torch.isfinite(scaled).all()
    assert float(scaled.min()) >= 0 and float(scaled.max()) <= 1


@pytest.mark.parametrize("modality", ["mri", "ct", "oct"])
def test_scale_intensity_returns_plain_float_tensor_of_same_shape(modality):
    volume = torch.randint(-200, 300, (5, 6, 7), dtype=torch.int16)
    scaled = scale_intensity(volume, volume != 0, modality=modality, window="liver", intensity="clip")
    assert type(scaled) is torch.Tensor  # a MetaTensor never leaves transforms
    assert scaled.dtype == torch.float32
    assert scaled.shape == volume.shape


def test_scale_intensity_does_not_mutate_input():
    volume = torch.linspace(-500, 500, 60).reshape(3, 4, 5)
    copy = volume.clone()
    scale_intensity(volume, volume > 0, modality="mri", window="liver", intensity="clip")
    scale_intensity(volume, volume > 0, modality="ct", window="liver", intensity="clip")
    assert torch.equal(volume, copy)


# --------------------------------------------------------------------------------------------------------------------
# to_backbone_images


def test_backbone_images_shape_and_imagenet_normalisation():
    slices = torch.rand(2, 20, 30)
    images = to_backbone_images(slices, (32, 48))
    assert images.shape == (2, 3, 32, 48)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    raw = images * std + mean
    # The three channels are the same grey image before normalisation.
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 0], raw[:, 2])
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5


def test_backbone_images_are_exactly_the_imagenet_formula():
    slices = torch.rand(4, 20, 30, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(slices[:, None], size=(32, 48), mode="bilinear", align_corners=False,
                                              antialias=True)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.equal(to_backbone_images(slices, (32, 48)), (resized.expand(-1, 3, -1, -1) - mean) / std)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_backbone_images_of_constant_slice_known_answer(value):
    images = to_backbone_images(torch.full((1, 17, 23), value), (32, 32))
    for channel in range(3):
        expected = (value - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(images[0, channel], torch.full((32, 32), expected))


def test_backbone_images_same_size_is_identity_before_normalisation():
    slices = torch.rand(3, 16, 32)
    images = to_backbone_images(slices, (16, 32))
    raw = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    torch.testing.assert_close(raw, slices)


# --------------------------------------------------------------------------------------------------------------------
# patch_foreground


def quadrant_foreground() -> torch.Tensor:
    """16 x 16, 2 x 2 patches of 8 x 8 px with foreground fractions 0.75, 0.5 / 0.25, 0."""
    foreground = torch.zeros(1, 16, 16, dtype=torch.bool)
    foreground[0, 0:8, 0:6] = True  # 48 / 64
    foreground[0, 0:8, 8:12] = True  # 32 / 64
    foreground[0, 8:10, 0:8] = True  # 16 / 64
    return foreground


@pytest.mark.parametrize(("threshold", "expected"), [
    (0.5, [[True, True], [False, False]]),
    (0.6, [[True, False], [False, False]]),
    (0.25, [[True, True], [True, False]]),
    (0.0, [[True, True], [True, False]]),  # any foreground at all, never the empty patch
    (1.0, [[False, False], [False, False]]),
])
def test_patch_foreground_threshold(threshold, expected):
    patches = patch_foreground(quadrant_foreground(), (2, 2), threshold)
    assert patches.dtype == torch.bool
    assert torch.equal(patches, torch.tensor([expected]))


def test_patch_foreground_full_patch_at_threshold_one():
    foreground = torch.ones(2, 8, 12, dtype=torch.bool)
    foreground[1, :4, :4] = False
    patches = patch_foreground(foreground, (2, 3), 1.0)
    assert torch.equal(patches, torch.tensor([[[True] * 3] * 2, [[False, True, True], [True, True, True]]]))
