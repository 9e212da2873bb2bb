"""The Python API: open or build a detector, detect on an image in memory or in a file, save what the CLI writes.

::

    import himatch_med as hm

    detector = hm.open_detector("brain_bank/")                     # model and settings from the bank
    detector = hm.build_detector(["normals/"], modality="mri")     # or a bank built from normal references
    result = hm.detect_image(detector, "patient.nii.gz")           # or a nibabel image, a SimpleITK image,
                                                                   # or an (array, affine) pair
    result.anomaly, result.uncertainty, result.labels              # on the input's grid (nibabel images; SimpleITK
                                                                   # images for a SimpleITK input)
    result.volume_score, result.volume_percentile, result.slice_scores, result.findings
    result.save("results/")                                        # the files `himatch-med run` writes

The detector is :class:`himatch_med.detect.Detector` (extractor + bank + settings), the very object the command
lines, screening, evaluation and the Ray actors pass around. :func:`detect_image` reads or converts the input into a
:class:`~himatch_med.scan.Scan` (the checks of a file read from disk included), detects and finds the findings in
memory (:func:`himatch_med.jobs.examine`, as ``run`` does), and :meth:`Result.save` writes them with
:func:`himatch_med.jobs.analyse`, so a saved result is the same set of files as the command line's.

Settings are keyword arguments named as in :class:`himatch_med.config.Settings` (``image_size=224``,
``references_k=8``); an opened bank's recorded settings are its defaults, as with ``--bank``. Notes that matter
(how the foreground was found, approximate z-units) go to the ``himatch_med`` logger as warnings and stay in
:attr:`Result.notes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np

from himatch_med import cli, io, jobs, preflight
from himatch_med.bank.build import build_planes
from himatch_med.bank.store import build_bank_folder, open_bank, reference_volumes
from himatch_med.config import ReadOptions, Settings
from himatch_med.detect import Detector, load_extractor
from himatch_med.errors import InputError
from himatch_med.features import Extractor
from himatch_med.scan import Scan, scan_of
from himatch_med.volume import to_canonical

logger = logging.getLogger("himatch_med")

IN_MEMORY_NAME = "image"
"""The name (and output prefix) of an input given in memory without ``name=``."""


def settings_of(chosen: dict, defaults: dict | None = None) -> Settings:
    """Resolved :class:`Settings` from keyword arguments over ``defaults``; an unknown name is refused."""
    names = {f.name for f in fields(Settings)}
    unknown = sorted(set(chosen) - names)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting; use the names of himatch_med.config.Settings "
                         f"({', '.join(sorted(names))})")
    values = {**(defaults or {}), **{k: v for k, v in chosen.items() if v is not None}}
    if "stages" in values:
        values["stages"] = tuple(values["stages"])
    return Settings(**values).resolved()


def open_detector(bank: str | Path, *, device: str = "auto", extractor: Extractor | None = None,
                  **settings) -> Detector:
    """A detector from a bank folder (``himatch-med bank build``); the bank gives the model and its settings.

    Args:
        bank: the bank folder.
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
        extractor: an extractor already loaded (or a stand-in with the same interface) instead of the bank's model.
        **settings: settings to change (names of :class:`~himatch_med.config.Settings`); one the bank records
            differently is refused, a calibrated one is allowed with a note that z-units are then approximate.

    Raises:
        InputError: the folder is not a bank, or one built with other settings.
    """
    bank = Path(bank)
    chosen = settings_of(settings, cli.bank_defaults(bank))
    preflight.bank_fits(bank, chosen)
    extractor = extractor if extractor is not None else load_extractor(chosen, device)
    return Detector(extractor, open_bank(bank, chosen, extractor), chosen)


def build_detector(references: list[str | Path] | str | Path, *, output: str | Path | None = None,
                   reference_labels: str | Path | None = None, device: str = "auto",
                   extractor: Extractor | None = None, options: ReadOptions | None = None, **settings) -> Detector:
    """A detector with a bank built from normal references (files or folders of them).

    Args:
        references: normal NIfTI files, DICOM series folders, 2D images, or folders of them.
        output: a folder to write the bank to (as ``himatch-med bank build -o``), to open it later with
            :func:`open_detector`; ``None`` keeps the bank in memory only.
        reference_labels: a folder of lesion labels named like the references: only lesion-free slices are used.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        extractor: an extractor already loaded (or a stand-in) instead of ``model``.
        options: how the references are read.
        **settings: settings (names of :class:`~himatch_med.config.Settings`), e.g. ``modality="ct"``,
            ``model="facebook/dinov2-base"``, ``image_size=224``.

    Raises:
        InputError: no reference could be read (each skipped one is logged as a warning).
    """
    if extractor is not None and "model" not in settings:
        settings = {**settings, "model": extractor.model_id}  # what the report and the bank then name
    chosen = settings_of(settings)
    given = [references] if isinstance(references, str | Path) else list(references)
    files = jobs.expand_inputs([Path(p) for p in given])
    labels = Path(reference_labels) if reference_labels is not None else None
    preflight.existing([labels] if labels is not None else [])
    extractor = extractor if extractor is not None else load_extractor(chosen, device)
    if output is not None:
        folder = build_bank_folder(files, labels, chosen, extractor, Path(output), options=options)
        return Detector(extractor, open_bank(folder, chosen, extractor), chosen)
    files, left_out = jobs.split_outputs(files)
    for path in left_out:
        logger.warning("left out %s: a himatch-med output, not a reference", path)
    bank = build_planes(extractor, lambda plane: reference_volumes(
        files, labels, plane, options, logger.warning if plane is chosen else None), chosen)
    return Detector(extractor, bank, chosen)


@dataclass(frozen=True, eq=False)
class Result:
    """What :func:`detect_image` found in one input, in memory.

    ``anomaly`` (the fused map in z-units), ``uncertainty`` and ``labels`` (the findings, 0 = none, 1..N from the
    most to the least anomalous) are images on the input's voxel grid with its geometry: nibabel images (with the
    input's header, for NIfTI-like input), or SimpleITK images for a SimpleITK input. ``outcome`` holds everything
    else (:class:`himatch_med.jobs.Outcome`), ``detector`` what found it.
    """

    anomaly: object
    uncertainty: object
    labels: object
    outcome: jobs.Outcome
    detector: Detector

    @property
    def report(self) -> dict:
        """The report ``himatch-med run`` writes as ``<name>_report.json`` (before the files are written)."""
        return self.outcome.report

    @property
    def volume_score(self) -> float:
        """The mean of the top 1 % (``top_fraction``) foreground voxels of the anomaly map."""
        return self.outcome.detection.volume_score

    @property
    def volume_percentile(self) -> float:
        """The volume score as a percentile (0-100) of the bank's normal volumes; NaN without calibration."""
        return self.outcome.detection.volume_percentile

    @property
    def slice_scores(self) -> np.ndarray:
        """Per-slice scores ``(S,)`` along the canonical (RAS) slice axis, 0 for slices not scored."""
        return self.outcome.detection.slice_scores.numpy()

    @property
    def slice_percentiles(self) -> np.ndarray:
        """Per-slice scores as percentiles of the bank's normal slices ``(S,)``."""
        return self.outcome.detection.slice_percentiles.numpy()

    @property
    def findings(self) -> list[dict]:
        """One record per finding (number, size in voxels and mL, peak and mean z, position), as in the report."""
        return self.outcome.found.records

    @property
    def notes(self) -> list[str]:
        """What a user should know about this input and run (as the report's ``notes``)."""
        return list(self.outcome.report["notes"])

    def array(self, name: str) -> np.ndarray:
        """The map ``name`` (``anomaly``, ``uncertainty``, ``labels``) as an array on the input's voxel grid."""
        if name == "labels":
            return self.outcome.found.labels
        if name not in self.outcome.maps:
            raise ValueError(f"name={name!r} is not one of anomaly, uncertainty, labels")
        return self.outcome.on_file_grid(name)

    def save(self, folder: str | Path) -> dict:
        """Write the files ``himatch-med run`` writes for this input into ``folder``; returns the written report.

        The names start with the input file's name, or ``name=`` of :func:`detect_image` (``image`` by default)
        for an input given in memory.
        """
        folder = Path(folder)
        jobs.check_output_folder(folder, [])
        return jobs.analyse(self.outcome.job, self.detector, folder, progress=False, outcome=self.outcome)


