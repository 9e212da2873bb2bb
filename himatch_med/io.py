"""The only module that reads or writes files: images (NIfTI, DICOM series, PNG/JPEG), banks, text, pictures.

Every output is written to a temporary name in its destination folder and renamed when complete, so an interrupted
run never leaves a half-written file under a final name; the outputs of one input are written as a set
(:func:`write_set`), which a reader finds complete or not at all. Inputs are only ever opened for reading, and
:func:`source_identity` records what identifies their content.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from io import BufferedWriter, BytesIO
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
import torch

from himatch_med.errors import InputError

try:
    from isal import igzip as _igzip
except ImportError:  # optional: zlib does the same job, slower
    _igzip = None
GZIP_LIBRARY = "zlib" if _igzip is None else "isal"
"""What compresses the maps here (benchmarks report it)."""
MAP_WRITE_CHUNK = 8 << 20
"""Bytes of a map compressed at once (see :func:`_write_nifti_gz`)."""
FIGURE_COMPRESSION = 3
"""zlib level of the pictures matplotlib draws (:func:`write_figure`)."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PAIR_SUFFIXES = (".hdr", ".img")
"""An Analyze 7.5 or NIfTI pair: header and data in two files; the ``.hdr`` stands for both."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BANK_ARRAYS = "bank.safetensors"
BANK_META = "bank.json"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Image:
    """A volume as read from its file.

    ``array`` (X, Y, Z) raw intensities as stored (float32); ``affine`` voxel-to-world RAS; ``header`` the NIfTI header
    that outputs copy (one is made for DICOM and 2D images); ``kind`` is ``nifti``, ``dicom`` or ``image``.
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path
    kind: str
    notes: tuple[str, ...] = ()
    sources: tuple[Path, ...] = ()
    """For a DICOM series: its files in the order of the array's third axis (what DICOM outputs refer to)."""


def stem(path: str | Path) -> str:
    """The name outputs are derived from: the file name without its image suffix (the folder name for DICOM)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + PAIR_SUFFIXES + IMAGE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    """Whether a path looks like an image this package reads (by suffix), or a DICOM series folder."""
    return (path.is_file() and _image_suffix(path)) or is_dicom_folder(path)


def _image_suffix(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES + (".hdr",) + IMAGE_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """Whether a file is DICOM by its content (the ``DICM`` preamble, or a DICOM header under a ``.dcm`` name)."""
    return dicom_file(path) is not None


def holds_dicom(folder: Path) -> bool:
    """Whether a folder directly holds DICOM image files (SEG, RTSTRUCT and other non-image objects do not count)."""
    return folder.is_dir() and any(p.is_file() and not p.name.startswith(".") and _dicom_image(p)
                                   for p in sorted(folder.iterdir()))


def _dicom_image(path: Path) -> bool:
    found = dicom_file(path)
    return found is not None and not found.what


def is_dicom_folder(path: Path) -> bool:
    """A folder that is one input, a DICOM series: it holds DICOM image files and no NIfTI or 2D image files.

    Other files (a README, a DICOMDIR, a SEG) may lie beside the slices. A folder that holds image files as well is
    a folder of inputs, its series among them (see :func:`list_images`).
    """
    return holds_dicom(path) and not any(p.is_file() and not p.name.startswith(".") and _image_suffix(p)
                                         for p in path.iterdir())


def list_images(folder: Path) -> list[Path]:
    """Image files and DICOM series folders directly in ``folder``, sorted by name.

    When DICOM image files lie directly in ``folder`` beside other images, ``folder`` itself comes last: the series
    it holds is one more input (read from the folder's DICOM files only).
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; pass a folder of NIfTI files, 2D images or DICOM series")
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                   and ((p.is_file() and _image_suffix(p)) or (p.is_dir() and holds_dicom(p))))
    return found + ([folder] if holds_dicom(folder) else [])


def read_image(path: str | Path, *, volume_index: int | None = None, series: str | None = None) -> Image:
    """Read a NIfTI file, a DICOM series folder or a 2D image (as a one-slice volume).

    Args:
        path: the file or DICOM folder.
        volume_index: which volume of a 4D NIfTI to take (a 4D file is refused without it).
        series: the SeriesInstanceUID to read from a DICOM folder holding several series.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom(path, series)
    lower = path.name.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return _read_2d(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; pass a NIfTI volume (.nii or .nii.gz)")
    if not lower.endswith(NIFTI_SUFFIXES + (".hdr", ".img")) and not _looks_like_nifti(path):
        kind = "a DICOM file: pass the folder that holds its series" if is_dicom_file(path) else \
            f"not an image file (its name ends in {path.suffix or 'no suffix'} and its content is no NIfTI)"
        raise InputError(f"{path}: {kind}; pass a NIfTI volume (.nii, .nii.gz), a DICOM series folder or a 2D image "
                         "(PNG, JPEG, TIFF)")
    return _read_nifti(path, volume_index)


def _looks_like_nifti(path: Path) -> bool:
    """Whether a file's first bytes are gzip's or a NIfTI-1/2 header's (``sizeof_hdr`` 348 or 540)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start[:2] == b"\x1f\x8b" or start in (struct.pack("<i", 348), struct.pack(">i", 348),
                                                  struct.pack("<i", 540), struct.pack(">i", 540))


