"""Single-process tests of cirlab.losses against explicit hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from cirlab.losses import LogitScale, cosine_loss, info_nce, mse_loss, nt_xent


def _feats(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1)
    t = F.normalize(torch.randn(b, d, generator=g), dim=1)
    return q, t


def _ce_by_hand(logits, labels, masked=None):
    """-log softmax computed term by term with explicit loops."""
    total = 0.0
    for i in range(logits.shape[0]):
        denom = 0.0
        for j in range(logits.shape[1]):
            if masked is not None and masked[i][j]:
                continue
            denom += math.exp(float(logits[i, j]))
        total += -(float(logits[i, labels[i]]) - math.log(denom))
    return total / logits.shape[0]


def test_info_nce_one_way_matches_hand():
    q, t = _feats()
    scale = 20.0
    logits = scale * q @ t.T
    expected = _ce_by_hand(logits, list(range(6)))
    assert info_nce(q, t, scale).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_symmetric_matches_hand():
    q, t = _feats(seed=1)
    scale = torch.tensor(14.0)
    l_qt = _ce_by_hand(scale * q @ t.T, list(range(6)))
    l_tq = _ce_by_hand(scale * t @ q.T, list(range(6)))
    got = info_nce(q, t, scale, symmetric=True)
    assert got.item() == pytest.approx((l_qt + l_tq) / 2, rel=1e-5)
    # and the symmetric loss really differs from the one-way one
    assert abs(l_qt - l_tq) > 1e-3


def test_info_nce_duplicate_ids_masks_same_id_negatives():
    q, t = _feats(b=5, seed=2)
    ids = ["red", "blue", "red", "green", "blue"]
    scale = 10.0
    logits = scale * q @ t.T
    # row i drops column j (j != i) when ids[j] == ids[i]
    masked = [[j != i and ids[j] == ids[i] for j in range(5)] for i in range(5)]
    assert masked[0][2] and masked[2][0] and masked[1][4] and not masked[0][1]
    expected = _ce_by_hand(logits, list(range(5)), masked)
    got = info_nce(q, t, scale, duplicate_ids=ids)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - _ce_by_hand(logits, list(range(5)))) > 1e-4  # masking changes the loss
    # symmetric, integer ids
    sym = info_nce(q, t, scale, symmetric=True, duplicate_ids=torch.tensor([0, 1, 0, 2, 1]))
    expected_sym = (expected + _ce_by_hand(scale * t @ q.T, list(range(5)), masked)) / 2
    assert sym.item() == pytest.approx(expected_sym, rel=1e-5)


def test_info_nce_hard_negatives_join_the_query_side_only():
    """NegCLIP: each query's softmax also holds the (real) hard negatives; the target->query side does not."""
    q, t = _feats(b=4, seed=4)
    g = torch.Generator().manual_seed(5)
    negs = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    mask = torch.tensor([True, False, True])  # the middle one is padding
    scale = 12.0
    denom_cols = torch.cat([t, negs[[0, 2]]])  # targets, then the real negatives
    l_qt = _ce_by_hand(scale * q @ denom_cols.T, list(range(4)))
    l_tq = _ce_by_hand(scale * t @ q.T, list(range(4)))
    got = info_nce(q, t, scale, symmetric=True, hard_negatives=negs, hard_negative_mask=mask)
    assert got.item() == pytest.approx((l_qt + l_tq) / 2, rel=1e-5)
    plain = info_nce(q, t, scale, symmetric=True)
    assert got.item() > plain.item() + 1e-4  # more negatives: a larger loss
    # with duplicate ids: same-id columns dropped, the negatives kept
    ids = ["a", "b", "a", "c"]
    masked = [[j < 4 and j != i and ids[j] == ids[i] for j in range(6)] for i in range(4)]
    expected = _ce_by_hand(scale * q @ denom_cols.T, list(range(4)), masked)
    got = info_nce(q, t, scale, duplicate_ids=ids, hard_negatives=negs, hard_negative_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="hard_negatives must be"):
        info_nce(q, t, scale, hard_negatives=negs[:, :3])


def test_info_nce_all_distinct_ids_equals_plain():
    q, t = _feats(seed=3)
    assert info_nce(q, t, 5.0, duplicate_ids=list(range(6))).item() == pytest.approx(
        info_nce(q, t, 5.0).item(), rel=1e-6)


def test_info_nce_learnable_scale_gets_gradient():
    q, t = _feats(seed=4)
    ls = LogitScale(1 / 0.07, learnable=True)
    info_nce(q, t, ls(), symmetric=True).backward()
    assert ls.log_scale.grad is not None and ls.log_scale.grad.abs().item() > 0


def test_info_nce_shape_errors():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
        info_nce(torch.randn(4, 3), torch.randn(4, 5), 1.0)
    with pytest.raises(ValueError, match="duplicate_ids has 3 entries"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), 1.0, duplicate_ids=[1, 2, 3])


def test_logit_scale_init_clamp_and_fixed():
    ls = LogitScale(1 / 0.07)
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert ls.log_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        ls.log_scale.fill_(math.log(500.0))
    assert ls().item() == pytest.approx(100.0)
    fixed = LogitScale(100.0, learnable=False)
    assert fixed().item() == pytest.approx(100.0, rel=1e-5)
    assert len(list(fixed.parameters())) == 0 and "log_scale" in fixed.state_dict()


def test_nt_xent_matches_hand():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g)
    tau = 0.25
    z = [F.normalize(v, dim=0) for v in list(a) + list(b)]  # 2N normalised samples
    n = 4
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    assert nt_xent(a, b, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(3, 3\)"):
        nt_xent(a, b[:3], tau)


def test_cosine_and_mse_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    # cos = [0, 1] -> mean(1 - cos) = (1 + 0) / 2
    assert cosine_loss(a, b).item() == pytest.approx(0.5)
    # squared errors: 1, 1, 0, 9 -> mean 11/4
    assert mse_loss(a, b).item() == pytest.approx(11 / 4)
    with pytest.raises(ValueError, match=r"\(2, 2\) and \(2, 3\)"):
        mse_loss(a, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cosine_loss"):
        cosine_loss(a, torch.zeros(3, 2))
