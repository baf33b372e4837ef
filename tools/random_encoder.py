"""
A random-init ViT of the same shape as a real encoder: the sanity floor of every probe. An evaluation that measures
something must score the pretrained encoder above this one (issue 16).

    python tools/random_encoder.py weights/dinov2-s14 runs/random-dinov2-s14 --seed 0
    python eval.py --vision weights/dinov2-s14 --vision runs/random-dinov2-s14

Same ViTConfig (family, width, depth, patch, registers, position table), weights drawn as ViT.__init__ draws them
(truncated normal, std 0.02; norms at 1 and 0), so preprocessing and token layout are the real encoder's.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import ViT, load_vit, save_vit  # noqa: E402


def random_like(like, seed: int = 0) -> ViT:
    """A freshly initialised ViT with the config of the encoder at `like` (any directory load_vit reads)."""
    cfg = load_vit(like).cfg
    torch.manual_seed(seed)
    return ViT(cfg).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description="write a random-init ViT shaped like a real encoder")
    ap.add_argument("like", help="an encoder directory (load_vit) whose shape to copy")
    ap.add_argument("out", help="output directory (save_vit format; eval.py --vision reads it)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    vit = random_like(args.like, args.seed)
    save_vit(vit, args.out)
    print(f"random-init {vit.cfg.family} ({sum(p.numel() for p in vit.parameters()) / 1e6:.1f}M) -> {args.out}")


if __name__ == "__main__":
    main()
