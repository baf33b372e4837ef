"""
The language model f_L: Llama / SmolLM2, Qwen2 and Qwen3 decoders in one class, loaded from HF-layout safetensors
or a GGUF file, with a chunked supervised loss and KV-cache generation. The tokenizer lives in language/tokenizer.py
and is re-exported here.

    lm, tok = load_llm("weights/smollm2-135m-instruct")   # or a .gguf file
    logits = lm(idx)                                        # (B, T) -> (B, T, V), equal to transformers' logits
    h = lm.hidden(embeds=x, positions=pos, mask=m)          # (B, T, D) after the final norm (the VLM's path)
    loss = lm.loss(h, ids, mask)                            # only supervised positions reach the vocabulary
    new = lm.generate(idx, pad_mask=..., stop_ids=tok.stop_ids)

Module and parameter names follow transformers' checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...), so
a checkpoint loads by name, and `lm.state_dict()` can be written back as one.

The families differ only in switches: Qwen2 has q/k/v biases and (usually) an untied head, Qwen3 RMS-normalizes q
and k per head, Llama-3 rescales RoPE frequencies. All attention goes through attention.Attention (SDPA, GQA).
"""

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import Attention, KVCache, Packed, RMSNorm, rope_1d
from language.tokenizer import Tokenizer, gguf_field, gguf_tokenizer_files, open_gguf
from storage.atomic import read_json
from storage.tensors import listed, non_float, read_safetensors, state_diff, write_model_dir

__all__ = ["LLMConfig", "LLM", "Tokenizer", "load_llm", "save_llm", "gguf_to_hf", "block_causal", "packed_cuts"]

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# logit elements per chunk of the supervised loss: 64 MB in fp32 on CPU (cache-sized); 512 MB on a GPU, where each
# chunk under bf16 also adds a (V, D) fp32 copy of the head's gradient: few chunks (~880 rows of Qwen's 152K vocab)
LOSS_CHUNK, LOSS_CHUNK_CUDA = 2**24, 2**27


