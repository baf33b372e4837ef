"""
The vision side of SpatialBoost: one `ViT` for the DINOv2 / DINOv2-with-registers / DINOv3 / SigLIP / SigLIP2
families, `load_vit` for their Hugging Face checkpoints and for our own exports, image preprocessing per family,
and the LLaVA-style `Projector` that maps patch features into the language model's embedding space.

The families differ in a handful of switches (ViTConfig): how positions enter (a learned table interpolated to the
patch grid, or DINOv3's 2D RoPE), which prefix tokens exist (CLS, registers), layerscale, the MLP (GELU, tanh-GELU,
SwiGLU) and biases. Everything else is one transformer block, written once.
"""

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from attention import Attention, DualChannelAttention, add_dual_channel, rope_2d
from storage.atomic import read_json
from storage.tensors import listed, non_float, read_safetensors, state_diff, write_model_dir

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
EXPORT_TYPE = "spatialboost_vit"  # config.json model_type of the encoders this repo writes


@dataclass
class ViTConfig:
    family: str = "dinov2"  # dinov2 | dinov3 | siglip (SigLIP2 NaFlex loads as siglip with pos_resize="bilinear_aa")
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536  # hidden width of the MLP (per branch for gated MLPs)
    mlp_gated: bool = False  # down(act(gate(x)) * up(x)): DINOv2-giant SwiGLU, DINOv3 gated MLP
    act: str = "gelu"  # gelu | gelu_tanh | silu
    patch_size: int = 14
    image_size: int = 224  # the side images are resized to by default
    pos_grid: int = 16  # side of the learned position table (0 when positions come from RoPE)
    pos_resize: str = "bicubic"  # how the table meets other grids: bicubic | bicubic_aa | bilinear_aa
    rope_theta: float = 0.0  # > 0: DINOv3 2D RoPE on patch tokens
    cls_token: bool = True
    n_registers: int = 0
    layerscale: bool = True
    qkv_bias: bool = True
    k_bias: bool = True  # DINOv3 has q and v biases but no k bias
    mlp_bias: bool = True
    norm_eps: float = 1e-6
    pool_head: bool = False  # SigLIP's attention-pooling head
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def n_prefix(self):
        return int(self.cls_token) + self.n_registers


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.dim, cfg.mlp_dim, bias=cfg.mlp_bias) if cfg.mlp_gated else None
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, q_bias=cfg.qkv_bias, k_bias=cfg.qkv_bias and cfg.k_bias,
                              v_bias=cfg.qkv_bias, o_bias=True)
        self.ls1 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layerscale else None
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layerscale else None

    def forward(self, x, rope=None):
        h = self.attn(self.norm1(x), rope)
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class AttentionPool(nn.Module):
    """SigLIP's head: a learned probe attends over all tokens, then a residual MLP. (B, T, D) -> (B, D)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.dim, cfg.dim))  # q, k, v stacked (nn.MultiheadAttention)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.dim))
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        B, T, D = x.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        split = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, hd)
        q = split(F.linear(self.probe.expand(B, -1, -1), wq, bq))
        y = F.scaled_dot_product_attention(q, split(F.linear(x, wk, bk)), split(F.linear(x, wv, bv)))
        y = self.out_proj(y.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        return (y + self.mlp(self.norm(y)))[:, 0]


class ViT(nn.Module):
    """pixels (B, 3, H, W), already normalized -> tokens (B, T, D) after the final norm, in the family's order:
    DINO [CLS, registers..., patches], SigLIP [patches]. H and W must be multiples of the patch size."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg, D = cfg, cfg.dim
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.cls_token else None
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.n_registers, D)) if cfg.n_registers else None
        # replaces masked patches in masked-image-modelling objectives (DINO checkpoints carry it)
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if cfg.family in ("dinov2", "dinov3") else None
        # learned table over [CLS (DINOv2 only), patch grid]; DINOv3 uses RoPE and has none
        n_pos = cfg.pos_grid**2 + (cfg.family == "dinov2")
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D)) if cfg.pos_grid else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = AttentionPool(cfg) if cfg.pool_head else None
        self.grad_checkpointing = False  # recompute block activations in backward: memory for compute
        self.apply(_init_weights)
        for p in (self.cls_token, self.register_tokens, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        if self.head is not None:
            nn.init.trunc_normal_(self.head.probe, std=0.02)
            nn.init.xavier_uniform_(self.head.in_proj_weight)

    def grid(self, height, width):
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def embed(self, pixels):
        """pixels (B, 3, H, W) -> tokens before the first block (B, T, D)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        B = pixels.shape[0]
        h, w = self.grid(*pixels.shape[2:])
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.cfg.family == "dinov2":  # positions cover [CLS, patches]; registers are added after, position-free
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self._positions(h, w)
            if self.register_tokens is not None:
                x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
            return x
        if self.pos_embed is not None:
            x = x + self._positions(h, w)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.register_tokens) if t is not None]
        return torch.cat(prefix + [x], dim=1) if prefix else x

    def _positions(self, h, w):
        """The learned table resized to an h x w grid, as each family's reference does it."""
        table, g = self.pos_embed, self.cfg.pos_grid
        n_cls = table.shape[1] - g * g
        if h == w == g:
            return table
        grid = table[:, n_cls:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
        mode = self.cfg.pos_resize
        grid = F.interpolate(grid, size=(h, w), mode=mode.removesuffix("_aa"), align_corners=False,
                             antialias=mode.endswith("_aa"))
        grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([table[:, :n_cls], grid], dim=1)

    def _rope(self, h, w, device):
        theta = self.cfg.rope_theta
        return rope_2d(h, w, self.cfg.dim // self.cfg.heads, theta, device=device) if theta else None

    def blocks_forward(self, x, rope=None, keep=(), stop=None):
        """Blocks 0..stop (default all) -> (the last hidden state, the un-normed outputs of the blocks in `keep`)."""
        kept = []
        for i, block in enumerate(self.blocks[: None if stop is None else stop + 1]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
            if i in keep:
                kept.append(x)
        return x, kept

    def forward(self, pixels):
        x, _ = self.blocks_forward(self.embed(pixels), self._rope(*self.grid(*pixels.shape[2:]), pixels.device))
        return self.norm(x)  # (B, T, D)

    def pool(self, tokens):
        """One vector per image: SigLIP's attention-pooling head when present, else the CLS token. (B, D)"""
        if self.head is not None:
            return self.head(tokens)
        return tokens[:, 0] if self.cls_token is not None else tokens.mean(1)

    def patch_grid(self, pixels, layer=-1):
        """The projector's input: block `layer`'s patch tokens after the final norm (B, h, w, D), no later block run."""
        h, w = self.grid(*pixels.shape[2:])
        x, _ = self.blocks_forward(self.embed(pixels), self._rope(h, w, pixels.device), stop=layer % len(self.blocks))
        return self.norm(x[:, self.cfg.n_prefix:]).reshape(x.shape[0], h, w, -1)

    def features(self, pixels, layers=(-1,)):
        """What the probes read, every tensor after the final norm (as DINOv2's get_intermediate_layers(norm=True)):
        cls (B, D) or None, registers (B, R, D), patches (B, h, w, D) of the last block, pooled (B, D), and for each
        requested block index (negative counts from the end) `layers` (B, h, w, D) and `layers_cls` (B, D) or None."""
        h, w = self.grid(*pixels.shape[2:])
        idx = [i % len(self.blocks) for i in layers]
        x, kept = self.blocks_forward(self.embed(pixels), self._rope(h, w, pixels.device), keep=set(idx))
        by_index = dict(zip(sorted(set(idx)), kept))
        n, B = self.cfg.n_prefix, pixels.shape[0]
        split = lambda t: (t[:, 0] if self.cfg.cls_token else None, t[:, n:].reshape(B, h, w, -1))
        tokens = self.norm(x)
        (cls, patches), per_layer = split(tokens), [split(self.norm(by_index[i])) for i in idx]
        return {"cls": cls, "registers": tokens[:, int(self.cfg.cls_token):n], "patches": patches,
                "pooled": self.pool(tokens), "layers": [p for _, p in per_layer],
                "layers_cls": [c for c, _ in per_layer]}


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def preprocess(images, cfg: ViTConfig, size: int | None = None, crop: bool = False):
    """PIL images, uint8 arrays (H, W, 3) or a uint8 tensor (B, 3, H, W) -> float (B, 3, S, S), normalized. The
    default squashes the image to S x S: every pixel stays in view, so the normalized (u/W, v/H) coordinates of our
    questions keep their content. crop=True: DINOv2's classification policy (short side to S·256/224, centre crop)."""
    size = size or cfg.image_size
    if isinstance(images, torch.Tensor):
        batch = [images] if images.dim() == 4 else [images[None]]
    else:
        items = images if isinstance(images, (list, tuple)) else [images]
        batch = [_to_uint8_chw(im) for im in items]
    out = []
    for x in batch:  # images of different sizes are resized one by one; a stacked batch in one call
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {x.dtype}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels, got an image of shape {tuple(x.shape)}")
        x = x.float()
        if crop:
            H, W = x.shape[-2:]
            s = round(size * 256 / 224)
            new = (s, max(s, round(W * s / H))) if H <= W else (max(s, round(H * s / W)), s)
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        elif tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(x.clamp(0, 255))
    return (torch.cat(out) / 255.0 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)


def _to_uint8_chw(image):
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None]  # (1, 3, H, W); a copy: PIL arrays are read-only


class Projector(nn.Module):
    """LLaVA-1.5's Linear -> GELU -> Linear, after merging each merge x merge block of patches into one token (pixel
    shuffle: a 32x32 grid costs 256 LLM tokens at merge 2). patches (B, h, w, D) -> (B, N, llm_dim)."""

    def __init__(self, vision_dim: int, llm_dim: int, merge: int = 1, out_rms: float | None = None):
        super().__init__()
        self.merge = merge
        self.fc1 = nn.Linear(vision_dim * merge * merge, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        # out_rms: an RMSNorm on the output whose gain starts at the LLM's text-embedding RMS, so image tokens enter
        # the LLM at the scale of words (unnormalized, stage 1 grows them ~100x past it: train.py --projector-norm)
        self.out_gain = nn.Parameter(torch.full((llm_dim,), float(out_rms))) if out_rms else None

    def n_tokens(self, h, w):
        return math.ceil(h / self.merge) * math.ceil(w / self.merge)

    def forward(self, patches):
        m, (h, w) = self.merge, patches.shape[1:3]
        patches = F.pad(patches, (0, 0, 0, -w % m, 0, -h % m))  # odd grids: pad with zero patches
        return self.project(rearrange(patches, "b (h m1) (w m2) d -> b (h w) (m1 m2 d)", m1=m, m2=m))

    def project(self, x):
        """Merged blocks (..., merge * merge * vision_dim), row-major within the block -> (..., llm_dim)."""
        x = self.fc2(F.gelu(self.fc1(x)))
        if self.out_gain is None:
            return x
        return self.out_gain * F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)

    def at_points(self, grid, points):
        """One token per query point, made as an image token is but from the merge x merge block centred on the
        point: grid (N, h, w, D) patch features, points (P, 3) rows (image index, u, v) in [0, 1] -> (P, llm_dim).
        The block's patches are sampled bilinearly one patch apart, so a point on a token's centre gives exactly
        that token."""
        m, (h, w) = self.merge, grid.shape[1:3]
        offsets = (torch.arange(m, device=grid.device, dtype=torch.float32) - (m - 1) / 2)  # in patches
        u = points[:, 1, None] * w + offsets[None]                                         # (P, m) in patches
        v = points[:, 2, None] * h + offsets[None]
        xy = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), -1)        # (P, m, m, 2): (x, y)
        xy = xy / torch.tensor([w, h], device=grid.device) * 2 - 1                         # grid_sample's [-1, 1]
        feats = grid[points[:, 0].long()].permute(0, 3, 1, 2)                              # (P, D, h, w)
        block = F.grid_sample(feats.float(), xy, mode="bilinear", padding_mode="border", align_corners=False)
        return self.project(rearrange(block, "p d m1 m2 -> p (m1 m2 d)").to(grid.dtype))


def expect(ok: torch.Tensor, message):
    """A check of a bool tensor computed on the device: a ValueError with message() on the CPU; on a GPU an
    asynchronous assert, which does not stall the step on a host sync and still stops the run when it fails."""
    if ok.is_cuda:
        torch._assert_async(ok, "VLM.embed: the text's image or point tokens do not match the inputs")
    elif not ok:
        raise ValueError(message())


class VLM(nn.Module):
    """ViT -> Projector -> LLM, as LLaVA: each image's projected patch features take the places of its run of
    image-token ids in the text, so one sequence can hold several images (multi-view samples)."""

    def __init__(self, vit: ViT, projector: Projector, lm: nn.Module, image_token_id: int, feature_layer: int = -1,
                 point_token_id: int | None = None):
        super().__init__()
        self.vit, self.projector, self.lm = vit, projector, lm
        self.image_token_id, self.point_token_id = image_token_id, point_token_id
        self.feature_layer = feature_layer  # which ViT block the projector reads (-1: the last)

    def n_image_tokens(self, image_size: int) -> int:
        return self.projector.n_tokens(*self.vit.grid(image_size, image_size))

    def embed(self, ids, pixels=None, points=None):
        """ids (B, T) with image-token runs, pixels (N, 3, S, S) for the images in reading order, points (P, 3) for
        the point tokens in reading order (image index into pixels, u, v) -> (B, T, D)."""
        x = self.lm.embed(ids)
        is_image = ids == self.image_token_id
        n_points = 0 if points is None else points.shape[0]
        if self.point_token_id is not None:
            is_point = ids == self.point_token_id
            expect(is_point.sum() == n_points,
                   lambda: f"the text has {int(is_point.sum())} point tokens but {n_points} points were given")
        elif n_points:
            raise ValueError(f"{n_points} points were given to a model without point tokens")
        if pixels is None or pixels.shape[0] == 0:
            expect(~is_image.any(), lambda: "the text has image tokens but no images were given")
            if n_points:
                raise ValueError("points were given but no images")
            return x
        grid = self.vit.patch_grid(pixels, self.feature_layer)  # (N, h, w, vision_dim)
        img = self.projector(grid)  # (N, n_image_tokens, D)
        expect(is_image.sum() == img.shape[0] * img.shape[1], lambda: f"the text has {int(is_image.sum())} image "
               f"tokens but {img.shape[0]} images give {img.shape[0]} x {img.shape[1]}")
        x = x.masked_scatter(is_image[..., None], img.to(x.dtype))
        if n_points:
            x = x.masked_scatter(is_point[..., None], self.projector.at_points(grid, points).to(x.dtype))
        return x

    def forward(self, ids, pixels, weights, positions=None, mask=None, points=None, n_supervised=None):
        """The summed next-token loss over supervised tokens (weights: render's mask); the trainer normalizes it.
        n_supervised: their count when known (collate's), which spares the loss a host sync."""
        h = self.lm.hidden(embeds=self.embed(ids, pixels, points), positions=positions, mask=mask)  # (B, T, D)
        return self.lm.loss(h, ids, weights, reduction="sum", n=n_supervised)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], pixels, points=None, **kw) -> list[list[int]]:
        """Continue rendered prompts (image tokens expanded; `add_generation_prompt=True`), left-padded into one
        batch; pixels hold their images in order. kw go to LLM.generate (max_new_tokens, temperature, stop_ids...)."""
        T = max(len(p) for p in prompts)
        dev = next(self.lm.parameters()).device
        ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=dev)  # (B, T)
        pad_mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=dev)
        return self.lm.generate(embeds=self.embed(ids, pixels, points), pad_mask=pad_mask, **kw)