def _read_nifti(path: Path, volume_index: int | None) -> Image:
    """A NIfTI file or an Analyze/NIfTI pair, read the way its header and content say, not its name."""
    raw = _raw_header(path)
    if raw is not None:
        _check_datatype(path, raw)
    notes: list[str] = []
    try:
        with _quiet_nibabel(), _opened(path, notes) as image:
            if not isinstance(image, nib.AnalyzeImage):  # NIfTI files and pairs are AnalyzeImages too
                raise InputError(f"{path}: is a {type(image).__name__}, not NIfTI; convert it to .nii.gz")
            array = _voxels(image, notes)
    except InputError:
        raise
    except Exception as error:  # nibabel raises many types for damaged files
        raise InputError(f"{path}: cannot be read as NIfTI ({_reason(error)}); pass an intact .nii or .nii.gz "
                         "volume (a truncated download is a common cause)") from error
    array, picked = _pick_volume(path, array, volume_index)
    header = _single_file_header(image)
    nifti = isinstance(image, nib.Nifti1Pair)  # every NIfTI file or pair, of either version
    if nifti:
        notes += _orientation_notes(header)
    else:
        notes.append("an Analyze 7.5 header holds no orientation; nibabel's default (LAS, from the voxel sizes and "
                     "origin) is used and written into the outputs' sform")
    if raw is not None and not (nifti and header.get_sform(coded=True)[1]):
        notes += _zero_voxel_size_notes(raw, array.ndim)
    return Image(array.astype(np.float32, copy=False), image.affine, header, path, "nifti", tuple(notes) + picked)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _raw_header(path: Path) -> nib.Nifti1Header | None:
    """The header as stored, before nibabel's fixes (it sets a voxel size of 0 to 1 on load); None if it is none.

    An Analyze header is read through the NIfTI-1 layout, which it shares for the fields looked at here.
    """
    if path.name.lower().endswith(".img") and path.with_suffix(".hdr").is_file():
        path = path.with_suffix(".hdr")
    try:
        with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as handle:
            block = handle.read(540)
    except (OSError, EOFError):
        return None
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        if len(block) >= size and size in (struct.unpack("<i", block[:4])[0], struct.unpack(">i", block[:4])[0]):
            try:
                return klass(block[:size], check=False)
            except Exception:  # a block that only looks like a header
                return None
    return None


def _check_datatype(path: Path, raw: nib.Nifti1Header) -> None:
    code = int(raw["datatype"])
    if code == 1:
        raise InputError(f"{path}: stores 1-bit voxels (NIfTI datatype DT_BINARY), which nibabel (like most tools) "
                         "cannot read and which hold masks rather than images; pass the image the mask belongs to, or "
                         "re-export the file from the program that wrote it with 8-bit (uint8) or wider voxels")
    if code not in nib.nifti1.data_type_codes.code or code == 0:
        raise InputError(f"{path}: its header gives the unknown NIfTI datatype code {code}, so the voxels cannot be "
                         "interpreted; re-export the file from the program that made it")


@contextmanager
def _quiet_nibabel():
    # nibabel logs its header fixes (e.g. "pixdim[1,2,3] should be non-zero") straight to stderr; the notes say it.
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _opened(path: Path, notes: list[str]):
    """The image as nibabel opens it; a single file whose compression its name contradicts is read by its content.

    A gzipped single file is decompressed by ISA-L when it is installed (a 240 x 240 x 155 int16 volume read in 61
    instead of 93 ms; the same voxels).
    """
    lower = path.name.lower()
    compressed = _is_gzip(path)
    agrees = compressed == lower.endswith(".gz")
    if not lower.endswith(NIFTI_SUFFIXES) or (agrees and not (compressed and _igzip is not None)):
        yield nib.load(path)
        return
    if not agrees:
        named, actual = (".nii", ".nii.gz") if compressed else (".nii.gz", ".nii")
        notes.append(f"the file {'is' if compressed else 'is not'} gzip-compressed though its name ends in {named}; "
                     f"it was read by its content (rename it to {stem(path)}{actual} to match)")
    gunzip = gzip.open if _igzip is None else _igzip.open
    with (gunzip(path, "rb") if compressed else open(path, "rb")) as handle:
        start = handle.read(4)
        handle.seek(0)
        klass = nib.Nifti2Image if 540 in struct.unpack("<i", start) + struct.unpack(">i", start) else nib.Nifti1Image
        # The image reads its voxels from the open stream: they are read before it closes.
        yield klass.from_stream(handle)


def _voxels(image, notes: list[str]) -> np.ndarray:
    """The voxels as float32 intensities: complex data as its magnitude, RGB as the mean of its channels."""
    dtype = image.get_data_dtype()
    if dtype.names:
        data = np.asanyarray(image.dataobj)
        channels = [name for name in ("R", "G", "B") if name in dtype.names] or list(dtype.names)
        notes.append("RGB voxels: the mean of the red, green and blue channels is used as the intensity")
        return sum(data[name].astype(np.float32) for name in channels) / np.float32(len(channels))
    if dtype.kind == "c":
        notes.append(f"{dtype.name} voxels: their magnitude is used (the phase is dropped)")
        return np.abs(np.asanyarray(image.dataobj)).astype(np.float32)
    return image.get_fdata(dtype=np.float32)  # float32 directly: float64 would double the peak memory


def _single_file_header(image) -> nib.Nifti1Header:
    """A single-file NIfTI header for the outputs: the input's own, or made from a pair's or Analyze header."""
    if isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        return image.header.copy()
    klass = nib.Nifti2Header if isinstance(image, nib.Nifti2Pair) else nib.Nifti1Header
    header = klass.from_header(image.header)
    if not isinstance(image, nib.Nifti1Pair):
        header.set_qform(image.affine, code=0)
        header.set_sform(image.affine, code=2)
    return header


def _zero_voxel_size_notes(raw: nib.Nifti1Header, ndim: int) -> list[str]:
    """What a user should know when a voxel size that places the voxels is 0 (nibabel then takes 1 mm)."""
    ordinal = {1: "first", 2: "second", 3: "third"}
    return [f"pixdim[{axis}] (the voxel size along the {ordinal[axis]} axis) is 0 in the header; 1 mm is assumed "
            "there (as nibabel does) and written into the outputs, so sizes and proportions along it may be wrong; "
            "set the true voxel size in the header to fix this"
            for axis in range(1, min(ndim, 3) + 1) if float(raw["pixdim"][axis]) == 0]


