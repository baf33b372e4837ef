"""
A boosted encoder as a small file: only what stage 3 trained in the encoder (every layer's Attn+ and gate, bf16),
and back to a full encoder directory that load_vit reads, given the baseline it was trained from.

    python tools/boosted_encoder.py pack runs/b15-boost-s1/stage3/vision results/b15/b15-boost-s1-encoder.safetensors
    python tools/boosted_encoder.py unpack weights/dinov2-s14 results/b15/b15-boost-s1-encoder.safetensors runs/boosted
    python eval.py --vision weights/dinov2-s14 --vision runs/boosted          # re-probe it

Attn+ is stored as its change from the frozen Attn it was cloned from (keys `...attn_plus_delta...`), not as its
weights: bf16 rounds each number by up to 0.4 %, which on the weights themselves is about the size of the change
stage 3 makes (the unpacked encoder would not re-probe as measured), and on the change is 0.4 % of it. Files of the
older kind (Attn+'s own weights under `...attn_plus...`) still unpack.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import add_dual_channel  # noqa: E402
from model import load_vit, save_vit  # noqa: E402
from storage.tensors import load_safetensors, save_tensors  # noqa: E402


PLUS, DELTA = ".attn_plus.", ".attn_plus_delta."  # Attn+'s weights (older files), its change from Attn


def is_boost(name: str) -> bool:
    return PLUS in name or DELTA in name or name.endswith(".attn.gate")


def frozen_of(name: str) -> str:
    """blocks.3.attn.attn_plus.q_proj.weight (or its _delta) -> blocks.3.attn.attn.q_proj.weight"""
    return name.replace(DELTA if DELTA in name else PLUS, ".attn.")


def pack(vision_dir, out) -> Path:
    own = load_vit(vision_dir).state_dict()
    state = {k: v.to(torch.bfloat16) for k, v in own.items() if k.endswith(".attn.gate")}
    state.update({k.replace(PLUS, DELTA): (v.float() - own[frozen_of(k)].float()).to(torch.bfloat16)
                  for k, v in own.items() if PLUS in k})
    if not state:
        raise ValueError(f"{vision_dir}: no dual-channel tensors (not a stage-3 export of --vision-tune dual)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(state, Path(out))
    return Path(out)


def unpack(baseline_dir, packed, out) -> Path:
    vit = load_vit(baseline_dir)
    add_dual_channel(vit)
    own, state = vit.state_dict(), load_safetensors(packed)
    wanted = {k for k in own if is_boost(k)}
    names = {k.replace(DELTA, PLUS): k for k in state}  # Attn+ (or gate) name -> the file's key
    if set(names) != wanted:
        raise KeyError(f"{packed} does not fit {baseline_dir}: missing {sorted(wanted - set(names))[:8]}, "
                       f"unexpected {sorted(set(names) - wanted)[:8]}")
    new = {k: (own[frozen_of(f)].float() + state[f].float()) if DELTA in f else state[f].float()
           for k, f in names.items()}
    vit.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in new.items()}})
    save_vit(vit, out)
    return Path(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="a stage-3 encoder export -> its gates and Attn+'s change from Attn, bf16 "
                       "safetensors")
    p.add_argument("vision")
    p.add_argument("out")
    u = sub.add_parser("unpack", help="baseline encoder + packed file -> an encoder directory load_vit reads")
    u.add_argument("baseline")
    u.add_argument("packed")
    u.add_argument("out")
    args = ap.parse_args(argv)
    print(pack(args.vision, args.out) if args.cmd == "pack" else unpack(args.baseline, args.packed, args.out))


if __name__ == "__main__":
    main()
