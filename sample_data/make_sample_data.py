"""Generate the quick-start sample data: three normal brain volumes and one query with a planted lesion.

Every volume is a variation of the skull-stripped MNI ICBM152 2009a nonlinear symmetric T1 template that nilearn ships
inside its package (``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, 1 mm, RAS, background
exactly 0). See ``README.md`` next to this file for the licence notice, the references and what each file contains.

For each volume, in this order:

1. (query only) plant a hyperintense ellipsoid with a smooth edge into the 1 mm template, together with its soft
   membership map, so that the lesion is part of the anatomy and goes through every step below;
2. MONAI ``RandAffine`` (rotation up to 3 degrees per axis, scale up to 5 %, translation up to 3 mm) on the 1 mm image,
   the brain mask and the lesion map together;
3. Gaussian anti-aliasing (FWHM = the target spacing) and trilinear resampling onto the volume's own grid: its
   orientation (RAS, LPS, LAS), spacing and, for the query, an oblique head pose with the slab tilted to follow it;
4. brain mask = resampled mask >= 0.5; lesion mask = resampled lesion map >= 0.5 inside the brain;
5. MONAI ``RandBiasField`` (degree 3, coefficients in [-0.05, 0.05]) and ``RandGaussianNoise`` (std 0.02 of the
   template's maximum);
6. background set back to exactly 0; brain voxels clipped to >= 1; stored as int16 (template maximum = 1000).

All randomness comes from fixed seeds and the gzip stream carries no timestamp, so rerunning the script reproduces the
files byte for byte with the package versions listed in ``README.md``; other versions of MONAI, torch or scipy may
change the random draws or the interpolation slightly. ``nilearn`` is needed only here, to find the template file;
himatch-med itself never imports it.

Usage (from the repository root)::

    pip install nilearn            # only for this script
    python sample_data/make_sample_data.py [--out sample_data]
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

HERE = pathlib.Path(__file__).resolve().parent

# Field of view shared by every volume, as voxel-edge bounds in template (MNI) mm. It covers the brain left-right and
# front-back with a few mm to spare, and 44 axial slices of 3 mm from the mid cerebellum (z = -48) to above the vertex.
FOV_MIN = np.array([-75.0, -110.0, -48.0])
FOV_MAX = np.array([75.0, 76.0, 84.0])
FOV_CENTRE = (FOV_MIN + FOV_MAX) / 2

INTENSITY_SCALE = 1000.0  # stored value of the template's maximum (255 in the uint8 file)

# The planted lesion, in template (MNI) mm, before the query's random affine and head pose move it: right hemisphere,
# corona radiata white matter lateral to the body of the lateral ventricle (94 % of it has WM probability > 0.5).
LESION_CENTRE_MNI = np.array([26.0, -10.0, 28.0])
LESION_RADII_MM = np.array([11.0, 13.0, 10.0])
LESION_EDGE = 0.1  # logistic edge width in units of the normalised radius: 10 % to 90 % over r = 0.78 .. 1.22
LESION_CONTRAST = 1.3  # lesion core = 1.3 x the template's median white-matter intensity


@dataclass(frozen=True)
class VolumeSpec:
    """One output volume: its grid, its head pose in the scanner and its seed."""

    name: str
    orientation: str  # three letters, one per voxel axis, e.g. "RAS", "LPS", "LAS"
    spacing: tuple[float, float, float]  # mm along the voxel axes
    head_rotation_deg: tuple[float, float, float]  # rotation of head and slab about x, y, z (scanner axes)
    seed: int
    lesion: bool = False


SPECS = (
    VolumeSpec("references/normal_01", "RAS", (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), seed=101),
    VolumeSpec("references/normal_02", "LPS", (1.875, 1.875, 3.0), (0.0, 0.0, 0.0), seed=102),
    VolumeSpec("references/normal_03", "LAS", (2.2, 2.2, 3.0), (0.0, 0.0, 0.0), seed=103),
    VolumeSpec("query", "RAS", (2.0, 2.0, 3.0), (8.0, 0.0, 5.0), seed=104, lesion=True),
)


def load_template() -> tuple[np.ndarray, np.ndarray, float]:
    """Return the 1 mm template scaled to [0, 1] ``(X, Y, Z)``, its affine and its median white-matter intensity."""
    from nilearn.datasets import struct  # the file paths nilearn ships; nothing is downloaded

    t1 = nib.load(struct.MNI152_FILE_PATH)
    wm = nib.load(struct.WM_MNI152_FILE_PATH)
    image = np.asarray(t1.dataobj, dtype=np.float32) / 255.0
    wm_probability = np.asarray(wm.dataobj, dtype=np.float32) / 255.0
    return image, t1.affine.astype(np.float64), float(np.median(image[wm_probability > 0.9]))


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix (3, 3): about x, then y, then z, by the given angles in degrees."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def anatomical_grid(orientation: str, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Axis-aligned grid over the shared field of view: affine voxel -> template mm and shape."""
    axis_of = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    affine = np.eye(4)
    shape = []
    for column, (letter, step) in enumerate(zip(orientation, spacing, strict=True)):
        axis, sign = axis_of[letter]
        n = int(round((FOV_MAX[axis] - FOV_MIN[axis]) / step))
        shape.append(n)
        affine[axis, column] = sign * step
        # voxel centres symmetric about the field of view's centre
        affine[axis, 3] = FOV_CENTRE[axis] - sign * step * (n - 1) / 2
    return affine, tuple(shape)


