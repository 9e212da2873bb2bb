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
**centroids** are the clustered normal features of a reference.

This module imports nothing heavy so that ``--help`` stays instant.
"""

__version__ = "0.2.0"
