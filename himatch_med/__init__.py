"""himatch-med: training-free anomaly detection for 3D medical images (HiMatch-AD with frozen DINOv3 features).

A volume is cut into slices, each slice goes through a frozen vision transformer, and its patch features are compared
with clustered features of similar normal slices (the references in a bank) at several transformer stages. The stage
maps are calibrated to z-units and fused with weights that follow how much the references agree.

Shape letters, used in every docstring of the package:

- ``S`` slices, ``H, W`` slice size (pixels), ``h, w`` patch grid of a slice
- ``D`` feature size, ``L`` stages, ``K`` retrieved references per slice, ``c`` centroids per reference slice
- ``N`` references in a bank, ``g`` cells per side of the layout descriptor

Words: a **stage** is a transformer block whose patch tokens are used; a **grid** holds patch features
``(..., h, w, D)``; a **map** holds scores on a grid or a slice; a **reference** is a normal slice in the **bank**;
**centroids** are the clustered normal features of a reference; a **scan** is a volume as read, with the way back to
its file; the **extractor** is what turns images into CLS and grids (the DINOv3 backbone, or a stand-in).

The house: :mod:`~himatch_med.jobs` reads an input (:func:`~himatch_med.scan.read_scan`: the file's
:class:`~himatch_med.scan.Scan`, checked and in RAS, through :mod:`~himatch_med.io`, the only module that opens
files), :func:`~himatch_med.detect.prepare` cuts it into slices, a :class:`~himatch_med.detect.Detector` (extractor
+ bank + settings) finds its anomalies with the method modules (``volume``, ``transforms``, ``backbone``,
``features``, ``retrieval``, ``matching``, ``fusion``, ``scoring``; ``metrics`` for evaluation), and the job writes
the maps back on the file's grid with :mod:`~himatch_med.report`'s report and picture. The bank lives in
:mod:`himatch_med.bank` (data, building, storage); :mod:`~himatch_med.config` holds every setting and what it
matters for; :mod:`~himatch_med.cli` and ``run``, :mod:`~himatch_med.screening`, :mod:`~himatch_med.distributed`,
:mod:`~himatch_med.viewer` and :mod:`himatch_med.evaluation` are the applications.

The Python API (:mod:`~himatch_med.api`): ``open_detector``, ``build_detector``, ``detect_image`` and its
``Result``, with ``Detector`` and ``Settings``, are names of this package, imported on first use::

    import himatch_med as hm
    result = hm.detect_image(hm.open_detector("brain_bank/"), "patient.nii.gz")

This module imports nothing heavy so that ``--help`` stays instant.
"""

__version__ = "0.2.0"

API = {"open_detector": "api", "build_detector": "api", "detect_image": "api", "Result": "api",
       "Detector": "detect", "Settings": "config", "ReadOptions": "config"}
"""The names of the Python API and the modules they come from (imported on first use: torch loads with them)."""

__all__ = ["__version__", *API]


def __getattr__(name: str):
    """The Python API's names, imported from their modules on first use."""
    if name in API:
        import importlib

        return getattr(importlib.import_module(f"himatch_med.{API[name]}"), name)
    raise AttributeError(f"module 'himatch_med' has no attribute {name!r}")
