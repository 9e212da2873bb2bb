"""Dual-branch retrieval: CLS similarity and layout (patch-branch) similarity, jointly, top-K over the bank."""

from __future__ import annotations

import torch

OUT_OF_WINDOW_PENALTY = 4.0
"""Subtracted from the similarity (which lies in [-1, 1]) of references outside the position window: they are taken
only when fewer than K lie inside it."""


def similarity(
    query_cls: torch.Tensor, query_layout: torch.Tensor, bank_cls: torch.Tensor, bank_layout: torch.Tensor,
    *, cls_weight: float,
) -> torch.Tensor:
    """``α cos(cls_q, cls_n) + (1 - α) mean_cells cos(layout_q, layout_n)`` for all pairs ``(Q, N)``.

    Args:
        query_cls: unit CLS ``(Q, D)``; query_layout: unit cells ``(Q, G, D)``.
        bank_cls: unit CLS ``(N, D)``; bank_layout: unit cells ``(N, G, D)``.
        cls_weight: α.
    """
    cells = query_layout.shape[1]
    cls_term = query_cls @ bank_cls.T
    # Each cell is unit norm, so the mean of per-cell cosines is one dot product of the flattened layouts.
    layout_term = query_layout.flatten(1) @ bank_layout.flatten(1).T / cells
    return cls_weight * cls_term + (1 - cls_weight) * layout_term


def retrieve(
    query_cls: torch.Tensor, query_layout: torch.Tensor, bank_cls: torch.Tensor, bank_layout: torch.Tensor,
    *, k: int, cls_weight: float, chunk: int, query_positions: torch.Tensor | None = None,
    bank_positions: torch.Tensor | None = None, window: float = 0.0, query_groups: torch.Tensor | None = None,
    bank_groups: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(Q, K)`` and similarities of the K most similar bank rows, best first, scanning the bank in chunks.

    With a position window, only the rows inside some query's window are scored when every query has K allowed rows
    inside its own: the others could only fill up to K, so the result is the one scoring the whole bank gives. The
    bank may be stored in another dtype or on another device (memory-mapped fp16); only the rows scored are
    converted, one chunk at a time.

    Args:
        query_cls, query_layout, bank_cls, bank_layout, cls_weight: as in :func:`similarity`.
        k: references per query (at most the number of allowed rows).
        chunk: bank rows compared at once; memory stays ``O(Q * (chunk + k))`` whatever the bank size.
        query_positions, bank_positions: relative slice positions ``(Q,)``, ``(N,)`` for the position prior.
        window: references farther than this in position are used only to fill up to K (0: no prior).
        query_groups, bank_groups: a query never retrieves a bank row of its own group (used to leave a
            reference volume out of its own calibration).
        allowed: the bank rows any query may retrieve ``(N,)`` (a subset of the bank; default all).
    """
    if k > len(bank_cls):
        raise ValueError(f"k={k} references asked for but the bank holds {len(bank_cls)}; lower references_k")
    positioned = window > 0 and query_positions is not None and bank_positions is not None
    grouped = query_groups is not None and bank_groups is not None
    device = query_cls.device

    def far(rows: slice) -> torch.Tensor:
        # The tolerance keeps slices exactly one window away on both sides despite float32 rounding.
        return (query_positions[:, None] - bank_positions[rows].to(query_positions)).abs() > window + 1e-6

    def own(rows: slice) -> torch.Tensor:
        return query_groups[:, None] == bank_groups[rows].to(query_groups)

    def barred(rows: slice) -> torch.Tensor:
        return ~allowed[rows].to(device)[None]

    pieces = [slice(start, min(start + chunk, len(bank_cls))) for start in range(0, len(bank_cls), chunk)]
    if positioned:
        inside, candidates = torch.zeros(len(query_cls), dtype=torch.long, device=device), []
        for rows in pieces:
            usable = ~far(rows)
            if grouped:
                usable &= ~own(rows)
            if allowed is not None:
                usable &= ~barred(rows)
            inside += usable.sum(dim=1)
            candidates.append(torch.nonzero(usable.any(dim=0)).flatten().cpu() + rows.start)
        rows = torch.cat(candidates)
        runs = _runs(rows, chunk)
        # Runs shorter than a few rows on average (a bank not in slice order) cost more as many small products.
        if bool((inside >= k).all()) and len(runs) * 8 <= len(rows):
            pieces = runs
    best_key = query_cls.new_full((len(query_cls), 0), -torch.inf)
    best_sim = best_key.clone()
    best_idx = torch.zeros((len(query_cls), 0), dtype=torch.long, device=device)
    for rows in pieces:
        sim = similarity(query_cls, query_layout, bank_cls[rows].to(query_cls),
                         bank_layout[rows].to(query_layout), cls_weight=cls_weight)
        key = sim
        if positioned:
            key = key - OUT_OF_WINDOW_PENALTY * far(rows)
        if grouped:
            key = key.masked_fill(own(rows), -torch.inf)
        if allowed is not None:
            key = key.masked_fill(barred(rows), -torch.inf)
        index = torch.arange(rows.start, rows.stop, device=device)
        merged_key = torch.cat([best_key, key], dim=1)
        best_key, order = merged_key.topk(min(k, merged_key.shape[1]), dim=1)
        best_idx = torch.gather(torch.cat([best_idx, index.expand(len(sim), -1)], dim=1), 1, order)
        best_sim = torch.gather(torch.cat([best_sim, sim], dim=1), 1, order)
    if torch.isinf(best_key).any():
        raise ValueError(f"fewer than k={k} references are allowed for some query; lower references_k")
    return best_idx, best_sim


def _runs(rows: torch.Tensor, chunk: int) -> list[slice]:
    """Sorted row indices as runs of consecutive rows, at most ``chunk`` long.

    A bank's rows go volume by volume in slice order, so the rows inside a window form one run per volume: scoring
    views of them reads only those rows, where gathering them would copy them first.
    """
    if not len(rows):
        return []
    breaks = (torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, len(rows)]
    return [slice(int(rows[a]) + offset, int(rows[a]) + min(offset + chunk, b - a))
            for a, b in zip(starts, stops) for offset in range(0, b - a, chunk)]

