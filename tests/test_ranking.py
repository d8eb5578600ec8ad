"""cirlab.train.ranking.rank against a brute-force full sort, with exclusions, ties and odd inputs."""

import pytest
import torch
import torch.nn.functional as F

from cirlab.train.ranking import rank, ranked_ids


def _data(q=11, n=53, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(q, d, generator=g), dim=1),
            F.normalize(torch.randn(n, d, generator=g), dim=1))


def _brute(q, gal, k, exclude=None):
    s = q @ gal.T
    if exclude is not None:
        for i, ex in enumerate(exclude):
            s[i, list(ex)] = float("-inf")
    vals, idx = torch.sort(s, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


@pytest.mark.parametrize("qc,gc", [(1024, 65536), (3, 7), (1, 1), (4, 53), (5, 52)])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_rank_matches_brute_force_for_any_chunking(qc, gc, k):
    q, gal = _data()
    s, i = rank(q, gal, k, query_chunk=qc, gallery_chunk=gc)
    bs, bi = _brute(q, gal, k)
    assert s.shape == i.shape == (11, k)
    assert torch.equal(i, bi)
    torch.testing.assert_close(s, bs, atol=1e-6, rtol=0)


def test_rank_exclude_removes_items_and_matches_brute_force():
    q, gal = _data(seed=1)
    # exclude each query's own best match (like CIRR's reference) plus some extra items
    best = (q @ gal.T).argmax(dim=1).tolist()
    exclude = [[b] + ([3, 40] if i % 2 else []) for i, b in enumerate(best)]
    s, i = rank(q, gal, 10, exclude=exclude, query_chunk=4, gallery_chunk=9)
    bs, bi = _brute(q, gal, 10, exclude)
    assert torch.equal(i, bi)
    for row, ex in zip(i.tolist(), exclude):
        assert not set(row) & set(ex)
    # without exclusion the best item would have been first
    _, i_plain = rank(q, gal, 1)
    assert i_plain[:, 0].tolist() == best


def test_k_larger_than_gallery_and_empty_slots():
    q, gal = _data(q=2, n=5)
    s, i = rank(q, gal, 50, gallery_chunk=2)
    assert i.shape == (2, 5) and sorted(i[0].tolist()) == [0, 1, 2, 3, 4]
    s, i = rank(q, gal, 50, exclude=[[0, 4], []], gallery_chunk=2)
    # query 0 has only 3 items left: two empty slots at the end
    assert i[0, 3:].tolist() == [-1, -1] and torch.isinf(s[0, 3:]).all()
    assert sorted(i[0, :3].tolist()) == [1, 2, 3]
    assert ranked_ids(i, ["a", "b", "c", "d", "e"])[0] == [["a", "b", "c", "d", "e"][j] for j in i[0, :3].tolist()]


def test_ties_lower_index_first():
    v = F.normalize(torch.tensor([[1.0, 2.0, 3.0]]), dim=1)
    w = F.normalize(torch.tensor([[3.0, 2.0, 1.0]]), dim=1)
    gal = torch.cat([w, v, w, v, v, w])  # v at 1, 3, 4 (best for query v), w at 0, 2, 5
    s, i = rank(v, gal, 4, gallery_chunk=2)
    assert i[0].tolist() == [1, 3, 4, 0]
    s, i = rank(v, gal, 2, gallery_chunk=2)
    assert i[0].tolist() == [1, 3]


@pytest.mark.parametrize("gc", [1, 6, 7, 1000])
@pytest.mark.parametrize("k", [2, 5, 41, 60])
def test_ties_at_the_topk_cut_keep_lowest_indices(k, gc):
    # 60 exact copies of v (indices = 1, 3, 4 mod 6) then 60 of w: torch.topk alone picks among
    # equal scores arbitrarily, so the k returned must be the k lowest-index copies, in order.
    v = F.normalize(torch.tensor([[1.0, 2.0, 3.0]]), dim=1)
    w = F.normalize(torch.tensor([[3.0, 2.0, 1.0]]), dim=1)
    gal = torch.cat([w, v, w, v, v, w] * 20)
    best = [j for j in range(120) if j % 6 in (1, 3, 4)]
    rest = [j for j in range(120) if j % 6 not in (1, 3, 4)]
    _, i = rank(v, gal, k, gallery_chunk=gc)
    assert i[0].tolist() == (best + rest)[:k]


def test_half_inputs_are_ranked_in_float32():
    q, gal = _data(seed=2)
    s, i = rank(q.half(), gal.half(), 5, gallery_chunk=10)
    assert s.dtype == torch.float32
    bs, bi = _brute(q.half().float(), gal.half().float(), 5)
    assert torch.equal(i, bi)


def test_no_queries_gives_empty_result():
    _, gal = _data()
    s, i = rank(torch.empty(0, 8), gal, 3)
    assert s.shape == i.shape == (0, 3)


def test_bad_inputs():
    q, gal = _data()
    with pytest.raises(ValueError, match="query features have dim 8 but gallery features have dim 6"):
        rank(q, gal[:, :6], 3)
    with pytest.raises(ValueError, match="exclude has 2 entries but there are 11 queries"):
        rank(q, gal, 3, exclude=[[0], [1]])
    with pytest.raises(ValueError, match=r"exclude\[0\] holds gallery index 99"):
        rank(q, gal, 3, exclude=[[99]] + [[]] * 10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        rank(q, gal, 0)
    with pytest.raises(ValueError, match="outside gallery_ids"):
        ranked_ids(torch.tensor([[0, 7]]), ["a", "b"])
