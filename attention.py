"""
Attention, shared by the vision encoder and the language model, and SpatialBoost's dual-channel attention.

One `Attention` covers every family we load: separate q/k/v/o projections with per-projection bias switches
(DINOv3 has no key bias, Qwen2 has q/k/v bias), grouped-query attention, optional rotary embeddings (1D for
text, 2D for DINOv3 patches, rotate_half convention), optional q/k RMSNorm (Qwen3), causal masking and a
KV-cache hook for generation. The math is always `F.scaled_dot_product_attention`, so the fastest kernel the
device has (flash, memory-efficient, or the CPU's fused one) does the work.

`DualChannelAttention` is the method's core: out = σ(a)·Attn(x) + (1−σ(a))·Attn+(x), where Attn is the frozen
pre-trained attention, Attn+ a trainable clone and a ∈ R^D a zero-initialised gate. `add_dual_channel(vit)`
swaps it into every attention layer of a model in place.
"""

import copy
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm that normalizes in fp32 (as the reference Llama/Qwen code does) and scales in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_1d(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None):
    """Text RoPE. positions (T,) or (B, T) integers -> fp32 cos, sin of shape (T, head_dim) or (B, T, head_dim).
    `scaling`: a Llama-3 `rope_scaling` dict; other types are refused, not ignored: a wrong frequency table still
    produces fluent-looking garbage."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    if scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, scaling)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, head_dim): rotate_half pairs i with i + head_dim/2
    return angles.cos(), angles.sin()


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: 'default', 'llama3')")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, slowed)


def rope_2d(h: int, w: int, head_dim: int, theta: float = 100.0, device=None):
    """DINOv3 patch RoPE for an h x w grid -> fp32 cos, sin of shape (h*w, head_dim), patches in row-major order.
    Patch centres are normalized to [-1, 1] in (y, x); head_dim/4 frequencies per axis, laid out as
    [y-freqs, x-freqs] and tiled twice so that rotate_half pairs match."""
    inv_freq = 1.0 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)  # (hd/4,)
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (h*w, 2)
    angles = 2 * math.pi * coords[:, :, None] * inv_freq  # (h*w, 2, hd/4)
    angles = angles.flatten(1).tile(2)  # (h*w, hd)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (T', hd) or (B, T', hd). With T' < T only the last T' tokens rotate: DINOv3's
    CLS and register tokens sit in front of the patches and carry no position."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T', hd): per-sample positions (left-padded batches)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    n = cos.shape[-2]
    if n == x.shape[-2]:
        return x * cos + rotate_half(x) * sin
    prefix, rest = x.split((x.shape[-2] - n, n), dim=-2)
    return torch.cat([prefix, rest * cos + rotate_half(rest) * sin], dim=-2)


class Packed(NamedTuple):
    """Packed rows for varlen attention, no (T, T) mask: the rows (B, T) read as one sequence of B*T tokens, cut at
    cu_seqlens (S+1,) int32 into its S samples (a row's padding is one more); max_len bounds every sample's length
    (the row length: the bound needs no host sync). llm.packed builds it from collate's segments."""
    cu_seqlens: torch.Tensor
    max_len: int


def packed_attention(q, k, v, packed: Packed, gqa: bool):
    """Causal attention within each packed sample. q (B, H, T, hd), k, v (B, Hkv, T, hd) -> (B, H, T, hd). CUDA:
    flash-attention's varlen kernel over the boundaries; elsewhere (and as the tests' reference of the same cut) one
    causal SDPA per sample."""
    B, H, T, hd = q.shape
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], hd)  # (B*T, heads, hd)
    q, k, v = flat(q), flat(k), flat(v)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn
        y = varlen_attn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_len, packed.max_len,
                        window_size=(-1, 0), enable_gqa=gqa)  # (-1, 0): causal
    else:
        cuts = packed.cu_seqlens.tolist()
        y = torch.cat([F.scaled_dot_product_attention(*(t[None, a:b].transpose(1, 2) for t in (q, k, v)),
                                                      is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)
                       for a, b in zip(cuts, cuts[1:])])  # (B*T, H, hd)
    return y.view(B, T, H, hd).transpose(1, 2)


class KVCache:
    """Keys and values of every layer, (n_layers, B, Hkv, max_len, hd) each, allocated once and written in place.
    `layers[i]` is the hook layer i's attention calls; the model advances `pos` once per forward, after all layers."""

    def __init__(self, n_layers, batch, n_kv_heads, head_dim, max_len, device=None, dtype=torch.float32):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos, self.max_len = 0, max_len
        self.layers = [_LayerCache(self, i) for i in range(n_layers)]


class _LayerCache:
    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def update(self, k, v):
        """Store k, v (B, Hkv, T, hd) at the cache position; return all keys and values so far."""
        c, start = self.cache, self.cache.pos
        end = start + k.shape[2]
        if end > c.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {c.max_len}")
        c.k[self.layer, :, :, start:end] = k
        c.v[self.layer, :, :, start:end] = v
        return c.k[self.layer, :, :, :end], c.v[self.layer, :, :, :end]


