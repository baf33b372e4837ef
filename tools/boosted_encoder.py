"""
A boosted encoder as a small file: only what stage 3 trained in the encoder (every layer's Attn+ and gate, bf16),
and back to a full encoder directory that load_vit reads, given the baseline it was trained from.

    python tools/boosted_encoder.py pack runs/b15-boost-s1/stage3/vision results/b15-boost-s1-encoder.safetensors
    python tools/boosted_encoder.py unpack weights/dinov2-s14 results/b15-boost-s1-encoder.safetensors runs/boosted
    python eval.py --vision weights/dinov2-s14 --vision runs/boosted          # re-probe it

bf16 rounds Attn+ by ~0.2 % of each weight, about the size of the change stage 3 makes: re-probing an unpacked
encoder measures nearly, not exactly, the exported one (eval.py prints both encoders' fingerprints).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import add_dual_channel  # noqa: E402
from model import load_vit, save_vit  # noqa: E402
from storage.tensors import load_safetensors, save_tensors  # noqa: E402


def is_boost(name: str) -> bool:
    return ".attn_plus." in name or name.endswith(".attn.gate")


def pack(vision_dir, out) -> Path:
    state = {k: v.to(torch.bfloat16) for k, v in load_vit(vision_dir).state_dict().items() if is_boost(k)}
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
    if set(state) != wanted:
        raise KeyError(f"{packed} does not fit {baseline_dir}: missing {sorted(wanted - set(state))[:8]}, "
                       f"unexpected {sorted(set(state) - wanted)[:8]}")
    vit.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})
    save_vit(vit, out)
    return Path(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="a stage-3 encoder export -> its Attn+ and gates, bf16 safetensors")
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