def detect_image(detector: Detector, image, *, mask=None, name: str | None = None,
                 options: ReadOptions | None = None, progress: bool = False) -> Result:
    """Detect anomalies in one image against the detector's bank; nothing is written (see :meth:`Result.save`).

    Args:
        detector: from :func:`open_detector` or :func:`build_detector`.
        image: a path (NIfTI, DICOM series folder, 2D image), a nibabel image, a SimpleITK image (3D, or 2D as a
            one-slice volume), or an ``(array, affine)`` pair (a 3D array and its 4 x 4 voxel-to-RAS affine, as
            nibabel gives them).
        mask: a foreground mask on the image's grid, instead of the foreground mode: an array, a nibabel image or a
            path.
        name: for an image in memory, its name in the report and the saved files' prefix (default: ``image``, or
            the file name a nibabel image was loaded from); a file's outputs are named after the file.
        options: how a file is read; the NaN policy and ``allow_shear`` hold for images in memory too.
        progress: show a progress bar over the slices (stderr).

    Raises:
        InputError: the image cannot be analysed (naming it, the cause and the fix).
        ValueError: ``image`` is none of the kinds above.
    """
    settings = detector.settings
    form = None
    if isinstance(image, str | Path):
        if name is not None:
            raise ValueError(f"name={name!r}: for an image in memory; the outputs of a file are named after it "
                             f"({Path(image).name})")
        if mask is None or isinstance(mask, str | Path):
            job = jobs.read(Path(image), settings, options, mask=None if mask is None else Path(mask))
        else:
            job = jobs.read(Path(image), settings, options)
            job = jobs.job_of(job.scan, settings, foreground=_mask_on(job.scan, mask), source=job.source)
    else:
        made, form = in_memory(image, name or IN_MEMORY_NAME)
        scan = scan_of(made, axis=settings.axis, options=options)
        job = jobs.job_of(scan, settings, foreground=None if mask is None else _mask_on(scan, mask))
    outcome = jobs.examine(job, detector, progress=progress)
    for note in outcome.report["notes"]:
        logger.warning("%s: %s", job.scan.path, note)
    return Result(*(_as_input(outcome.on_file_grid(key) if key != "labels" else outcome.found.labels, job.scan, form)
                    for key in ("anomaly", "uncertainty", "labels")), outcome, detector)


