"""
The table of the controlled stage-3 experiment, from one eval.py report that probed every encoder on the same
held-out probe set: each metric as mean ± sd over training seeds per arm, and each arm's difference against the
shuffled-answer control and against the baseline with a paired bootstrap 95 % interval over test images (every
encoder is scored on the same resampled images; an arm's value is its mean over seeds).

    python experiments/boost_report.py runs/b15-eval/report.json --arm baseline=baseline \\
        --arm boost=b15-boost-s1,b15-boost-s2,b15-boost-s3 --arm control=b15-control-s1,... --out results/boost

Writes OUT.md (the table) and OUT.json (every number). Needs reports written with per-image results
(eval.py --per-image). Several reports may share the work (encoders probed in separate eval.py calls on the same probe
set): they must agree on the probe set, and an encoder in more than one (the baseline, say) must have exactly the same
per-image results in each, which also checks that the probes are deterministic.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# (name in the table, how to score a set of test images from per-image arrays, lower is better)
METRICS = [("depth lin.1 RMSE (m)", "depth_lin1_rmse", True), ("depth lin.4 RMSE (m)", "depth_lin4_rmse", True),
           ("segmentation mIoU", "seg", False), ("classification, linear", "linear_correct", False),
           ("classification, k-NN", "knn_correct", False)]


def score(per_image: dict, key: str, images: np.ndarray) -> float:
    """A metric on a multiset of test images (indices, repeats allowed)."""
    if key == "seg":
        conf = np.asarray(per_image["seg_confusion"])[images].sum(0)         # (C, C) rows: truth
        inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
        present = union > 0                      # as probes.miou: classes in the truth or the prediction
        return float((inter[present] / union[present]).mean())
    if key in ("linear_correct", "knn_correct"):
        of = np.asarray(per_image["object_image"])
        # each test object counts as often as its image was drawn
        counts = np.bincount(images, minlength=len(per_image["depth_lin1_rmse"]))[of]
        return float((np.asarray(per_image[key]) * counts).sum() / max(counts.sum(), 1))
    return float(np.nanmean(np.asarray(per_image[key], dtype=float)[images]))


def arm_value(per_images: list, key: str, images) -> float:
    return float(np.mean([score(p, key, images) for p in per_images]))


def compare(arms: dict, a: str, b: str, key: str, n_images: int, n_boot: int, seed: int = 0) -> dict:
    """a − b on all test images, and its paired bootstrap 95 % interval over test images."""
    everything = np.arange(n_images)
    diff = arm_value(arms[a], key, everything) - arm_value(arms[b], key, everything)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        images = rng.integers(0, n_images, n_images)
        boots.append(arm_value(arms[a], key, images) - arm_value(arms[b], key, images))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"diff": diff, "ci95": [float(lo), float(hi)]}


def load_encoders(paths: list) -> dict:
    """{encoder name: results} over one or more eval.py reports of the same probe set."""
    by_name, first, where = {}, None, {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        setting = (report.get("probe_set"), report.get("config"))  # the probe images, and how the probes train
        if first is None:
            first = setting
        elif setting != first:
            sys.exit(f"{path}: another probe set or probe config than {paths[0]}'s (eval.py --probes, --n-images, "
                     f"--test-every, the probe settings)")
        for e in report["encoders"]:
            name, res = e["name"], e["results"]
            if name in by_name and by_name[name].get("per_image") != res.get("per_image"):
                sys.exit(f"{path}: encoder {name} has other per-image results than in {where[name]}")
            by_name[name], where[name] = res, path
    return by_name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", nargs="+", help="eval.py's report.json (one or more), written with --per-image")
    ap.add_argument("--arm", action="append", required=True, help="NAME=encoder,encoder,... (the report's names)")
    ap.add_argument("--control", default="control", help="the arm the others are compared with")
    ap.add_argument("--baseline", default="baseline")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    by_name = load_encoders(args.report)
    arms = {}
    for item in args.arm:
        name, _, members = item.partition("=")
        missing = [m for m in members.split(",") if m not in by_name or "per_image" not in by_name[m]]
        if missing:
            sys.exit(f"{', '.join(args.report)}: no per-image results for {missing} (names: {sorted(by_name)}; "
                     "eval.py --per-image)")
        arms[name] = [by_name[m]["per_image"] for m in members.split(",")]
    n_images = len(next(iter(arms.values()))[0]["depth_lin1_rmse"])
    rows, table = {}, []
    names = list(arms)
    head = "| metric | " + " | ".join(f"{n} (n={len(arms[n])})" for n in names)
    others = [n for n in names if n not in (args.control, args.baseline)]
    pairs = [(n, args.control) for n in others if args.control in arms] + \
            [(n, args.baseline) for n in others + [args.control] if args.baseline in arms and n in arms]
    head += "".join(f" | {a} − {b} [95 % CI]" for a, b in pairs) + " |"
    table += [head, "|" + "---|" * (1 + len(names) + len(pairs))]
    everything = np.arange(n_images)
    for label, key, lower in METRICS:
        per_seed = {n: [score(p, key, everything) for p in arms[n]] for n in names}
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
                 for v in per_seed.values()]
        diffs = {f"{a}-{b}": compare(arms, a, b, key, n_images, args.n_boot) for a, b in pairs}
        cells += [f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" for d in diffs.values()]
        table.append(f"| {label} {'↓' if lower else '↑'} | " + " | ".join(cells) + " |")
        rows[key] = {"per_seed": per_seed, "differences": diffs, "lower_is_better": lower}
    text = "\n".join(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"Test images: {n_images}; bootstrap resamples: {args.n_boot}.\n\n{text}\n")
    out.with_suffix(".json").write_text(json.dumps({"test_images": n_images, "arms": {n: len(v) for n, v in
                                                    arms.items()}, "metrics": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