class Attention(nn.Module):
    """Multi-head attention (B, T, dim) -> (B, T, dim), with the switches every supported family needs."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 q_bias: bool = False, k_bias: bool = False, v_bias: bool = False, o_bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-6, causal: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        self.causal = causal
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=q_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=v_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def forward(self, x, rope=None, mask=None, cache=None):
        """x (B, T, dim); rope (cos, sin) from rope_1d/rope_2d; mask (B or 1, 1, T, S) bool, True = may attend, or a
        Packed (causal within each packed sample); cache a KVCache layer hook. Returns (B, T, dim)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, hd), S = tokens cached so far
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(mask, Packed):
            return self.o_proj(packed_attention(q, k, v, mask, gqa).transpose(1, 2).flatten(2))
        S, is_causal = k.shape[2], False
        if mask is None and self.causal and T > 1:
            if T == S:
                is_causal = True
            else:  # a chunk after cached context: query i sees keys up to S - T + i
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=gqa)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class DualChannelAttention(nn.Module):
    """out = σ(a)·Attn(x) + (1−σ(a))·Attn+(x): `attn` pre-trained and frozen, `attn_plus` its trainable clone, the
    gate a ∈ R^D zero at init (σ(a) = 1/2: the output is unchanged) and per output channel, so each feature dimension
    decides how much new spatial attention it takes in. The channels run as two plain attention calls: fusing them
    (one qkv matmul, one SDPA over 2H heads) made a CPU training step slower, as it also computes weight gradients for
    the frozen half (BENCHMARKS.md, bench/bench_vit.py)."""

    def __init__(self, attn: Attention):
        super().__init__()
        if attn.q_norm is not None:
            raise ValueError("DualChannelAttention supports attention without q/k norm (the ViT families)")
        w = attn.o_proj.weight
        self.attn, self.attn_plus = attn.requires_grad_(False), copy.deepcopy(attn).requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))

    def forward(self, x, rope=None, mask=None, cache=None):
        if cache is not None:
            raise ValueError("DualChannelAttention is for encoders: it takes no KV cache")
        g = torch.sigmoid(self.gate)  # (D,)
        return g * self.attn(x, rope, mask) + (1 - g) * self.attn_plus(x, rope, mask)  # (B, T, D)


def add_dual_channel(model: nn.Module) -> nn.Module:
    """In place: wrap every `Attention` of `model` in a `DualChannelAttention`, then freeze everything except the
    Attn+ weights and the gates. The model's outputs are unchanged by this call. Returns the model."""
    if any(isinstance(m, DualChannelAttention) for m in model.modules()):
        raise ValueError("add_dual_channel: the model already has dual-channel attention")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not targets:
        raise ValueError("add_dual_channel: the model has no Attention module to wrap")
    model.requires_grad_(False)
    for name, attn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DualChannelAttention(attn))
    return model


class LoRALinear(nn.Module):
    """base(x) + B·A·x: a frozen Linear plus a trainable rank-r update, B zero-initialised (output unchanged). For
    the paper's ablation of how the encoder trains (dual channel vs full fine-tuning vs LoRA vs frozen)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.lora_b @ self.lora_a
        return self.base


def add_lora(model: nn.Module, rank: int = 8) -> nn.Module:
    """In place: LoRA on the q/k/v/o projections of every `Attention`; only the LoRA factors train afterwards."""
    model.requires_grad_(False)
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, LoRALinear(getattr(attn, name), rank))
    return model


def tune_encoder(vit: nn.Module, mode: str, lora_rank: int = 8) -> nn.Module:
    """In place: stage 3's trainable part of a frozen encoder (train.py --vision-tune; every teacher trains the same
    one): dual (Attn+ and gates), dual-qk (only Attn+'s q/k: where tokens look, not what they read), lora, full or
    frozen. What no gradient reaches stays frozen, since DDP waits for every trainable tensor: the mask token and
    SigLIP's pooling head (the projector and a depth teacher's head read patch tokens)."""
    if mode in ("dual", "dual-qk"):
        add_dual_channel(vit)  # Attn+ and gates trainable, the rest of the ViT frozen
        if mode == "dual-qk":  # one-step tests: most of stage 3's forgetting is in Attn+'s v/o
            for name, p in vit.named_parameters():
                if ".attn_plus.v_proj." in name or ".attn_plus.o_proj." in name:
                    p.requires_grad_(False)
    elif mode == "lora":
        add_lora(vit, lora_rank)
    elif mode == "full":
        vit.requires_grad_(True)
    for m in (getattr(vit, "mask_token", None), getattr(vit, "head", None)):
        m.requires_grad_(False) if m is not None else None
    return vit


def merge_lora(model: nn.Module) -> nn.Module:
    """In place: fold every LoRA update into its Linear (W += B·A), leaving a plain model."""
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(attn, name)
            if isinstance(proj, LoRALinear):
                setattr(attn, name, proj.merged())
    return model
