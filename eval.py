"""
Evaluation: did SpatialBoost make the encoder better? Frozen-encoder probes (probes.py) for any number of encoders
on the same held-out probe set with the same seeds and budget, spatial-QA accuracy of a trained VLM, and a report.

    python eval.py --vision weights/dinov2-s14                 # one encoder (makes the probe set if missing)
    python eval.py --vision A --vision B                       # side by side, deltas against the first
    python eval.py --run NAME                                  # runs/NAME/stage3: base_vision vs the boosted export
    python eval.py --vision A --rgbd my_frames/                # + the depth probes on RGB-D frame folders
    python eval.py --qa data/heldout --answers answers.jsonl   # score a VLM's answers to held-out conversations

Writes report.json (every number), report.md (the table) and report.png (bar charts + a depth panel) to --out
(default runs/NAME/eval for --run, else runs/eval) and prints the table.

Features are computed once per (encoder, probe set, settings), without gradients, and cached in the probe set's
cache/ directory (fp16 safetensors; ~0.8 MB per image for a ViT-S), so re-running a comparison only trains the heads.
Spatial QA stays independent of the model: `evaluate_qa(samples, answer_fn)` takes any
`answer_fn(samples, turn_index) -> list[str]` (the VLM's batched KV-cache generation in practice), parses the answers
(numbers with units, signs and thousands separators; yes/no; relation words) and scores them per level and type.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import probes
from attention import DualChannelAttention
from checkpoint import write_file_atomically
from model import ViT, load_vit, preprocess
from probes import ProbeConfig
from qa import evaluate_qa, load_conversations, read_answers, score_qa, vlm_answer_fn

FEATURE_VERSION = 2  # bump when what encode() stores changes: old cache files are then ignored


# ----------------------------------------------------------------------------------------------------------------
# Features: computed once per encoder, cached.


def _fit(size: int, patch: int) -> int:
    """The nearest side to `size` that is a multiple of the patch size."""
    return max(patch, round(size / patch) * patch)


def dense_layers(vit: ViT) -> tuple:
    """lin.4 reads the last four blocks (all of them for shallower encoders); lin.1 the last."""
    return tuple(range(-min(4, len(vit.blocks)), 0))


@torch.no_grad()
def encode(vit: ViT, ps: probes.ProbeSet, image_size: int, crop_size: int, batch: int = 16, log=None) -> dict:
    """Features of a probe set: patches (N, h, w, L*D) fp16 and cls (N, L*D) fp16 for the blocks of dense_layers
    (last block last; encoders without CLS get each block's mean patch token), and pooled (M, D) fp32 per object
    crop (`vit.pool`: the CLS token, SigLIP's attention-pooling head)."""
    vit.eval()
    device = next(vit.parameters()).device
    dtype = next(vit.parameters()).dtype
    layers = dense_layers(vit)
    size, csize = _fit(image_size, vit.cfg.patch_size), _fit(crop_size, vit.cfg.patch_size)
    patches, cls = [], []
    for i in range(0, len(ps.images), batch):
        x = torch.from_numpy(ps.images[i:i + batch]).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        f = vit.features(preprocess(x, vit.cfg, size=size).to(device, dtype), layers=layers)
        patches.append(torch.cat(f["layers"], -1).half().cpu())
        g = [c if c is not None else p.mean((1, 2)) for c, p in zip(f["layers_cls"], f["layers"])]
        cls.append(torch.cat(g, -1).half().cpu())
        if log and (i // batch) % 10 == 9:
            log(f"  features: {i + len(x)}/{len(ps.images)} images")
    out = {"patches": torch.cat(patches), "cls": torch.cat(cls)}
    if ps.crops is not None:
        pooled = []
        for i in range(0, len(ps.crops), 4 * batch):
            x = torch.from_numpy(ps.crops[i:i + 4 * batch]).permute(0, 3, 1, 2)
            pooled.append(vit.features(preprocess(x, vit.cfg, size=csize).to(device, dtype))["pooled"].float().cpu())
        out["pooled"] = torch.cat(pooled)
    return out


def fingerprint(vit: ViT) -> str:
    """A hash of the encoder's config and every weight: the cache key follows what the encoder computes."""
    h = hashlib.sha256(json.dumps(asdict(vit.cfg), sort_keys=True, default=str).encode())
    for name, t in sorted(vit.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cached_features(vit: ViT, ps: probes.ProbeSet, image_size: int, crop_size: int, cache: bool = True, log=print):
    """encode(), read from / written to <probe set>/cache/<key>.safetensors when `cache`."""
    log = log or (lambda *_: None)
    settings = dict(v=FEATURE_VERSION, probes=ps.fingerprint, encoder=fingerprint(vit), size=image_size,
                    crop=crop_size, crops=ps.crops is not None)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(ps.root) / "cache" / f"{key}.safetensors"
    if cache and path.exists():
        log(f"  features: cached {path}")
        return load_file(path)
    t = time.time()
    feats = encode(vit, ps, image_size, crop_size, log=log)
    log(f"  features: {len(ps.images)} images" + (f" + {len(ps.crops)} crops" if ps.crops is not None else "")
        + f" in {time.time() - t:.1f} s")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in feats.items()}, tmp, metadata={k: str(v) for k, v in settings.items()})
        os.replace(tmp, path)
    return feats


# ----------------------------------------------------------------------------------------------------------------
# The probe suite.


def run_probes(vit: ViT, ps: probes.ProbeSet, cfg: ProbeConfig, image_size: int = 224, crop_size: int = 112,
               cache: bool = True, log=print) -> tuple[dict, dict]:
    """Every probe the probe set supports, for one encoder. Returns (metrics {probe: {metric: value}},
    examples {name: array} of the first test image for the figure)."""
    log = log or (lambda *_: None)
    times = {}
    t0 = time.time()
    feats = cached_features(vit, ps, image_size, crop_size, cache, log)
    times["features"] = time.time() - t0
    D = vit.cfg.dim
    train, test = torch.from_numpy(ps.train), torch.from_numpy(~ps.train)
    if not train.any() or not test.any():
        raise ValueError(f"{ps.root}: the probe set needs both train and test images")
    depth = torch.from_numpy(ps.depth)
    out_size = depth.shape[-2:]
    patches, cls = feats["patches"], feats["cls"]
    p_tr, c_tr, p_te, c_te = patches[train], cls[train], patches[test], cls[test]
    first = int(np.flatnonzero(~ps.train)[0])  # the test image the figure shows
    results, examples = {}, {"rgb": ps.images[first], "depth": ps.depth[first]}
    for name, last in (("depth_lin1", slice(-D, None)), ("depth_lin4", slice(None))):
        t = time.time()
        head = probes.fit_depth(p_tr[..., last], c_tr[:, last], depth[train], cfg)
        pred = probes.predict_depth(head, p_te[..., last], c_te[:, last], cfg, out_size)
        gt = depth[test]
        results[name] = probes.depth_metrics(pred, gt, (gt > cfg.min_depth) & (gt < cfg.max_depth))
        examples[name] = pred[0].numpy()
        times[name] = time.time() - t
        log(f"  {name}: RMSE {results[name]['rmse']:.3f} m, delta1 {results[name]['d1']:.3f} ({times[name]:.0f} s)")
    if ps.labels is not None:
        t = time.time()
        labels = torch.from_numpy(ps.labels)
        n_classes = len(ps.classes)
        head = probes.fit_segmentation(p_tr[..., -D:], labels[train], n_classes, cfg)
        pred = probes.predict_segmentation(head, p_te[..., -D:], out_size)
        results["segmentation"] = probes.miou(probes.confusion_matrix(pred, labels[test], n_classes))
        examples["segmentation"] = pred[0].numpy()
        examples["labels"] = ps.labels[first]
        times["segmentation"] = time.time() - t
        log(f"  segmentation: mIoU {results['segmentation']['miou']:.3f} ({times['segmentation']:.0f} s)")
    if ps.crops is not None:
        t = time.time()
        x, y = feats["pooled"], torch.from_numpy(ps.obj_label)
        tr, te = torch.from_numpy(ps.obj_train), torch.from_numpy(~ps.obj_train)
        head = probes.fit_classifier(x[tr], y[tr], len(ps.object_classes), cfg)
        with torch.no_grad():
            linear = (head(x[te]).argmax(1) == y[te]).float().mean().item()
        knn = probes.knn_accuracy(x[tr], y[tr], x[te], y[te], cfg.knn_k, cfg.knn_temperature)
        results["classification"] = {"linear_acc": linear, "knn_acc": knn}
        results["retrieval"] = probes.retrieval_map(x, torch.from_numpy(ps.obj_key), torch.from_numpy(ps.obj_image))
        times["objects"] = time.time() - t
        log(f"  classification: linear {linear:.3f}, k-NN {knn:.3f}; retrieval mAP "
            f"{results['retrieval']['map']:.3f} ({times['objects']:.0f} s)")
    results["time_s"] = {k: round(v, 1) for k, v in times.items()}
    return results, examples


# ----------------------------------------------------------------------------------------------------------------
# The report: a table with one column per encoder and deltas against the first, report.json / .md / .png.

LOWER_IS_BETTER = {"rmse", "absrel", "si_rmse", "rmse_aligned", "absrel_aligned", "rel_err", "rel_err_median",
                   "err_m", "err_m_median"}
HEADLINE = [("depth_lin1", "rmse"), ("depth_lin4", "rmse"), ("depth_lin1", "d1"), ("depth_lin1", "si_rmse"),
            ("depth_lin1", "rmse_aligned"), ("segmentation", "miou"), ("classification", "linear_acc"),
            ("classification", "knn_acc"), ("retrieval", "map"), ("rgbd_depth_lin1", "rmse")]


def table_rows(results: list) -> list:
    """[(probe, metric, [value per encoder])] for every number the encoders report (timings and counts left out)."""
    rows = []
    for probe, metrics in results[0].items():
        if probe == "time_s" or not isinstance(metrics, dict):  # dual_channel is a list per layer, not a metric
            continue
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and metric not in ("queries", "n"):
                rows.append((probe, metric, [r.get(probe, {}).get(metric, float("nan")) for r in results]))
    return rows


def format_table(names: list, rows: list, markdown: bool = False) -> str:
    """Text (or markdown) table: metric, then each encoder's value; after the first, the delta against it."""
    head = ["probe", "metric"] + [names[0]] + [f"{n} (delta)" for n in names[1:]]
    body = []
    for probe, metric, values in rows:
        arrow = "lower better" if metric in LOWER_IS_BETTER else "higher better"
        cells = [f"{values[0]:.3f}"] + [f"{v:.3f} ({v - values[0]:+.3f})" for v in values[1:]]
        body.append([probe, f"{metric} ({arrow})"] + cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _colormap(x: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> (..., 3) uint8 along viridis' anchor colours."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    pos = np.clip(np.nan_to_num(x), 0, 1) * (len(anchors) - 1)
    lo = np.minimum(pos.astype(int), len(anchors) - 2)
    w = (pos - lo)[..., None]
    return (anchors[lo] * (1 - w) + anchors[lo + 1] * w).astype(np.uint8)


PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
                    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]], np.uint8)
ENCODER_COLOURS = [(90, 90, 90), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_report(path, names: list, rows: list, examples: list) -> None:
    """report.png with Pillow: one small bar chart per headline metric (one bar per encoder), then a qualitative
    panel of the first test image: RGB, ground-truth depth and each encoder's lin.1 depth (one colour scale), and
    the segmentation labels with each encoder's prediction."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    by_key = {(p, m): v for p, m, v in rows}
    charts = [(p, m, by_key[(p, m)]) for p, m in HEADLINE if (p, m) in by_key]
    pw, ph, cols = 230, 190, 5
    tile = 160
    n_img = 2 + len(names)
    qual = examples and "rgb" in examples[0]
    width = max(cols * pw, n_img * (tile + 10) + 10)
    height = 30 + -(-len(charts) // cols) * ph + (2 * (tile + 25) + 10 if qual else 0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for k, name in enumerate(names):  # legend
        x = 10 + k * (width - 20) // max(len(names), 1)
        d.rectangle([x, 8, x + 14, 22], fill=ENCODER_COLOURS[k % len(ENCODER_COLOURS)])
        d.text((x + 20, 8), name[:40], fill="black", font=font)
    for c, (probe, metric, values) in enumerate(charts):
        x0, y0 = (c % cols) * pw, 30 + (c // cols) * ph
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        d.text((x0 + 8, y0 + 4), f"{probe} {metric}", fill="black", font=font)
        d.text((x0 + 8, y0 + 19), f"({better} is better)", fill=(110, 110, 110), font=font)
        top = max([v for v in values if np.isfinite(v)] + [1e-9])
        bw = (pw - 40) / len(values)
        for k, v in enumerate(values):
            h = 0 if not np.isfinite(v) else (ph - 80) * v / top
            bx = x0 + 20 + k * bw
            d.rectangle([bx + 4, y0 + ph - 25 - h, bx + bw - 4, y0 + ph - 25], fill=ENCODER_COLOURS[k % 6])
            d.text((bx + 4, y0 + ph - 40 - h), f"{v:.3f}", fill="black", font=font)
    if qual:
        y = 30 + -(-len(charts) // cols) * ph + 10
        depth = examples[0]["depth"]
        vmax = float(np.percentile(depth[depth > 0], 99)) if (depth > 0).any() else 1.0
        show = lambda a: Image.fromarray(a).resize((tile, tile), Image.NEAREST)
        row1 = [("image", show(examples[0]["rgb"])), (f"depth 0-{vmax:.1f} m (truth)", show(_colormap(depth / vmax)))]
        row1 += [(f"lin.1: {n}", show(_colormap(e["depth_lin1"] / vmax))) for n, e in zip(names, examples)]
        row2 = []
        if "labels" in examples[0]:
            row2 = [("", None), ("classes (truth)", show(PALETTE[examples[0]["labels"] % len(PALETTE)]))]
            row2 += [(f"seg: {n}", show(PALETTE[e["segmentation"] % len(PALETTE)])) for n, e in zip(names, examples)]
        for r, row in enumerate([row1, row2]):
            for k, (label, im) in enumerate(row):
                if im is not None:
                    x = 10 + k * (tile + 10)
                    img.paste(im, (x, y + r * (tile + 25) + 15))
                    d.text((x, y + r * (tile + 25)), label[:24], fill="black", font=font)
    tmp = Path(str(path) + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def qa_rows(qa: dict) -> list:
    """Table rows of score_qa results {column name: scores}: overall, per level, per question type."""
    names = list(qa)
    get = lambda n, group, key, metric: qa[n][group].get(key, {}).get(metric, float("nan"))
    rows = [("qa", "overall accuracy", [qa[n]["overall"]["accuracy"] for n in names])]
    rows += [("qa level", f"{lv} accuracy", [get(n, "by_level", lv, "accuracy") for n in names])
             for lv in qa[names[0]]["by_level"]]
    for kind, first in qa[names[0]]["by_type"].items():
        for metric in ("accuracy", "within10", "within25", "rel_err", "err_m", "recall"):
            if metric in first:
                rows.append((f"qa {kind}", metric, [get(n, "by_type", kind, metric) for n in names]))
    return rows


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_report(out_dir, report: dict, names: list, results: list, examples: list, qa: dict | None = None) -> str:
    """report.json (every number), report.md (the tables) and, with encoders, report.png in out_dir; returns the
    text tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, md = [], [f"# SpatialBoost evaluation\n\n{report.get('summary', '')}\n"]
    if names:
        rows = table_rows(results)
        text.append(format_table(names, rows))
        md.append(format_table(names, rows, markdown=True))
        plot_report(out / "report.png", names, rows, examples)
    if qa:
        text.append("Spatial QA\n" + format_table(list(qa), qa_rows(qa)))
        md.append("\n## Spatial QA\n\n" + format_table(list(qa), qa_rows(qa), markdown=True))
    _write(out / "report.json", json.dumps(report, indent=1, default=float))
    _write(out / "report.md", "\n".join(md) + "\n")
    return "\n\n".join(text)


# ----------------------------------------------------------------------------------------------------------------
# Command line.

DEFAULT_PROBES = "data/probes"


@torch.no_grad()
def dual_channel_stats(vit: ViT) -> list:
    """Per dual-channel layer: how far stage 3 moved it. σ(a) near 1/2 with Attn+ near Attn means the layer barely
    changed; σ(a) near 0 or 1 means the gate saturated onto one channel. Empty for an encoder without the dual
    channel. rel_change = ‖W+ − W‖ / ‖W‖ over the q/k/v/o weights."""
    stats = []
    for name, m in vit.named_modules():
        if isinstance(m, DualChannelAttention):
            g = torch.sigmoid(m.gate.float())  # (D,)
            old = torch.cat([p.float().flatten() for p in m.attn.parameters()])
            new = torch.cat([p.float().flatten() for p in m.attn_plus.parameters()])
            stats.append({"layer": name, "gate_mean": round(g.mean().item(), 5), "gate_min": round(g.min().item(), 5),
                          "gate_max": round(g.max().item(), 5),
                          "rel_change": round(((new - old).norm() / old.norm()).item(), 6)})
    return stats


def encoder_name(path: Path) -> str:
    """A column name for --vision PATH: the run's name for a train.py export (runs/NAME/stage3/vision)."""
    if path.name == "vision" and path.parent.name.startswith("stage"):
        return path.parent.parent.name
    return path.name


def run_encoders(run: str | None) -> list:
    """[(name, path)] of --run NAME: the baseline (config.json's base_vision) and the boosted export."""
    stage = Path("runs") / run / "stage3"
    cfg_path = stage / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: not found (is {run!r} a stage-3 run of train.py?)")
    cfg = json.loads(cfg_path.read_text())
    if "base_vision" not in cfg:
        raise KeyError(f"{cfg_path}: no key 'base_vision' (the path of the encoder stage 3 started from)")
    base = Path(cfg["base_vision"])
    if not base.is_absolute() and not base.exists():  # relative to the repo root when not to the working directory
        base = Path(__file__).resolve().parent / base
    return [("baseline", base), (f"boosted ({run})", stage / "vision")]


def run_qa(run: str, samples: list, args) -> dict:
    """Spatial QA of a run's VLM before (stage 2) and after (stage 3) the boost, on the same held-out samples."""
    import train

    out = {}
    for stage, name in ((2, "stage 2 (before)"), (3, "stage 3 (boosted)")):
        stage_dir = Path("runs") / run / f"stage{stage}"
        if not (stage_dir / "config.json").exists():
            print(f"qa: {stage_dir} not found, skipped")
            continue
        vlm, tok, cfg = train.load_stage(stage_dir)
        print(f"qa: {name}: {len(samples)} held-out conversations, context {args.qa_context}")
        answer = vlm_answer_fn(vlm, tok, cfg.image_size, args.qa, args.qa_max_new, args.qa_context)
        out[name], answers = evaluate_qa(samples, answer)
        _write(Path(args.out or Path("runs") / run / "eval") / f"answers-stage{stage}.jsonl",
               "".join(json.dumps({"id": s["id"], "answers": a}) + "\n" for s, a in zip(samples, answers)))
        del vlm
    return out


def quick_summary(stage_dir, log=print) -> dict:
    """A minute's look at a finished stage-3 run: short depth / segmentation / k-NN probes on a small held-out probe
    set at the run's image size, baseline vs boosted. A smoke test of the whole path, not a result: eval.py's full
    suite is the measurement."""
    stage_dir = Path(stage_dir)
    meta = json.loads((stage_dir / "config.json").read_text())
    size = meta["config"]["image_size"]
    root = Path(meta["config"].get("data_root", "data")) / f"probes-quick-{size}"
    if not (root / "index.json").exists():
        log(f"probe summary: making a small probe set at {root} (96 held-out views, {size}px)")
        probes.make_probe_sets(root, 96, seed=0, size=size, min_pixels=max(16, int(150 * (size / 224) ** 2)),
                              overwrite=True, log=lambda *a: None)
    ps = probes.load_probe_set(root, crop_size=size)
    cfg = ProbeConfig()
    cfg.depth_steps, cfg.seg_steps, cfg.cls_steps = cfg.depth_steps // 5, cfg.seg_steps // 5, cfg.cls_steps // 5
    base = Path(meta["base_vision"])
    base = base if base.is_absolute() or base.exists() else Path(__file__).resolve().parent / base
    rows = {}
    for name, path in (("baseline", base), ("boosted", stage_dir / "vision")):
        res, _ = run_probes(load_vit(path), ps, cfg, size, size, cache=False, log=None)
        rows[name] = res
    pick = [("depth_lin1", "rmse", "depth RMSE (m)"), ("segmentation", "miou", "seg mIoU"),
            ("classification", "knn_acc", "k-NN acc")]
    log("probe summary (quick; `python eval.py --run NAME` for the real measurement):")
    for group, key, label in pick:
        b, a = rows["baseline"][group][key], rows["boosted"][group][key]
        log(f"  {label:<16} baseline {b:.3f}  boosted {a:.3f}  ({a - b:+.3f})")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="Frozen-encoder probes (depth lin.1/lin.4, segmentation, "
                                 "classification, retrieval) and spatial QA; baseline vs boosted.")
    ap.add_argument("--vision", action="append", default=[], help="encoder directory (load_vit); repeat to compare, "
                    "the first is the baseline")
    ap.add_argument("--run", help="runs/RUN/stage3: compare its base_vision (baseline) with its boosted export")
    ap.add_argument("--probes", default=DEFAULT_PROBES, help=f"probe set directory (default {DEFAULT_PROBES}; "
                    "made if missing)")
    ap.add_argument("--n-images", type=int, default=480, help="views in a newly made probe set (2 per scene)")
    ap.add_argument("--probe-seed", type=int, default=0, help="seed of a newly made probe set")
    ap.add_argument("--make-probes", action="store_true", help="only write the probe set (replacing it) and exit")
    ap.add_argument("--rgbd", help="also run the depth probes on RGB-D frame folders (scenes.load_rgbd format)")
    ap.add_argument("--qa", help="held-out spatial conversations (a data.py directory) to score --answers against")
    ap.add_argument("--answers", action="append", default=[], help="NAME=answers.jsonl ({'id', 'answers': [str per "
                    "turn]} per line), repeatable: one QA column each; without it, --run's VLMs answer (stage 2 "
                    "before the boost, stage 3 after)")
    ap.add_argument("--qa-samples", type=int, default=24, help="held-out conversations the VLMs answer")
    ap.add_argument("--qa-context", default="none", choices=["none", "gold"], help="ask each question alone "
                    "(none) or after the conversation's own earlier turns (gold, as in training; slower)")
    ap.add_argument("--qa-max-new", type=int, default=160, help="tokens generated per answer at most")
    ap.add_argument("--out", help="report directory (default runs/RUN/eval with --run, else runs/eval)")
    ap.add_argument("--image-size", type=int, default=224, help="dense-probe input side (rounded to the patch size)")
    ap.add_argument("--crop-size", type=int, default=112, help="object-crop input side (rounded to the patch size)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every probe head and batch order")
    ap.add_argument("--quick", action="store_true", help="a tenth of the training steps: a smoke test, not a result")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    if args.make_probes:
        print(probes.make_probe_sets(args.probes, args.n_images, args.probe_seed, overwrite=True))
        return
    encoders = [(encoder_name(Path(v)), Path(v)) for v in args.vision]
    if args.run:
        encoders = run_encoders(args.run) + encoders
    if not encoders and not args.qa:
        ap.error("nothing to evaluate: give --vision, --run or --qa")
    cfg = ProbeConfig(seed=args.seed)
    if args.quick:
        cfg.depth_steps, cfg.seg_steps, cfg.cls_steps = cfg.depth_steps // 10, cfg.seg_steps // 10, cfg.cls_steps // 10
    out = Path(args.out or (Path("runs") / args.run / "eval" if args.run else Path("runs") / "eval"))
    names, results, examples, report = [], [], [], {"config": asdict(cfg), "encoders": [], "argv": sys.argv[1:]}
    if encoders:
        if not (Path(args.probes) / "index.json").exists():
            print(f"no probe set at {args.probes}: making the default one ({args.n_images} held-out views, "
                  f"seed {args.probe_seed}); later runs reuse it")
            probes.make_probe_sets(args.probes, args.n_images, args.probe_seed, overwrite=True)
        ps = probes.load_probe_set(args.probes, args.crop_size)
        rgbd = probes.load_rgbd_set(args.rgbd, args.image_size) if args.rgbd else None
        report["probe_set"] = {"path": str(ps.root), "fingerprint": ps.fingerprint, "images": len(ps.images),
                               "train_images": int(ps.train.sum()), "objects": len(ps.crops)}
        for name, path in encoders:
            print(f"{name}: {path}")
            vit = load_vit(path)
            t = time.time()
            res, ex = run_probes(vit, ps, cfg, args.image_size, args.crop_size, not args.no_cache)
            if rgbd is not None:
                more, _ = run_probes(vit, rgbd, cfg, args.image_size, args.crop_size, not args.no_cache)
                res.update({f"rgbd_{k}": v for k, v in more.items() if k != "time_s"})
            res["time_s"]["total"] = round(time.time() - t, 1)
            dual = dual_channel_stats(vit)
            if dual:
                res["dual_channel"] = dual
                print("  dual channel, per layer: σ(a) mean " + " ".join(f"{d['gate_mean']:.3f}" for d in dual)
                      + " | ‖W+ − W‖/‖W‖ " + " ".join(f"{d['rel_change']:.4f}" for d in dual))
            names.append(name)
            results.append(res)
            examples.append(ex)
            report["encoders"].append({"name": name, "path": str(path), "fingerprint": fingerprint(vit),
                                       "results": res})
            del vit
    qa = None
    if args.qa:
        samples = load_conversations(args.qa, limit=args.qa_samples)
        qa = {}
        for item in args.answers:
            name, _, file = item.rpartition("=")
            qa[name or Path(file).stem] = score_qa(samples, read_answers(file, samples))
        if not args.answers:
            if not args.run:
                ap.error("--qa needs --answers NAME=FILE, or --run NAME whose stage-2 and stage-3 VLMs answer")
            qa.update(run_qa(args.run, samples, args))
        report["qa"] = qa
    report["wall_time_s"] = round(time.time() - t_start, 1)
    report["summary"] = (f"{len(names)} encoder(s) on {report.get('probe_set', {}).get('images', 0)} probe images; "
                         f"deltas against {names[0] if names else '-'}; wall time {report['wall_time_s']} s.")
    print(write_report(out, report, names, results, examples, qa))
    print(f"\nwrote {out}/report.json, report.md" + (", report.png" if names else "")
          + f" ({report['wall_time_s']} s)")


if __name__ == "__main__":
    main()