@dataclass
class LLMConfig:
    """Defaults are a tiny random model over the byte-level tokenizer (256 bytes + 3 specials + <image>)."""
    vocab_size: int = 260
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 352
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", "factor", ...}
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama / Qwen3 attention_bias=true sets q, k, v and o biases
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    tie_embeddings: bool = True
    max_seq_len: int = 2048  # the checkpoint's context length (informational)
    model_type: str = "llama"

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @classmethod
    def from_hf(cls, c: dict, source: str = "config.json") -> "LLMConfig":
        """From a transformers config.json (4.x layout with rope_theta/rope_scaling, or 5.x rope_parameters)."""
        mt = c.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(FAMILIES)})")
        arch = (c.get("architectures") or [FAMILIES[mt]])[0]
        if arch != FAMILIES[mt]:
            raise ValueError(f"{source}: architecture {arch!r} is not supported (expected {FAMILIES[mt]!r} for "
                             f"model_type {mt!r})")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {c['hidden_act']!r} is not supported (expected 'silu')")
        if c.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")

        def need(key):
            if key not in c:
                raise ValueError(f"{source}: missing {key!r}")
            return c[key]

        rope = dict(c.get("rope_parameters") or {})  # transformers 5.x keeps theta and scaling here
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        scaling = c.get("rope_scaling") or rope or None
        kind = scaling and scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif scaling is not None and kind != "llama3":
            raise ValueError(f"{source}: rope type {kind!r} is not supported (supported: default, llama3)")
        bias = bool(c.get("attention_bias", False))
        n_heads = need("num_attention_heads")
        return cls(vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
                   n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
                   head_dim=c.get("head_dim") or need("hidden_size") // n_heads, ffn_dim=need("intermediate_size"),
                   norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                   qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
                   mlp_bias=bool(c.get("mlp_bias", False)) if mt == "llama" else False, qk_norm=mt == "qwen3",
                   tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                   max_seq_len=c.get("max_position_embeddings", 2048), model_type=mt)

    def to_hf(self) -> dict:
        """A transformers config.json for this model (4.x key layout, which 5.x reads too)."""
        mt = self.model_type
        fits = {"llama": self.qkv_bias == self.o_bias and not self.qk_norm,
                "qwen2": self.qkv_bias and not self.o_bias and not self.mlp_bias and not self.qk_norm,
                "qwen3": self.qkv_bias == self.o_bias and self.qk_norm and not self.mlp_bias}.get(mt)
        if not fits:
            raise ValueError(f"to_hf: these switches cannot be written as a {mt!r} config: {self}")
        c = {"architectures": [FAMILIES[mt]], "model_type": mt, "vocab_size": self.vocab_size,
             "hidden_size": self.dim, "intermediate_size": self.ffn_dim, "num_hidden_layers": self.n_layers,
             "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
             "hidden_act": "silu", "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
             "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
             "tie_word_embeddings": self.tie_embeddings}
        if mt != "qwen2":
            c["attention_bias"] = self.o_bias
        if mt == "llama":
            c["mlp_bias"] = self.mlp_bias
        return c


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, q_bias=cfg.qkv_bias,
                                   k_bias=cfg.qkv_bias, v_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm,
                                   norm_eps=cfg.norm_eps, causal=True)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg = replace(cfg)  # our own copy: resize_vocab edits it
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each block in backward instead of storing its activations
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # transformers' initializer_range
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, idx):
        return self.model.embed_tokens(idx)  # (B, T) -> (B, T, D)

    def hidden(self, idx=None, embeds=None, positions=None, mask=None, cache: KVCache | None = None):
        """Token ids (B, T) or input embeddings (B, T, D) -> hidden states (B, T, D) after the final norm.
        positions: (T,) or (B, T) per-sample RoPE positions; default 0..T-1 (after the cache's length with a cache).
        mask: (B or 1, 1, T, S) bool, True = may attend; it replaces the causal mask, so it must be causal itself
        (`block_causal` builds one for packed rows), or a Packed (`packed_cuts`: the same rows without a (T, T) mask).
        cache: a KVCache, advanced by T."""
        x = self.embed(idx) if embeds is None else embeds  # (B, T, D)
        T = x.shape[1]
        if positions is None:
            start = cache.pos if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device)  # (T,)
        rope = rope_1d(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        for i, layer in enumerate(self.model.layers):
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, idx, positions=None, mask=None):
        """(B, T) token ids -> (B, T, V) logits. For inference and tests: training uses hidden() + loss()."""
        return self.lm_head(self.hidden(idx, positions=positions, mask=mask))

    def loss(self, h, ids, weights, reduction: str = "sum", n: int | None = None):
        """Weighted next-token cross-entropy over the supervised tokens only. h (B, T, D) from hidden(); ids (B, T)
        the input ids; weights (B, T), render's mask as is: weights[b, t] > 0 marks ids[b, t] as a token to produce,
        predicted from h[b, t-1] (the shift happens here, so weights[:, 0] is never used). Returns sum(w * CE)
        ("sum"; the trainer divides by the global supervised-token count) or that over sum(w) ("mean": transformers'
        loss with -100 labels for 0/1 weights). Only supervised rows of h meet the vocabulary, one chunk at a time.
        n: the number of supervised tokens when the caller knows it (collate's n_supervised): no host sync then."""
        w = weights[:, 1:].float().flatten()  # (B*(T-1),)
        sel = w > 0
        rows = sel.nonzero().squeeze(1) if n is None else torch.nonzero_static(sel, size=n).squeeze(1)  # (N,)
        hs = h[:, :-1].flatten(0, 1).index_select(0, rows)  # (N, D)
        targets, ws = ids[:, 1:].flatten().index_select(0, rows), w.index_select(0, rows)  # (N,), (N,)
        chunk = max(1, (LOSS_CHUNK_CUDA if h.is_cuda else LOSS_CHUNK) // self.lm_head.weight.shape[0])
        total = LinearCrossEntropy.apply(hs, self.lm_head.weight, targets, ws, chunk)
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / ws.sum().clamp_min(1e-12)
        raise ValueError(f"loss: reduction must be 'sum' or 'mean', got {reduction!r}")

    @torch.no_grad()
    def resize_vocab(self, n: int):
        """Grow the embeddings (and an untied head) to n rows; new rows start at the mean of the old ones, the usual
        start for added tokens such as <image>. Smaller n does nothing."""
        old = self.model.embed_tokens.weight
        if n <= old.shape[0]:
            return

        def grown(w):
            out = torch.cat([w, w.mean(0, keepdim=True).expand(n - w.shape[0], -1)])  # (n, D)
            return nn.Parameter(out, requires_grad=w.requires_grad)

        self.model.embed_tokens.weight = grown(old)
        self.model.embed_tokens.num_embeddings = n
        self.lm_head.weight = self.model.embed_tokens.weight if self.cfg.tie_embeddings else grown(self.lm_head.weight)
        self.lm_head.out_features = self.cfg.vocab_size = n

    @torch.no_grad()
    def generate(self, idx=None, embeds=None, pad_mask=None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_ids=(), generator=None) -> list[list[int]]:
        """Continue prompts given as ids (B, T) or embeddings (B, T, D), left-padded when of unequal length: pad_mask
        (B, T) bool, True on real tokens (None = no padding). temperature 0 is greedy, else sampling from
        softmax(logits / temperature), optionally limited to the top_k tokens and/or the smallest set with probability
        >= top_p. Returns, per sample, the new token ids up to (not including) the first of `stop_ids`."""
        x = self.embed(idx) if embeds is None else embeds  # (B, T, D)
        B, T, _ = x.shape
        dev = x.device
        cache = KVCache(self.cfg.n_layers, B, self.cfg.n_kv_heads, self.cfg.head_dim, T + max_new_tokens, dev, x.dtype)
        if pad_mask is None:
            positions, mask, valid = None, None, None
            next_pos = torch.full((B,), T, device=dev)
        else:
            pad_mask = pad_mask.to(dev, torch.bool)
            positions = (pad_mask.long().cumsum(1) - 1).clamp_min(0)  # (B, T): each prompt starts at 0
            valid = torch.cat([pad_mask, pad_mask.new_ones(B, max_new_tokens)], 1)  # (B, T + new) keys that exist
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            # pad queries see themselves: a row with no key makes SDPA return NaN, which 0-weights would then spread
            mask = ((causal & valid[:, None, :T]) | torch.eye(T, dtype=torch.bool, device=dev))[:, None]  # (B, 1, T, T)
            next_pos = positions[:, -1] + 1
        h = self.hidden(embeds=x, positions=positions, mask=mask, cache=cache)[:, -1]  # (B, D)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        n = 0
        for n in range(1, max_new_tokens + 1):
            token = sample_next(self.lm_head(h).float(), temperature, top_k, top_p, generator)  # (B,)
            out[:, n - 1] = token
            done |= torch.isin(token, stops)
            if n == max_new_tokens or bool(done.all()):
                break
            step_mask = None if valid is None else valid[:, None, None, : cache.pos + 1]  # (B, 1, 1, S)
            h = self.hidden(token[:, None], positions=next_pos[:, None], mask=step_mask, cache=cache)[:, -1]
            next_pos = next_pos + 1
        stop_set = set(stop_ids)
        return [row[:next((j for j, t in enumerate(row) if t in stop_set), len(row))] for row in out[:, :n].tolist()]


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p; keeps the first
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def block_causal(segments: torch.Tensor):
    """Packing several samples into one row. segments (B, T) ints, equal along each sample's run -> positions (B, T)
    restarting at 0 in each sample, and mask (B, 1, T, T) bool: causal within a sample, nothing across. Pass both to
    hidden(); the loss needs weights 0 on each sample's first token (render's mask is). Numpy, block by block: an
    unwritten np.zeros costs nothing and small torch ops pay thread hand-offs (~10x faster than all pairs in torch)."""
    seg = segments.cpu().numpy()
    B, T = seg.shape
    starts = np.ones((B, T), bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(T), 0), axis=1)  # (B, T) index of the sample's start
    mask, tril = np.zeros((B, 1, T, T), bool), np.tri(T, dtype=bool)
    for r in range(B):
        bounds = np.flatnonzero(starts[r]).tolist() + [T]
        for a, b in zip(bounds, bounds[1:]):
            mask[r, 0, a:b, a:b] = tril[:b - a, :b - a]
    return torch.from_numpy(np.arange(T) - first).to(segments.device), torch.from_numpy(mask).to(segments.device)


