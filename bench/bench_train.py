"""
The stage-3 training step of the small preset (DINOv2-S/14 + projector + SmolLM2-135M, LLM frozen) against the same
model composed from transformers' classes: Dinov2Model -> our Projector -> LlamaForCausalLM(inputs_embeds=...,
labels=...), on the same weights, batch and sequence.

    python bench/bench_train.py [--batch 4] [--text 448] [--supervised 0.4] [--iters 5] [--threads 2]

Both sides compute the same model and train the same tensors: the transformers side wraps each Dinov2Attention in
the same gated pair (frozen original, trainable clone, zero-initialised gate; `HFDualChannel` below), so the only
differences are the implementations. Each variant runs in a fresh subprocess so that its peak RSS is its own.
Needs weights/ (python tools/offline_weights.py).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import copy

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def batch(args, image_token_id, n_img, vocab):
    g = torch.Generator().manual_seed(0)
    T = n_img + args.text
    ids = torch.randint(3, 2000, (args.batch, T), generator=g)
    ids[:, 8:8 + n_img] = image_token_id  # the image sits after a short system/user header, as render puts it
    weights = torch.zeros(args.batch, T)
    n_sup = int(args.supervised * args.text)
    weights[:, T - n_sup:] = 1.0  # the answers: the last part of the text
    pixels = torch.randn(args.batch, 3, 224, 224, generator=g)
    return ids, weights, pixels


def run_ours(args):
    import train

    cfg = train.parse_config(["--preset", "small", "--stage", "3", "--no-probe"])
    vlm, tok = train.build_base(cfg, train.base_sources(cfg, ROOT / "runs" / "bench", print, write=False))
    train.set_trainable(vlm, cfg)
    n_img = vlm.n_image_tokens(224)
    ids, weights, pixels = batch(args, vlm.image_token_id, n_img, len(tok))
    n = float((weights[:, 1:] > 0).sum())

    def step():
        vlm.zero_grad(set_to_none=True)
        (vlm(ids, pixels, weights) / n).backward()
    return step, ids.shape


class HFDualChannel(nn.Module):
    """σ(a)·Attn(x) + (1−σ(a))·Attn+(x) around a transformers Dinov2Attention (which returns (out, weights))."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn.requires_grad_(False)
        self.attn_plus = copy.deepcopy(attn).requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(attn.o_proj.out_features))

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        g = torch.sigmoid(self.gate)
        out = g * self.attn(hidden_states, attention_mask, **kwargs)[0]
        return out + (1 - g) * self.attn_plus(hidden_states, attention_mask, **kwargs)[0], None


def run_transformers(args):
    from transformers import Dinov2Model, LlamaForCausalLM

    from model import Projector

    vit = Dinov2Model.from_pretrained(ROOT / "weights" / "dinov2-s14", attn_implementation="sdpa")
    lm = LlamaForCausalLM.from_pretrained(ROOT / "weights" / "smollm2-135m-instruct", attn_implementation="sdpa")
    lm.resize_token_embeddings(lm.config.vocab_size + 1)  # the <image> token, as ours adds it
    image_token_id = lm.config.vocab_size - 1
    proj = Projector(384, lm.config.hidden_size, merge=2)
    vit.requires_grad_(False)
    lm.requires_grad_(False)
    for layer in vit.encoder.layer:  # the same dual channel as ours: only Attn+ and the gates train
        layer.attention = HFDualChannel(layer.attention)
    lm.eval()
    vit.train()
    n_img = proj.n_tokens(16, 16)
    ids, weights, pixels = batch(args, image_token_id, n_img, lm.config.vocab_size)
    labels = torch.where(weights > 0, ids, torch.full_like(ids, -100))

    def step():
        vit.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        patches = vit(pixel_values=pixels).last_hidden_state[:, 1:].reshape(args.batch, 16, 16, -1)
        embeds = lm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == image_token_id)[..., None], proj(patches))
        lm(inputs_embeds=embeds, labels=labels).loss.backward()  # mean over the same supervised tokens
    return step, ids.shape


def child(args):
    torch.set_num_threads(args.threads)
    step, shape = {"ours": run_ours, "transformers": run_transformers}[args.child](args)
    step()
    step()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"variant": args.child, "seconds": dt, "peak_rss_gib": rss, "batch": shape[0], "seq": shape[1]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=448, help="text tokens per sample (plus 64 image tokens)")
    ap.add_argument("--supervised", type=float, default=0.4, help="fraction of the text the loss covers")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"stage-3 step, small preset, CPU fp32, {args.threads} threads, batch {args.batch}, "
          f"{args.text} text + 64 image tokens, {args.supervised:.0%} of the text supervised, torch {torch.__version__}")
    results = {}
    for variant in ("transformers", "ours"):
        cmd = [sys.executable, __file__, "--child", variant] + [f"--{k}={v}" for k, v in vars(args).items()
                                                                  if k != "child"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[variant] = r
        tok_s = r["batch"] * r["seq"] / r["seconds"]
        print(f"{variant:<13} {r['seconds'] * 1000:8.0f} ms/step  {r['batch'] / r['seconds']:6.2f} samples/s  "
              f"{tok_s:7.0f} tokens/s  peak RSS {r['peak_rss_gib']:.2f} GiB")
    print(f"speed-up: {results['transformers']['seconds'] / results['ours']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