def _hf_config(cfg: dict, path) -> tuple[ViTConfig, list]:
    """Translate an HF config.json into (ViTConfig, key renames); the renames map checkpoint names to ours."""
    kind, get, need = cfg.get("model_type"), cfg.get, lambda key: _need(cfg, key, path)
    if kind in ("siglip", "siglip2") and "vision_config" in cfg:  # full image-text checkpoints: the vision tower
        return _hf_config({**cfg["vision_config"], "model_type": kind + "_vision_model"}, path)
    if kind not in ("dinov2", "dinov2_with_registers", "dinov3_vit", "siglip_vision_model", "siglip2_vision_model"):
        raise ValueError(f"{path}/config.json: unknown model_type {kind!r}; supported: dinov2, dinov2_with_registers, "
                         f"dinov3_vit, siglip_vision_model, siglip2_vision_model, siglip, siglip2, {EXPORT_TYPE}")
    shape = dict(dim=need("hidden_size"), depth=need("num_hidden_layers"), heads=need("num_attention_heads"))
    L, B = r"(\d+)", r"blocks.\1."  # a block index in the checkpoint's name -> the same block in ours
    dino = [(r"embeddings\.cls_token", "cls_token"), (r"embeddings\.mask_token", "mask_token"),
            (r"embeddings\.register_tokens", "register_tokens")]
    layerscale = lambda pre: [(pre + r"layer_scale([12])\.lambda1", B + r"ls\2"),
                              (pre + r"norm([12])\.", B + r"norm\2.")]
    if kind in ("dinov2", "dinov2_with_registers"):
        gated, ps = get("use_swiglu_ffn", False), get("patch_size", 14)
        hidden = int(shape["dim"] * get("mlp_ratio", 4))
        if gated:  # DINOv2's SwiGLU keeps 2/3 of the width, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        vc = ViTConfig(family="dinov2", **shape, mlp_dim=hidden, mlp_gated=gated, patch_size=ps,
                       act="silu" if gated else _act(get("hidden_act", "gelu"), path),
                       pos_grid=get("image_size", 518) // ps, n_registers=get("num_register_tokens", 0),
                       pos_resize="bicubic_aa" if kind == "dinov2_with_registers" else "bicubic",
                       qkv_bias=get("qkv_bias", True), norm_eps=get("layer_norm_eps", 1e-6))
        pre, attn = rf"encoder\.layer\.{L}\.", rf"encoder\.layer\.{L}\.attention\."
        return vc, dino + layerscale(pre) + [
            (r"embeddings\.position_embeddings", "pos_embed"),
            (r"embeddings\.patch_embeddings\.projection\.", "patch_embed."),
            (attn + r"attention\.query\.", B + "attn.q_proj."), (attn + r"attention\.key\.", B + "attn.k_proj."),
            (attn + r"attention\.value\.", B + "attn.v_proj."), (attn + r"output\.dense\.", B + "attn.o_proj."),
            (pre + r"mlp\.fc([12])\.", B + r"mlp.fc\2."),
            (pre + r"mlp\.weights_in\.", B + "mlp.weights_in."),  # split into gate/fc1 after renaming
            (pre + r"mlp\.weights_out\.", B + "mlp.fc2."), (r"layernorm\.", "norm.")]
    if kind == "dinov3_vit":
        if get("query_bias", True) != get("value_bias", True) or not get("proj_bias", True):
            raise ValueError(f"{path}: DINOv3 with query_bias != value_bias or without proj_bias is not supported")
        vc = ViTConfig(family="dinov3", **shape, mlp_dim=need("intermediate_size"), patch_size=get("patch_size", 16),
                       mlp_gated=get("use_gated_mlp", False), act=_act(get("hidden_act", "gelu"), path),
                       image_size=get("image_size", 224), pos_grid=0, rope_theta=get("rope_theta", 100.0),
                       n_registers=get("num_register_tokens", 0), qkv_bias=get("query_bias", True),
                       k_bias=get("key_bias", False), mlp_bias=get("mlp_bias", True),
                       norm_eps=get("layer_norm_eps", 1e-5))
        pre = rf"layer\.{L}\."
        return vc, dino + layerscale(pre) + [
            (r"embeddings\.patch_embeddings\.", "patch_embed."), (pre + r"attention\.", B + "attn."),
            (pre + r"mlp\.up_proj\.", B + "mlp.fc1."), (pre + r"mlp\.gate_proj\.", B + "mlp.gate."),
            (pre + r"mlp\.down_proj\.", B + "mlp.fc2."), (r"norm\.", "norm.")]
    ps, naflex = get("patch_size", 16), kind == "siglip2_vision_model"
    grid = math.isqrt(get("num_patches", 256)) if naflex else get("image_size", 224) // ps
    vc = ViTConfig(family="siglip", **shape, mlp_dim=need("intermediate_size"), patch_size=ps,
                   act=_act(get("hidden_act", "gelu_pytorch_tanh"), path), image_size=grid * ps, pos_grid=grid,
                   pos_resize="bilinear_aa" if naflex else "bicubic", cls_token=False, layerscale=False,
                   norm_eps=get("layer_norm_eps", 1e-6), pool_head=get("vision_use_head", True),
                   mean=SIGLIP_MEAN, std=SIGLIP_STD)
    pre = rf"encoder\.layers\.{L}\."
    return vc, [
        (r"embeddings\.patch_embedding\.", "patch_embed."), (r"embeddings\.position_embedding\.weight", "pos_embed"),
        (pre + r"layer_norm([12])\.", B + r"norm\2."), (pre + r"self_attn\.out_proj\.", B + "attn.o_proj."),
        (pre + r"self_attn\.", B + "attn."), (pre + r"mlp\.", B + "mlp."), (r"post_layernorm\.", "norm."),
        (r"head\.attention\.in_proj_", "head.in_proj_"), (r"head\.attention\.out_proj\.", "head.out_proj."),
        (r"head\.layernorm\.", "head.norm."), (r"head\.probe", "head.probe"), (r"head\.mlp\.", "head.mlp.")]


