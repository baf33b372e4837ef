"""
The probe suite on one encoder: its features on a probe set (computed once without gradients and cached in the
probe set's cache/ directory, fp16 safetensors), every probe the set supports (probes.py), how far stage 3 moved a
dual-channel encoder, and the quick summary train.py prints after stage 3.

    results, examples = run_probes(load_vit("weights/dinov2-s14"), load_probe_set("data/probes"), ProbeConfig())
    quick_summary("runs/tiny/stage3")        # baseline vs boosted on a small probe set: a smoke test, not a result
"""

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from attention import DualChannelAttention
from evaluation import probes
from evaluation.probes import ProbeConfig
from model import ViT, load_vit, preprocess
from storage.atomic import repo_path, write_file_atomically
from storage.tensors import load_safetensors

FEATURE_VERSION = 2  # bump when what encode() stores changes: old cache files are then ignored
QUICK_FRACTION = 0.2  # the quick summary trains each probe head for this share of the full suite's steps


def _fit(size: int, patch: int) -> int:
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
    device, dtype, layers = next(vit.parameters()).device, next(vit.parameters()).dtype, dense_layers(vit)
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
        return load_safetensors(path)
    t = time.time()
    feats = encode(vit, ps, image_size, crop_size, log=log)
    log(f"  features: {len(ps.images)} images" + (f" + {len(ps.crops)} crops" if ps.crops is not None else "")
        + f" in {time.time() - t:.1f} s")
    if cache:
        meta = {k: str(v) for k, v in settings.items()}
        try:  # the cache is only a speed-up: a full disk must not cost the features just computed (1.5 GB a ViT-S on
            #   a 1,920-view set; a probe run lost ten minutes that way)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in feats.items()}, tmp, meta))
        except OSError as e:
            log(f"  features: not cached ({e}); going on without the cache")
    return feats


def run_probes(vit: ViT, ps: probes.ProbeSet, cfg: ProbeConfig, image_size: int = 224, crop_size: int = 112,
               cache: bool = True, log=print, per_image: bool = False) -> tuple[dict, dict]:
    """Every probe the probe set supports, for one encoder -> (metrics {probe: {metric: value}}, examples {name:
    array} of the first test image, for the figure). per_image: also results["per_image"], each test image's part
    (depth RMSE, segmentation confusion, objects' correctness), for bootstrap intervals: experiments/boost_report.py."""
    log, t0 = log or (lambda *_: None), time.time()
    feats = cached_features(vit, ps, image_size, crop_size, cache, log)
    times, D = {"features": time.time() - t0}, vit.cfg.dim
    train, test = torch.from_numpy(ps.train), torch.from_numpy(~ps.train)
    if not train.any() or not test.any():
        raise ValueError(f"{ps.root}: the probe set needs both train and test images")
    depth = torch.from_numpy(ps.depth)
    out_size = depth.shape[-2:]
    patches, cls = feats["patches"], feats["cls"]
    p_tr, c_tr, p_te, c_te = patches[train], cls[train], patches[test], cls[test]
    first = int(np.flatnonzero(~ps.train)[0])  # the test image the figure shows
    results, examples, each = {}, {"rgb": ps.images[first], "depth": ps.depth[first]}, {}
    for name, last in (("depth_lin1", slice(-D, None)), ("depth_lin4", slice(None))):
        t = time.time()
        pred = probes.fit_predict_depth(p_tr[..., last], c_tr[:, last], depth[train], p_te[..., last], c_te[:, last],
                                        cfg, out_size)
        gt = depth[test]
        valid = (gt > cfg.min_depth) & (gt < cfg.max_depth)
        results[name] = probes.depth_metrics(pred, gt, valid)
        each[f"{name}_rmse"] = probes.depth_metrics(pred, gt, valid, per_image=True)["rmse"]
        examples[name] = pred[0].numpy()
        times[name] = time.time() - t
        log(f"  {name}: RMSE {results[name]['rmse']:.3f} m, delta1 {results[name]['d1']:.3f} ({times[name]:.0f} s)")
    if ps.labels is not None:
        t = time.time()
        labels = torch.from_numpy(ps.labels)
        n_classes = len(ps.classes)
        head = probes.fit_segmentation(p_tr[..., -D:], labels[train], n_classes, cfg)
        pred, gt = probes.predict_segmentation(head, p_te[..., -D:], out_size), labels[test]  # gt: one copy, not one
        results["segmentation"] = probes.miou(probes.confusion_matrix(pred, gt, n_classes))  # per test image
        each["seg_confusion"] = [probes.confusion_matrix(pred[i:i + 1], gt[i:i + 1], n_classes).tolist()
                                 for i in range(len(pred))]
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
            linear_ok = head(x[te]).argmax(1) == y[te]
        knn_ok = probes.knn_accuracy(x[tr], y[tr], x[te], y[te], cfg.knn_k, cfg.knn_temperature, per_item=True)
        linear, knn = linear_ok.float().mean().item(), knn_ok.float().mean().item()
        test_position = np.cumsum(~ps.train) - 1                  # an image's index among the test images
        each.update(linear_correct=linear_ok.int().tolist(), knn_correct=knn_ok.int().tolist(),
                    object_image=test_position[ps.obj_image[~ps.obj_train]].tolist())
        results["classification"] = {"linear_acc": linear, "knn_acc": knn}
        results["retrieval"] = probes.retrieval_map(x, torch.from_numpy(ps.obj_key), torch.from_numpy(ps.obj_image))
        times["objects"] = time.time() - t
        log(f"  classification: linear {linear:.3f}, k-NN {knn:.3f}; retrieval mAP "
            f"{results['retrieval']['map']:.3f} ({times['objects']:.0f} s)")
    results["time_s"] = {k: round(v, 1) for k, v in times.items()}
    if per_image:
        results["per_image"] = {k: v.tolist() if torch.is_tensor(v) else v for k, v in each.items()}
    return results, examples


