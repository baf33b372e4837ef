"""
Probe-suite benchmark: wall time of eval.py's whole probe suite for one encoder at default settings (probe set
loading, features, depth lin.1 / lin.4, segmentation, classification + retrieval), and the sanity check that a
pretrained encoder beats a random init of the same shape on every probe.

    python bench/bench_eval.py [--vision weights/dinov2-s14] [--random] [--threads 2] [--probes data/probes]
    python bench/bench_eval.py --dtypes fp32,bf16      # the same suite in fp32, then under bf16 autocast

With --dtypes each encoder runs the suite once per dtype, one after the other in the same process; bf16 computes the
encoder's features under bf16 autocast (the probe heads train in fp32 either way), which eval.py does not offer yet.

Features are recomputed (the cache is neither read nor written) so that their cost is part of the time. With
--random a randomly initialised ViT of the same config runs the same suite and the table compares the two.
Without weights (python tools/offline_weights.py) a random ViT-S/14 is timed: speed does not depend on the values.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402
from evaluation import probes  # noqa: E402
from evaluation import report, suite  # noqa: E402
from model import ViT, ViTConfig, load_vit  # noqa: E402


def autocast_bf16(fn):
    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args, **kwargs)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vision", default=str(ROOT / "weights" / "dinov2-s14"))
    ap.add_argument("--random", action="store_true", help="also run a random init of the same config and compare")
    ap.add_argument("--probes", default=str(ROOT / ev.DEFAULT_PROBES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="probe seed (heads, batches)")
    ap.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (autocast)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t = time.time()
    if not (Path(args.probes) / "index.json").exists():
        probes.make_probe_sets(args.probes, log=None)
        print(f"probe set made: {time.time() - t:.1f} s")
    t = time.time()
    ps = probes.load_probe_set(args.probes)
    t_load = time.time() - t
    print(f"probe set loaded: {len(ps.images)} images ({int(ps.train.sum())} train), {len(ps.crops)} object crops, "
          f"{t_load:.1f} s")
    if Path(args.vision, "config.json").exists():
        encoders = [(Path(args.vision).name, lambda: load_vit(args.vision))]
        shape = load_vit(args.vision).cfg
    else:
        print(f"{args.vision} not found: timing a random ViT-S/14")
        shape = ViTConfig(pos_grid=37)
        encoders = []
    if args.random or not encoders:
        encoders.append(("random init", lambda: ViT(shape).eval()))
    cfg = probes.ProbeConfig(seed=args.seed)
    names, results = [], []
    for (name, make), dtype in [(e, d) for e in encoders for d in args.dtypes.split(",")]:
        torch.manual_seed(0)
        vit = make()
        name = name if dtype == "fp32" else f"{name} {dtype}"
        print(f"\n{name}")
        if dtype == "bf16":
            vit.features = autocast_bf16(vit.features)
        t = time.time()
        res, _ = suite.run_probes(vit, ps, cfg, cache=False, log=lambda s: print(s) if "/" not in s else None)
        wall = time.time() - t
        print(f"  probe suite wall time: {wall:.1f} s ({wall + t_load:.1f} s with loading the probe set); "
              f"phases {res['time_s']}")
        names.append(name)
        results.append(res)
    print()
    rows = report.table_rows(results)
    print(report.format_table(names, rows))
    if len(results) == 2 and args.random:  # the pretrained encoder against its random init
        worse = [f"{p} {m}" for p, m, (a, b) in rows if m not in ("d2", "d3")
                 and ((a >= b) if m in report.LOWER_IS_BETTER else (a <= b))]
        print(f"\n{names[0]} better than {names[1]} on every metric (d2, d3 aside): "
              + ("yes" if not worse else f"no, not on {worse}"))


if __name__ == "__main__":
    main()