def head_pose(degrees: tuple[float, float, float]) -> np.ndarray:
    """Affine (4, 4) template mm -> scanner mm: the head rotated about the field of view's centre."""
    pose = np.eye(4)
    pose[:3, :3] = rotation(degrees)
    pose[:3, 3] = FOV_CENTRE - pose[:3, :3] @ FOV_CENTRE
    return pose


def lesion_map(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Soft lesion membership ``(X, Y, Z)`` in [0, 1] on the template grid; 0.5 on the ellipsoid's surface."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:]
    r = np.sqrt((((xyz - LESION_CENTRE_MNI[:, None]) / LESION_RADII_MM[:, None]) ** 2).sum(0))
    return (1.0 / (1.0 + np.exp((r - 1.0) / LESION_EDGE))).reshape(shape).astype(np.float32)


def make_volume(
    spec: VolumeSpec, template: np.ndarray, template_affine: np.ndarray, wm_level: float
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, str]:
    """Return the int16 volume, the uint8 lesion mask (query only), the header affine and what was drawn."""
    import torch
    from monai.transforms import RandAffine, RandBiasField, RandGaussianNoise

    brain = (template > 0).astype(np.float32)
    image = template.copy()
    lesion = np.zeros_like(template)
    if spec.lesion:
        lesion = lesion_map(template.shape, template_affine) * brain
        image = (1 - lesion) * image + lesion * LESION_CONTRAST * wm_level

    # 1 mm template voxels, so MONAI's voxel-unit ranges are also mm and radians.
    rand_affine = RandAffine(
        prob=1.0,
        rotate_range=(np.deg2rad(3.0),) * 3,
        scale_range=(0.05,) * 3,
        translate_range=(3.0,) * 3,
        mode="bilinear",
        padding_mode="zeros",
    )
    rand_affine.set_random_state(seed=spec.seed)
    channels = torch.from_numpy(np.stack([image, brain, lesion]))
    channels = np.asarray(rand_affine(channels), dtype=np.float32)

    grid, shape = anatomical_grid(spec.orientation, spec.spacing)
    # Anti-aliasing: a Gaussian whose FWHM is the target spacing along each template axis.
    sigma = np.abs(grid[:3, :3]).sum(1) / (2 * np.sqrt(2 * np.log(2)))
    to_template = np.linalg.inv(template_affine) @ grid
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coordinates = to_template[:3, :3] @ ijk + to_template[:3, 3:]
    resampled = [
        ndimage.map_coordinates(
            ndimage.gaussian_filter(channel, sigma, mode="constant"), coordinates, order=1, mode="constant"
        ).reshape(shape)
        for channel in channels
    ]
    image, brain_mask, lesion_mask = resampled[0], resampled[1] >= 0.5, resampled[2] >= 0.5
    lesion_mask &= brain_mask

    bias = RandBiasField(prob=1.0, degree=3, coeff_range=(-0.05, 0.05))
    bias.set_random_state(seed=spec.seed + 1000)
    noise = RandGaussianNoise(prob=1.0, mean=0.0, std=0.02, sample_std=False)
    noise.set_random_state(seed=spec.seed + 2000)
    biased = np.asarray(bias(image[None]), dtype=np.float32)[0]
    field = biased[brain_mask & (image > 0.05)] / image[brain_mask & (image > 0.05)]
    image = np.asarray(noise(biased[None]), dtype=np.float32)[0]
    grid_params = rand_affine.rand_affine_grid
    drawn = (
        f"rotation {np.round(np.rad2deg(grid_params.rotate_params), 2).tolist()} deg,"
        f" scale {np.round(np.asarray(grid_params.scale_params), 3).tolist()},"
        f" translation {np.round(grid_params.translate_params, 2).tolist()} mm,"
        f" bias field {field.min():.2f}..{field.max():.2f} in the brain"
    )

    stored = np.where(brain_mask, np.clip(np.rint(image * INTENSITY_SCALE), 1, 32767), 0).astype(np.int16)
    affine = head_pose(spec.head_rotation_deg) @ grid
    return stored, (lesion_mask.astype(np.uint8) if spec.lesion else None), affine, drawn


def save(array: np.ndarray, affine: np.ndarray, path: pathlib.Path, description: str) -> None:
    """Write a NIfTI-1 file with equal qform and sform (code 1, scanner), mm units, gzip with no timestamp."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    # The sform is set from the qform as stored, so both read back as the same matrix (to float32 precision).
    image.set_sform(image.get_qform(), code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:80]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    """Generate every file into ``--out`` (default: this script's folder) and print a one-line summary per file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    template, template_affine, wm_level = load_template()
    notice = "Derived from MNI ICBM152 2009a sym T1, (C) 1993-2004 L. Collins, MNI, McGill"
    for spec in SPECS:
        volume, lesion_mask, affine, drawn = make_volume(spec, template, template_affine, wm_level)
        path = args.out / f"{spec.name}.nii.gz"
        save(volume, affine, path, notice)
        print(f"{path}: {volume.shape} {''.join(nib.aff2axcodes(affine))} spacing {spec.spacing}; {drawn}")
        if lesion_mask is not None:
            mask_path = args.out / f"{spec.name}_lesion_mask.nii.gz"
            save(lesion_mask, affine, mask_path, notice)
            centre = np.argwhere(lesion_mask).mean(0)
            world = affine[:3, :3] @ centre + affine[:3, 3]
            print(
                f"{mask_path}: {int(lesion_mask.sum())} voxels, centroid voxel {np.round(centre, 2).tolist()}"
                f" = {np.round(world, 1).tolist()} mm, peak {int(volume[lesion_mask > 0].max())}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
