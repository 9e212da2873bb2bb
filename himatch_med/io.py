"""The only module that reads or writes files: images (NIfTI, DICOM series, PNG/JPEG), banks, reports, pictures.

Every output is written to a temporary name in its destination folder and renamed when complete, so an interrupted
run never leaves a half-written file under a final name. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from himatch_med.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
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


def stem(path: str | Path) -> str:
    """The name outputs are derived from: the file name without its image suffix (the folder name for DICOM)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    """Whether a path looks like an image this package reads (by suffix), or a DICOM series folder."""
    lower = path.name.lower()
    return (path.is_file() and lower.endswith(NIFTI_SUFFIXES + IMAGE_SUFFIXES)) or is_dicom_folder(path)


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or a file of any name with the DICOM preamble (``DICM`` at byte 128)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: Path) -> bool:
    """A folder directly holding DICOM files (a series; other files such as a README may sit beside them)."""
    return path.is_dir() and any(p.is_file() and not p.name.startswith(".") and is_dicom_file(p)
                                 for p in path.iterdir())


def list_images(folder: Path) -> list[Path]:
    """Image files and DICOM series folders directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; pass a folder of NIfTI files, 2D images or DICOM series")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p))


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
    try:
        image = nib.load(path)
        array = image.get_fdata(dtype=np.float32)  # float32 directly: float64 would double the peak memory
    except Exception as error:  # nibabel raises many types for damaged files
        raise InputError(f"{path}: cannot be read as NIfTI ({_reason(error)}); pass an intact .nii or .nii.gz "
                         "volume (a truncated download is a common cause)") from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: is a {type(image).__name__}, not NIfTI; convert it to .nii.gz")
    array, notes = _pick_volume(path, array, volume_index)
    header = image.header.copy()
    return Image(array.astype(np.float32, copy=False), image.affine, header, path, "nifti",
                 notes + _orientation_notes(header))


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
    # The inverse of volume.to_slices on the axial axis: the slice cut from this volume is the image as displayed.
    array = np.ascontiguousarray(np.flip(plane, (0, 1)).T[..., None])
    header = nib.Nifti1Header()
    header.set_qform(np.eye(4), code=0)
    header.set_sform(np.eye(4), code=2)
    return Image(array, np.eye(4), header, path, "image")


def _read_dicom(folder: Path, series: str | None) -> Image:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise InputError(f"{folder}: a folder without a DICOM series; pass a NIfTI file or a DICOM series folder")
    if series is None and len(uids) > 1:
        raise InputError(f"{folder}: holds {len(uids)} DICOM series; choose one with --series UID from: "
                         + ", ".join(uids))
    uid = series or uids[0]
    if uid not in uids:
        raise InputError(f"{folder}: has no series {uid}; it holds: " + ", ".join(uids))
    try:
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: the DICOM series {uid} cannot be read ({_reason(error)})") from error
    affine = dicom_affine(image)
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    return Image(np.ascontiguousarray(array), affine, header, folder, "dicom")


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
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_map(array: np.ndarray, like: Image, path: str | Path) -> Path:
    """Save a map ``(X, Y, Z)`` on ``like``'s voxel grid as float32 NIfTI with its header (affine, qform, sform)."""
    path = Path(path)
    if array.shape != like.array.shape:
        raise RuntimeError(f"map shape {array.shape} differs from the input's {like.array.shape}")
    header = like.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(np.nan, np.nan)
    header.set_data_shape(array.shape)
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), None, header) \
        if isinstance(header, nib.Nifti1Header) and not isinstance(header, nib.Nifti2Header) \
        else nib.Nifti2Image(np.asarray(array, dtype=np.float32), None, header)
    with _atomic(path, ".nii.gz") as temporary:
        nib.save(image, temporary)
    return path


def nifti_bytes(image: Image, *, dtype=np.float32) -> bytes:
    """The bytes of a gzipped NIfTI file of ``image`` on its own header (affine, qform, sform), made in memory.

    For pages that embed their volumes. The same image gives the same bytes (the gzip header carries no time).
    """
    header = image.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(np.nan, np.nan)
    header.set_data_shape(image.array.shape)
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    data = kind(np.asarray(image.array, dtype=dtype), None, header).to_bytes()
    return gzip.compress(data, compresslevel=1, mtime=0)


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


def write_figure(figure, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    path = Path(path)
    with _atomic(path, ".png") as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    return path


def write_bank(tensors: dict[str, torch.Tensor], meta: dict, folder: str | Path) -> Path:
    """Write a bank folder (``bank.safetensors`` + ``bank.json``); it appears complete or not at all."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / BANK_ARRAYS)
        meta = {**meta, "arrays_sha256": file_sha256(staging / BANK_ARRAYS)}
        (staging / BANK_META).write_text(json.dumps(_json_safe(meta), indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a bank is meant to be shared
        previous = None
        if folder.exists():
            previous = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, previous)
        os.rename(staging, folder)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


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


SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "BF16": None}


def read_bank(folder: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Open a bank folder: arrays memory-mapped (read-only, nothing read until used) and the metadata.

    Args:
        folder: the bank folder.
        verify: check the arrays file against the SHA-256 recorded in ``bank.json``.
    """
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
    if verify and meta.get("arrays_sha256") != file_sha256(arrays):
        raise InputError(f"{arrays}: its checksum differs from the one recorded in {BANK_META} (truncated or "
                         "modified); rebuild the bank")
    try:
        tensors = _map_safetensors(arrays)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as error:
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

