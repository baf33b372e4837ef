"""
The table of the controlled stage-3 experiment, from one eval.py report that probed every encoder on the same
held-out probe set: each metric as mean ± sd over training seeds per arm, and each arm's difference against the
shuffled-answer control and against the baseline with a paired bootstrap 95 % interval over test images (every
encoder is scored on the same resampled images; an arm's value is its mean over seeds).

    python experiments/boost_report.py runs/b15-eval/report.json --arm baseline=baseline \\
        --arm boost=b15-boost-s1,b15-boost-s2,b15-boost-s3 --arm control=b15-control-s1,... --out results/b15/b15

Writes OUT.md (the table) and OUT.json (every number). Needs reports written with per-image results
(eval.py --per-image). Several reports may share the work (encoders probed in separate eval.py calls on the same probe
set): they must agree on the probe set, and an encoder in more than one (the baseline, say) must have exactly the same
per-image results in each, which also checks that the probes are deterministic.

A bootstrap over the test images of one probe set leaves out the probe's own training views: on this project's
240-view sets a depth difference moved ~3x more between probe sets than between training seeds. With
--across-probe-sets the reports may come from several probe sets (each must hold every arm's encoders): OUT.md first
tables each difference as its mean over (seed, probe set) ± 2 se, se² = sd_seeds²/seeds (each arm's, of its
per-seed values averaged over probe sets) + sd_sets²/sets (of the per-set differences), with every set's own
difference beside it; then each probe set's table as above. --some-seeds-per-set: a set may hold only some of an
arm's seeds (seed k probed on set k, a third of the probing of the full cross); se² = sd_sets²/sets then, the spread
over sets holding the spread over seeds.
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


def measured(arms: dict) -> list:
    """The METRICS every encoder of every arm has per-image results for (a MuJoCo probe set has no object crops:
    no classification)."""
    needs = {"seg": "seg_confusion", "linear_correct": "object_image", "knn_correct": "object_image"}
    return [m for m in METRICS if all(needs.get(m[1], m[1]) in p for ps in arms.values() for p in ps)]


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


def load_encoders(paths: list, across_probe_sets: bool = False) -> list:
    """[(probe set, {encoder name: results})], one entry per probe set, from one or more eval.py reports. Without
    across_probe_sets every report must be of the same probe set."""
    sets, where = {}, {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        probe_set = report.get("probe_set")  # the probe images (path, fingerprint, sizes)
        if not sets:
            config, first = report.get("config"), probe_set
        if report.get("config") != config or (probe_set != first and not across_probe_sets):
            sys.exit(f"{path}: another probe set or probe config than {paths[0]}'s (eval.py --probes, --n-images, "
                     f"--test-every, the probe settings; --across-probe-sets for reports of several probe sets)")
        key = json.dumps(probe_set, sort_keys=True)
        by_name = sets.setdefault(key, (probe_set, {}))[1]
        for e in report["encoders"]:
            name, res = e["name"], e["results"]
            if name in by_name and by_name[name].get("per_image") != res.get("per_image"):
                sys.exit(f"{path}: encoder {name} has other per-image results than in {where[key, name]}")
            by_name[name], where[key, name] = res, path
    return list(sets.values())


def gather_arms(by_name: dict, specs: list, where: str, some_seeds: bool = False) -> dict:
    """{arm: [per-image results of each member]} from --arm NAME=enc,enc,... specs; some_seeds: a member the report
    lacks is left out (an arm needs at least one)."""
    arms = {}
    for item in specs:
        name, _, members = item.partition("=")
        have = [m for m in members.split(",") if m in by_name and "per_image" in by_name[m]]
        missing = [m for m in members.split(",") if m not in have]
        if missing and not (some_seeds and have):
            sys.exit(f"{where}: no per-image results for {missing} (names: {sorted(by_name)}; eval.py --per-image)")
        arms[name] = [by_name[m]["per_image"] for m in have]
    return arms


def probe_set_table(arms: dict, pairs: list, n_boot: int) -> tuple[list, dict]:
    """One probe set's table rows (markdown) and numbers: per-seed values, differences with bootstrap intervals."""
    n_images = len(next(iter(arms.values()))[0]["depth_lin1_rmse"])
    everything, lines, rows = np.arange(n_images), [], {}
    for label, key, lower in measured(arms):
        per_seed = {n: [score(p, key, everything) for p in arms[n]] for n in arms}
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
                 for v in per_seed.values()]
        diffs = {f"{a}-{b}": compare(arms, a, b, key, n_images, n_boot) for a, b in pairs}
        cells += [f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" for d in diffs.values()]
        lines.append(f"| {label} {'↓' if lower else '↑'} | " + " | ".join(cells) + " |")
        rows[key] = {"per_seed": per_seed, "differences": diffs, "lower_is_better": lower}
    return lines, {"test_images": n_images, "metrics": rows}


def pooled(per_set: list, pairs: list, some_seeds: bool = False) -> tuple[list, dict]:
    """Each difference over probe sets and seeds: mean, se from the seed and probe-set spreads, every set's value.
    some_seeds (each set holds other seeds of an arm, e.g. seed k on set k): the spread over sets already holds the
    spread over seeds, so se² = sd_sets² / sets."""
    lines, rows = [], {}
    for label, key, lower in [m for m in METRICS if m[1] in per_set[0]["metrics"]]:
        seeds = {} if some_seeds else {n: np.mean([s["metrics"][key]["per_seed"][n] for s in per_set], axis=0)
                                       for n in per_set[0]["metrics"][key]["per_seed"]}  # (seeds,) over sets
        cells, rows[key] = [], {}
        for a, b in pairs:
            d = np.array([s["metrics"][key]["differences"][f"{a}-{b}"]["diff"] for s in per_set])  # (sets,)
            var = sum(np.var(seeds[n], ddof=1) / len(seeds[n]) for n in seeds if n in (a, b) and len(seeds[n]) > 1)
            var += np.var(d, ddof=1) / len(d)
            se = float(np.sqrt(var))
            # the two spreads side by side: one seed of each arm vs one probe set (the larger one decides how many
            # of each a comparison needs)
            spreads = [np.var(seeds[n], ddof=1) for n in seeds if n in (a, b) and len(seeds[n]) > 1]
            sd_seeds = float(np.sqrt(sum(spreads))) if spreads else None  # None: one seed per arm, nothing to see
            sd_sets = float(np.std(d, ddof=1))
            rows[key][f"{a}-{b}"] = {"diff": float(d.mean()), "se": se, "per_probe_set": d.tolist(),
                                     "sd_probe_sets": sd_sets, "sd_seeds": sd_seeds}
            cells.append(f"{d.mean():+.3f} ± {2 * se:.3f} [sd sets {sd_sets:.3f}, seeds "
                         + ("—" if sd_seeds is None else f"{sd_seeds:.3f}") + "] ("
                         + ", ".join(f"{x:+.3f}" for x in d) + ")")
        lines.append(f"| {label} {'↓' if lower else '↑'} | " + " | ".join(cells) + " |")
    return lines, rows


def efficiency(rows: dict, a: str, b: str, baseline: str) -> tuple[list, dict]:
    """(a − baseline) / (b − baseline) per metric from the pooled differences (issue 29's language efficiency: the
    llm arm's gain as a share of the depth-points teacher's on the same images and steps), with a delta-method 95 %
    interval, ratio ± 1.96 |ratio| sqrt((se_a/d_a)² + (se_b/d_b)²), which treats the two differences as independent
    (they share the baseline, which correlates them positively: the interval is then wider than it need be)."""
    lines, out = [], {}
    for label, key, _ in [m for m in METRICS if m[1] in rows]:
        da, db = rows[key][f"{a}-{baseline}"], rows[key][f"{b}-{baseline}"]
        r = da["diff"] / db["diff"] if db["diff"] else float("nan")
        half = 1.96 * abs(r) * np.hypot(da["se"] / da["diff"], db["se"] / db["diff"]) if da["diff"] and db["diff"] \
            else float("nan")
        out[key] = {"ratio": r, "ci95": [r - half, r + half]}
        lines.append(f"| {label} | {da['diff']:+.3f} | {db['diff']:+.3f} | {r:.2f} [{r - half:.2f}, {r + half:.2f}] |")
    return lines, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", nargs="+", help="eval.py's report.json (one or more), written with --per-image")
    ap.add_argument("--arm", action="append", required=True, help="NAME=encoder,encoder,... (the report's names)")
    ap.add_argument("--control", default="control", help="the arm the others are compared with")
    ap.add_argument("--baseline", default="baseline")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--across-probe-sets", action="store_true", help="reports of several probe sets: pool them, "
                    "with the spread over probe sets in each difference's interval")
    ap.add_argument("--some-seeds-per-set", action="store_true", help="with --across-probe-sets: a probe set may "
                    "hold only some of an arm's encoders (seed k on set k: 3 seeds x 3 sets for a third of the probing)"
                    "; each set's difference uses those it holds, se from the spread over sets alone")
    ap.add_argument("--efficiency", metavar="A,B", help="with --across-probe-sets: (A − baseline) / (B − baseline) "
                    "per metric with its interval, e.g. boost,depth-points (issue 29's language efficiency)")
    ap.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    sets = load_encoders(args.report, args.across_probe_sets)
    where = ", ".join(args.report)
    if (args.some_seeds_per_set or args.efficiency) and not args.across_probe_sets:
        ap.error("--some-seeds-per-set and --efficiency pool several probe sets: add --across-probe-sets")
    arms_of_set = [gather_arms(by_name, args.arm, f"{where} (probe set {ps})", args.some_seeds_per_set)
                   for ps, by_name in sets]
    names = list(arms_of_set[0])
    others = [n for n in names if n not in (args.control, args.baseline)]
    pairs = [(n, args.control) for n in others if args.control in names] + \
            [(n, args.baseline) for n in others + [args.control] if args.baseline in names and n in names]
    head = "| metric | " + " | ".join(f"{n} (n={len(arms_of_set[0][n])})" for n in names)
    head += "".join(f" | {a} − {b} [95 % CI]" for a, b in pairs) + " |"
    rule = "|" + "---|" * (1 + len(names) + len(pairs))
    tables, per_set = [], []
    for (ps, _), arms in zip(sets, arms_of_set):
        lines, numbers = probe_set_table(arms, pairs, args.n_boot)
        title = f"Test images: {numbers['test_images']}; bootstrap resamples: {args.n_boot}."
        if len(sets) > 1:
            title = f"Probe set {ps.get('path') if isinstance(ps, dict) else ps}. " + title
        tables.append(f"{title}\n\n" + "\n".join([head, rule] + lines) + "\n")
        per_set.append({"probe_set": ps, "arms": {n: len(v) for n, v in arms.items()}, **numbers})
    result = per_set[0]
    if len(sets) > 1:
        lines, rows = pooled(per_set, pairs, args.some_seeds_per_set)
        top = (f"Over {len(sets)} probe sets: each difference's mean over seeds and probe sets ± 2 se (se from the "
               f"spread over seeds and over probe sets), the two spreads (sd of the difference over probe sets, and "
               f"over seeds), then each probe set's own value.\n\n| metric | "
               + " | ".join(f"{a} − {b}" for a, b in pairs) + " |\n|" + "---|" * (1 + len(pairs)) + "\n"
               + "\n".join(lines) + "\n")
        result = {"pooled": rows, "probe_sets": per_set}
        if args.efficiency:
            a, b = args.efficiency.split(",")
            lines, result["efficiency"] = efficiency(rows, a, b, args.baseline)
            top += (f"\nEfficiency: ({a} − {args.baseline}) / ({b} − {args.baseline}), 95 % delta-method interval.\n\n"
                    f"| metric | {a} − {args.baseline} | {b} − {args.baseline} | ratio |\n|---|---|---|---|\n"
                    + "\n".join(lines) + "\n")
        tables.insert(0, top)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(tables)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
