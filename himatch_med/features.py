"""What the backbone gives for a batch of slices, and the interface any feature extractor offers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class Extractor(Protocol):
    """Anything that turns backbone images into a CLS vector and stage grids.

    ``patch_size`` is the side of a patch in pixels; ``model_id`` names the weights (recorded in banks and reports);
    ``depth`` is the number of transformer blocks; ``stages`` are the 1-based blocks whose grids are returned.
    """

    patch_size: int
    model_id: str
    stages: tuple[int, ...]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Images ``(S, 3, H', W')`` -> unit CLS ``(S, D)`` and unit patch grids ``(S, h, w, D)``, one per stage."""
        ...


@dataclass(frozen=True)
class Features:
    """Backbone output for ``S`` slices: ``cls`` (S, D), ``layout`` (S, g*g, D), one grid (S, h, w, D) per stage."""

    cls: torch.Tensor
    layout: torch.Tensor
    grids: tuple[torch.Tensor, ...]

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(h, w)``."""
        return tuple(self.grids[0].shape[1:3])


def layout_descriptor(grid: torch.Tensor, cells: int) -> torch.Tensor:
    """Coarse layout ``(S, g*g, D)`` of a grid ``(S, h, w, D)``: average-pooled to g x g cells, each cell unit-norm."""
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2).float(), cells)
    return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1).to(grid.dtype)


def describe(cls: torch.Tensor, grids: tuple[torch.Tensor, ...], cells: int) -> Features:
    """Bundle an extractor's output with the layout descriptor of its last stage."""
    return Features(cls=cls, layout=layout_descriptor(grids[-1], cells), grids=tuple(grids))
