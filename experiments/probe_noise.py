"""
Where the depth probe's noise comes from: the lin.1 depth head of two (or more) fixed encoders, trained under several
probe protocols, several head seeds, on the train split of one probe set and scored on the test split of every probe
set. The difference between two encoders then splits into the part that moves with the head's seed, with the training
views and with the test views (issue 27).

    python experiments/probe_noise.py --probes data/cal/p480-s100 --probes data/cal/p480-s101 \\
        --vision weights/dinov2-s14 --vision runs/enc/p1-boost-s1 --seeds 0,1,2 \\
        --variant default: --variant long:depth_steps=2000,depth_rows=64 --out runs/cal/noise.json
    python experiments/probe_noise.py --report runs/cal/noise.json     # the tables again, from the file

A variant is NAME:FIELD=VALUE,... over ProbeConfig; `depth_heads=K` averages the predicted depth of K heads with
seeds s, s+1000, ... (one "seed" of such a variant is K heads), as eval.py --depth-heads does. Features come from
each probe set's cache (eval.py's, the same key), so a set that eval.py has seen costs no encoder pass.
"""

import argparse
import dataclasses
import json
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import probes  # noqa: E402
from evaluation.probes import ProbeConfig  # noqa: E402
from evaluation.suite import cached_features  # noqa: E402
from model import load_vit  # noqa: E402
from storage.atomic import write_file_atomically  # noqa: E402


def parse_variant(text: str) -> tuple[str, ProbeConfig]:
    """'long:depth_steps=2000,depth_rows=64' -> ('long', ProbeConfig(...))."""
    name, _, rest = text.partition(":")
    cfg = ProbeConfig()
    fields = {f.name: f.type for f in dataclasses.fields(ProbeConfig)}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in fields:
            cfg = dataclasses.replace(cfg, **{key: type(getattr(cfg, key))(value)})
        else:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a ProbeConfig field")
    return name, cfg