def _orientation_notes(header: nib.Nifti1Header) -> tuple[str, ...]:
    """What a user should know about which orientation field of the header is used."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if scode and qcode:
        shift = float(np.abs(np.asarray(qform) - np.asarray(sform)).max())
        if shift > 1e-3:
            return (f"qform (code {int(qcode)}) and sform (code {int(scode)}) disagree by up to {shift:.3g}; the sform "
                    "is used (nibabel's rule); the outputs keep both unchanged",)
    if not scode and not qcode:
        return ("neither qform nor sform is set; nibabel's fallback orientation (LAS, from the voxel sizes) is used",)
    return ()


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _pick_volume(path: Path, array: np.ndarray, volume_index: int | None) -> tuple[np.ndarray, tuple[str, ...]]:
    if 0 in array.shape or array.size == 0:
        raise InputError(f"{path}: has an axis of size 0 (shape {array.shape}); the file holds no image")
    squeezed = array.reshape(array.shape[:3] + tuple(s for s in array.shape[3:] if s != 1)) if array.ndim > 3 else array
    if squeezed.ndim == 4:
        count = squeezed.shape[3]
        if volume_index is None:
            raise InputError(f"{path}: is 4D with {count} volumes; choose one with --volume-index 0..{count - 1}")
        if not 0 <= volume_index < count:
            raise InputError(f"{path}: --volume-index {volume_index} is out of range 0..{count - 1}")
        return squeezed[..., volume_index], (f"volume {volume_index} of {count} taken from a 4D file",)
    if squeezed.ndim != 3:
        raise InputError(f"{path}: has {array.ndim} dimensions {array.shape}; a 3D volume is expected (pass 2D "
                         "slices as PNG/JPEG, 4D with --volume-index)")
    return squeezed, ()


def _read_2d(path: Path) -> Image:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read as an image ({_reason(error)})") from error
    if image.GetNumberOfComponentsPerPixel() > 1:
        channels = sitk.GetArrayFromImage(image).astype(np.float32)
        plane = channels[..., :3].mean(axis=-1)
    else:
        plane = sitk.GetArrayFromImage(image).astype(np.float32)
    if plane.ndim != 2:
        raise InputError(f"{path}: is not a single 2D image (shape {plane.shape})")
    # On the image's own grid as ITK reads it: voxel (i, j) is pixel (column i, row j) at ITK's LPS point (i, j), so
    # outputs read back with ITK lie on the image. In RAS both axes are flipped, which makes the axial slice cut from
    # the canonical volume the image as displayed (volume.to_slices).
    array = np.ascontiguousarray(plane.T[..., None])
    affine = plane_affine(image)
    header = nib.Nifti1Header()
    header.set_qform(affine, code=2)
    header.set_sform(affine, code=2)
    return Image(array, affine, header, path, "image")


def plane_affine(image) -> np.ndarray:
    """RAS voxel-to-world affine of a 2D SimpleITK image as a one-slice volume (the slice axis of 1 mm)."""
    direction = np.eye(3)
    direction[:2, :2] = np.array(image.GetDirection()).reshape(2, 2)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array([*image.GetSpacing(), 1.0])[None]
    affine[:2, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


NON_IMAGES = {"SEG": "a DICOM SEG segmentation", "RTSTRUCT": "an RT structure set, RTSTRUCT", "RTPLAN": "an RT plan",
              "RTDOSE": "an RT dose grid", "RTRECORD": "an RT treatment record", "SR": "a structured report",
              "PR": "a presentation state", "KO": "a key-object selection", "REG": "a registration",
              "DOC": "an encapsulated document", "PLAN": "a plan"}
"""DICOM modalities that are not images to score, and what each is called in messages."""
DICOM_TAGS = ("SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesDescription", "ImagePositionPatient",
              "ImageOrientationPatient", "Rows", "Columns", "NumberOfFrames")
PLANES = ("sagittal", "coronal", "axial")
"""Slice planes by the patient axis (LPS x, y, z) their normal runs along."""


@dataclass(frozen=True)
class DicomFile:
    """One DICOM file as its header describes it (the pixels are not read).

    ``what`` is empty for an image, else what the object is (a SEG, an RT structure set, ...); ``error`` says why a
    file with the DICOM preamble could not be parsed. ``position`` and ``orientation`` are ImagePositionPatient and
    ImageOrientationPatient (LPS, mm and direction cosines) when present.
    """

    path: Path
    series: str = ""
    modality: str = ""
    description: str = ""
    what: str = ""
    error: str = ""
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None
    size: tuple[int, int] = (0, 0)


def dicom_file(path: Path) -> DicomFile | None:
    """The DICOM header of a file, decided by content; None for anything that is not DICOM (an empty ``.dcm`` too)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    preamble = head[128:132] == b"DICM"
    if not preamble and (path.suffix.lower() != ".dcm" or not head):
        return None
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=not preamble, specific_tags=list(DICOM_TAGS))
    except Exception as error:  # pydicom raises many types for damaged files
        return DicomFile(path, error=_reason(error)) if preamble else None
    if not preamble and "SOPClassUID" not in header and "SeriesInstanceUID" not in header:
        return None  # a file named .dcm that parses as nothing DICOM
    modality = str(header.get("Modality", "") or "")
    if modality in NON_IMAGES:
        what = NON_IMAGES[modality]
    elif "Rows" not in header:
        what = "an object without pixel data"
    else:
        what = ""
    return DicomFile(path, str(header.get("SeriesInstanceUID", "") or ""), modality,
                     str(header.get("SeriesDescription", "") or ""), what, "",
                     _numbers(header.get("ImagePositionPatient"), 3),
                     _numbers(header.get("ImageOrientationPatient"), 6),
                     (int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)))


