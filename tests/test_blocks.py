import math

import pytest
import torch

from archlab.blocks import Attention, FeedForward, ResBlock, rope_2d


def _naive_attention(x, ctx, wq, wk, wv, heads):
    b, n, c = x.shape
    d = c // heads
    q = (x @ wq.T).view(b, n, heads, d).transpose(1, 2)
    k = (ctx @ wk.T).view(b, -1, heads, d).transpose(1, 2)
    v = (ctx @ wv.T).view(b, -1, heads, d).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (att @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_equals_mhsa_with_shared_kv_weights(kv_heads):
    torch.manual_seed(0)
    heads, dim, d = 8, 64, 8
    gqa = Attention(dim, heads, kv_heads, context_dim=24)
    mhsa = Attention(dim, heads, heads, context_dim=24)
    group = heads // kv_heads
    with torch.no_grad():
        mhsa.to_q.weight.copy_(gqa.to_q.weight)
        mhsa.to_out.load_state_dict(gqa.to_out.state_dict())
        # MHSA whose query head h uses K/V head h // group of the GQA module
        for name in ("to_k", "to_v"):
            w = getattr(gqa, name).weight.view(kv_heads, d, 24)
            getattr(mhsa, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(heads * d, 24))
    x, ctx = torch.randn(2, 10, dim), torch.randn(2, 7, 24)
    torch.testing.assert_close(gqa(x, ctx), mhsa(x, ctx), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in gqa.to_k.parameters()) == 24 * kv_heads * d


def test_mhsa_matches_reference_attention():
    torch.manual_seed(1)
    a = Attention(32, 4, 4)
    x = torch.randn(2, 9, 32)
    ref = _naive_attention(x, x, a.to_q.weight, a.to_k.weight, a.to_v.weight, 4)
    torch.testing.assert_close(a(x), a.to_out(ref), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(2)
    h, w, d = 6, 7, 16
    q, k = torch.randn(d), torch.randn(d)
    grid = (h, w)

    def score(pq, pk):  # q at grid position pq, k at pk
        xq = torch.zeros(1, 1, h * w, d)
        xk = torch.zeros(1, 1, h * w, d)
        xq[0, 0, pq[0] * w + pq[1]] = q
        xk[0, 0, pk[0] * w + pk[1]] = k
        return (rope_2d(xq, grid)[0, 0, pq[0] * w + pq[1]] @ rope_2d(xk, grid)[0, 0, pk[0] * w + pk[1]]).item()

    base = score((1, 2), (3, 1))
    assert score((2, 4), (4, 3)) == pytest.approx(base, rel=1e-4, abs=1e-5)  # same (2, -1) offset, shifted
    assert score((0, 5), (2, 4)) == pytest.approx(base, rel=1e-4, abs=1e-5)
    assert score((1, 2), (3, 2)) != pytest.approx(base, rel=1e-3)  # another offset, another score
    assert score((1, 2), (1, 2)) == pytest.approx((q @ k).item(), rel=1e-4)  # zero offset: unrotated


def test_rope_changes_attention_output():
    torch.manual_seed(3)
    a = Attention(32, 2, 2, rope=True)
    b = Attention(32, 2, 2, rope=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 32)
    assert not torch.allclose(a(x, hw=(4, 4)), b(x))


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("cin, cout, r", [(32, 32, 1), (32, 64, 2), (96, 32, 3)])
def test_residual_block_param_formulas(cin, cout, r):
    t = 40
    hid = r * cout
    norms = 2 * cin + 2 * hid
    shortcut = (cin * cout + cout) if cin != cout else 0
    standard = 9 * cin * hid + hid + 9 * hid * cout + cout
    separable = (9 * cin + cin) + (cin * hid + hid) + (9 * hid + hid) + (hid * cout + cout)
    temb = t * hid + hid
    assert _params(ResBlock(cin, cout, t, "standard", r)) == standard + temb + norms + shortcut
    assert _params(ResBlock(cin, cout, t, "separable", r)) == separable + temb + norms + shortcut


def test_separable_is_cheaper_than_standard_and_expansion_costs_more():
    std = _params(ResBlock(64, 64, 16, "standard"))
    sep = _params(ResBlock(64, 64, 16, "separable"))
    sep2 = _params(ResBlock(64, 64, 16, "separable", 2))
    assert sep < sep2 < std


@pytest.mark.parametrize("act, ratio", [("geglu", 4), ("geglu", 3), ("gelu", 2)])
def test_ffn_param_formula(act, ratio):
    c = 32
    h = ratio * c
    width = 2 * h if act == "geglu" else h
    assert _params(FeedForward(c, ratio, act)) == c * width + width + h * c + c
