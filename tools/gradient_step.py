"""
Where would stage 3 take the encoder if every step saw unlimited data? The mean stage-3 gradient over many
conversations, at the point where stage 3 starts, and encoders moved one step along it, for eval.py to probe:

    python tools/gradient_step.py --init runs/p1/stage2 --data data/b15/spatial-grad303 --n 256 --preset small \
        --point-tokens --out runs/gradstep-303
    python eval.py --vision weights/dinov2-s14 --vision runs/gradstep-303/image-0.02 ...
    bash experiments/gradient_step.sh       # docs/log's table: three conversation sets, one eval, boost_report

Four directions, three from each conversation's gradient with its own image (g) and with another sample's image
(h, the pairing of train.py --shuffle-images):
- boost   = E[g]: what stage 3 itself follows;
- control = E[h]: what the shuffled-answer control follows (the format, the answers' distribution);
- image   = E[g - h]: the part only the true image teaches;
- random  = a Gaussian direction (from --seed): the null, what any step of that size does to the probes.
Every Attn+ tensor moves against its direction by --rel of its own norm (as Adam, each tensor moves by a comparable
relative amount; a 16-step stage 3 at 2e-4 moves each layer's Attn+ by 1-2.5 %; a tensor of norm 0 stays). The gates
stay at 0 (σ = ½), so the attention output moves by half of Attn+'s change, as at the start of training.

tools/gradient_noise.py says how noisy a mean over n samples is (B_img: the image part needs n >> B_img). This tool
asks the other question: if that mean were known, would it make the probes better? If the image direction does not
improve depth even here, no amount of stage-3 data at this size of step will.

Two handles on the forgetting: --only moves a subset of the tensors (a regular expression over their names: which
layers or projections carry the gain and which the loss), --precondition steps in the metric of each projection's
output on the stage-3 images (input moments, K-FAC's input factor). Every encoder's line in the log says how much the
step changes the projections' outputs (|ΔW x| / |W x|): the gradient directions move them ~5x more than a random
step of the same weight norm.

Writes OUT/mean.safetensors (the two mean gradients, per Attn+ tensor) and OUT/<direction>[-pre<damping>][-<tag>]-<rel>/
(encoders in load_vit's format). --again reuses mean.safetensors and only writes the encoders.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from model import save_vit  # noqa: E402
from storage.tensors import load_safetensors, save_tensors  # noqa: E402
from tools.gradient_noise import stage3_start  # noqa: E402
from training.dataset import collate  # noqa: E402

DIRECTIONS = ("boost", "control", "image", "random")


def attn_plus(vlm) -> dict:
    return {k: p for k, p in vlm.named_parameters() if ".attn_plus." in k}


def mean_gradients(vlm, tok, rt, own, other, n: int, seed: int, log=print) -> dict:
    """{'own.<param>': E[g], 'other.<param>': E[h]} over n samples, each sample's loss per supervised token (one
    sample per backward: every sample weighs the same, whatever its length)."""
    params = attn_plus(vlm)
    order = np.random.default_rng(seed).permutation(len(own))[:n]
    if len(order) < n:
        raise ValueError(f"--n {n}: the data has only {len(own)} samples")
    out, t0 = {}, time.time()
    for which, ds in (("own", own), ("other", other)):
        sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        for j, i in enumerate(order):
            item = ds[int(i)]
            if item["problem"]:
                raise ValueError(f"sample {i}: {item['problem']}")
            vlm.zero_grad(set_to_none=True)
            train.forward_backward(vlm, vlm, [collate([item], pad_id=tok.pad_id)], rt)
            for k, p in params.items():
                sums[k] += p.grad.float()
            if (j + 1) % 16 == 0:
                log(f"  {which} image: {j + 1}/{n} samples ({time.time() - t0:.0f} s)")
        out.update({f"{which}.{k}": s / n for k, s in sums.items()})
    return out


def direction(mean: dict, name: str, which: str, gen: torch.Generator) -> torch.Tensor:
    g, h = mean[f"own.{name}"], mean[f"other.{name}"]
    if which == "random":
        return torch.randn(g.shape, generator=gen)
    return {"boost": g, "control": h, "image": g - h}[which]


def input_moments(vlm, items: list) -> dict:
    """{linear name: E[x x^T]} over every token of `items`' images, x = [the Linear's input, 1], for each Attn+
    projection (k and v read q's input). The metric in which a weight change ΔW changes the layer's output:
    E|ΔW x|^2 = tr(ΔW Σ ΔW^T)."""
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().float().flatten(0, -2)  # (tokens, in)
            x = torch.cat([x, torch.ones(len(x), 1)], 1)
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
            counts[name] = counts.get(name, 0) + len(x)
        return fn

    for name, m in vlm.vit.named_modules():
        if name.endswith("attn_plus.q_proj") or name.endswith("attn_plus.o_proj"):
            hooks.append(m.register_forward_hook(hook("vit." + name)))
    with torch.no_grad():
        for item in items:
            vlm.vit(item["pixels"].to(next(vlm.vit.parameters()).dtype))
    for h in hooks:
        h.remove()
    moments = {k: (s / counts[k]).float() for k, s in sums.items()}
    for k in list(moments):  # k and v share q's input
        if k.endswith("q_proj"):
            moments[k[:-6] + "k_proj"] = moments[k[:-6] + "v_proj"] = moments[k]
    return moments


def step(vlm, mean: dict, which: str, rel: float, seed: int = 0, moments: dict | None = None,
         damping: float = 0.0, only: str = "") -> dict:
    """In place: every Attn+ tensor W whose name matches the regular expression `only` -> W - rel * |W| * D / |D|,
    D its part of direction `which`; the rest stay. With damping > 0 each Linear's [weight, bias] direction is first
    preconditioned by its input moments, D -> D (Σ + λI)^-1 with λ = damping * tr(Σ) / dim: the step that changes
    the layer's output least per unit of first-order loss. -> {linear: |ΔW x| / |W x| over the moments' tokens, how
    much the step changes the projection's output} when moments are given."""
    gen = torch.Generator().manual_seed(seed)
    params = attn_plus(vlm)
    dirs = {k: direction(mean, k, which, gen) for k in params}  # in parameter order: the random draws stay put
    change = {}
    with torch.no_grad():
        chosen = sorted({k.rsplit(".", 1)[0] for k in params if re.search(only, k)})
        if not chosen:
            raise ValueError(f"--only {only!r} matches no Attn+ tensor (names like {next(iter(params))})")
        for lin in chosen:
            # [weight, bias] as one (out, in + 1) matrix acting on [x, 1]; DINOv3's k_proj has no bias
            ps = [params[lin + ".weight"]] + ([params[lin + ".bias"]] if lin + ".bias" in params else [])
            d = torch.cat([dirs[lin + ".weight"]] + [dirs[lin + ".bias"][:, None]] * (len(ps) == 2), 1)
            if not d.norm() > 0:
                raise ValueError(f"{lin}: the {which} direction is zero (no gradient reached this tensor)")
            S = moments[lin][: d.shape[1], : d.shape[1]] if moments is not None else None
            if damping > 0:
                d = torch.linalg.solve(S + damping * S.trace() / len(S) * torch.eye(len(S)), d.T).T
            # each tensor by rel of its own norm; a zero tensor, or one the direction misses, stays
            steps = [rel * p.float().norm() / dp.norm() * dp if dp.norm() > 0 else 0 * dp
                     for p, dp in zip(ps, (d[:, :-1], d[:, -1]) if len(ps) == 2 else (d,))]
            if S is not None:
                W, D = (torch.cat([t.float().reshape(len(t), -1) for t in ts], 1) for ts in (ps, steps))
                change[lin] = float(((D @ S * D).sum() / (W @ S * W).sum()).sqrt())
            for p, dp in zip(ps, steps):
                p -= dp.to(p.dtype)
    return change


def main(argv=None):
    ap = argparse.ArgumentParser(description="encoders one step along the mean stage-3 gradient (boost, control, "
                                             "image-only) and a random one, for eval.py")
    ap.add_argument("--init", required=True, help="the finished stage-2 directory stage 3 would start from")
    ap.add_argument("--data", required=True, help="stage-3 data (a data.py spatial directory)")
    ap.add_argument("--out", required=True, help="directory: mean.safetensors and one encoder per direction and rel")
    ap.add_argument("--n", type=int, default=256, help="samples (two forward-backward passes each)")
    ap.add_argument("--rel", default="0.02,0.05", help="relative step per Attn+ tensor, comma-separated")
    ap.add_argument("--directions", default=",".join(DIRECTIONS))
    ap.add_argument("--seed", type=int, default=0,
                    help="which samples, the control's image pairing, the random direction")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--again", action="store_true", help="reuse OUT/mean.safetensors: no passes")
    ap.add_argument("--precondition", type=float, default=0.0, metavar="DAMPING",
                    help="> 0: precondition each Linear's direction by its input moments (Σ + λI)^-1, "
                         "λ = DAMPING * tr(Σ)/dim, measured on --moment-samples samples' images")
    ap.add_argument("--moment-samples", type=int, default=32)
    ap.add_argument("--only", default="", help="a regular expression: move only the Attn+ tensors whose name it "
                                               "matches (e.g. '[qk]_proj', 'blocks\\.1[01]\\.'); the rest stay at Attn")
    ap.add_argument("--tag", default="", help="added to the encoders' directory names (tell --only runs apart)")
    args, extra = ap.parse_known_args(argv)  # anything else goes to train.py's Config (--preset, --point-tokens)
    rels = [float(r) for r in args.rel.split(",")]
    which = args.directions.split(",")
    if any(w not in DIRECTIONS for w in which) or any(not r > 0 for r in rels):
        ap.error(f"--directions from {DIRECTIONS}; --rel positive numbers")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    vlm, tok, rt, own, other = stage3_start(args.init, args.data, args.seed, args.dtype,
                                            tuple(extra or ["--preset", "small"]))
    start = {k: p.detach().clone() for k, p in attn_plus(vlm).items()}
    if args.again:
        mean = load_safetensors(out / "mean.safetensors")
    else:
        mean = mean_gradients(vlm, tok, rt, own, other, args.n, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(mean, out / "mean.safetensors")
    for k in start:
        g, h = mean[f"own.{k}"], mean[f"other.{k}"]
        cos = float(g.flatten() @ h.flatten() / (g.norm() * h.norm()))
        print(f"{k:<48} |E g| {g.norm():.3e}  |E h| {h.norm():.3e}  |E(g-h)| {(g - h).norm():.3e}  cos {cos:+.3f}")
    items = [own[i] for i in range(min(args.moment_samples, len(own)))]
    moments = input_moments(vlm, items)
    tag = (f"-pre{args.precondition:g}" if args.precondition > 0 else "") + (f"-{args.tag}" if args.tag else "")
    for w in which:
        for rel in rels:
            with torch.no_grad():
                for k, p in attn_plus(vlm).items():
                    p.copy_(start[k])
            change = step(vlm, mean, w, rel, args.seed, moments, args.precondition, args.only)
            save_vit(vlm.vit, out / f"{w}{tag}-{rel:g}")
            print(f"wrote {out / f'{w}{tag}-{rel:g}'}: each Attn+ output moves by {np.mean(list(change.values())):.4f} "
                  f"of its size (mean over {len(change)} projections, on {len(items)} samples' images)")


if __name__ == "__main__":
    main()
