"""
How well the critic reads depth (issue 29's first gate): on held-out spatial conversations, the VLM's answers to the
point-depth turns against the true depth at the asked pixels, beside the lin.1 probe's reading of the same pixels of
the same images from the frozen encoder the VLM sees. The first number says how well the critic reads, the second what
the features allow; the gate asks critic AbsRel <= 1.5 x probe AbsRel.

    python tools/critic_reading.py --qa data/critic/heldout --vlm runs/NAME/stage2 --probes data/probes-1920-seed201 \
        --out results/critic/reading.json
    python tools/critic_reading.py --qa data/critic/heldout --answers s2=runs/NAME/eval/answers-stage2.jsonl ...

Points: every point of every "depth" turn (data.py spatial; --points-per-turn K asks K at once, answered in order);
truth: the sample's stored depth map at the point's pixel (not the answer's rounded text). An answer's k-th length is
point k's reading; a point without one is unread (its share is reported; AbsRel is over read points, for the critic
and the probe alike). The probe: eval.py's lin.1 head ([patch; CLS] of the last block, --depth-heads heads averaged)
fitted on the probe set's training views, predicting the conversations' images at their own size. Intervals: 95 %
bootstrap over conversations (paired: the ratio resamples the same conversations for both).
The blind prior (--prior-data, stage 2's spatial conversations): what the question's (u, v) alone tells, no image: the
AbsRel-optimal depth (a 1/depth-weighted median) of stage 2's points in the same cell of an 8 x 8 grid. Its row carries
most of it in a room (lower is nearer), and the LLM reads the coordinates as text: a critic near the prior has learned
where points tend to be, not what the image shows.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.images import read_rgb  # noqa: E402
from dataengine.views import load_depth  # noqa: E402
from evaluation import probes, qa, suite  # noqa: E402
from model import load_vit  # noqa: E402
from storage.atomic import write_text_atomically  # noqa: E402
from train import load_stage  # noqa: E402


def depth_points(samples: list, root: Path) -> list:
    """[(sample index, turn index, k-th point of the turn, row, col, true depth m)] of every depth turn's points."""
    out = []
    for i, s in enumerate(samples):
        depth = load_depth(root / s["meta"]["depth"])
        for t, turn in enumerate(s["meta"]["turns"]):
            if turn["kind"] == "depth":
                for k, p in enumerate(turn["points"]):
                    col, row = s["meta"]["points"][p]["px"]
                    out.append((i, t, k, row, col, float(depth[row, col])))
    return out


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def position_prior(points: list, train: list, shape: tuple, grid: int = 8) -> np.ndarray:
    """The blind reading of each point: the depth c minimising sum |c - d| / d over the training points (depth_points
    of stage 2's conversations) in its cell of a grid x grid split of the (H, W) image; all of them where the cell is
    empty."""
    cell = lambda p: (p[3] * grid // shape[0], p[4] * grid // shape[1])  # noqa: E731  (row, col) -> cell
    depth = np.array([p[-1] for p in train])
    cells = np.array([cell(p) for p in train]).reshape(-1, 2)
    whole = weighted_median(depth, 1 / depth)
    prior = {}
    for c in {cell(p) for p in points}:
        mine = (cells == c).all(axis=1)
        prior[c] = weighted_median(depth[mine], 1 / depth[mine]) if mine.any() else whole
    return np.array([prior[cell(p)] for p in points])


def critic_readings(points: list, answers: list) -> np.ndarray:
    """The k-th length (m) each depth answer gives, NaN where it gives fewer."""
    got = []
    for i, t, k, *_ in points:
        lengths = [v for v, _ in qa.parse_numbers(answers[i][t])]
        got.append(lengths[k] if k < len(lengths) else np.nan)
    return np.array(got)


def probe_readings(points: list, samples: list, root: Path, vit, ps, cfg, image_size: int) -> np.ndarray:
    """lin.1 fitted on the probe set's training views, read at each point of the conversations' images."""
    feats = suite.cached_features(vit, ps, image_size, 112, cache=True, log=print)
    train, D = torch.from_numpy(ps.train), vit.cfg.dim
    images = np.stack([read_rgb(root / (s["image"][0] if isinstance(s["image"], list) else s["image"]))
                       for s in samples])  # (N, H, W, 3): single-view spatial data
    mine = suite.encode(vit, SimpleNamespace(images=images, crops=None), image_size, 112)
    pred = probes.fit_predict_depth(feats["patches"][train][..., -D:], feats["cls"][train][:, -D:],
                                    torch.from_numpy(ps.depth)[train], mine["patches"][..., -D:],
                                    mine["cls"][:, -D:], cfg, images.shape[1:3])
    return np.array([float(pred[i, row, col]) for i, _, _, row, col, _ in points])


def interval(values_of, groups: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list:
    """95 % bootstrap interval of values_of(mask of resampled points) over conversations."""
    rng, ids = np.random.default_rng(seed), np.unique(groups)
    boots = []
    for _ in range(n_boot):
        pick = rng.choice(ids, len(ids))
        weight = np.bincount(np.searchsorted(ids, pick), minlength=len(ids))[np.searchsorted(ids, groups)]
        boots.append(values_of(weight))
    return [float(x) for x in np.nanquantile(boots, [0.025, 0.975])]


def compare(points: list, critic: np.ndarray, probe: np.ndarray, prior: np.ndarray | None = None) -> dict:
    """AbsRel of the critic and of the probe over the points the critic read (None when it read none), the probe's
    over every point, their ratio, each with its interval, and the shares within 10 %; with a prior, its AbsRel over
    the same points."""
    truth, groups = np.array([p[-1] for p in points]), np.array([p[0] for p in points])
    read = np.isfinite(critic) & (truth > 0)
    rel_c, rel_p = np.abs(critic - truth) / np.maximum(truth, 1e-6), np.abs(probe - truth) / np.maximum(truth, 1e-6)
    mean = lambda rel, w, where: float(np.sum(rel[where] * w[where]) / max(np.sum(w[where]), 1e-9))
    one, everywhere = np.ones(len(points)), truth > 0
    out = {"points": len(points), "conversations": int(len(np.unique(groups))), "read": float(read.mean()),
           "probe_absrel_all": mean(rel_p, one, everywhere),
           "probe_absrel_all_ci95": interval(lambda w: mean(rel_p, w, everywhere), groups)}
    if not read.any():
        return {**out, "critic_absrel": None, "probe_absrel": None, "ratio": None}
    if prior is not None:
        rel_b = np.abs(prior - truth) / np.maximum(truth, 1e-6)
        out.update(prior_absrel=mean(rel_b, one, read), prior_absrel_ci95=interval(lambda w: mean(rel_b, w, read),
                                                                                  groups),
                   critic_over_prior_ci95=interval(lambda w: mean(rel_c, w, read) / max(mean(rel_b, w, read), 1e-9),
                                                   groups))
    return {**out, "critic_absrel": mean(rel_c, one, read), "critic_absrel_ci95": interval(
                lambda w: mean(rel_c, w, read), groups),
            "probe_absrel": mean(rel_p, one, read), "probe_absrel_ci95": interval(lambda w: mean(rel_p, w, read),
                                                                                  groups),
            "ratio": mean(rel_c, one, read) / mean(rel_p, one, read),
            "ratio_ci95": interval(lambda w: mean(rel_c, w, read) / max(mean(rel_p, w, read), 1e-9), groups),
            "critic_within10": float(np.mean(rel_c[read] <= 0.10)), "probe_within10": float(np.mean(rel_p[read] <= 0.10))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qa", required=True, help="held-out spatial conversations (a data.py spatial directory)")
    ap.add_argument("--vlm", action="append", default=[], help="a finished stage directory whose VLM answers")
    ap.add_argument("--answers", action="append", default=[], help="NAME=answers.jsonl (eval.py's answers files)")
    ap.add_argument("--vision", default="weights/dinov2-s14", help="the frozen encoder the critic reads")
    ap.add_argument("--probes", required=True, help="probe set the lin.1 head is fitted on (its training views)")
    ap.add_argument("--limit", type=int, default=64, help="held-out conversations")
    ap.add_argument("--depth-heads", type=int, default=3, help="lin.1 heads averaged (eval.py's protocol)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="a tenth of the probe's steps: a smoke test")
    ap.add_argument("--prior-data", help="stage 2's spatial conversations: the blind (u, v) prior's training points")
    ap.add_argument("--out", help="write the results here (JSON)")
    args = ap.parse_args(argv)
    if not args.vlm and not args.answers:
        ap.error("give --vlm STAGE_DIR or --answers NAME=FILE: whose reading to measure")
    root = Path(args.qa)
    samples = qa.load_conversations(root, args.limit)
    answers = {name or Path(f).stem: qa.read_answers(f, samples)
               for name, _, f in (a.rpartition("=") for a in args.answers)}
    for stage_dir in args.vlm:
        vlm, tok, cfg = load_stage(stage_dir)
        answers[stage_dir] = qa.evaluate_qa(samples, qa.vlm_answer_fn(vlm, tok, cfg.image_size, root))[1]
    points = depth_points(samples, root)
    if not points:
        raise SystemExit(f"{root}: no depth turns in the first {len(samples)} conversations")
    cfg = probes.ProbeConfig(depth_heads=args.depth_heads)
    cfg = cfg.shortened(0.1) if args.quick else cfg
    probe = probe_readings(points, samples, root, load_vit(args.vision), probes.load_probe_set(args.probes), cfg,
                           args.image_size)
    prior = None
    if args.prior_data:
        prior_root = Path(args.prior_data)
        prior_samples = qa.load_conversations(prior_root, None)
        shapes = {d: load_depth(r / ss[0]["meta"]["depth"]).shape for d, r, ss in
                  (("--qa", root, samples), ("--prior-data", prior_root, prior_samples))}
        if len(set(shapes.values())) > 1:
            raise SystemExit(f"critic_reading: --prior-data {prior_root} and --qa {root} have images of different "
                             f"sizes {shapes}: the (u, v) prior needs one")
        prior = position_prior(points, depth_points(prior_samples, prior_root), shapes["--qa"])
    out = {"qa": str(root), "probes": args.probes, "vision": args.vision, "probe_config": dataclasses.asdict(cfg),
           "prior_data": args.prior_data,
           "critics": {name: compare(points, critic_readings(points, a), probe, prior) for name, a in answers.items()}}
    for name, r in out["critics"].items():
        line = f"{name}: {r['points']} points of {r['conversations']} conversations, {r['read']:.0%} read"
        if r["ratio"] is not None:
            line += (f" | AbsRel critic {r['critic_absrel']:.3f} {r['critic_absrel_ci95']}, probe {r['probe_absrel']:.3f}"
                     f" {r['probe_absrel_ci95']}, ratio {r['ratio']:.2f} {r['ratio_ci95']} (gate <= 1.5) | within "
                     f"10 %: critic {r['critic_within10']:.0%}, probe {r['probe_within10']:.0%}")
            if "prior_absrel" in r:
                line += f" | blind (u, v) prior {r['prior_absrel']:.3f} {r['prior_absrel_ci95']}"
        print(line + f" | probe AbsRel at every point {r['probe_absrel_all']:.3f} {r['probe_absrel_all_ci95']}")
    if args.out:
        write_text_atomically(Path(args.out), json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
