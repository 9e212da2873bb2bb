"""Shared fixtures: synthetic volumes with awkward headers, a weight-free stand-in extractor, a tiny DINOv3, and one
bank of stand-in references (with the settings every stand-in test uses)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

# Tests never reach the network: a Hub id fails at once instead of retrying. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

# A suite started in the background by a non-interactive shell (`bash .ci/run &`, nohup) begins with Ctrl-C ignored,
# and Python then never turns SIGINT into KeyboardInterrupt: the tests that interrupt a run (here and in the commands
# they start, which inherit the disposition) would wait forever. Python's own handler, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from himatch_med.config import Settings  # noqa: E402

SETTINGS = Settings(model="stand-in", image_size=64, centroids=16, calibration_slices=64, batch_size=8,
                    kmeans_iterations=10, references_k=4).resolved()
"""The settings of every test with the stand-in extractor (unless it says otherwise)."""
SHAPE = (56, 60, 14)
"""The synthetic brain volumes of those tests."""
LESION = (20, 24, 7)
"""Where a planted lesion goes in them."""
FAST = ["--image-size", "32", "--centroids", "8", "--calibration-slices", "32", "--kmeans-iterations", "5",
        "--references-k", "2"]
"""Command-line options that keep the tiny DINOv3 runs short."""


def _oblique() -> np.ndarray:
    """Rotated 10 degrees about z and 8 about x, anisotropic (1.5 x 2 x 3 mm), with the first axis flipped."""
    a, b = np.radians(10), np.radians(8)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = about_z @ about_x @ np.diag([-1.5, 2.0, 3.0])
    affine[:3, 3] = (80.0, -60.0, -40.0)
    return affine


# An identity affine hides every orientation bug: these do not.
OBLIQUE = _oblique()
# LPS-stored with permuted axes: file axis i runs posterior->anterior... (codes P, S, L).
PERMUTED = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 3], [0, 3.0, 0, 1], [0, 0, 0, 1]])
LPS = np.diag([-1.2, -1.2, 2.5, 1.0])


def brain_volume(seed: int, shape=(40, 44, 14), lesion: tuple[int, int, int] | None = None, radius: float = 4.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 'brain': textured ellipsoid on an exact-zero background, optionally with a bright lesion.

    Returns the volume (float32) and the lesion mask (bool).
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = [(s - 1) / 2 for s in shape]
    inside = sum(((a - c) / (0.45 * s)) ** 2 for a, c, s in zip((x, y, z), centre, shape)) < 1
    texture = 100 + 25 * np.sin(x / 2.5) * np.cos(y / 3.0) + 10 * np.sin(z / 2.0) + rng.normal(0, 2, shape)
    volume = (texture * inside).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    if lesion is not None:
        mask = (((x - lesion[0]) ** 2 + (y - lesion[1]) ** 2 + ((z - lesion[2]) * 1.5) ** 2) < radius**2) & inside
        volume[mask] = 220 + rng.normal(0, 2, int(mask.sum()))
    return volume, mask


def as_distributed(volume: np.ndarray, brain: np.ndarray, *, kind: str) -> np.ndarray:
    """A synthetic brain as real preprocessed scans come: no longer on an exact-zero background.

    ``zscore``: intensities normalised by the mean and standard deviation inside the brain, the background a constant
    below every tissue (BraTS as distributed: -3.62); ``ct``: Hounsfield-like units, soft tissue around 40 HU and a
    constant -1024 HU around the body (CT masked to the body, or outside the reconstruction circle).
    """
    inside = volume[brain]
    if kind == "zscore":
        scaled = (volume - inside.mean()) / inside.std()
        return np.where(brain, scaled, np.float32(-3.62)).astype(np.float32)
    if kind == "ct":
        scaled = 40.0 + (volume - np.median(inside)) * 0.4
        return np.where(brain, scaled, np.float32(-1024.0)).astype(np.float32)
    raise ValueError(f"kind={kind!r}")


def ct_volume(seed: int, shape=(40, 44, 14)) -> np.ndarray:
    """A synthetic CT in Hounsfield units: air (-1000) around a soft-tissue body (~40) with a bone ring (~700).

    The background is a constant non-zero value, as in real CT; the body carries scanner-like noise.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    radius = np.sqrt(((x - (shape[0] - 1) / 2) / (0.42 * shape[0])) ** 2 + ((y - (shape[1] - 1) / 2) / (0.4 * shape[1])) ** 2)
    volume = np.full(shape, -1000.0, np.float32)
    body = radius < 1
    volume[body] = 40 + 15 * np.sin(x[body] / 3.0) * np.cos(z[body] / 2.0) + rng.normal(0, 8, int(body.sum()))
    volume[(radius > 0.8) & body] = 700 + rng.normal(0, 20, int(((radius > 0.8) & body).sum()))
    return volume


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom(folder: Path, hu: np.ndarray, *, positions=None, orientation=AXIAL, thickness: float = 3.0,
                series: str = "1.2.826.0.1.3680043.8.498.101", description: str = "CT 3 mm", modality: str = "CT",
                origin=(-18.0, -12.0, 40.0), names=None) -> list[Path]:
    """Write a CT series one slice per file, as a scanner does: ``hu`` (slices, rows, columns) in Hounsfield units.

    Stored values are HU + 1024 with RescaleIntercept -1024. ``positions`` gives each slice's ImagePositionPatient
    (LPS, mm); by default they step ``thickness`` along the slice normal from ``origin``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(orientation[:3], orientation[3:])
    if positions is None:
        positions = [np.asarray(origin) + k * thickness * normal for k in range(len(hu))]
    paths = []
    for k, (plane, position) in enumerate(zip(hu, positions)):
        instance = f"{series}.{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE, instance
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_IMAGE, instance, modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1", series, \
            "1.2.826.0.1.3680043.8.498.2"
        ds.PatientID, ds.SeriesDescription, ds.InstanceNumber = "TEST-001", description, k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.PixelSpacing, ds.SliceThickness = ["0.8", "0.7"], f"{thickness:g}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = (np.round(plane) + 1024).astype("<i2").tobytes()
        path = folder / (names[k] if names else f"IM{k + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_object(path: Path, modality: str, sop_class: str, *, series: str, rows: int | None = None) -> Path:
    """A non-image DICOM object (a SEG, an RT structure set) as it lies beside the images it refers to."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, f"{series}.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.SeriesInstanceUID = sop_class, f"{series}.1", modality, series
    ds.SeriesDescription = f"{modality} of the CT"
    if rows:
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, rows, 2
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 1, 0
        ds.PixelData = bytes(rows * rows * 2 // 8)
    ds.save_as(path, enforce_file_format=True)
    return path


def as_stored(canonical: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The array a file with ``affine`` stores so that its anatomy in RAS is ``canonical``."""
    from himatch_med.volume import from_canonical

    return from_canonical(canonical, nib.orientations.io_orientation(affine))


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, *, sform_code: int = 1, qform_code: int = 1) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    nib.save(image, path)
    return path


class StandIn:
    """A weight-free extractor with the backbone's interface: fixed random projections of raw patch pixels.

    Each stage has its own projection; the last one first averages over 3x3 neighbouring patches, so stages see the
    image at different scales, like transformer stages do. A constant input term plays the part of a patch
    embedding's bias: without it a flat patch's feature would have the same direction at any brightness (cosine
    similarity is blind to scale), and a lesion that is only brighter would be invisible. Everything is seeded: the
    same image gives the same features.
    """

    model_id = "stand-in"
    patch_size = 8

    def __init__(self, stages: int = 3, dim: int = 24, device: str = "cpu") -> None:
        generator = torch.Generator().manual_seed(1234)
        self.stages = tuple(range(1, stages + 1))
        self.pooling = [1] * (stages - 1) + [3]
        # Scaled so that tanh stays away from saturation and features keep the patch's detail.
        self.projections = [0.3 * torch.randn(self.patch_size**2 + 3, dim, generator=generator) for _ in self.stages]
        self.device = torch.device(device)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        pixels = images[:, :1]
        patches = F.unfold(pixels, self.patch_size, stride=self.patch_size)  # (S, p*p, h*w)
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = patches.transpose(1, 2)
        stats = torch.stack([patches.mean(-1), patches.std(-1), torch.ones_like(patches[..., 0]) * 4.0], dim=-1)
        raw = torch.cat([patches, stats], dim=-1).unflatten(1, (height, width))  # (S, h, w, p*p+3)
        grids = []
        for size, projection in zip(self.pooling, self.projections):
            pooled = F.avg_pool2d(raw.permute(0, 3, 1, 2), size, stride=1, padding=size // 2,
                                  count_include_pad=False).permute(0, 2, 3, 1)
            grids.append(F.normalize(torch.tanh(pooled @ projection.to(pooled)), dim=-1))
        cls = F.normalize(grids[-1].mean(dim=(1, 2)), dim=-1)
        return cls, tuple(grids)


@pytest.fixture(scope="session")
def stand_in() -> StandIn:
    return StandIn()


@pytest.fixture(scope="session")
def tiny_dinov3(tmp_path_factory) -> Path:
    """A tiny random DINOv3 (4 registers) saved with save_pretrained, as a user's local folder would be."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             num_register_tokens=4, patch_size=16, image_size=64)
    folder = tmp_path_factory.mktemp("tiny-dinov3")
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (no registers) saved with save_pretrained."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                          patch_size=14, image_size=56)
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> Path:
    """Four normal reference volumes of :data:`SHAPE`, stored oblique, permuted, LPS and oblique again."""
    folder = tmp_path_factory.mktemp("references")
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS, OBLIQUE)):
        save_nifti(as_stored(brain_volume(i, SHAPE)[0], affine), affine, folder / f"ref{i}.nii.gz")
    return folder