def _numbers(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _read_dicom(folder: Path, series: str | None) -> Image:
    import SimpleITK as sitk

    files = [f for f in (dicom_file(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith("."))
             if f is not None]
    damaged = [f for f in files if f.error]
    if damaged:
        raise InputError(f"{damaged[0].path}: a damaged DICOM file ({damaged[0].error}); re-export the series, or move "
                         f"the file out of {folder}")
    others = [f for f in files if f.what]
    groups: dict[str, list[DicomFile]] = {}
    for found in files:
        if not found.what:
            groups.setdefault(found.series, []).append(found)
    if not groups:
        if others:
            raise InputError(f"{folder}: holds no DICOM image series: " + "; ".join(
                f"{f.path.name} is {f.what}" for f in others[:3]) + ", not an image; pass the folder of the images "
                "it belongs to")
        raise InputError(f"{folder}: a folder without a DICOM series; pass a NIfTI file or a DICOM series folder")
    listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'} ({_series_summary(members)})"
                        for uid, members in groups.items())
    if series is None and len(groups) > 1:
        raise InputError(f"{folder}: holds {len(groups)} DICOM series; choose one with --series UID from: {listing}")
    uid = next(iter(groups)) if series is None else series
    if uid not in groups:
        raise InputError(f"{folder}: has no series {uid}; it holds: {listing}")
    paths = _stacking_order(f"{folder}: DICOM series {uid}", groups[uid])
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in paths])
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: the DICOM series {uid} cannot be read ({_reason(error)})") from error
    affine = dicom_affine(image)
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    notes = ("not read, as they are not images: " + ", ".join(f"{f.path.name} ({f.what})" for f in others),) \
        if others else ()
    return Image(np.ascontiguousarray(array), affine, header, folder, "dicom", notes, tuple(paths))


def _series_summary(files: list[DicomFile]) -> str:
    description = f'"{files[0].description}"' if files[0].description else "no description"
    return f"{files[0].modality or 'no modality'}, {description}, {len(files)} slice{'s' if len(files) > 1 else ''}"


def _stacking_order(name: str, files: list[DicomFile]) -> list[Path]:
    """The files of one series in slice order, refused when they cannot be one evenly spaced volume.

    SimpleITK stacks whatever it is given with one spacing: a missing slice, uneven spacing, two slices at one
    position or slices of different orientations would silently misplace anatomy. Refusing is chosen over resampling,
    because the outputs must lie on the series' own slices, and slices that are not on one grid have no such volume.

    Args:
        name: how messages name the series (its folder and UID).
        files: its DICOM files.
    """
    if len(files) == 1:
        return [files[0].path]
    unplaced = [f for f in files if f.position is None or f.orientation is None]
    if unplaced:
        raise InputError(f"{name}: {len(unplaced)} of its {len(files)} slices have no ImagePositionPatient or "
                         f"ImageOrientationPatient (e.g. {unplaced[0].path.name}), so their order and spacing cannot "
                         "be checked; export the series with its patient geometry, or convert it to NIfTI")
    sizes: dict[tuple[int, int], list[DicomFile]] = {}
    for found in files:
        sizes.setdefault(found.size, []).append(found)
    if len(sizes) > 1:
        raise InputError(f"{name}: its slices differ in size (" + "; ".join(
            f"{len(group)} of {rows} x {columns} pixels, e.g. {group[0].path.name}"
            for (rows, columns), group in sizes.items()) + "); pass a folder holding one series of one slice size")
    planes: list[list[DicomFile]] = []
    for found in files:
        group = next((g for g in planes if np.abs(np.subtract(g[0].orientation, found.orientation)).max() < 1e-3),
                     None)
        if group is None:
            planes.append([found])
        else:
            group.append(found)
    if len(planes) > 1:
        raise InputError(f"{name} mixes slice orientations (" + "; ".join(
            f"{len(group)} {_plane(group[0].orientation)} slices, e.g. {group[0].path.name}" for group in planes)
            + "); stacked as one volume they would be wrong; pass a folder holding slices of one orientation "
            "(split the files by ImageOrientationPatient)")
    orientation = np.array(files[0].orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.array([np.dot(f.position, normal) for f in files])
    order = np.argsort(along, kind="stable")
    along, files = along[order], [files[i] for i in order]
    gaps = np.diff(along)
    twice = np.flatnonzero(gaps < 0.01)  # mm: positions are written to a micron or better
    if twice.size:
        first = twice[0]
        shared = len(set(twice) | set(twice + 1))
        where = "one position" if np.all(np.diff(twice) == 1) and np.ptp(along[twice]) < 0.01 else "shared positions"
        raise InputError(f"{name} has {shared} slices at {where} (e.g. {files[first].path.name} and "
                         f"{files[first + 1].path.name} at {along[first]:.3g} mm along "
                         "the slice normal); it may hold several acquisitions (echoes, time points or a repeat) under "
                         "one UID; pass a folder holding one slice per position")
    spacing = float(np.median(gaps))
    uniform = (along[-1] - along[0]) / (len(along) - 1)
    misplaced = float(np.abs(along - (along[0] + uniform * np.arange(len(along)))).max())
    # A fifth of a slice tolerates positions rounded when written; one missing slice misplaces about half a slice.
    if misplaced > 0.2 * spacing:
        widest = int(np.argmax(np.abs(gaps - spacing)))
        missing = gaps[widest] / spacing - 1
        # One hole in otherwise even slices reads as missing slices; anything else as uneven spacing.
        hole = missing > 0.8 and abs(missing - round(missing)) < 0.1 and \
            np.abs(np.delete(gaps, widest) - spacing).max() < 0.2 * spacing
        cause = (f" ({round(missing)} slice{'s' if round(missing) > 1 else ''} missing?)" if hole
                 else f"; the spacing varies from {gaps.min():.3g} to {gaps.max():.3g} mm")
        raise InputError(f"{name} is not evenly spaced: its slices are {spacing:.3g} mm apart but {gaps[widest]:.3g} "
                         f"mm between {files[widest].path.name} and {files[widest + 1].path.name}{cause}; stacked as "
                         f"one volume at a uniform {uniform:.3g} mm, slices would be misplaced by up to "
                         f"{misplaced:.2g} mm; "
                         "re-export the complete series, or resample it onto evenly spaced slices (e.g. 3D Slicer's "
                         "acquisition geometry regularisation, or dcm2niix, which writes an equidistant _Eq volume) "
                         "and pass the NIfTI")
    return [f.path for f in files]


def _plane(orientation: tuple[float, ...]) -> str:
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    return PLANES[int(np.argmax(normal))] if normal.max() > 0.9 else "oblique"


def dicom_affine(image) -> np.ndarray:
    """RAS voxel-to-world affine of a SimpleITK image (whose geometry is LPS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())[None]
    affine[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


@contextmanager
def _atomic(path: Path, suffix: str):
    """Yield a temporary path beside ``path``; rename it to ``path`` only when the block finishes without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = None
    try:
        with _signals_held():
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
            os.close(handle)
        yield Path(temporary)
        with _signals_held():
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are meant to be shared
            os.replace(temporary, path)
    finally:
        with _signals_held():
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)


@contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM while the block runs, and deliver them when it ends.

    Renames and removals that keep a set of files whole are then never cut short. Python runs signal handlers in
    the main thread only, so other threads need no holding.
    """
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in numbers}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    caught: list[int] = []
    for number in numbers:
        signal.signal(number, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])  # now handled as it would have been when it came


@contextmanager
def write_set(paths: dict[str, Path], *, lock: Path, owner: str, replaces: tuple[Path, ...] = ()
              ) -> Iterator[dict[str, Path]]:
    """Write a set of files in one folder so that a reader finds all of them or none, one writer at a time.

    Yields a temporary path beside each final one (hidden, ``.part``), for the block to write. When the block
    finishes, the earlier last file and ``replaces`` are removed, and the temporaries are renamed into place in the
    order of ``paths``: the last one, placed last, marks the set complete. If the block fails (an error, a full
    disk, Ctrl-C or SIGTERM), its temporaries are removed and an earlier complete set stays as it was; if placing
    fails, every file of the set is removed. The renames and removals are not cut short by Ctrl-C or SIGTERM.

    Args:
        paths: the final paths by kind, all in one folder; the last one marks the set complete.
        lock: the lock file of the set in that folder, held (``flock``) while the set is written and removed after.
            What a killed writer left (temporaries, files of a set without its last file) is removed by the next.
        owner: how messages name what the set belongs to (the input).
        replaces: other files made from the set (e.g. a page showing it): removed when the set is replaced.

    Raises:
        InputError: another process holds the lock.
    """
    finals = list(paths.values())
    folder = lock.parent
    folder.mkdir(parents=True, exist_ok=True)
    staged = {key: path.with_name(f".{path.name}.{secrets.token_hex(4)}.part{_suffixes(path)}")
              for key, path in paths.items()}
    handle = None
    try:
        with _signals_held():
            handle, stale = _lock(lock, owner)
            _clear_leftovers(finals, replaces, scan=stale)
        yield dict(staged)
        missing = [key for key, path in staged.items() if not path.is_file()]
        if missing:
            raise RuntimeError(f"{owner}: its {', '.join(missing)} was not written, so none of its outputs is placed")
        with _signals_held():
            try:
                for path in (finals[-1], *replaces):
                    path.unlink(missing_ok=True)  # the earlier set is incomplete, and so not taken, from here on
                for key, path in paths.items():
                    os.replace(staged[key], path)
            except BaseException:
                for path in finals:
                    path.unlink(missing_ok=True)
                raise
    finally:
        with _signals_held():
            for path in staged.values():
                path.unlink(missing_ok=True)
            if handle is not None:
                _unlock(lock, handle)


def clear_set(paths: dict[str, Path], *, lock: Path, owner: str, replaces: tuple[Path, ...] = ()) -> None:
    """Remove what a killed writer of a set (:func:`write_set`) left, unless a live writer holds its lock now."""
    if not lock.parent.is_dir():
        return
    with _signals_held():
        try:
            handle, _ = _lock(lock, owner)
        except InputError:
            return
        try:
            _clear_leftovers(list(paths.values()), replaces, scan=True)
        finally:
            _unlock(lock, handle)


def _suffixes(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def _lock(lock: Path, owner: str) -> tuple[int, bool]:
    """Take the lock of a set (``flock``, refused at once when held) and write this process into it.

    Returns:
        The open lock file, and whether it was there before: left by a writer that was killed (one that ends
        removes it), which may have left more.
    """
    while True:
        try:
            handle, stale = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), False
        except FileExistsError:
            try:
                handle, stale = os.open(lock, os.O_RDWR), True
            except FileNotFoundError:  # removed by its holder in between
                continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 256).decode("utf-8", "replace").split()
            os.close(handle)
            who = "another run" if not holder else f"another run (process {holder[0]}" + (
                f" on {holder[1]})" if len(holder) > 1 and holder[1] != socket.gethostname() else ")")
            raise InputError(f"{owner}: {who} is writing its outputs into {lock.parent} now; wait for it to finish, "
                             "or write into another output folder") from None
        except BaseException:
            os.close(handle)
            raise
        # The holder before may have removed the file between our open and our lock: then ours locks nothing.
        try:
            mine, named = os.fstat(handle), os.stat(lock)
        except FileNotFoundError:
            mine = named = None
        if mine is not None and (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino):
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return handle, stale
        os.close(handle)


def _unlock(lock: Path, handle: int) -> None:
    # Removed while still held: a process that opens it after this finds it gone, and makes its own.
    try:
        lock.unlink(missing_ok=True)
    finally:
        os.close(handle)


def _clear_leftovers(finals: list[Path], replaces: tuple[Path, ...], *, scan: bool) -> None:
    """Remove what a killed writer of this set left: the files of a set without its last one, and its temporaries.

    Temporaries are found by listing the folder (``scan``), which a folder of many outputs makes slow: that is done
    only when a lock file shows that a writer was killed.
    """
    if scan:
        prefixes = tuple(f"{dots}{path.name}." for path in finals for dots in (".", ".."))
        for entry in finals[0].parent.iterdir():
            if entry.name.startswith(prefixes) and ".part" in entry.name and entry.is_file():
                entry.unlink(missing_ok=True)
    if not finals[-1].exists():
        for path in (*finals, *replaces):
            path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class Display:
    """How a map asks viewers to show it: NIfTI ``cal_min``/``cal_max``, intent code and name (``descrip`` is kept)."""

    cal_min: float
    cal_max: float
    intent: str = "none"
    name: str = ""


def write_map(array: np.ndarray, header: nib.Nifti1Header, path: str | Path, *, display: Display | None = None,
              dtype=np.float32) -> Path:
    """Save a map ``(X, Y, Z)`` as gzipped NIfTI with a copy of ``header`` (affine, qform, sform, descriptions).

    Always gzip-compressed (see :func:`_gzip_writer`); the same map gives the same bytes.

    Args:
        array: the map, on the header's grid.
        header: the input's header.
        path: where it goes.
        display: display range and intent written into the header (``None``: the input's kept).
        dtype: the stored type (float32 for maps, an unsigned integer for label maps).
    """
    path = Path(path)
    if display is not None:
        header = header.copy()
        header["cal_min"], header["cal_max"] = display.cal_min, display.cal_max
        header.set_intent(display.intent, name=display.name[:16])
    with _atomic(path, ".nii.gz") as temporary, open(temporary, "wb") as target:
        _write_nifti_gz(array, header, dtype, target)
    return path


def read_dicom_headers(paths: tuple[Path, ...] | list[Path]) -> list:
    """The pydicom headers (no pixel data) of a series' files, in the order given."""
    import pydicom

    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


def write_dicom(dataset, path: str | Path) -> Path:
    """Write a pydicom dataset as a DICOM file (with its file meta information) atomically."""
    path = Path(path)
    with _atomic(path, ".dcm") as temporary:
        dataset.save_as(temporary, enforce_file_format=True)
    return path


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write uint8 pixels ``(H, W)`` or ``(H, W, 3)`` as PNG atomically; no time stamp, so same pixels, same bytes."""
    from PIL import Image as Picture

    path = Path(path)
    if pixels.dtype != np.uint8:
        raise RuntimeError(f"a PNG is written from uint8 pixels, not {pixels.dtype}")
    with _atomic(path, ".png") as temporary:
        Picture.fromarray(np.ascontiguousarray(pixels)).save(temporary, format="PNG")
    return path


def nifti_bytes(image: Image, *, dtype=np.float32) -> bytes:
    """The bytes of a gzipped NIfTI file of ``image`` on its own header (affine, qform, sform), made in memory.

    For pages that embed their volumes. The same image gives the same bytes (the gzip header carries no time).
    """
    buffer = BytesIO()
    _write_nifti_gz(image.array, image.header, dtype, buffer)
    return buffer.getvalue()


def _write_nifti_gz(array: np.ndarray, header: nib.Nifti1Header, dtype, target: BinaryIO) -> None:
    """Write a single-file NIfTI of ``array`` as ``dtype`` on a copy of ``header`` into ``target``, gzipped.

    NIfTI-2 stays NIfTI-2. nibabel writes the header and then the data slice by slice straight into the compressing
    stream (:func:`_gzip_writer`): neither the file's bytes nor their compressed copy are held whole, as
    ``to_bytes`` and then compressing held them (two copies of 35 MB and 30 ms for a map of 240 x 240 x 155).
    """
    header = header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(np.nan, np.nan)
    header.set_data_shape(array.shape)
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = kind(np.asarray(array, dtype=dtype), None, header)
    # nibabel writes a slice at a time; compressed in chunks of 8 MB, a writer thread takes the GIL back a few
    # times per map, not once per slice (each time it may wait for another thread's switch interval).
    with BufferedWriter(_gzip_writer(target), buffer_size=MAP_WRITE_CHUNK) as stream:
        image.to_file_map(image.make_file_map({"image": stream, "header": stream}))


def _gzip_writer(target: BinaryIO):
    """A file that writes what it is given into ``target`` as one gzip member with no time or name in its header.

    The same data then gives the same bytes. ISA-L's igzip (the ``isal`` package) when it is installed: about 8 times
    zlib's speed at its level 1, for the same size (compressing the maps was the largest cost of a run after the
    backbone). Without it, zlib at level 1. Either way a standard gzip stream that every NIfTI reader opens; the
    bytes differ between the two. Closing it finishes the member and leaves ``target`` open.
    """
    # filename="": a real file's name (a temporary's) would otherwise go into the header.
    if _igzip is None:
        return gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=target, mtime=0)
    return _igzip.IGzipFile(filename="", mode="wb", compresslevel=2, fileobj=target, mtime=0)


def read_text(path: str | Path, *, encoding: str = "utf-8") -> str:
    """The text of a file (``OSError`` and ``UnicodeDecodeError`` as raised; callers say what the file was for)."""
    return Path(path).read_text(encoding=encoding)


def read_json(path: str | Path) -> dict:
    """The content of a JSON file."""
    return json.loads(read_text(path))


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write (and remove) a probe file in it; ``OSError`` when that fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with _atomic(path, path.suffix) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_json(data: dict, path: str | Path) -> Path:
    """Write a JSON file atomically (NaN written as null)."""
    return write_text(json.dumps(_json_safe(data), indent=2) + "\n", path)


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_figure(figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically, cropped to what it draws as ``bbox_inches="tight"`` crops it."""
    path = Path(path)
    with _atomic(path, ".png") as temporary:
        # zlib level 3, not PIL's 6: an overview of 979 x 329 pixels compresses in 15 ms instead of 29-40, and 3 %
        # smaller (145 against 150 kB; level 1 is as fast but not smaller).
        figure.savefig(temporary, format="png", dpi=dpi, bbox_inches=_tight_box(figure, dpi),
                       pil_kwargs={"compress_level": FIGURE_COMPRESSION})
    return path