def packed_cuts(segments: torch.Tensor) -> Packed:
    """segments (B, T) as block_causal takes them -> Packed: the sample boundaries in the rows flattened to B*T
    tokens (each row's padding run counts as a sample of its own). Numpy, on the host: collate calls it, so the
    trainer moves a few integers to the GPU and never a (B, 1, T, T) mask, and no host sync reads them back."""
    seg = segments.cpu().numpy()
    B, T = seg.shape
    starts = np.ones((B, T), bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    cuts = np.append(np.flatnonzero(starts.reshape(-1)), B * T).astype(np.int32)  # (S+1,)
    return Packed(torch.from_numpy(cuts), T)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, y_i) chunk by chunk. The gradients come out of the same pass (softmax - onehot is at
    hand then), so no chunk's logits are kept for backward and none are recomputed. W's gradient (V, D) is only
    computed when W trains (not for the frozen LLM of stage 3). Under autocast the matmuls run in the autocast dtype,
    as nn.Linear's would; log-softmax and the weight-gradient sum are fp32 either way."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):  # every cast below is explicit
            hh, W = h.to(dtype), weight.to(dtype)  # (N, D), (V, D)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hh) if need_h else None  # (N, D)
            grad_w = torch.zeros(W.shape, dtype=torch.float32, device=h.device) if need_w else None  # (V, D)
            for s in range(0, h.shape[0], chunk):
                hc, yc, wc = hh[s : s + chunk], targets[s : s + chunk], w[s : s + chunk]
                logp = torch.log_softmax(hc @ W.T, -1, dtype=torch.float32)  # (n, V)
                total -= (logp.gather(1, yc[:, None]).squeeze(1) * wc).sum()
                if need_h or need_w:
                    g = logp.exp_()  # softmax, in place
                    g[torch.arange(len(yc), device=g.device), yc] -= 1
                    g = g.mul_(wc[:, None]).to(dtype)  # (n, V) d total / d logits
                    if need_h:
                        torch.mm(g, W, out=grad_h[s : s + chunk])
                    if need_w and dtype == torch.float32:
                        grad_w.addmm_(g.T, hc)  # accumulate in place: no (V, D) temporary per chunk
                    elif need_w:
                        grad_w += (g.T @ hc).float()
        # on ctx (neither inputs nor outputs): backward scales them in place and hands them over, no second buffer
        ctx.grads = tuple(g if g is None else g.to(t.dtype) for g, t in ((grad_h, h), (grad_w, weight)))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("LinearCrossEntropy: backward ran twice through the same loss (retain_graph)")
        grads, ctx.grads = ctx.grads, None
        return *(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads), None, None, None


