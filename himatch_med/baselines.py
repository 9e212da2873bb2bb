"""The published baselines on the same backbone features: AnomalyDINO and DINO-AD, as pure tensor functions.

HiMatch-AD claims that dual-branch retrieval, clustering, several stages and uncertainty fusion beat plain
nearest-neighbour matching; these let a user see each block's value on their own data (``--method``).

- **AnomalyDINO** (Damm et al., 2025; as its code does it): the last stage's patches of all references form the
  memory (a seeded random subset of ``memory_patches`` when the references hold more: :func:`sample_patches`); each
  query patch's map value is its cosine distance to the nearest memory patch (:func:`nearest_patch_distances`); the
  map is upsampled and smoothed with a Gaussian of σ = 4 backbone-image pixels; the image score is the mean of the top
  1 % patch distances (:func:`patch_scores`). No retrieval, clustering, calibration or fusion.
- **DINO-AD** (as its abstract describes it): one support slice, the reference most similar by its CLS embedding
  (:func:`support_slices`); the foreground-aware k-means centroids of its patches (the bank's, last stage); each
  query patch's cosine distance to the nearest centroid (:func:`centroid_distances`).

Ours, where the papers leave it open for volumes: only foreground patches of references enter AnomalyDINO's memory
(their background is constant); scores are over the foreground patches of a slice (image score) and of the whole
volume (volume score); DINO-AD's centroids are the bank's (``centroids`` per slice), and it takes the same top-1 %
score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from himatch_med.scoring import top_count


def nearest_patch_distances(grid: torch.Tensor, memory: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Cosine distance ``1 - max cos`` of each query patch to its nearest memory patch.

    Args:
        grid: query patch features ``(B, h, w, D)``, unit norm.
        memory: reference patches ``(M, D)``, unit norm.
        chunk: memory rows compared at once (bounds memory at ``B * h * w * chunk``).

    Returns:
        Maps ``(B, h, w)``.
    """
    if len(memory) == 0:
        raise ValueError("memory holds no reference patch; build it from references with foreground")
    queries = grid.flatten(0, 2)
    best = torch.full((len(queries),), -torch.inf, dtype=queries.dtype, device=queries.device)
    for part in memory.split(chunk):
        best = torch.maximum(best, (queries @ part.to(queries).T).amax(dim=1))
    # 1 - cos dips below 0 by rounding when a patch equals a memory patch.
    return (1 - best).clamp(min=0).view(grid.shape[:3])


def support_slices(query_cls: torch.Tensor, bank_cls: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """The bank row whose CLS embedding is most similar (cosine) to each query's: ``(B,)`` indices.

    Args:
        query_cls: ``(B, D)``.
        bank_cls: ``(N, D)``, in any float dtype (converted chunk by chunk); ties go to the lowest row.
        chunk: bank rows compared at once.
    """
    queries = F.normalize(query_cls.float(), dim=-1)
    best = torch.full((len(queries),), -torch.inf, device=queries.device)
    index = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    for start in range(0, len(bank_cls), chunk):
        part = F.normalize(bank_cls[start:start + chunk].to(queries.device, torch.float32), dim=-1)
        value, where = (queries @ part.T).max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, where + start, index)
    return index


def centroid_distances(grid: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cosine distance of each query patch to the nearest centroid of its own support slice.

    Args:
        grid: query patch features ``(B, h, w, D)``, unit norm.
        centroids: each query's support centroids ``(B, c, D)``, unit norm (unused slots repeat a live centroid, as
            :func:`himatch_med.matching.spherical_kmeans` leaves them).

    Returns:
        Maps ``(B, h, w)``.
    """
    similarity = grid.flatten(1, 2) @ centroids.to(grid).transpose(1, 2)
    return (1 - similarity.amax(dim=-1)).clamp(min=0).view(grid.shape[:3])


def patch_scores(maps: torch.Tensor, patches: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-slice score ``(B,)``: mean of the top ``fraction`` of each slice's foreground patch values.

    Args:
        maps: patch maps ``(B, h, w)``.
        patches: foreground patches ``(B, h, w)``; every slice needs one.
        fraction: AnomalyDINO's 1 %.
    """
    values = maps.flatten(1).float().masked_fill(~patches.flatten(1), -torch.inf)
    counts = top_count(fraction, patches.flatten(1).sum(dim=1))
    top = values.topk(int(counts.max()), dim=1).values.nan_to_num(neginf=0.0).double().cumsum(dim=1)
    return (top.gather(1, (counts - 1)[:, None])[:, 0] / counts).float()


def sample_patches(kept: torch.Tensor, kept_keys: torch.Tensor, new: torch.Tensor, new_keys: torch.Tensor,
                   cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bounded uniform random subset of a stream of patches: the ``cap`` with the highest random keys so far.

    Feeding every patch with an independent uniform key keeps a uniform random subset whatever the order of the
    calls, in memory bounded by ``cap`` rows.

    Args:
        kept: patches kept so far ``(M, D)`` and their keys ``kept_keys`` ``(M,)``.
        new: patches to add ``(P, D)`` and their keys ``new_keys`` ``(P,)``.
        cap: the most patches kept.

    Returns:
        The kept patches and their keys, in decreasing key order.
    """
    patches, keys = torch.cat([kept, new.to(kept)]), torch.cat([kept_keys, new_keys.to(kept_keys)])
    order = keys.argsort(descending=True, stable=True)[:cap]
    return patches[order], keys[order]
