"""Known-answer tests for himatch_med.retrieval: dual-branch similarity and chunked top-K retrieval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from himatch_med.retrieval import OUT_OF_WINDOW_PENALTY, retrieve, similarity

DIM, CELLS = 12, 4


def unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def bank(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return unit(count, DIM, seed=seed), unit(count, CELLS, DIM, seed=seed + 1000)


def near(cls: torch.Tensor, layout: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A slightly perturbed copy of bank rows: the planted most-similar reference."""
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(cls + noise * torch.randn(cls.shape, generator=generator), dim=-1),
            F.normalize(layout + noise * torch.randn(layout.shape, generator=generator), dim=-1))


def similarity_by_hand(q_cls, q_layout, b_cls, b_layout, alpha: float) -> torch.Tensor:
    out = torch.empty(len(q_cls), len(b_cls))
    for q in range(len(q_cls)):
        for n in range(len(b_cls)):
            cls_cos = F.cosine_similarity(q_cls[q], b_cls[n], dim=0)
            cell_cos = torch.stack([F.cosine_similarity(q_layout[q, g], b_layout[n, g], dim=0)
                                    for g in range(q_layout.shape[1])])
            out[q, n] = alpha * cls_cos + (1 - alpha) * cell_cos.mean()
    return out


# --------------------------------------------------------------------------------------------------------------------
# similarity


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_similarity_against_hand_computation(alpha):
    q_cls, q_layout = bank(3, seed=1)
    b_cls, b_layout = bank(5, seed=2)
    sim = similarity(q_cls, q_layout, b_cls, b_layout, cls_weight=alpha)
    assert sim.shape == (3, 5)
    torch.testing.assert_close(sim, similarity_by_hand(q_cls, q_layout, b_cls, b_layout, alpha), rtol=0, atol=1e-6)


def test_similarity_of_a_row_with_itself_is_one():
    cls, layout = bank(4, seed=3)
    sim = similarity(cls, layout, cls, layout, cls_weight=0.5)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4))
    assert float(sim.max()) <= 1 + 1e-6


def test_similarity_layout_branch_compares_cells_in_place():
    """Cells are matched position by position: the same cells in another order are not the same layout."""
    cls, layout = bank(1, seed=4)
    shuffled = layout[:, [1, 0, 3, 2]]
    assert float(similarity(cls, layout, cls, shuffled, cls_weight=0.0)) < 0.9
    assert float(similarity(cls, layout, cls, shuffled, cls_weight=1.0)) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# retrieve


def test_planted_most_similar_reference_is_retrieved_first():
    b_cls, b_layout = bank(20, seed=5)
    planted = torch.tensor([6, 13, 0])
    q_cls, q_layout = near(b_cls[planted], b_layout[planted], noise=0.05, seed=6)
    index, sims = retrieve(q_cls, q_layout, b_cls, b_layout, k=4, cls_weight=0.5, chunk=7)
    assert index.shape == (3, 4) and sims.shape == (3, 4)
    assert torch.equal(index[:, 0], planted)


def test_retrieve_equals_full_top_k_best_first():
    b_cls, b_layout = bank(17, seed=7)
    q_cls, q_layout = bank(5, seed=8)
    index, sims = retrieve(q_cls, q_layout, b_cls, b_layout, k=6, cls_weight=0.3, chunk=4)
    full = similarity_by_hand(q_cls, q_layout, b_cls, b_layout, 0.3)
    expected_sims, expected_index = full.topk(6, dim=1)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(sims, expected_sims, rtol=0, atol=1e-6)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())


@pytest.mark.parametrize("k", [1, 5, 11])
def test_retrieve_is_independent_of_chunk_size(k):
    count = 11
    b_cls, b_layout = bank(count, seed=9)
    q_cls, q_layout = bank(6, seed=10)
    positions = torch.linspace(0, 1, count)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4])
    results = []
    for chunk in (1, 3, count, count + 5):
        results.append(retrieve(q_cls, q_layout, b_cls, b_layout, k=min(k, count), cls_weight=0.5, chunk=chunk,
                                query_positions=torch.linspace(0, 1, 6), bank_positions=positions, window=0.3))
    for index, sims in results[1:]:
        assert torch.equal(index, results[0][0])
        torch.testing.assert_close(sims, results[0][1], rtol=0, atol=1e-6)
    # The same with groups left out (k small enough that every query has k allowed rows).
    if k <= 5:
        grouped = [retrieve(q_cls, q_layout, b_cls, b_layout, k=k, cls_weight=0.5, chunk=chunk,
                            query_groups=torch.tensor([0, 1, 2, 3, 4, 0]), bank_groups=groups)
                   for chunk in (1, 3, count)]
        for index, _ in grouped[1:]:
            assert torch.equal(index, grouped[0][0])


