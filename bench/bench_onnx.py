"""
ONNX export benchmark: export time, file size, parity and CPU latency of ONNX Runtime against PyTorch, per encoder.

    python bench/bench_onnx.py [--encoder weights/dinov2-s14 ...] [--batch 1 8] [--size 224] [--threads 1] [--iters 7]
    python bench/bench_onnx.py --encoder /work/main/runs/b15-boost-s1/stage3/vision --static

Exports each encoder with tools/export_onnx.py (dynamic shapes unless --static) into --out, then times both runtimes on
the same pixels, in turn round after round (as bench_vit.py: a busy machine weighs on both alike). Prints one line per
(encoder, batch): median seconds per call and images/s for each runtime, and the max abs difference of the outputs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import load_vit  # noqa: E402
from tools.export_onnx import OnnxEncoder, export, max_abs_diff, session  # noqa: E402


def interleaved(fns: dict, iters: int) -> dict:
    """Median seconds per call of each fn, after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="ONNX Runtime vs PyTorch on exported encoders")
    ap.add_argument("--encoder", action="append", default=None, help="encoder dir (repeatable; default DINOv2-S/14)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--static", action="store_true", help="one fixed-shape graph per batch size")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_onnx"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for i, enc in enumerate(args.encoder or [str(ROOT / "weights" / "dinov2-s14")]):
        vit = load_vit(enc, dtype=torch.float32)
        model = OnnxEncoder(vit).eval()
        graphs = {}
        for b in args.batch if args.static else [None]:
            path = Path(args.out) / f"encoder{i}-{b or 'dynamic'}.onnx"
            t0 = time.perf_counter()
            export(vit, path, args.size, static=b is not None, batch=b or 1)
            print(f"{enc}: exported in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 2**20:.1f} MiB "
                  f"({'static' if b else 'dynamic'})")
            graphs[b] = session(path, args.threads)
        for b in args.batch:
            x = torch.randn(b, 3, args.size, args.size)
            sess = graphs[b if args.static else None]
            diff = max(max_abs_diff(vit, sess, x).values())
            feed = {"pixel_values": x.numpy()}

            def torch_call():
                with torch.inference_mode():
                    model(x)

            t = interleaved({"torch": torch_call, "onnxruntime": lambda: sess.run(None, feed)}, args.iters)
            print(f"  batch {b} {args.size}px {args.threads} thread(s): " + ", ".join(
                f"{k} {v * 1e3:.0f} ms ({b / v:.1f} img/s)" for k, v in t.items())
                + f"; ort/torch {t['onnxruntime'] / t['torch']:.2f}; max|diff| {diff:.1e}")


if __name__ == "__main__":
    main()
