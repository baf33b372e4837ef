import math

import pytest
import torch
import torch.nn as nn

from attention import (
    Attention,
    DualChannelAttention,
    KVCache,
    add_dual_channel,
    apply_rope,
    rope_1d,
    rope_2d,
)


def naive_attention(attn: Attention, x, rope=None, causal=False):
    """Softmax attention written out by hand: the independent check of the SDPA path."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


@pytest.mark.parametrize("n_kv_heads,qk_norm,causal", [(4, False, False), (2, False, True), (1, True, True)])
def test_attention_matches_naive(n_kv_heads, qk_norm, causal):
    attn = Attention(32, 4, n_kv_heads, q_bias=True, k_bias=False, v_bias=True, o_bias=True, qk_norm=qk_norm, causal=causal)
    x = torch.randn(2, 7, 32)
    rope = rope_1d(torch.arange(7), attn.head_dim, 10000.0)
    torch.testing.assert_close(attn(x, rope), naive_attention(attn, x, rope, causal), atol=1e-5, rtol=1e-5)


def test_bias_switches():
    attn = Attention(16, 2, q_bias=True, k_bias=False, v_bias=True, o_bias=True)
    assert attn.q_proj.bias is not None and attn.k_proj.bias is None and attn.v_proj.bias is not None


def test_rope_1d_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for scaling in (None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}):
        params = {"rope_type": "default", "rope_theta": 500000.0} if scaling is None else {**scaling, "rope_theta": 500000.0}
        cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=params)
        ref = LlamaRotaryEmbedding(cfg)
        pos = torch.arange(200)[None]
        cos_ref, sin_ref = ref(torch.zeros(1, 200, 64), pos)
        cos, sin = rope_1d(pos, 16, 500000.0, scaling)
        torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)


def test_rope_2d_matches_transformers_dinov3():
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    cfg = DINOv3ViTConfig(hidden_size=64, num_attention_heads=2, patch_size=16)
    ref = DINOv3ViTRopePositionEmbedding(cfg).eval()
    cos_ref, sin_ref = ref(torch.zeros(1, 3, 5 * 16, 7 * 16))  # non-square: 5 x 7 patches
    cos, sin = rope_2d(5, 7, 32, 100.0)
    torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)


def test_rope_prefix_tokens_untouched():
    x = torch.randn(1, 2, 3 + 6, 8)
    cos, sin = rope_2d(2, 3, 8)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[:, :, :3], x[:, :, :3])
    assert not torch.allclose(y[:, :, 3:], x[:, :, 3:])


def test_kv_cache_matches_full_recompute():
    attn = Attention(32, 4, 2, causal=True).eval()
    x = torch.randn(2, 9, 32)
    full = attn(x, rope_1d(torch.arange(9), 8, 10000.0))
    cache = KVCache(1, 2, 2, 8, max_len=16)
    outs = []
    for start, end in [(0, 5), (5, 6), (6, 9)]:  # prefill, one token, then a chunk after cached context
        outs.append(attn(x[:, start:end], rope_1d(torch.arange(start, end), 8, 10000.0), cache=cache.layers[0]))
        cache.pos = end
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    attn = Attention(16, 2, causal=True)
    cache = KVCache(1, 1, 2, 8, max_len=4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        attn(torch.randn(1, 5, 16), cache=cache.layers[0])


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = Attention(16, 2, q_bias=True, v_bias=True, o_bias=True)
        self.mlp = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": Attention(16, 2, q_bias=True, k_bias=True, v_bias=True, o_bias=True)})])

    def forward(self, x):
        x = x + self.attn1(x)
        x = x + self.mlp(x)
        return x + self.blocks[0]["attn"](x)


def test_dual_channel_identity_trainable_set_and_gradients():
    model = TwoLayer()
    x = torch.randn(2, 5, 16)
    before = model(x)
    add_dual_channel(model)
    assert torch.equal(model(x), before)  # σ(0) = 1/2 and Attn+ is an exact clone: bitwise the same output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if ".attn_plus." in n or n.endswith(".gate")}
    assert trainable == expected and len(expected) == 2 * (1 + 4 + 4) - 1  # attn1 has no k bias
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), n
        if p.grad is not None:
            # dL/da ∝ Attn(x) − Attn+(x), which is exactly zero while Attn+ is still the clone
            assert (p.grad.abs().sum() > 0) != n.endswith(".gate"), n
    with torch.no_grad():
        model.attn1.attn_plus.v_proj.weight.add_(0.1 * torch.randn(16, 16))
    model.zero_grad()
    model(x).square().sum().backward()
    assert model.attn1.gate.grad.abs().sum() > 0


def test_dual_channel_gate_mixes_channels():
    attn = Attention(8, 2, o_bias=True)
    dual = DualChannelAttention(attn)
    with torch.no_grad():
        dual.attn_plus.o_proj.bias.add_(1.0)
        dual.gate.fill_(-30.0)  # σ ≈ 0: all from Attn+
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(dual(x), dual.attn_plus(x))


def test_add_dual_channel_twice_is_an_error():
    model = TwoLayer()
    add_dual_channel(model)
    with pytest.raises(ValueError, match="already"):
        add_dual_channel(model)


def test_lora_starts_as_identity_trains_only_factors_and_merges():
    from attention import add_lora, merge_lora

    model = TwoLayer()
    x = torch.randn(2, 5, 16)
    before = model(x)
    add_lora(model, rank=4)
    assert torch.equal(model(x), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_()
    adapted = model(x)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