def lin1_inputs(feats: dict, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return feats["patches"][..., -dim:], feats["cls"][:, -dim:]  # the last block: lin.1


def features(vit, ps) -> tuple[torch.Tensor, torch.Tensor]:
    """lin.1 inputs of a probe set (or of a composite's parts, each cached on its own)."""
    parts = [lin1_inputs(cached_features(vit, p, 224, 112, log=None), vit.cfg.dim) for p in ps.parts]
    return torch.cat([p for p, _ in parts]), torch.cat([c for _, c in parts])


def fit_and_predict(p_tr, c_tr, d_tr, tests: list, cfg: ProbeConfig) -> list:
    """Train cfg.depth_heads lin.1 heads (seeds cfg.seed + 1000 k) and average their depth maps on each test split.
    tests: [(patches, cls, out_size)] -> [(N, H, W) depth]."""
    preds = [0.0] * len(tests)
    heads = cfg.depth_heads
    for k in range(heads):
        head = probes.fit_depth(p_tr, c_tr, d_tr, dataclasses.replace(cfg, seed=cfg.seed + 1000 * k))
        for i, (p, c, size) in enumerate(tests):
            preds[i] = preds[i] + probes.predict_depth(head, p, c, cfg, size) / heads
    return preds


def composite(paths: list) -> probes.ProbeSet:
    """Several probe sets as one (their training views together, their test views together); dense part only."""
    parts = [dataclasses.replace(probes.load_probe_set(p), crops=None) for p in paths]
    cat = lambda k: np.concatenate([getattr(ps, k) for ps in parts])
    whole = dataclasses.replace(parts[0], images=cat("images"), depth=cat("depth"), labels=cat("labels"),
                                train=cat("train"))
    whole.parts = parts  # features are cached per part
    return whole


def measure(args) -> list:
    groups = [args.probes[i:i + args.group] for i in range(0, len(args.probes) - args.group + 1, args.group)]
    sets = [composite(g) for g in groups]
    variants = [parse_variant(v) for v in args.variant]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for path in args.vision:
        vit = load_vit(path)
        feats = [features(vit, ps) for ps in sets]
        del vit
        tests = [(f[0][~ps.train], f[1][~ps.train], ps.depth.shape[-2:]) for f, ps in zip(feats, sets)]
        for (ti, ps), (name, cfg), seed in product(enumerate(sets), variants, seeds):
            t = time.time()
            depth = torch.from_numpy(ps.depth)
            p, c = feats[ti]
            preds = fit_and_predict(p[ps.train], c[ps.train], depth[ps.train], tests,
                                    dataclasses.replace(cfg, seed=seed))
            for si, (pred, test_set) in enumerate(zip(preds, sets)):
                gt = torch.from_numpy(test_set.depth[~test_set.train])
                valid = (gt > cfg.min_depth) & (gt < cfg.max_depth)
                per = probes.depth_metrics(pred, gt, valid, per_image=True)["rmse"]
                rows.append({"encoder": path, "variant": name, "seed": seed, "train_set": ti, "test_set": si,
                             "rmse": float(per.nanmean()), "per_image": per.tolist()})
            print(f"{path} {name} seed {seed} train set {ti}: "
                  + " ".join(f"{r['rmse']:.4f}" for r in rows[-len(sets):]) + f" ({time.time() - t:.0f} s)",
                  flush=True)
    return rows


def components(m: np.ndarray) -> tuple[float, float, float]:
    """A (train set, test set) table of differences as diff_ij = mu + a_i + b_j + e_ij (two-way random effects, one
    value per cell): the sd of a (training views), of b (test views) and of e (the rest: head x views), from the mean
    squares. A probe set of T training halves and U test halves then spreads by about
    sqrt(sd_a^2 / T + sd_b^2 / U + sd_e^2 / U)."""
    n = len(m)
    r, c, g = m.mean(1), m.mean(0), m.mean()
    ms_rows, ms_cols = n * np.sum((r - g) ** 2) / (n - 1), n * np.sum((c - g) ** 2) / (n - 1)
    ms_rest = np.sum((m - r[:, None] - c[None] + g) ** 2) / (n - 1) ** 2
    sd = lambda v: float(np.sqrt(max(v, 0.0)))
    return sd((ms_rows - ms_rest) / n), sd((ms_cols - ms_rest) / n), sd(ms_rest)


def summarize(rows: list, sets: list) -> dict:
    """Per variant, the difference (second encoder - first) and its spread: over head seeds (same views), over
    probe sets (train and test from the same set, as eval.py does), and the split of the cross-set table into a
    training-view part and a test-view part (two-way layout, seeds averaged)."""
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    a, b = encoders[0], encoders[1]
    out = {}
    for v in dict.fromkeys(r["variant"] for r in rows):
        val = {(r["encoder"], r["seed"], r["train_set"], r["test_set"]): r["rmse"] for r in rows if r["variant"] == v}
        seeds = sorted({k[1] for k in val})
        n = len(sets)
        diff = np.array([[[val[(b, s, i, j)] - val[(a, s, i, j)] for j in range(n)] for i in range(n)]
                         for s in seeds])  # (seeds, train set, test set)
        own = np.array([[diff[k, i, i] for i in range(n)] for k in range(len(seeds))])  # (seeds, sets)
        m = diff.mean(0)  # (train, test), seeds averaged
        train_part, test_part, rest = components(m) if n > 1 else (float("nan"),) * 3
        out[v] = {"mean_diff": float(own.mean()), "sd_over_seeds": float(own.std(0, ddof=1).mean()) if len(seeds) > 1
                  else float("nan"), "sd_over_sets": float(own.mean(0).std(ddof=1)) if n > 1 else float("nan"),
                  "sd_over_sets_one_seed": float(own.std(1, ddof=1).mean()) if n > 1 else float("nan"),
                  "sd_train_views": float(train_part), "sd_test_views": float(test_part), "sd_rest": float(rest),
                  "per_set": own.mean(0).round(4).tolist(), "baseline_rmse":
                  float(np.mean([val[(a, s, i, i)] for s in seeds for i in range(n)]))}
    return {"first": a, "second": b, "variants": out}


def print_summary(s: dict):
    print(f"\nlin.1 RMSE difference, {s['second']} - {s['first']} (m)")
    print(f"{'variant':<16} {'baseline':>8} {'mean':>8} {'sd seeds':>9} {'sd sets':>8} {'sd sets,1 seed':>14} "
          f"{'sd train':>9} {'sd test':>8} {'sd rest':>8}  per set")
    for v, r in s["variants"].items():
        print(f"{v:<16} {r['baseline_rmse']:8.4f} {r['mean_diff']:+8.4f} {r['sd_over_seeds']:9.4f} "
              f"{r['sd_over_sets']:8.4f} {r['sd_over_sets_one_seed']:14.4f} {r['sd_train_views']:9.4f} "
              f"{r['sd_test_views']:8.4f} {r.get('sd_rest', float('nan')):8.4f}  {r['per_set']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", action="append", default=[], help="probe set directory (eval.py --make-probes), "
                    "repeatable")
    ap.add_argument("--vision", action="append", default=[], help="encoder directory, repeatable; the difference is "
                    "second - first")
    ap.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,... (ProbeConfig fields, "
                    "e.g. depth_heads=3); repeatable")
    ap.add_argument("--seeds", default="0,1,2", help="head seeds, comma-separated")
    ap.add_argument("--group", type=int, default=1, help="consecutive --probes taken together as one probe set (K x "
                    "its views: a larger protocol from independent smaller sets)")
    ap.add_argument("--out", help="write the summary and every (encoder, variant, seed, train set, test set) RMSE here "
                    "(JSON)")
    ap.add_argument("--per-image", action="store_true", help="--out also keeps each test image's RMSE")
    ap.add_argument("--report", help="print the summary of an earlier --out file and exit")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.report:
        return print_summary(json.loads(Path(args.report).read_text())["summary"])
    if len(args.vision) < 2 or not args.probes:
        ap.error("needs two --vision and at least one --probes")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.variant = args.variant or ["default:"]
    rows = measure(args)
    summary = summarize(rows, range(len(args.probes) // args.group))
    print_summary(summary)
    if args.out:
        kept = rows if args.per_image else [{k: v for k, v in r.items() if k != "per_image"} for r in rows]
        text = json.dumps({"argv": sys.argv[1:], "summary": summary, "rows": kept})
        write_file_atomically(Path(args.out), lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
