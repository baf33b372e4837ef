"""
Data: the spatial conversations SpatialBoost trains on, and every other kind, written to LLaVA-format dataset
directories; and the checker that recomputes every answer from the stored ground truth. The engine lives in
dataengine/ (numpy and PIL only: generating data never imports torch); the training Dataset that reads these
directories is training/dataset.py.

    python data.py spatial --n 1000 --out data/spatial --workers 2        # built-in synthetic rooms (exact geometry)
    python data.py spatial --n 200 --out data/mine --rgbd my_frames/      # real RGB-D frame folders (scenes.py format)
    python data.py captions --n 1000 --out data/captions                  # stage 1: image + caption
    python data.py instruct --n 1000 --out data/instruct                  # stage 2: single-view instruction QA
    python data.py multiview --n 1000 --out data/multiview                # stage 2: two views, VQA
    python data.py spatial-multiview --n 1000 --out data/spatial-mv       # stage 3: two views, spatial turns
    python data.py check data/spatial                                     # recompute every answer from ground truth

    from data import generate
    generate("spatial", "data/spatial", n=1000, seed=0, size=448)         # the same from Python

Pixel coordinates are (u/W, v/H), 3 decimals; 3D answers are in views.py's answer frame, meters, 2 decimals; answers
are computed from the ground truth exactly as stored, so `check` recomputes them from the files alone.
"""

import argparse
import sys

from dataengine.check import check
from dataengine.writer import KINDS, ORDERED, ORDERS, SIZES, write_dataset

__all__ = ["KINDS", "check", "generate", "main"]


def encoder_embedding(encoder, size: int = 224):
    """images -> (n, P, D) unit-length patch tokens (numpy) of the encoder at `encoder`, for the feature band. torch
    is imported here, only when --encoder is given, so that data generation and its workers stay torch-free."""
    import torch

    from model import load_vit, preprocess

    vit = load_vit(encoder).eval()

    def embed(images):
        with torch.no_grad():
            tokens = torch.cat([vit(preprocess(images[i:i + 16], vit.cfg, size=size))[:, vit.cfg.n_prefix:]
                                for i in range(0, len(images), 16)])
        return torch.nn.functional.normalize(tokens.float(), dim=-1).numpy()
    return embed


def generate(kind: str, out, n: int, seed: int = 0, size: int = 448, order: str = "forward", workers: int = 1,
             rgbd=None, shard_size: int = 256, progress: bool = True, band=None, encoder=None, depth_scale=1.0,
             points_per_turn: int = 1):
    """dataengine.writer.write_dataset, with `encoder` (a path) loaded to pair RGB-D frames without poses."""
    embed = encoder_embedding(encoder) if encoder else None
    return write_dataset(kind, out, n, seed, size, order, workers, rgbd, shard_size, progress, band, encoder, embed,
                         depth_scale, points_per_turn)


HELP = {"spatial": "single-view spatial conversations, 12 turns pixel -> object -> scene (stage 3)",
        "captions": "one image and one caption turn, phrasings varied (stage 1, alignment)",
        "instruct": "single-view instruction QA from the scene graph: counting, colour, existence, attributes, "
                    "short and long descriptions (stage 2)",
        "grounding": "single-view grounding: what is at (u, v), an object's box [x1, y1, x2, y2], which of two points "
                     "lies on an object (stage 2: the coordinate interface)",
        "multiview": "two views of a scene in a co-visibility band: common, false-premise and multiple-choice "
                     "questions (stage 2)",
        "spatial-multiview": "two views of a scene: the same point across views, camera motion, relations and "
                             "distances across views, pixel -> object -> scene (stage 3)"}


def at_least(least: int, most: int | None = None):
    """An argparse type: a whole number in [least, most], else a usage error (before anything is written)."""
    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if x < least or (most is not None and x > most):
            raise argparse.ArgumentTypeError(f"{x}: expected {least} .. {most}" if most else f"{x}: must be >= {least}")
        return x
    return parse


def main(argv=None):
    ap = argparse.ArgumentParser(description="SpatialBoost data. Kinds: " + "; ".join(f"{k}: {v}" for k, v in
                                 HELP.items()) + "; check: recompute every answer of a dataset from its ground truth.")
    sub = ap.add_subparsers(dest="kind", required=True)
    for kind, text in HELP.items():
        sp = sub.add_parser(kind, help=text, description=text)
        sp.add_argument("--n", type=at_least(1), required=True, help="number of samples")
        sp.add_argument("--out", required=True, help="dataset directory (re-running continues an interrupted run)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--workers", type=at_least(1), default=1, help="processes (results do not depend on it)")
        sp.add_argument("--rgbd", default=None, help="a folder of RGB-D frame folders (format: scenes.load_rgbd)"
                            + ("; for pairs, a folder of scene folders of frames (pose.txt gives the co-visibility "
                               "band, else --encoder)" if "multiview" in kind else ""))
        sp.add_argument("--depth-scale", type=float, default=1.0, help="--rgbd: stored depth x this = meters "
                        "(0.001 for a depth.npy in millimetres; depth.png is read as millimetres already)")
        sp.add_argument("--size", type=at_least(*SIZES), default=448, help="synthetic image size (square), pixels")
        if kind in ORDERED:
            sp.add_argument("--order", choices=ORDERS, default="forward", help="turn order: pixel->object->scene"
                            "(->caption), its reverse, or shuffled (the paper's ablation)")
        if kind == "spatial":
            sp.add_argument("--points-per-turn", type=int, choices=range(1, 9), default=1, metavar="K",
                            help="points each depth / 3D-position turn asks about, 1 to 8 (default 1): \"What is the "
                                 "depth at (u1, v1), (u2, v2) and (u3, v3)?\" -> \"2.35 m, 1.80 m and 3.02 m.\"")
        if "multiview" in kind:
            sp.add_argument("--band", default=None, metavar="LO,HI",
                            help="co-visibility band: the share of view-1 pixels that view 2 sees unoccluded "
                                 "(default 0.35,0.65); with --encoder, the feature-distance band (default 0.74,0.94)")
            sp.add_argument("--encoder", default=None, help="RGB-D frames without pose.txt: pair them by this "
                            "encoder's feature distance (a directory load_vit reads)")
        sp.add_argument("--shard-size", type=at_least(1), default=256, help="samples per atomically written shard")
    ck = sub.add_parser("check", help="recompute every numeric and yes/no answer of a dataset from its ground truth")
    ck.add_argument("dir")
    ck.add_argument("--limit", type=at_least(1), default=None, help="check only the first N >= 1 samples "
                    "(default: all)")
    args = ap.parse_args(argv)
    if args.kind == "check":
        problems, stats = check(args.dir, args.limit)
        for p in problems:
            print(p)
        print(f"checked {stats.pop('samples')} samples; yes/no answers {stats}; {len(problems)} problems")
        sys.exit(1 if problems else 0)
    band = getattr(args, "band", None)
    if band is not None:
        try:
            band = [float(x) for x in band.split(",")]
        except ValueError:
            ap.error(f"--band {band!r}: expected two numbers LO,HI")
    try:
        print(generate(args.kind, args.out, args.n, args.seed, args.size, getattr(args, "order", "forward"),
                       args.workers, args.rgbd, args.shard_size, band=band, encoder=getattr(args, "encoder", None),
                       depth_scale=args.depth_scale, points_per_turn=getattr(args, "points_per_turn", 1)))
    except (ValueError, OSError) as e:  # bad input (an RGB-D frame, an option, --out): its message names it
        raise SystemExit(f"data.py {args.kind}: {e}") from e


if __name__ == "__main__":
    main()
