"""
How much of a stage-3 update is signal, and how much of that signal needs the true image? A diagnostic that costs
two forward-backward passes per sample and no training, run at the point where stage 3 starts.

    python tools/gradient_noise.py --init runs/b15/stage2 --data data/b15/spatial --n 48 --out runs/gradnoise.json
    python tools/gradient_noise.py --again runs/gradnoise.json       # the numbers again, from the saved Gram matrices

For each of n samples, the gradient of its loss per supervised token with respect to what stage 3 trains (the Attn+
of every encoder layer, the projector), once with its own image (g_i) and once with another sample's image (h_i:
the pairing train.py --shuffle-images uses for the control). Per group of tensors, from the Gram matrix of the g's
and h's:

- the simple noise scale B = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):
  the batch size at which a step's gradient is as much signal as noise. Steps on batches much smaller than B are
  mostly noise; the number of samples a run needs grows with B.
- the image share |E[g − h]|² / |E g|²: how much of the mean gradient goes away when the conversation comes with the
  wrong image, i.e. the part the control cannot learn. Near 0: stage 3 mostly teaches the encoder the format.
- B_img = tr(Σ_d) / |E d|² for d_i = g_i − h_i: the noise scale of that image-driven part alone.
- cos(E g, E h): near 1 means the boost and the control push the encoder the same way.

|G|² is estimated without bias (|mean|² − tr(Σ)/n); each number has a bootstrap 95 % interval over samples. A
negative |G|² estimate means the signal is not resolved at this n: B is then reported as "> n".
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from storage.atomic import write_text_atomically  # noqa: E402
from training.dataset import collate  # noqa: E402


def group_of(name: str) -> str:
    """Attn+ tensors by encoder layer ('attn+ 03'), the projector as one group; the gates have no gradient at init
    (Attn+ equals Attn there, so σ(a) multiplies a zero difference) and are left out."""
    if ".attn_plus." in name:
        layer = int(name.split("blocks.")[1].split(".")[0])
        return f"attn+ {layer:02d}"
    return "projector" if name.startswith("projector.") else ""


def sample_gradients(vlm, batch: dict, rt, params: dict) -> dict:
    """One sample's gradient of its loss per supervised token, flattened per group -> {group: (P,) float32}."""
    vlm.zero_grad(set_to_none=True)
    train.forward_backward(vlm, vlm, [batch], rt)
    out = {}
    for name, p in params.items():
        g = p.grad.detach().float().reshape(-1) if p.grad is not None else torch.zeros(p.numel())
        out.setdefault(group_of(name), []).append(g)
    return {k: torch.cat(v) for k, v in out.items()}


def stats(K: np.ndarray, n: int, pick: np.ndarray | None = None) -> dict:
    """From the Gram matrix of [g_1..g_n, h_1..h_n] (2n, 2n): noise scales, image share, cosine. pick: which samples
    (a bootstrap resample; default all). |E x|^2 is the mean of x_a . x_b over pairs of different samples, which is
    unbiased, and stays so for a resample when pairs of copies of one sample are left out too."""
    pick = np.arange(n) if pick is None else pick
    Kgg, Kgh, Khh = (K[np.ix_(pick + a, pick + b)] for a, b in ((0, 0), (0, n), (n, n)))
    Kdd = Kgg - Kgh - Kgh.T + Khh
    distinct = pick[:, None] != pick[None, :]
    if not distinct.any():  # a resample of one sample repeated: no pair to estimate the mean gradient from
        return dict.fromkeys(("B", "image_share", "B_img", "cos_boost_control", "grad_norm", "noise_norm"), np.nan)

    def signal_and_trace(G):  # unbiased |E x|^2, and tr(Σ) = E|x|^2 - |E x|^2
        signal = G[distinct].mean()
        return signal, np.diag(G).mean() - signal

    sig_g, tr_g = signal_and_trace(Kgg)
    sig_h, _ = signal_and_trace(Khh)
    sig_d, tr_d = signal_and_trace(Kdd)
    cross = Kgh[distinct].mean()  # E g . E h
    return {"B": tr_g / sig_g if sig_g > 0 else float("inf"),
            "image_share": sig_d / sig_g if sig_g > 0 else float("nan"),
            "B_img": tr_d / sig_d if sig_d > 0 else float("inf"),
            "cos_boost_control": cross / np.sqrt(sig_g * sig_h) if sig_g > 0 and sig_h > 0 else float("nan"),
            "grad_norm": float(np.sqrt(max(sig_g, 0.0))), "noise_norm": float(np.sqrt(max(tr_g, 0.0)))}


