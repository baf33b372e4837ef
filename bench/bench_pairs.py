"""
View pairs: how often a candidate second camera lands in the co-visibility band, multi-view generation speed, and
the calibration of the feature-distance band (for frames without poses) against the geometric band.

    python bench/bench_pairs.py                                   # 300 candidate pairs, weights/dinov2-s14 if present
    python bench/bench_pairs.py --pairs 300 --encoder weights/dinov2-s14 --n 100 --size 448

1. Band: candidate pairs as synthetic_pair draws them (a random camera, then multiview.nearby_camera), their
   co-visibility at --size, the share inside multiview.BAND.
2. Feature band: for the same pairs, multiview.feature_distances (1 - the share of mutual nearest-neighbour
   patches); the Spearman correlation with co-visibility, the feature distances of the pairs inside the geometric
   band (their 10th-90th percentiles make FEATURE_BAND), and how well multiview.FEATURE_BAND picks the pairs of the
   geometric band (precision, recall).
3. Generation: `data.generate` of --n multiview and spatial-multiview samples at --size with --workers.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from dataengine import multiview  # noqa: E402
from dataengine import scenes  # noqa: E402


def candidates(k: int, size: int, seed: int = 0):
    """k (covisibility, rgb A, rgb B) of candidate pairs."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < k:
        scene = scenes.random_scene(rng)
        cam_a = scenes.random_camera(rng, scene)
        a = scenes.render(scene, cam_a, size, size)
        for _ in range(3):
            cam_b = multiview.nearby_camera(rng, scene, cam_a)
            b = scenes.render(scene, cam_b, size, size)
            c = multiview.covisibility(a["depth"], a["K"], cam_a.cam_to_world, b["depth"], b["K"], cam_b.cam_to_world,
                                       multiview.stride_for(size, size))
            out.append((c, a["rgb"], b["rgb"]))
    return out[:k]


def ranks(x):
    return np.argsort(np.argsort(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--size", type=int, default=224, help="render size for the band and the encoder")
    ap.add_argument("--encoder", default="weights/dinov2-s14")
    ap.add_argument("--n", type=int, default=60, help="samples per multi-view kind for the generation timing")
    ap.add_argument("--gen-size", type=int, default=448)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    pairs = candidates(args.pairs, args.size)
    covis = np.array([p[0] for p in pairs])
    lo, hi = multiview.BAND
    inside = (covis >= lo) & (covis <= hi)
    quartiles = np.round(np.percentile(covis, [25, 50, 75]), 3).tolist()
    print(f"band: {args.pairs} candidate pairs at {args.size} px; co-visibility quartiles {quartiles}; "
          f"{100 * inside.mean():.0f} % in {multiview.BAND}")
    encoder = Path(args.encoder)
    if (encoder / "config.json").exists():
        t0 = time.time()
        images = [im for p in pairs for im in p[1:]]
        f = data.encoder_embedding(encoder)(images)
        d = np.array([multiview.feature_distance(f[2 * i], f[2 * i + 1:2 * i + 2])[0] for i in range(len(pairs))])
        rho = np.corrcoef(ranks(covis), ranks(d))[0, 1]
        q10, q50, q90 = np.percentile(d[inside], [10, 50, 90])
        flo, fhi = multiview.FEATURE_BAND
        picked = (d >= flo) & (d <= fhi)
        precision = (picked & inside).sum() / max(picked.sum(), 1)
        recall = (picked & inside).sum() / max(inside.sum(), 1)
        print(f"feature band ({encoder.name}, {len(images)} images in {time.time() - t0:.0f} s): "
              f"Spearman(co-visibility, feature distance) = {rho:.2f}; in-band pairs' distance 10/50/90 % = "
              f"{q10:.3f} / {q50:.3f} / {q90:.3f}; "
              f"all pairs 10/90 % = {np.percentile(d, 10):.3f} / {np.percentile(d, 90):.3f}")
        print(f"  FEATURE_BAND {multiview.FEATURE_BAND} picks {picked.sum()} pairs: precision {precision:.2f}, recall "
              f"{recall:.2f} against the geometric band")
    else:
        print(f"feature band: {encoder} not found, skipped")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("multiview", "spatial-multiview"):
            t0 = time.time()
            data.generate(kind, Path(tmp) / kind, args.n, size=args.gen_size, workers=args.workers, progress=False)
            wall = time.time() - t0
            print(f"generate {kind}: {args.n} samples at {args.gen_size} px, --workers {args.workers}: "
                  f"{args.n / wall:.1f} samples/s")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