def _need(cfg: dict, key: str, path):
    if key not in cfg:
        raise ValueError(f"{path}/config.json: missing {key!r}, which a {cfg.get('model_type')} config needs")
    return cfg[key]


def _act(name, path):
    acts = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "silu": "silu", "swish": "silu"}
    if name not in acts:
        raise ValueError(f"{path}/config.json: hidden_act {name!r} is not supported ({sorted(acts)})")
    return acts[name]


def _rename_hf(state: dict, renames: list, cfg: ViTConfig, path) -> dict:
    """Checkpoint tensors -> our names and layouts. Tensors no rule matches are reported, never dropped."""
    out, unexpected = {}, []
    for key, t in state.items():
        k = key.removeprefix("vision_model.")
        if key.startswith(("text_model.", "logit_scale", "logit_bias")):
            continue  # the text tower of a full SigLIP checkpoint: not part of the vision encoder
        for pattern, repl in renames:
            if re.fullmatch(pattern + r".*", k):
                out[re.sub("^" + pattern, repl, k)] = t
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise KeyError(f"{path}: unexpected tensors for a {cfg.family} encoder: {listed(sorted(unexpected))}")
    for k in [k for k in out if ".mlp.weights_in." in k]:  # DINOv2 SwiGLU: [gate; up] stacked in one matrix
        gate, up = out.pop(k).chunk(2, dim=0)
        out[k.replace("weights_in", "gate")], out[k.replace("weights_in", "fc1")] = gate, up
    if "pos_embed" in out and cfg.family == "siglip":
        out["pos_embed"] = out["pos_embed"][None]  # (N, D) embedding table -> (1, N, D)
    w = out.get("patch_embed.weight")
    if w is not None and w.dim() == 2:  # SigLIP2 NaFlex: Linear over patches flattened in (ph, pw, c) order
        p = cfg.patch_size
        out["patch_embed.weight"] = w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2)
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    registers = out.get("register_tokens")
    if registers is not None and not cfg.n_registers and tuple(registers.shape) == (1, 0, cfg.dim):
        del out["register_tokens"]  # num_register_tokens=0: transformers saves an empty (1, 0, D) table
    return out