def _tight_box(figure, dpi: int):
    """The box ``bbox_inches="tight"`` crops to (inches, with its padding), measured without making the images.

    Our own because matplotlib's measure draws the whole figure once more first, images resampled and all (a third of
    the time of writing an overview); an image clipped to its axes does not change the box, so they are hidden while
    it is measured. Pinned equal, pixel for pixel, in a test.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    shown, canvas = figure.get_dpi(), figure.canvas
    images = [image for axes in figure.axes for image in axes.get_images() if image.get_visible()]
    try:
        figure.set_dpi(dpi)
        renderer = FigureCanvasAgg(figure).get_renderer()
        for image in images:
            image.set_visible(False)
        box = figure.get_tightbbox(renderer)
    finally:
        for image in images:
            image.set_visible(True)
        figure.set_dpi(shown)
        figure.set_canvas(canvas)  # a figure shown in a window keeps its own
    return box.padded(matplotlib.rcParams["savefig.pad_inches"])


def write_bank(tensors: dict[str, torch.Tensor], meta: Callable[[str], dict], folder: str | Path) -> Path:
    """Write a bank folder (``bank.safetensors`` + ``bank.json``); it appears complete or not at all.

    Args:
        tensors: the arrays by name.
        meta: the content of ``bank.json`` given the checksum of the arrays file (:func:`file_sha256`), which
            :func:`read_bank` verifies.
        folder: the bank folder; an existing one is replaced.
    """
    folder = Path(folder).resolve()  # `-o .` has no name of its own until resolved
    check_bank_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        try:
            write_safetensors(tensors, staging / BANK_ARRAYS)
            content = meta(file_sha256(staging / BANK_ARRAYS))
            content = {**content, "meta_sha256": meta_sha256(content)}
            (staging / BANK_META).write_text(json.dumps(_json_safe(content), indent=2) + "\n", encoding="utf-8")
        except Exception as error:  # a full disk, whichever layer notices it
            raise InputError(f"{folder}: the bank could not be written to {folder.parent} ({_reason(error)}); free "
                             "space there or choose another -o") from error
        # mkdtemp makes 0700 and safetensors writes 0600; a bank is meant to be shared, like the other outputs.
        os.chmod(staging, 0o777 & ~_umask())
        for name in (BANK_ARRAYS, BANK_META):
            os.chmod(staging / name, 0o666 & ~_umask())
        previous = None
        if folder.exists():
            check_bank_target(folder)  # again: something may have been put there while the bank was built
            previous = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, previous)
        os.rename(staging, folder)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def check_bank_target(folder: str | Path) -> None:
    """Refuse to write a bank where something of the user's is: a file, or a folder that is neither empty nor a bank.

    Only a bank is ever replaced (atomically, by :func:`write_bank`); anything else stays untouched.
    """
    folder = Path(folder)
    if folder.is_file() or (folder.exists() and not folder.is_dir()):
        raise InputError(f"{folder}: is a file, not a bank folder; choose a new folder for -o (nothing was changed)")
    if folder.is_dir() and not is_bank_folder(folder):
        held = sorted(p.name for p in folder.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise InputError(f"{folder}: exists and is not a bank (it holds {shown}); a bank replaces only an earlier "
                             "bank, so choose a new folder for -o (nothing was changed)")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, block: int = 64 << 20) -> None:
    """Write a safetensors file block by block, so that memory-mapped arrays of any size are never copied whole.

    The layout safetensors itself reads: an 8-byte little-endian header length, the JSON header (padded with spaces
    to 8 bytes), then each tensor's little-endian bytes in the header's order, without gaps.
    """
    header, offset = {}, 0
    for name, tensor in tensors.items():
        codes = [code for code, dtype in SAFETENSORS_DTYPES.items()
                 if dtype is not None and torch.from_numpy(np.zeros(0, dtype)).dtype == tensor.dtype]
        if not codes:
            raise ValueError(f"bank array {name}: dtype {tensor.dtype} cannot be stored")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": codes[0], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for tensor in tensors.values():
            flat = tensor.detach().reshape(-1)
            rows = max(1, block // max(1, tensor.element_size()))
            for start in range(0, len(flat), rows):
                handle.write(flat[start:start + rows].cpu().contiguous().numpy().tobytes())


class Spill:
    """Rows of one array appended to an anonymous temporary file and read back memory-mapped.

    For arrays that grow with a bank being built, so that building holds none of them in memory. The file lies in
    the temporary folder (``TMPDIR``) and is gone once nothing maps it.
    """

    def __init__(self) -> None:
        self.handle = tempfile.TemporaryFile(prefix="himatch-bank-")
        self.rows, self.shape, self.dtype = 0, None, None

    def append(self, tensor: torch.Tensor) -> None:
        """Append rows ``(B, ...)``; every call has the same row shape and dtype."""
        if self.shape is None:
            self.shape, self.dtype = tuple(tensor.shape[1:]), tensor.dtype
        elif tuple(tensor.shape[1:]) != self.shape or tensor.dtype != self.dtype:
            raise RuntimeError(f"spilled rows {tuple(tensor.shape[1:])} {tensor.dtype} differ from the first ones "
                               f"{self.shape} {self.dtype}")
        self.handle.write(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.rows += len(tensor)

    def tensor(self) -> torch.Tensor:
        """The rows so far, memory-mapped read-only ``(rows, ...)``."""
        self.handle.flush()
        dtype = torch.zeros(0, dtype=self.dtype).numpy().dtype
        if not self.rows:
            return torch.zeros((0, *self.shape), dtype=self.dtype)
        return _readonly_tensor(np.memmap(self.handle, dtype=dtype, mode="r", shape=(self.rows, *self.shape)))


def file_sha256(path: Path, block: int = 64 << 20) -> str:
    """SHA-256 over the SHA-256 digests of a file's blocks, hashed in parallel (hashlib releases the GIL).

    A one-level hash tree: any changed, missing or added byte changes it, and a 2 GB bank verifies in well under a
    second on a few cores instead of seconds on one.
    """
    size = path.stat().st_size
    digests = [hashlib.sha256(b"").digest()]
    if size:
        # Hashing memory-mapped views copies nothing; each thread hashes its own blocks.
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                    digests = list(pool.map(lambda start: hashlib.sha256(view[start:start + block]).digest(),
                                            range(0, size, block)))
            finally:
                view.release()
    return hashlib.sha256(size.to_bytes(8, "little") + b"".join(digests)).hexdigest()


def source_identity(path: str | Path) -> dict:
    """What identifies an input's content, for a report to record and :func:`same_source` to compare.

    ``path`` (resolved), ``size`` and ``mtime_ns`` (the newest of its files), ``sha256`` (of the file, of both files
    of an Analyze/NIfTI pair, or for a DICOM folder of its sorted list of file names, sizes and times) and ``stat``
    (a digest of its files' device, inode, size and modification and change times: while it is the same, the content
    is known unchanged without reading it again).
    """
    path = Path(path)
    files = _source_files(path)
    stats = [file.stat() for file in files]
    return {"path": str(path.resolve()), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0), "sha256": _content_sha256(path, files, stats),
            "stat": _stat_digest(files, stats)}


def same_source(recorded, path: str | Path) -> bool:
    """Whether ``path`` is the input that :func:`source_identity` once recorded as ``recorded``.

    The same resolved path, and the same content: known without reading it while its files are untouched (the same
    ``stat``), else compared by checksum (a copy that kept the times, a file touched but not changed).
    """
    path = Path(path)
    if not isinstance(recorded, dict) or recorded.get("path") != str(path.resolve()):
        return False
    try:
        files = _source_files(path)
        stats = [file.stat() for file in files]
        if recorded.get("stat") == _stat_digest(files, stats):
            return True
        return recorded.get("sha256") == _content_sha256(path, files, stats)
    except OSError:
        return False


def _source_files(path: Path) -> list[Path]:
    """The files an input is read from: the file, both files of a pair, or the files of a DICOM folder."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if path.name.lower().endswith(PAIR_SUFFIXES):
        pair = [path.with_suffix(suffix) for suffix in PAIR_SUFFIXES]
        return [p for p in pair if p.is_file()]
    return [path]


