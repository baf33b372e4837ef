"""
ViT benchmark: our ViT against transformers' Dinov2Model on the same weights, and the dual-channel training step
against the plain one, with the two ways of running the dual channel side by side.

    python bench/bench_vit.py [--batch 8] [--size 224] [--iters 5] [--threads 2] [--device cpu|cuda] [--dtype fp32|bf16]
    python bench/bench_vit.py --compare-dtypes [--iters 5]    # ours in fp32 vs bf16 autocast (as train.py runs it)

Uses weights/dinov2-s14 when present (python tools/offline_weights.py), else a random ViT-S/14 of the same shape:
speed does not depend on the values. Prints one line per case: median seconds per call and images/s.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attention import DualChannelAttention, add_dual_channel, apply_rope  # noqa: E402
from model import load_vit  # noqa: E402


def fused_dual_forward(self: DualChannelAttention, x, rope=None, mask=None, cache=None):
    """The alternative the issue asks to try: both channels' q/k/v as one matmul, one SDPA over 2H heads, and both
    output projections (gates folded into their rows) as one matmul."""
    a, p = self.attn, self.attn_plus
    B, T, D = x.shape
    H, hd = a.n_heads, a.head_dim
    bias = lambda lin: lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=x.dtype, device=x.device)
    projs = [a.q_proj, p.q_proj, a.k_proj, p.k_proj, a.v_proj, p.v_proj]
    w = torch.cat([lin.weight for lin in projs])  # (6D, D): [q, q+, k, k+, v, v+]
    b = torch.cat([bias(lin) for lin in projs])
    qkv = F.linear(x, w, b).view(B, T, 3, 2 * H, hd).permute(2, 0, 3, 1, 4)  # (3, B, 2H, T, hd)
    q, k, v = qkv.unbind(0)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, 2H, T, hd)
    y = y.transpose(1, 2).reshape(B, T, 2 * D)  # [Attn heads | Attn+ heads]
    g = torch.sigmoid(self.gate)[:, None]  # (D, 1): scales output rows
    w_o = torch.cat([g * a.o_proj.weight, (1 - g) * p.o_proj.weight], dim=1)  # (D, 2D)
    b_o = g[:, 0] * bias(a.o_proj) + (1 - g[:, 0]) * bias(p.o_proj)
    return F.linear(y, w_o, b_o)


def interleaved(fns: dict, iters, device) -> dict:
    """Median seconds per call of each fn, run in turn round after round: the allocator's state and a busy machine
    then weigh on every variant alike (timing one variant after the other favoured whichever ran second)."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def timeit(fn, iters, device):
    return interleaved({"fn": fn}, iters, device)["fn"]


def compare_dtypes(vit, x, args):
    """Ours in fp32 and under bf16 autocast, interleaved call by call: forward, a step with every weight trainable,
    and the dual-channel step (stage 3: Attn+ and the gates train)."""
    def under(amp, fn):
        def run():
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=amp):
                fn()
        return run

    def forward():
        with torch.no_grad():
            vit(x)

    def step():
        vit.zero_grad(set_to_none=True)
        vit(x).float().square().mean().backward()

    print(f"{'case':<28} {'fp32':>9} {'bf16':>9} {'fp32/bf16':>9}")
    for name in ("forward", "fwd+bwd, all trainable", "fwd+bwd, dual channel"):
        if name == "fwd+bwd, dual channel":
            add_dual_channel(vit)
        fn = forward if name == "forward" else step
        t = interleaved({"fp32": under(False, fn), "bf16": under(True, fn)}, args.iters, args.device)
        print(f"{name:<28} {t['fp32'] * 1000:6.0f} ms {t['bf16'] * 1000:6.0f} ms {t['fp32'] / t['bf16']:8.2f}x",
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compare-dtypes", action="store_true", help="ours only: fp32 vs bf16 autocast, interleaved")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    from transformers import Dinov2Model

    weights = ROOT / "weights" / "dinov2-s14"
    if not (weights / "config.json").exists():
        import tempfile

        weights = Path(tempfile.mkdtemp())
        from transformers import Dinov2Config

        ref = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                       patch_size=14))
        ref.save_pretrained(weights)
        print(f"(no weights/dinov2-s14: using a random ViT-S/14 saved to {weights})")
    ours = load_vit(weights).to(dev, dtype)
    ref = Dinov2Model.from_pretrained(weights, attn_implementation="sdpa").to(dev, dtype).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev, dtype=dtype)
    print(f"device={dev} dtype={args.dtype} threads={args.threads} batch={args.batch} size={args.size} "
          f"torch={torch.__version__}")
    if args.compare_dtypes:
        return compare_dtypes(ours.float().train(), x.float(), args)

    def report(name, seconds):
        print(f"{name:<48} {seconds * 1000:9.1f} ms   {args.batch / seconds:8.1f} img/s")
        return seconds

    def step(model, call):
        def run():
            model.zero_grad(set_to_none=True)
            call(model).float().square().mean().backward()
        return run

    with torch.no_grad():
        t = interleaved({"ref": lambda: ref(pixel_values=x), "ours": lambda: ours(x)}, args.iters, dev)
    report("forward  transformers Dinov2Model", t["ref"])
    report("forward  ours ViT", t["ours"])
    ref.train(), ours.train()
    t = interleaved({"ref": step(ref, lambda m: m(pixel_values=x).last_hidden_state),
                     "ours": step(ours, lambda m: m(x))}, args.iters, dev)
    report("fwd+bwd  transformers Dinov2Model (all trainable)", t["ref"])
    plain = report("fwd+bwd  ours ViT (all trainable)", t["ours"])

    add_dual_channel(ours)
    two_calls = report("fwd+bwd  ours dual channel, two attention calls", timeit(step(ours, lambda m: m(x)), args.iters, dev))
    original = DualChannelAttention.forward
    DualChannelAttention.forward = fused_dual_forward
    try:
        with torch.no_grad():  # the fused path must compute the same function
            ours.eval()
            y_fused = ours(x)
            DualChannelAttention.forward = original
            y_two = ours(x)
            DualChannelAttention.forward = fused_dual_forward
            ours.train()
        diff = (y_fused.float() - y_two.float()).abs().max().item()
        fused = report(f"fwd+bwd  ours dual channel, fused (max diff {diff:.1e})",
                       timeit(step(ours, lambda m: m(x)), args.iters, dev))
        with torch.no_grad():
            report("forward  ours dual channel, fused", timeit(lambda: ours(x), args.iters, dev))
    finally:
        DualChannelAttention.forward = original
    with torch.no_grad():
        report("forward  ours dual channel, two attention calls", timeit(lambda: ours(x), args.iters, dev))
    print(f"dual/plain step: two calls {two_calls / plain:.2f}x, fused {fused / plain:.2f}x")


if __name__ == "__main__":
    main()