def window_setup():
    """Bank rows at known positions; the most similar rows to the query lie far from its position."""
    b_cls, b_layout = bank(8, seed=11)
    positions = torch.tensor([0.0, 0.1, 0.45, 0.5, 0.55, 0.58, 0.9, 1.0])
    # The query is a near copy of row 7 (position 1.0), and second closest to row 6 (position 0.9).
    q_cls, q_layout = near(b_cls[7:8], b_layout[7:8], noise=0.05, seed=12)
    q_cls = F.normalize(q_cls + 0.3 * b_cls[6:7], dim=-1)
    return q_cls, q_layout, b_cls, b_layout, positions


def test_position_window_keeps_far_slices_out():
    q_cls, q_layout, b_cls, b_layout, positions = window_setup()
    without, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=3, cls_weight=0.5, chunk=3)
    assert int(without[0, 0]) == 7
    index, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=3, cls_weight=0.5, chunk=3,
                        query_positions=torch.tensor([0.5]), bank_positions=positions, window=0.1)
    assert set(index[0].tolist()) <= {2, 3, 4, 5}
    # Within the window, the order is that of plain similarity.
    sim = similarity(q_cls, q_layout, b_cls, b_layout, cls_weight=0.5)[0]
    inside = torch.tensor([2, 3, 4, 5])
    assert torch.equal(index[0], inside[sim[inside].argsort(descending=True)][:3])


def test_position_window_fills_up_with_far_slices_only_when_needed():
    q_cls, q_layout, b_cls, b_layout, positions = window_setup()
    index, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=6, cls_weight=0.5, chunk=5,
                        query_positions=torch.tensor([0.5]), bank_positions=positions, window=0.1)
    assert set(index[0, :4].tolist()) == {2, 3, 4, 5}  # every in-window row comes first
    assert index[0, 4:].tolist() == [7, 6]  # then the far rows, most similar first


def test_position_window_boundary_is_inclusive_on_both_sides():
    b_cls, b_layout = bank(3, seed=21)
    q_cls, q_layout = near(b_cls[2:], b_layout[2:], noise=0.02, seed=22)  # the query prefers row 2, out of window
    # Positions i / 10, as relative_positions gives for 11 foreground slices: 0.4 and 0.6 lie exactly 0.1 away.
    index, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=2, cls_weight=0.5, chunk=3,
                        query_positions=torch.tensor([0.5]), bank_positions=torch.tensor([0.4, 0.6, 0.9]),
                        window=0.1)
    assert set(index[0].tolist()) == {0, 1}


def test_position_window_zero_means_no_prior():
    q_cls, q_layout, b_cls, b_layout, positions = window_setup()
    plain, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=4, cls_weight=0.5, chunk=3)
    off, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=4, cls_weight=0.5, chunk=3,
                      query_positions=torch.tensor([0.5]), bank_positions=positions, window=0.0)
    assert torch.equal(plain, off)


def test_the_least_similar_reference_in_the_window_comes_before_the_most_similar_outside():
    """The worst case of the penalty: similarity -1 inside the window against +1 outside."""
    b_cls, b_layout = bank(2, seed=23)
    b_cls[1], b_layout[1] = -b_cls[0], -b_layout[0]  # row 1: the exact opposite of row 0
    index, sims = retrieve(b_cls[:1], b_layout[:1], b_cls, b_layout, k=2, cls_weight=0.5, chunk=2,
                           query_positions=torch.tensor([0.5]), bank_positions=torch.tensor([0.0, 0.5]), window=0.1)
    torch.testing.assert_close(sims[0], torch.tensor([-1.0, 1.0]))
    assert index[0].tolist() == [1, 0]


def test_returned_similarities_are_similarities_even_outside_the_window():
    q_cls, q_layout, b_cls, b_layout, positions = window_setup()
    index, sims = retrieve(q_cls, q_layout, b_cls, b_layout, k=6, cls_weight=0.5, chunk=5,
                           query_positions=torch.tensor([0.5]), bank_positions=positions, window=0.1)
    full = similarity(q_cls, q_layout, b_cls, b_layout, cls_weight=0.5)
    torch.testing.assert_close(sims, full.gather(1, index), rtol=0, atol=1e-6)


def test_query_never_retrieves_its_own_group():
    b_cls, b_layout = bank(9, seed=13)
    bank_groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    # Each query is a near copy of a row of its own group: without the exclusion it would retrieve it first.
    rows = torch.tensor([1, 4, 8, 3])
    query_groups = bank_groups[rows]
    q_cls, q_layout = near(b_cls[rows], b_layout[rows], noise=0.02, seed=14)
    plain, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=1, cls_weight=0.5, chunk=4)
    assert torch.equal(plain[:, 0], rows)
    for chunk in (1, 4, 9):
        index, sims = retrieve(q_cls, q_layout, b_cls, b_layout, k=6, cls_weight=0.5, chunk=chunk,
                               query_groups=query_groups, bank_groups=bank_groups)
        assert not bool((bank_groups[index] == query_groups[:, None]).any())
        assert bool(torch.isfinite(sims).all())