def check_state(module: nn.Module, state: dict, source) -> None:
    """Strict: every parameter filled with a float tensor of its shape, every tensor used; else a KeyError naming
    the keys at fault."""
    missing, unexpected, bad = state_diff({k: v.shape for k, v in module.state_dict().items()}, state)
    mismatches = "; ".join(f"{k}: file {a} vs expected {b}" for k, a, b in bad[:8])
    ints = non_float(state)
    problems = [f"missing tensors: {listed(missing)}" if missing else "",
                f"unexpected tensors: {listed(unexpected)}" if unexpected else "",
                f"shape mismatches: {mismatches}" if bad else "",
                f"not floating point where a float weight is expected: {listed(ints)}" if ints else ""]
    if any(problems):
        raise KeyError(f"{source}: " + " | ".join(p for p in problems if p))


def load_vit(path, dtype: torch.dtype | None = None) -> ViT:
    """An encoder from an HF-layout dir (config.json + safetensors) of a supported family, or from a dir written by
    `save_vit` (a stage-3 export included). Strict: every tensor used, every parameter filled."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    cfg_json = read_json(path / "config.json")
    state = read_safetensors(path)
    dual = False
    if cfg_json.get("model_type") == EXPORT_TYPE:
        names, vit_json = {f.name for f in fields(ViTConfig)}, _need(cfg_json, "vit", path)
        if not isinstance(vit_json, dict):
            raise ValueError(f"{path}/config.json: 'vit' should be an object of ViTConfig fields, got {vit_json!r}")
        vc = ViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vit_json.items() if k in names})
        dual = cfg_json.get("dual_channel", False)
    else:
        vc, renames = _hf_config(cfg_json, path)
        state = _rename_hf(state, renames, vc, path)
    if vc.pos_grid and "pos_embed" in state:  # the table's size, not config.image_size, fixes the grid
        vc.pos_grid = math.isqrt(state["pos_embed"].shape[1] - (vc.family == "dinov2"))
    with torch.device("meta"):  # no random init of weights about to be replaced
        vit = ViT(vc)
        if dual:
            add_dual_channel(vit)  # also sets requires_grad to what stage 3 trains
    check_state(vit, state, path)
    vit.load_state_dict(state, strict=True, assign=True)
    return vit.to(dtype).eval() if dtype is not None else vit.eval()


def save_vit(vit: ViT, path, state: dict | None = None) -> None:
    """An encoder as config.json + model.safetensors in our own names, atomically; `load_vit` reads it back exactly.
    state: its state_dict in full when the module holds shards (FSDP2)."""
    dual = any(isinstance(m, DualChannelAttention) for m in vit.modules())
    write_model_dir(path, vit.state_dict() if state is None else state, {"config.json": {"model_type": EXPORT_TYPE, "vit": asdict(vit.cfg),
                                                              "dual_channel": dual}})