@pytest.fixture(scope="session")
def bank(references, stand_in):
    """The bank of :func:`references` built with the stand-in and :data:`SETTINGS`."""
    from himatch_med import jobs
    from himatch_med.bank.build import build_bank

    paths = sorted(references.iterdir())
    return build_bank(stand_in, ((str(p), jobs.read(p, SETTINGS).prepared) for p in paths), SETTINGS)


@pytest.fixture(scope="session")
def detector(stand_in, bank):
    """The stand-in, :func:`bank` and :data:`SETTINGS` as one detector."""
    from himatch_med.detect import Detector

    return Detector(stand_in, bank, SETTINGS)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Three normal references with different orientations and an oblique query whose qform and sform differ."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "refs").mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS)):
        save_nifti(as_stored(brain_volume(i)[0], affine), affine, root / "refs" / f"normal{i}.nii.gz")
    array, lesion = brain_volume(9, lesion=(14, 18, 7))
    query = nib.Nifti1Image(as_stored(array, OBLIQUE).astype(np.int16), OBLIQUE)
    # qform and sform differ on purpose (codes and values): both must come back unchanged.
    query.set_qform(OBLIQUE @ np.diag([1, 1, 1.0, 1]) + np.array([[0, 0, 0, 0.5]] + [[0] * 4] * 3), code=1)
    query.set_sform(OBLIQUE, code=4)
    query.header["descrip"] = b"oblique query"
    nib.save(query, root / "query.nii.gz")
    return root


@pytest.fixture(scope="session")
def tiny_bank(cohort, tiny_dinov3) -> Path:
    """A bank of the cohort's references built through the CLI with the tiny DINOv3."""
    from himatch_med.bank.__main__ import bank_main

    folder = cohort / "bank"
    assert bank_main(["build", str(cohort / "refs"), "-o", str(folder), "--model", str(tiny_dinov3), *FAST]) == 0
    return folder
