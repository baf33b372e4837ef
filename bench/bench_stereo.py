"""
Correspondence-probe benchmark: evaluation/stereo.py's PCK on the Middlebury Motorcycle pair for each encoder, its
wall time, and paired bootstrap intervals of each encoder's PCK minus the first one's (over the query patches: they
are neighbours on one photograph, not independent samples, so the intervals are a lower bound on the uncertainty).

    python bench/bench_stereo.py --vision weights/dinov2-s14 --vision runs/random-dinov2-s14 --threads 1
    python bench/bench_stereo.py --vision base=weights/dinov2-s14 --vision boost=runs/X/stage3/vision --height 224,448

Needs scikit-image (the pair) and the encoders' weights; nothing is downloaded.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.middlebury import motorcycle  # noqa: E402
from evaluation.stats import bootstrap_ci  # noqa: E402
from evaluation.stereo import IMAGE_THRESHOLDS, THRESHOLDS, stereo_probe  # noqa: E402
from model import load_vit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="PCK of frozen encoders' patch matches on the Motorcycle stereo pair")
    ap.add_argument("--vision", action="append", required=True, help="[NAME=]encoder dir, repeatable; the first is "
                    "the reference of the paired intervals")
    ap.add_argument("--height", default="224", help="input height(s), comma-separated (the width keeps the aspect)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write every number (and per-query errors) to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pair = motorcycle()
    encoders = [v.split("=", 1) if "=" in v else (Path(v).parent.parent.name if Path(v).name == "vision"
                                                  else Path(v).name, v) for v in args.vision]
    results = {}
    for height in (int(h) for h in args.height.split(",")):
        rows = []
        for name, path in encoders:
            vit, t = load_vit(path), time.time()
            res = stereo_probe(vit, pair, height, per_query=True)
            res["time_s"] = round(time.time() - t, 2)
            rows.append((name, res))
            results[f"{name}@{height}"] = dict(path=str(path), height=height, **res)
        print(f"\nheight {height}: input {rows[0][1]['input']}, grid {rows[0][1]['grid']}, {rows[0][1]['n']} queries; "
              f"zero-disparity reference {rows[0][1]['reference']['zero_disparity']}")
        keys = [f"pck{t}" for t in THRESHOLDS] + ["err_px_median"] + [f"image_pck{t}" for t in IMAGE_THRESHOLDS]
        print(f"{'encoder':<18}" + "".join(f"{k:>14}" for k in keys) + f"{'time_s':>9}")
        for name, res in rows:
            print(f"{name:<18}" + "".join(f"{res[k]:>14.3f}" for k in keys) + f"{res['time_s']:>9.2f}")
        base = rows[0][1]
        for name, res in rows[1:]:
            cells = []
            for errs, thresholds, tag in (("errors", THRESHOLDS, ""), ("image_errors", IMAGE_THRESHOLDS, "image_")):
                a, b = np.array(base[errs]), np.array(res[errs])
                ok = np.isfinite(a)
                for t in thresholds:
                    lo, hi = bootstrap_ci((b[ok] <= t).astype(float) - (a[ok] <= t))
                    cells.append(f"{tag}pck{t} {float((b[ok] <= t).mean() - (a[ok] <= t).mean()):+.3f} "
                                 f"[{lo:+.3f}, {hi:+.3f}]")
            print(f"  {name} - {rows[0][0]}: " + "; ".join(cells))
    print(f"\nwall time {time.time() - t0:.1f} s ({args.threads} thread(s))")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