@torch.no_grad()
def dual_channel_stats(vit: ViT) -> list:
    """Per dual-channel layer (none: []), how far stage 3 moved it: σ(a) near 1/2 with Attn+ near Attn, barely;
    σ(a) near 0 or 1, the gate saturated onto one channel. rel_change = ‖W+ − W‖ / ‖W‖ over the q/k/v/o weights.
    Batched: a few device ops over all layers and one host read (train.py logs it every --log-every steps)."""
    layers = [(name, m) for name, m in vit.named_modules() if isinstance(m, DualChannelAttention)]
    if not layers:
        return []
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float()  # FSDP2 shards
    g = torch.sigmoid(torch.stack([full(m.gate) for _, m in layers]))  # (L, D)
    old = [full(p) for _, m in layers for p in m.attn.parameters()]
    new = [full(p) for _, m in layers for p in m.attn_plus.parameters()]
    sq = lambda ts: torch.stack([t.pow(2).sum() for t in ts]).view(len(layers), -1).sum(1)  # (L,)
    rel = (sq([b - a for a, b in zip(old, new)]) / sq(old)).sqrt()
    table = torch.stack([g.mean(1), g.amin(1), g.amax(1), rel], 1).tolist()  # (L, 4): the one host read
    return [{"layer": name, "gate_mean": round(mean, 5), "gate_min": round(lo, 5), "gate_max": round(hi, 5),
             "rel_change": round(r, 6)} for (name, _), (mean, lo, hi, r) in zip(layers, table)]


def quick_summary(stage_dir, log=print, device: str = "cpu") -> dict:
    """A minute's look at a finished stage-3 run, baseline vs boosted: short depth / segmentation / k-NN probes on a
    small probe set at the run's image size, the encoders on `device` (the run's). A smoke test of the whole path;
    eval.py's full suite is the measurement."""
    stage_dir = Path(stage_dir)
    meta = json.loads((stage_dir / "config.json").read_text())
    size = meta["config"]["image_size"]
    root = Path(meta["config"].get("data_root", "data")) / f"probes-quick-{size}"
    if not (root / "index.json").exists():
        log(f"probe summary: making a small probe set at {root} (96 held-out views, {size}px)")
        probes.make_probe_sets(root, 96, seed=0, size=size, min_pixels=max(16, int(150 * (size / 224) ** 2)),
                              overwrite=True, log=lambda *a: None)
    ps, cfg = probes.load_probe_set(root, crop_size=size), ProbeConfig().shortened(QUICK_FRACTION)
    rows = {name: run_probes(load_vit(path).to(device), ps, cfg, size, size, cache=False, log=None)[0]
            for name, path in (("baseline", repo_path(meta["base_vision"])), ("boosted", stage_dir / "vision"))}
    log("probe summary (quick; `python eval.py --run NAME` for the real measurement):")
    for group, key, label in (("depth_lin1", "rmse", "depth RMSE (m)"), ("segmentation", "miou", "seg mIoU"),
                              ("classification", "knn_acc", "k-NN acc")):
        b, a = rows["baseline"][group][key], rows["boosted"][group][key]
        log(f"  {label:<16} baseline {b:.3f}  boosted {a:.3f}  ({a - b:+.3f})")
    return rows