def _content_sha256(path: Path, files: list[Path], stats: list[os.stat_result]) -> str:
    if path.is_dir():  # a DICOM series: its file list is cheap to hash, and a re-export changes it
        listing = "".join(f"{f.name}\t{s.st_size}\t{s.st_mtime_ns}\n" for f, s in zip(files, stats))
        return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def _stat_digest(files: list[Path], stats: list[os.stat_result]) -> str:
    records = "".join(f"{f.name}\t{s.st_dev}\t{s.st_ino}\t{s.st_size}\t{s.st_mtime_ns}\t{s.st_ctime_ns}\n"
                      for f, s in zip(files, stats))
    return hashlib.sha256(records.encode("utf-8", "surrogateescape")).hexdigest()


SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "BF16": None}


def is_bank_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a bank (its two files) and nothing else, so that replacing it loses nothing."""
    folder = Path(folder)
    return folder.is_dir() and {p.name for p in folder.iterdir()} == {BANK_ARRAYS, BANK_META}


def meta_sha256(meta: dict) -> str:
    """SHA-256 of a bank's ``bank.json`` content without its own ``meta_sha256`` entry (keys sorted)."""
    content = {k: v for k, v in _json_safe(meta).items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_bank_meta(folder: str | Path, *, verify: bool = True) -> dict:
    """A bank folder's ``bank.json``, checked to be complete and, with ``verify``, unmodified since it was written."""
    folder = Path(folder)
    arrays, meta_path = folder / BANK_ARRAYS, folder / BANK_META
    missing = [p.name for p in (arrays, meta_path) if not p.is_file()]
    if not folder.is_dir() or missing:
        raise InputError(f"{folder}: not a complete bank (missing {', '.join(missing) or 'the folder'}); build it "
                         "with `python -m himatch_med.bank build`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{meta_path}: damaged bank metadata ({_reason(error)}); rebuild the bank") from error
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: not a bank description (it holds a JSON {type(meta).__name__}, not an "
                         "object); rebuild the bank")
    if verify and "meta_sha256" in meta and meta["meta_sha256"] != meta_sha256(meta):
        raise InputError(f"{meta_path}: its content differs from the checksum written with it (modified since the "
                         "bank was built); rebuild the bank")
    return meta


def read_bank(folder: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Open a bank folder: arrays memory-mapped (read-only, nothing read until used) and the metadata.

    Args:
        folder: the bank folder.
        verify: check ``bank.json`` against its own checksum and the arrays file against the SHA-256 recorded in it.
    """
    folder = Path(folder)
    meta = read_bank_meta(folder, verify=verify)
    arrays = folder / BANK_ARRAYS
    if verify and meta.get("arrays_sha256") != file_sha256(arrays):
        raise InputError(f"{arrays}: its checksum differs from the one recorded in {BANK_META} (truncated or "
                         "modified); rebuild the bank")
    try:
        tensors = _map_safetensors(arrays)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as error:
        raise InputError(f"{arrays}: damaged bank arrays ({_reason(error)}); rebuild the bank") from error
    return tensors, meta


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of a safetensors file (its header is JSON after an 8-byte little-endian length)."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    start = 8 + length
    size = path.stat().st_size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if start + end > size:
            raise ValueError(f"tensor {name} extends past the end of the file")
        count = int(np.prod(entry["shape"]))
        if count == 0:
            tensors[name] = torch.zeros(entry["shape"], dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
            continue
        mapped = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=tuple(entry["shape"]))
        tensors[name] = _readonly_tensor(mapped)
    return tensors


def _readonly_tensor(mapped: np.memmap) -> torch.Tensor:
    # torch warns on non-writable arrays; the mapping is read-only on purpose and never written through.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(mapped)

