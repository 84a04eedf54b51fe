"""The DiT blocks of the SnapGen++ family: ASSA against naive masked full attention, its cost counted,
its ONNX export run in ONNX Runtime; the DiT block, patch embedding, resampling and final layer."""

import pytest
import torch
import torch.nn.functional as F

from archlab.blocks_dit import ASSA, DiTBlock, FinalLayer, PatchEmbed, TokenResample, local_attention
from archlab.cost import count_macs


class _OnGrid(torch.nn.Module):
    """ASSA with its token grid bound: tensors in, a tensor out (what fvcore and the ONNX exporter take)."""

    def __init__(self, m, hw):
        super().__init__()
        self.m, self.hw = m, hw

    def forward(self, t):
        return self.m(t, hw=self.hw)


def _naive_local(q, k, v, hw, block, radius):
    """Full attention in which query i sees key j only if their tiles are within Chebyshev distance `radius`."""
    rows = torch.arange(hw[0]).repeat_interleave(hw[1]) // block
    cols = torch.arange(hw[1]).repeat(hw[0]) // block
    near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=near)


@pytest.mark.parametrize("hw, block, radius", [((8, 8), 2, 1), ((8, 12), 4, 1), ((12, 8), 2, 2), ((8, 8), 4, 0)])
def test_local_branch_is_masked_full_attention(hw, block, radius):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, hw[0] * hw[1], 8, generator=g) for _ in range(3))
    torch.testing.assert_close(local_attention(q, k, v, hw, block, radius), _naive_local(q, k, v, hw, block, radius),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads, qk_norm, rope", [(4, False, False), (2, True, True), (1, False, True)])
def test_assa_is_the_gated_mix_of_masked_local_and_compressed_global_attention(kv_heads, qk_norm, rope):
    """The whole block against a reference written from its definition with the block's own weights."""
    torch.manual_seed(0)
    dim, heads, hw, block, radius = 32, 4, (8, 8), 2, 1
    m = ASSA(dim, heads, kv_heads, block, radius, qk_norm, rope).eval()
    x = torch.randn(2, hw[0] * hw[1], dim)
    from archlab.blocks import rope_2d

    def split(t, h):
        return t.view(2, -1, h, dim // heads).transpose(1, 2)

    def expand(t):
        return t.repeat_interleave(heads // kv_heads, dim=1)

    q, k, v = split(m.to_q(x), heads), split(m.to_k(x), kv_heads), split(m.to_v(x), kv_heads)
    if qk_norm:
        q, k = m.q_norm(q), m.k_norm(k)
    def compress(t, conv):  # the K or V map through its 2x2 stride-2 conv
        kvd = t.shape[-1]
        grid = t.transpose(1, 2).reshape(2, kvd, *hw)
        return F.conv2d(grid, conv.weight, conv.bias, stride=2, groups=kvd).flatten(2).transpose(1, 2)

    kc, vc = compress(m.to_k(x), m.compress_k), compress(m.to_v(x), m.compress_v)
    assert kc.shape[1] == hw[0] * hw[1] // 4  # 4x fewer tokens
    kg, vg = split(kc, kv_heads), split(vc, kv_heads)
    if qk_norm:
        kg = m.k_norm(kg)
    glob = F.scaled_dot_product_attention(q, expand(kg), expand(vg))
    if rope:
        q, k = rope_2d(q, hw), rope_2d(k, hw)
    local = _naive_local(q, expand(k), expand(v), hw, block, radius)
    gate = torch.sigmoid(m.gate(x)).transpose(1, 2).unsqueeze(-1)
    ref = m.to_out((gate * local + (1 - gate) * glob).transpose(1, 2).reshape(2, -1, dim))
    with torch.no_grad():
        torch.testing.assert_close(m(x, hw=hw), ref, rtol=1e-5, atol=1e-5)


def test_assa_cost_is_counted_and_exceeds_its_projections():
    dim, hw = 32, (8, 8)
    m = ASSA(dim, 4, 1, block=2, radius=1).eval()
    x = torch.randn(1, hw[0] * hw[1], dim)

    macs = count_macs(_OnGrid(m, hw), (x,))  # raises on any op it cannot count
    n, d, kvd = hw[0] * hw[1], dim, dim // 4
    linear = n * d * (d + 2 * kvd + 4 + d)  # q, k, v, gate, out on the grid
    assert macs > linear + 2 * n * (n // 4) * d  # plus the global branch's attention (and more)


def test_assa_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dim, hw = 32, (8, 8)
    m = ASSA(dim, 4, 2, block=4, radius=1, qk_norm=True, rope=True).eval()

    x = torch.randn(1, hw[0] * hw[1], dim)
    path = tmp_path / "assa.onnx"
    torch.onnx.export(_OnGrid(m, hw), (x,), str(path), input_names=["x"], opset_version=20, dynamo=True, external_data=False)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), m(x, hw=hw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["full", "assa"])
def test_dit_block_starts_as_identity_on_its_modulated_paths_and_learns(attention):
    torch.manual_seed(0)
    dim, hw = 32, (8, 8)
    blk = DiTBlock(dim, 4, 1, temb_dim=16, context_dim=24, ffn_ratio=3, attention=attention, block=2, radius=1,
                   cross_attention=False)
    x, temb = torch.randn(2, hw[0] * hw[1], dim), torch.randn(2, 16)
    torch.testing.assert_close(blk(x, temb, None, hw), x)  # adaLN-Zero: gates start at 0
    blk(x, temb, None, hw).pow(2).mean().backward()
    assert blk.modulation[1].weight.grad.abs().sum() > 0


def test_patch_embed_resample_and_final_layer_shapes():
    latent = torch.randn(2, 4, 16, 16)
    tokens = PatchEmbed(4, 32, patch=2)(latent)
    assert tokens.shape == (2, 64, 32)  # 8x8 tokens
    down = TokenResample(32, 48, "down")(tokens, (8, 8))
    assert down.shape == (2, 16, 48)
    up = TokenResample(48, 32, "up")(down, (4, 4))
    assert up.shape == (2, 64, 32)
    out = FinalLayer(32, 4, patch=2, temb_dim=16)(up, torch.randn(2, 16), (8, 8))
    assert out.shape == latent.shape
