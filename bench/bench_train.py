"""
The stage-3 training step of the small preset (DINOv2-S/14 + projector + SmolLM2-135M, LLM frozen) against the same
model composed from transformers' classes: Dinov2Model -> our Projector -> LlamaForCausalLM(inputs_embeds=...,
labels=...), on the same weights, batch and sequence.

    python bench/bench_train.py [--batch 4] [--text 448] [--supervised 0.4] [--iters 5] [--threads 2]
    python bench/bench_train.py --compare dtypes [--rounds 4] [--batch 4] [--data DIR] [--stage 3] [--random]
    python bench/bench_train.py --compare compile [--rounds 4] ...

--compare runs train.py's own step (forward_backward, clipping, AdamW) of the small preset on real data (64 spatial
samples at 224 px generated into a temporary dir unless --data is given), the two variants in turn on the same
micro-batch, round after round, in one process: a busy machine then slows both alike, and the ratio per round is the
number to trust. `dtypes`: fp32 against bf16 autocast; `compile`: bf16 eager against bf16 with every block compiled
(train.py --compile on; the first rounds include compilation and are not timed). --random: random weights of the real
shapes instead of weights/ (speed does not depend on the values).

Both sides compute the same model and train the same tensors: the transformers side wraps each Dinov2Attention in
the same gated pair (frozen original, trainable clone, zero-initialised gate; `HFDualChannel` below), so the only
differences are the implementations. Each variant runs in a fresh subprocess so that its peak RSS is its own.
Needs weights/ (python tools/offline_weights.py).
"""

import argparse
import copy
import dataclasses
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402


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


def compare_setup(args):
    """train.py's small-preset stage model (weights/ or random of the same shapes) and the first rounds' micro-batches
    of its training plan."""
    import train
    from dataengine.writer import write_dataset
    from gpu_check import random_sources
    from llm import Tokenizer
    from training.dataset import collate

    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    data = args.data or str(write_dataset("spatial", tmp / "spatial", n=64, seed=0, size=224, progress=False).parent)
    argv = ["--preset", "small", "--stage", str(args.stage), "--data", data, "--batch-size", str(args.batch),
            "--global-batch", str(args.batch), "--runs-dir", str(tmp / "runs"), "--no-probe", "--device", "cpu"]
    if args.random:
        real = ROOT / "weights" / "smollm2-135m-instruct"
        tok = Tokenizer.load(real) if real.exists() else Tokenizer.byte_level()  # byte-level: ~2x the tokens
        sources = random_sources("small", tmp, tok, dry=False)
        argv += ["--vision", sources["vision"], "--llm", sources["llm"]]
    cfg = train.parse_config(argv)
    rt = train.setup_runtime(cfg)
    vlm, tok, _, _ = train.stage_model(cfg, rt, tmp / "out")
    ds = train.stage_data(cfg, rt, vlm, tok)[0]
    plan = train.batch_plan(cfg, len(ds), 1, 0, 0, args.rounds + 2)[2]
    batches = [collate([ds[i] for i in idx], pad_id=tok.pad_id) for idx in plan]
    return train, cfg, rt, vlm, batches, tmp


def compare(args):
    """Two variants of train.py's step in turn on the same micro-batch each round; the first two rounds warm up."""
    torch.set_num_threads(args.threads)
    train, cfg, rt, vlm, batches, tmp = compare_setup(args)
    if args.compare == "dtypes":
        variants = {"fp32": (vlm, dataclasses.replace(rt, amp_dtype=None)),
                    "bf16": (vlm, dataclasses.replace(rt, amp_dtype=torch.bfloat16))}
    else:
        compiled = copy.deepcopy(vlm)
        for block in list(compiled.vit.blocks) + list(compiled.lm.model.layers):
            block.compile()  # as train.prepare does for --compile on
        bf16 = dataclasses.replace(rt, amp_dtype=torch.bfloat16)
        variants = {"bf16 eager": (vlm, bf16), "bf16 compiled": (compiled, bf16)}
    opts = {name: torch.optim.AdamW(train.param_groups(m, cfg), lr=cfg.lr) for name, (m, _) in variants.items()}
    times = {name: [] for name in variants}
    print(f"stage {args.stage}, small preset, CPU {cpu_model()}, {torch.get_num_threads()} threads, batch "
          f"{args.batch}, torch {torch.__version__}; per round: the same micro-batch for each variant")
    for r, batch in enumerate(batches):
        line = f"round {r} ({batch['n_tokens']} tokens, T={batch['ids'].shape[1]}):"
        for name, (model, rt_v) in variants.items():
            t0 = time.perf_counter()
            train.forward_backward(model, model, [batch], rt_v)
            train.reduce_and_clip(model, cfg, 1)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            times[name].append((dt, batch["n_tokens"]))
            line += f" {name} {dt:.2f} s"
        print(line + ("  (warm-up)" if r < 2 else ""), flush=True)
    a, b = variants
    for name in variants:
        dt = statistics.median(t for t, _ in times[name][2:])
        tok = statistics.median(n / t for t, n in times[name][2:])
        print(f"{name:<14} {dt:7.2f} s/step (median)  {tok:6.0f} tokens/s")
    ratios = [ta / tb for (ta, _), (tb, _) in zip(times[a][2:], times[b][2:])]
    print(f"{a} / {b} per round: {' '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}x "
          f"on {cpu_model()}")  # the ratio depends on the CPU (AMX or not): it goes with every row
    shutil.rmtree(tmp)


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
    ap.add_argument("--compare", choices=["dtypes", "compile"], help="train.py's step, two variants in turn")
    ap.add_argument("--rounds", type=int, default=4, help="--compare: timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--stage", type=int, default=3, help="--compare: the stage")
    ap.add_argument("--data", default="", help="--compare: dataset dir(s) as train.py --data takes them")
    ap.add_argument("--random", action="store_true", help="--compare: random weights of the real shapes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        return compare(args)
    if args.child:
        return child(args)
    print(f"stage-3 step, small preset, CPU fp32 on {cpu_model()}, {args.threads} threads, batch {args.batch}, "
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