def load_llm(path, dtype: torch.dtype | None = None) -> tuple[LLM, Tokenizer]:
    """(model in eval mode, tokenizer) from an HF-layout dir (config.json, model.safetensors or its sharded index,
    tokenizer.json) or a .gguf file (llama, dequantized). dtype None keeps the checkpoint's (fp32 for GGUF)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        reader = open_gguf(path)
        cfg, sd = read_gguf(reader, str(path))
        tok = Tokenizer.from_hf(*gguf_tokenizer_files(reader, str(path)), source=str(path))
    elif path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"load_llm: {path} has no config.json")
        cfg = LLMConfig.from_hf(read_json(config), source=str(config))
        sd = read_safetensors(path)
        tok = Tokenizer.load(path)
    else:
        raise FileNotFoundError(f"load_llm: {path} is neither an HF-layout directory nor a .gguf file")
    return from_state_dict(cfg, sd, dtype, source=str(path)).eval(), tok


def from_state_dict(cfg: LLMConfig, sd: dict, dtype=None, source: str = "checkpoint") -> LLM:
    """An LLM holding exactly the tensors of `sd` (HF key names): every parameter filled, every tensor used, shapes
    equal, every tensor a float (never cast from integers) — otherwise a ValueError naming the keys at fault."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints; recomputed
    with torch.device("meta"):  # no random init of weights about to be replaced
        lm = LLM(cfg)
    expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    emb = "model.embed_tokens.weight"
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        head = sd.pop("lm_head.weight", None)
        if head is not None and not (emb in sd and torch.equal(head, sd[emb])):
            raise ValueError(f"{source}: the config ties the embeddings but lm_head.weight differs from {emb}")
    missing, unexpected, bad = state_diff(expected, sd)
    shapes = [f"{k}: {a} in the checkpoint, {b} expected" for k, a, b in bad]
    problems = [f"{what} keys: {listed(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if names]
    if problems:
        raise ValueError(f"{source}: the weights do not match the {cfg.model_type} config; " + "; ".join(problems))
    ints = non_float(sd)
    if ints:
        raise ValueError(f"{source}: not floating point where a float weight is expected: {listed(ints)}")
    dtype = dtype or sd[emb].dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd[emb]
    lm.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign replaced the shared Parameter by two
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return lm


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
                    "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', others unchanged (for the key check)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_NAMES:
        return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
    return gguf_name


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head for its RoPE; restore HF's rotate_half order."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_number(field, source: str, key: str, default=None, kind=int):
    """A numeric GGUF metadata value; a string or list where a number belongs names the file and the key."""
    value = field(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{source}: GGUF metadata {key!r} is {value!r}; expected a number")
    if kind is int and value != int(value):
        raise ValueError(f"{source}: GGUF metadata {key!r} is {value!r}; expected an integer")
    return kind(value)


def read_gguf(reader, source: str = "gguf") -> tuple[LLMConfig, dict]:
    """Config and dequantized fp32 tensors (HF names, q/k permutation undone) of a llama-architecture GGUF."""
    field = functools.partial(gguf_field, reader)
    f32 = lambda x: float(str(np.float32(x)))  # GGUF floats are f32: 1e-5 reads 9.99999975e-06; the shortest decimal
    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported (supported: 'llama')")
    names = {t.name for t in reader.tensors}
    if field("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"{source}: RoPE scaling in GGUF files is not supported")
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if field(f"llama.{key}") is None:
            raise ValueError(f"{source}: missing GGUF metadata 'llama.{key}'")
    num = functools.partial(gguf_number, field, source)
    dim, n_heads = num("llama.embedding_length"), num("llama.attention.head_count")
    n_kv = num("llama.attention.head_count_kv", n_heads)
    tokens = field("tokenizer.ggml.tokens")
    cfg = LLMConfig(vocab_size=num("llama.vocab_size", len(tokens) if tokens else 0), dim=dim,
                    n_layers=num("llama.block_count"), n_heads=n_heads, n_kv_heads=n_kv,
                    head_dim=num("llama.attention.key_length", dim // n_heads), ffn_dim=num("llama.feed_forward_length"),
                    norm_eps=f32(num("llama.attention.layer_norm_rms_epsilon", 1e-5, float)),
                    rope_theta=f32(num("llama.rope.freq_base", 10000.0, float)), tie_embeddings="output.weight" not in names,
                    max_seq_len=num("llama.context_length", 2048), model_type="llama")
    sd = {}
    for t in reader.tensors:
        w, name = _dequantized(t, source), _hf_name(t.name)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            w = _unpermute(w, n_heads if ".q_proj." in name else n_kv)
        sd[name] = w
    return cfg, sd


def _dequantized(t, source: str) -> torch.Tensor:
    """One GGUF tensor as fp32 in torch's dimension order. Integer tensors are refused, not cast: a float weight
    stored as integers is a broken file, and casting would load numbers no model was trained with."""
    import gguf
    kind = t.tensor_type.name
    if kind in ("I8", "I16", "I32", "I64"):
        raise ValueError(f"{source}: tensor {t.name!r} has type {kind} where a float (or quantized) weight is expected")
    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions fastest-first
    try:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    except NotImplementedError as e:
        raise ValueError(f"{source}: tensor {t.name!r} has type {kind}, which gguf cannot dequantize") from e
    return torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are views of the read-only map


def gguf_to_hf(gguf_path, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF checkpoint as an HF-layout dir that load_llm and transformers' from_pretrained read, atomically:
    config.json, model.safetensors (dequantized, in `dtype`, HF names, q/k permutation undone), tokenizer.json (the
    real pre-tokenizer, e.g. SmolLM2's Sequence[Digits, ByteLevel]), tokenizer_config.json (specials, chat template)."""
    reader = open_gguf(gguf_path)
    cfg, sd = read_gguf(reader, str(gguf_path))
    tj, tok_config = gguf_tokenizer_files(reader, str(gguf_path))
    from_state_dict(cfg, {k: v.to("meta") for k, v in sd.items()}, source=str(gguf_path))  # strict key check
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    config = {**cfg.to_hf(), **{f"{k}_token_id": tj["model"]["vocab"].get(tok_config.get(f"{k}_token"))
                                for k in ("bos", "eos", "pad")}, "torch_dtype": str(dtype).removeprefix("torch.")}
    files = {"config.json": config, "tokenizer.json": tj, "tokenizer_config.json": tok_config}
    return write_model_dir(out_dir, {k: v.to(dtype) for k, v in sd.items()}, files)


def save_llm(lm, tok, out: Path) -> Path:
    """An HF-layout dir (model.safetensors in transformers' names) plus our tokenizer cache, which load_llm reads."""
    state = {k: v for k, v in lm.state_dict().items() if not (lm.cfg.tie_embeddings and k == "lm_head.weight")}
    save_tok = lambda tmp: tok.save(tmp / "tokenizer.tiktoken")
    return write_model_dir(out, state, {"config.json": lm.cfg.to_hf()}, save_tok)