def with_interval(K: np.ndarray, n: int, draws: int = 1000, seed: int = 0) -> dict:
    """stats() and a bootstrap 95 % interval per number, resampling samples (each keeps its g and h together)."""
    point, rng = stats(K, n), np.random.default_rng(seed)
    boot = [stats(K, n, rng.integers(n, size=n)) for _ in range(draws)]
    out = {}
    for key, value in point.items():
        vals = np.array([b[key] for b in boot], dtype=float)
        vals = np.where(np.isnan(vals), np.inf, vals)  # no interpolation: an unbounded end stays inf, never nan
        out[key] = {"value": float(value), "ci95": [float(np.percentile(vals, 2.5, method="lower")),
                                                    float(np.percentile(vals, 97.5, method="higher"))]}
    return out


def stage3_start(init: str, data: str, seed: int, dtype: str, extra: tuple):
    """-> (vlm, tok, rt, own, other): the VLM stage 3 starts from (Attn+ = Attn, gates 0) and the stage-3 data, each
    sample with its own image and with another's (the pairing of train.py --shuffle-images for this seed)."""
    argv = ["--stage", "3", "--init", init, "--data", data, "--dtype", dtype, "--seed", str(seed), "--no-probe",
            "--name", "gradient-diagnostic", *extra]
    cfg = train.parse_config(argv)
    rt = train.setup_runtime(cfg)
    vlm, tok, _, _ = train.stage_model(cfg, rt, Path("(no run: a gradient diagnostic)"))
    own = train.stage_data(cfg, rt, vlm, tok)[0]
    other = train.stage_data(train.parse_config(argv + ["--shuffle-images"]), rt, vlm, tok)[0]
    return vlm, tok, rt, own, other


def measure(init: str, data: str, n: int, seed: int = 0, dtype: str = "bf16", extra: tuple = (), log=print) -> dict:
    """The Gram matrices per group over n samples of `data`, at the model stage 3 would start from (`init`)."""
    vlm, tok, rt, own, other = stage3_start(init, data, seed, dtype, extra)
    params = {k: p for k, p in train.trainable_state(vlm).items() if group_of(k)}
    order = np.random.default_rng(seed).permutation(len(own))[:n]
    if len(order) < n:
        raise ValueError(f"--n {n}: {data} has only {len(own)} samples")
    grads, t0 = {}, time.time()  # {group: [g_1..g_n, h_1..h_n]}
    for which, ds in (("own image", own), ("another image", other)):
        for j, i in enumerate(order):
            item = ds[int(i)]
            if item["problem"]:
                raise ValueError(f"sample {i}: {item['problem']}")
            for k, g in sample_gradients(vlm, collate([item], pad_id=tok.pad_id), rt, params).items():
                grads.setdefault(k, []).append(g)
            if (j + 1) % 8 == 0:
                log(f"  {which}: {j + 1}/{n} samples ({time.time() - t0:.0f} s)")
    gram = {k: (lambda X: (X @ X.T).double().numpy())(torch.stack(v)) for k, v in grads.items()}
    gram["attn+ all"] = sum(K for k, K in gram.items() if k.startswith("attn+"))
    return gram


def main(argv=None):
    ap = argparse.ArgumentParser(description="noise scale and image share of the stage-3 gradient at its start")
    ap.add_argument("--init", help="the finished stage-2 directory stage 3 would start from")
    ap.add_argument("--data", help="stage-3 data (a data.py spatial directory)")
    ap.add_argument("--again", metavar="JSON", help="no passes: the numbers again from an earlier --out's Gram matrices")
    ap.add_argument("--n", type=int, default=48, help="samples (two forward-backward passes each)")
    ap.add_argument("--seed", type=int, default=0, help="which samples, and the image pairing of the control")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="write every number here (json)")
    args, extra = ap.parse_known_args(argv)  # anything else goes to train.py's Config (e.g. --preset, --image-size)
    if args.n < 4:
        ap.error("--n: at least 4 samples for a variance and its interval")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.again:
        before = json.loads(Path(args.again).read_text())
        args.init, args.data, args.n, args.seed = before["init"], before["data"], before["n"], before["seed"]
        gram = {k: np.array(K) for k, K in before["gram"].items()}
    elif not (args.init and args.data):
        ap.error("give --init and --data (or --again JSON)")
    else:
        gram = measure(args.init, args.data, args.n, args.seed, args.dtype, tuple(extra or ["--preset", "small"]))
    result = {"init": args.init, "data": args.data, "n": args.n, "seed": args.seed,
              "groups": {k: with_interval(K, args.n) for k, K in sorted(gram.items())},
              "gram": {k: K.tolist() for k, K in gram.items()}}
    print(f"{'group':<12} {'B = tr(Σ)/|G|²':>26} {'image share':>22} {'B_img':>22} {'cos(boost, control)':>22}")
    for k, r in result["groups"].items():
        cell = lambda s: f"{s['value']:9.3g} [{s['ci95'][0]:.3g}, {s['ci95'][1]:.3g}]"  # noqa: E731
        print(f"{k:<12} {cell(r['B']):>26} {cell(r['image_share']):>22} {cell(r['B_img']):>22} "
              f"{cell(r['cos_boost_control']):>22}")
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