def test_group_exclusion_combined_with_window():
    b_cls, b_layout = bank(6, seed=15)
    positions = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.5, 0.1])
    bank_groups = torch.tensor([0, 0, 1, 1, 2, 2])
    q_cls, q_layout = near(b_cls[:1], b_layout[:1], noise=0.02, seed=16)
    index, _ = retrieve(q_cls, q_layout, b_cls, b_layout, k=4, cls_weight=0.5, chunk=2,
                        query_positions=torch.tensor([0.5]), bank_positions=positions, window=0.1,
                        query_groups=torch.tensor([0]), bank_groups=bank_groups)
    assert set(index[0, :2].tolist()) == {2, 4}  # allowed and in the window
    assert set(index[0, 2:].tolist()) == {3, 5}  # allowed, outside the window


def test_too_few_allowed_references_raises():
    b_cls, b_layout = bank(4, seed=17)
    with pytest.raises(ValueError, match="k=3"):
        retrieve(b_cls[:1], b_layout[:1], b_cls, b_layout, k=3, cls_weight=0.5, chunk=2,
                 query_groups=torch.tensor([0]), bank_groups=torch.tensor([0, 0, 1, 1]))


def test_k_larger_than_bank_raises():
    b_cls, b_layout = bank(4, seed=18)
    with pytest.raises(ValueError, match="k=6"):
        retrieve(b_cls[:2], b_layout[:2], b_cls, b_layout, k=6, cls_weight=0.5, chunk=3)


def test_retrieve_does_not_mutate_inputs():
    b_cls, b_layout = bank(6, seed=19)
    q_cls, q_layout = bank(2, seed=20)
    copies = [t.clone() for t in (q_cls, q_layout, b_cls, b_layout)]
    retrieve(q_cls, q_layout, b_cls, b_layout, k=3, cls_weight=0.5, chunk=4,
             query_positions=torch.tensor([0.1, 0.9]), bank_positions=torch.linspace(0, 1, 6), window=0.2)
    for tensor, copy in zip((q_cls, q_layout, b_cls, b_layout), copies, strict=True):
        assert torch.equal(tensor, copy)


# --------------------------------------------------------------------------------------------------------------------
# retrieve against the implementation it replaced (window applied before scoring, only scored rows converted)


def scan_whole_bank(query_cls, query_layout, bank_cls, bank_layout, *, k, cls_weight, chunk, query_positions=None,
                    bank_positions=None, window=0.0, query_groups=None, bank_groups=None, allowed=None):
    """The implementation before 0.3 (every bank row scored, the window a penalty after), kept as the reference.

    ``allowed`` (added since) masks the rows outside the subset, like a query's own group.
    """
    if k > len(bank_cls):
        raise ValueError(f"k={k} references asked for but the bank holds {len(bank_cls)}; lower references_k")
    best_key = query_cls.new_full((len(query_cls), 0), -torch.inf)
    best_sim = best_key.clone()
    best_idx = torch.zeros((len(query_cls), 0), dtype=torch.long, device=query_cls.device)
    for start in range(0, len(bank_cls), chunk):
        stop = min(start + chunk, len(bank_cls))
        sim = similarity(query_cls, query_layout, bank_cls[start:stop].to(query_cls),
                         bank_layout[start:stop].to(query_layout), cls_weight=cls_weight)
        key = sim
        if window > 0 and query_positions is not None and bank_positions is not None:
            # The tolerance keeps slices exactly one window away on both sides despite float32 rounding.
            far = (query_positions[:, None] - bank_positions[None, start:stop].to(query_positions)).abs() \
                > window + 1e-6
            key = key - OUT_OF_WINDOW_PENALTY * far
        if query_groups is not None and bank_groups is not None:
            own = query_groups[:, None] == bank_groups[None, start:stop].to(query_groups)
            key = key.masked_fill(own, -torch.inf)
        if allowed is not None:
            key = key.masked_fill(~allowed[None, start:stop], -torch.inf)
        index = torch.arange(start, stop, device=sim.device).expand(len(sim), -1)
        merged_key = torch.cat([best_key, key], dim=1)
        best_key, order = merged_key.topk(min(k, merged_key.shape[1]), dim=1)
        best_idx = torch.gather(torch.cat([best_idx, index], dim=1), 1, order)
        best_sim = torch.gather(torch.cat([best_sim, sim], dim=1), 1, order)
    if torch.isinf(best_key).any():
        raise ValueError(f"fewer than k={k} references are allowed for some query; lower references_k")
    return best_idx, best_sim