def in_memory(image, name: str) -> tuple[io.Image, object]:
    """An image given in memory as an :class:`himatch_med.io.Image`, and what the outputs are made like.

    Returns the image and the input itself when the outputs are to be SimpleITK images like it, else None.

    Raises:
        ValueError: ``image`` is not a nibabel image, a SimpleITK image or an ``(array, affine)`` pair.
    """
    path = Path(name)
    if isinstance(image, tuple) and len(image) == 2:
        array, affine = np.asarray(image[0]), np.asarray(image[1], dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"{name}: the affine has shape {affine.shape}; pass a 4 x 4 voxel-to-RAS matrix (as "
                             "nibabel's image.affine)")
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"{name}: the array has shape {array.shape}; pass one 3D volume (X, Y, Z) or a 2D slice")
        return io.Image(_voxels(array, name), affine, _header(affine), path, "nifti"), None
    if isinstance(image, nib.spatialimages.SpatialImage):
        array = image.get_fdata(dtype=np.float32)
        if array.ndim == 4 and array.shape[3] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"{name}: the nibabel image has shape {array.shape}; pass one 3D volume (e.g. "
                             "image.slicer[..., 0] of a 4D one)")
        affine = np.asarray(image.affine if image.affine is not None else image.header.get_best_affine(),
                            dtype=np.float64)
        if isinstance(image.header, nib.Nifti1Header) and np.allclose(_best_affine(image.header), affine):
            header = image.header.copy()
        else:
            header = _header(affine)
        if getattr(image, "get_filename", lambda: None)() and name == IN_MEMORY_NAME:
            path = Path(image.get_filename())
        return io.Image(array, affine, header, path, "nifti"), None
    if type(image).__module__.startswith("SimpleITK"):
        import SimpleITK as sitk

        pixels = sitk.GetArrayFromImage(image).astype(np.float32)
        if image.GetNumberOfComponentsPerPixel() > 1:
            pixels = pixels[..., :3].mean(axis=-1)
        if image.GetDimension() == 2:
            affine = io.plane_affine(image)
            return io.Image(np.ascontiguousarray(pixels.T[..., None]), affine, _header(affine), path, "image"), image
        if image.GetDimension() != 3:
            raise ValueError(f"{name}: a {image.GetDimension()}D SimpleITK image; pass a 3D volume or a 2D image")
        affine = io.dicom_affine(image)
        return io.Image(np.ascontiguousarray(pixels.transpose(2, 1, 0)), affine, _header(affine), path, "nifti"), image
    raise ValueError(f"{name}: a {type(image).__name__} is not an image himatch-med reads; pass a path, a nibabel "
                     "image, a SimpleITK image or an (array, affine) pair")


def _voxels(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name}: {array.dtype} voxels; pass real-valued intensities (e.g. np.abs of complex data)")
    return np.ascontiguousarray(array, dtype=np.float32)


def _header(affine: np.ndarray) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def _best_affine(header: nib.Nifti1Header) -> np.ndarray:
    sform, code = header.get_sform(coded=True)
    return sform if code else header.get_qform()


def _mask_on(scan: Scan, mask) -> np.ndarray:
    """A mask given as an array, a nibabel image or a path, as a canonical boolean volume on the scan's grid."""
    if isinstance(mask, str | Path):
        return scan.aligned(Path(mask), "the mask")
    array = np.asarray(mask.dataobj) if isinstance(mask, nib.spatialimages.SpatialImage) else np.asarray(mask)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape != scan.shape:
        raise InputError(f"the mask has shape {array.shape}; it must lie on the grid of {scan.path} (shape "
                         f"{scan.shape})")
    return to_canonical(array > 0, scan.affine)[0]


def _as_input(array: np.ndarray, scan: Scan, form) -> object:
    """A map on the file's grid as an image like the input: SimpleITK for a SimpleITK input, else nibabel."""
    if form is not None:
        import SimpleITK as sitk

        made = sitk.GetImageFromArray(array[..., 0].T if form.GetDimension() == 2 else array.transpose(2, 1, 0))
        made.SetOrigin(form.GetOrigin())
        made.SetSpacing(form.GetSpacing())
        made.SetDirection(form.GetDirection())
        return made
    header = scan.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(np.nan, np.nan)
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return kind(array, scan.affine, header)
