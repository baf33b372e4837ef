"""
Issue 29's gates, each with its number and interval, before any stage-3 run of the critic experiment:

1. the critic reads: its point-depth AbsRel on held-out conversations <= 1.5 x the lin.1 probe's at the same points
   (tools/critic_reading.py --out);
2. the image decides the encoder's gradient at stage 3's start: image share of the Attn+ gradient > 0.5, its 95 %
   interval above 0 (tools/gradient_noise.py --out, group "attn+ all");
3. the boost and the control push apart: cos(boost, control) < 0.5 (same file).

    python experiments/critic_gates.py --critic results/c/c-critic.json --gradient results/c/c-gradient.json \\
        --out results/c/c-gates.md

Writes the table (markdown) and exits 0 when every gate passes, 1 when one fails (experiments/gpu.sh stops there
unless FORCE=1).
"""

import argparse
import json
import sys
from pathlib import Path

RATIO, SHARE, COS = 1.5, 0.5, 0.5


def interval(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "—"


def gates(critic: dict, gradient: dict) -> list:
    """[(gate, number, interval, threshold, passed)] from the two tools' JSON outputs."""
    name, c = next(iter(critic["critics"].items()))  # the first critic measured
    g, ratio = gradient["groups"]["attn+ all"], c["ratio"]
    read = f"{c['read']:.0%} of {c['points']} points read"
    what = f"critic {c['critic_absrel']:.3f}, probe {c['probe_absrel']:.3f}, {read}" if ratio is not None else read
    rows = [(f"critic AbsRel / probe AbsRel ({name}: {what})", ratio, c.get("ratio_ci95"), f"<= {RATIO}",
             ratio is not None and ratio <= RATIO)]
    share, cos = g["image_share"], g["cos_boost_control"]
    rows.append(("image share of the Attn+ gradient at stage 3's start", share["value"], share["ci95"],
                 f"> {SHARE}, interval above 0", share["value"] > SHARE and share["ci95"][0] > 0))
    rows.append(("cos(boost, control) of the Attn+ gradient", cos["value"], cos["ci95"], f"< {COS}",
                 cos["value"] < COS))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--critic", required=True, help="tools/critic_reading.py's --out (one critic)")
    ap.add_argument("--gradient", required=True, help="tools/gradient_noise.py's --out")
    ap.add_argument("--out", help="write the table here (markdown)")
    args = ap.parse_args(argv)
    critic = json.loads(Path(args.critic).read_text())
    rows = gates(critic, json.loads(Path(args.gradient).read_text()))
    lines = ["| gate | value | 95 % interval | passes when | passed |", "|---|---|---|---|---|"]
    lines += [f"| {g} | {'—' if v is None else f'{v:.3g}'} | {interval(ci)} | {t} | {'yes' if ok else 'NO'} |"
              for g, v, ci, t, ok in rows]
    c = next(iter(critic["critics"].values()))  # the critic gate 1 read
    if c.get("prior_absrel") is not None:  # not a gate: does the critic beat a guess from the asked (u, v) alone?
        lines.append(f"\nBeside gate 1 (not a gate): the blind (u, v) prior reads the same points at AbsRel "
                     f"{c['prior_absrel']:.3f} {interval(c['prior_absrel_ci95'])}; critic / prior "
                     f"{c['critic_absrel'] / c['prior_absrel']:.2f} {interval(c['critic_over_prior_ci95'])} (the "
                     f"critic reads the image only where this is below 1).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    sys.exit(0 if all(ok for *_, ok in rows) else 1)


if __name__ == "__main__":
    main()