def positioned_bank(count: int, volumes: int, seed: int):
    """A bank of several volumes, each with its slices' relative positions 0..1, stored as fp16 like a real one."""
    b_cls, b_layout = bank(count, seed=seed)
    per_volume = count // volumes
    positions = torch.cat([torch.linspace(0, 1, per_volume)] * volumes + [torch.rand(count - per_volume * volumes)])
    groups = torch.cat([torch.arange(volumes).repeat_interleave(per_volume),
                        torch.full((count - per_volume * volumes,), volumes)])
    return b_cls.half(), b_layout.half(), positions, groups


@pytest.mark.parametrize(("window", "k", "chunk", "grouped", "subset"),
                         [(0.1, 8, 64, False, False), (0.1, 8, 37, True, False), (0.05, 3, 1000, True, False),
                          (0.3, 20, 50, True, False), (0.0, 8, 64, True, False), (0.005, 8, 64, True, False),
                          (0.1, 8, 37, True, True), (0.0, 8, 64, False, True), (0.05, 3, 1000, True, True),
                          (0.02, 5, 64, True, True)])
def test_retrieve_equals_scoring_the_whole_bank(window, k, chunk, grouped, subset):
    """Same references in the same order and the same similarities, whether or not the window narrows the scan.

    The queries are a batch of consecutive slices (positions 0.3 to 0.45); with (0.005, k=8) some have fewer than K
    rows inside their window, so the whole bank is scored. ``subset``: a bank subset of a score's spread (every
    third row and all of volume 2 left out) may be retrieved only; with (0.02, k=5) the queries of volume 0 have K
    rows in their window in the bank but not in the subset.
    """
    b_cls, b_layout, positions, groups = positioned_bank(300, 4, seed=30)
    q_cls, q_layout = bank(16, seed=31)
    q_positions = torch.linspace(0.3, 0.45, 16)
    q_groups = torch.tensor([0, 1, 2, 3] * 4)
    options = dict(k=k, cls_weight=0.5, chunk=chunk, query_positions=q_positions, bank_positions=positions,
                   window=window, query_groups=q_groups if grouped else None, bank_groups=groups if grouped else None,
                   allowed=((torch.arange(300) % 3 > 0) & (groups != 2)) if subset else None)
    index, sims = retrieve(q_cls, q_layout, b_cls, b_layout, **options)
    if subset:
        assert bool(options["allowed"][index].all())
    expected_index, expected_sims = scan_whole_bank(q_cls, q_layout, b_cls, b_layout, **options)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(sims, expected_sims, rtol=0, atol=1e-6)


def test_rows_outside_every_window_are_not_read():
    """Rows no query could take are never scored: poisoning them with NaN changes nothing."""
    b_cls, b_layout, positions, groups = positioned_bank(200, 2, seed=32)
    q_cls, q_layout = bank(4, seed=33)
    q_positions = torch.tensor([0.40, 0.45, 0.5, 0.52])
    options = dict(k=5, cls_weight=0.5, chunk=16, query_positions=q_positions, bank_positions=positions, window=0.1)
    expected = scan_whole_bank(q_cls, q_layout, b_cls, b_layout, **options)
    outside = ((q_positions[:, None] - positions[None]).abs() > 0.1 + 1e-6).all(dim=0)
    assert int(outside.sum()) > 100
    poisoned_cls, poisoned_layout = b_cls.clone(), b_layout.clone()
    poisoned_cls[outside], poisoned_layout[outside] = float("nan"), float("nan")
    index, sims = retrieve(q_cls, q_layout, poisoned_cls, poisoned_layout, **options)
    assert torch.equal(index, expected[0])
    torch.testing.assert_close(sims, expected[1], rtol=0, atol=1e-6)


def test_retrieve_from_an_fp16_bank_equals_its_float32_copy():
    """Converting chunk by chunk or once beforehand gives the same answer (fp16 values are exact in float32)."""
    b_cls, b_layout, positions, groups = positioned_bank(120, 3, seed=34)
    q_cls, q_layout = bank(5, seed=35)
    options = dict(k=6, cls_weight=0.4, chunk=25, query_positions=torch.rand(5), bank_positions=positions,
                   window=0.15, query_groups=torch.tensor([0, 1, 2, 0, 1]), bank_groups=groups)
    stored = retrieve(q_cls, q_layout, b_cls, b_layout, **options)
    converted = retrieve(q_cls, q_layout, b_cls.float(), b_layout.float(), **options)
    assert torch.equal(stored[0], converted[0]) and torch.equal(stored[1], converted[1])
