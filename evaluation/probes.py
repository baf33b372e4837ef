"""
Frozen-encoder probes: the held-out probe sets, linear heads trained on cached features, and the metrics the field
reports. eval.py computes the features and runs these; `make_probe_sets` writes the sets.

- Depth, DINOv2's linear protocol: per patch [patch token ; CLS] (lin.1: last block; lin.4: the last four blocks
  concatenated), a linear layer to 256 bins spaced uniformly over 0.001-10 m, the logits upsampled x4 bilinearly,
  "linear" normalization (relu + 0.1, divided by the sum: DINOv2's norm_strategy="linear"), the depth the weighted sum
  of the bin centres, resized to the ground truth, trained with the scale-invariant log loss (SigLoss). Metrics per
  image, then averaged: RMSE, AbsRel, delta1-3, SI-RMSE (log), and RMSE/AbsRel/delta1 after a least-squares
  scale-and-shift alignment (Probe3D reports both).
- Segmentation: a linear layer on last-block patch tokens, logits upsampled to the labels; mIoU from the confusion
  matrix (classes absent from both prediction and ground truth are left out), plus pixel accuracy.
- Classification: logistic regression on one vector per object crop, and weighted k-NN (cosine, DINO's exp(s/T)).
- Retrieval: mAP and recall@1 of same-instance retrieval, each query against every crop of the other images.

Features are standardized with training-set statistics (the role of the BatchNorm in DINOv2's linear head). The
budget (steps, batch, learning rate) and every random draw come from ProbeConfig, so two encoders are trained on
equal terms. Linear maps commute with bilinear resizing, so the dense heads run on the patch grid and only the
logits are resized; during training each step scores `rows` random rows of the resized map per image (computed
exactly, by two small matrix products: `resized_rows`), evaluation resizes the whole map.

A probe set on disk (written by make_probe_sets; paths relative to its directory):

    index.json          {"format": "spatialboost-probes-1", "seed", "size", "views", "categories": [semantic class
                         names; class c is label value c + 1], "object_categories": [...],
                         "images": [{"rgb", "depth", "semantic", "instance", "scene", "view", "split"}, ...],
                         "objects": [{"image": index into images, "instance", "category", "label": index into
                                      object_categories, "box": [x0, y0, x1, y1] pixels, exclusive ends, "pixels",
                                      "key": "<scene>/<instance>" (same object in another view = same key),
                                      "split"}, ...]}
    rgb/<s>_<v>.png     uint8 RGB, size x size
    depth/<s>_<v>.npy   float32 z-depth in meters, 0 = unknown
    semantic/<s>_<v>.png  uint8, scenes.CATEGORIES index + 1, 0 = unlabeled
    instance/<s>_<v>.png  uint16, object id within its scene, 0 = room
    cache/              features computed by eval.py, one safetensors file per (encoder, settings)

Scenes are split whole into train (3 of 4) and test (1 of 4), so no test view shares a room with a training view.
Their random generators come from the seed sequence (PROBE_TAG, seed, scene), a namespace the training data
(seeded by (seed, index)) never draws from.
"""

import hashlib
import json
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dataengine import scenes
from storage.atomic import write_dir_atomically

PROBE_TAG = int.from_bytes(b"probe", "big")  # first word of every probe-scene seed
FORMAT = "spatialboost-probes-1"
DENSE = ("rgb", "depth", "semantic", "instance")  # one file per view each


@dataclass
class ProbeConfig:
    """The budget of every probe; the defaults were chosen on DINOv2-S/14 features of the default probe set, where
    doubling depth_steps or depth_rows moves lin.1 RMSE by < 0.01 m. depth_heads > 1 averages the depth maps of that
    many heads (seeds seed, seed + 1000, ...): the head's own seed moves a difference between two encoders by ~0.005 m
    (experiments/probe_noise.py; docs/log/2026-12-06-probe-protocol.md)."""
    seed: int = 0
    depth_heads: int = 1
    batch: int = 8  # images per step of the dense probes
    depth_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    depth_norm: str = "linear"  # linear (DINOv2) | softmax
    upsample: int = 4
    depth_steps: int = 500
    depth_lr: float = 1e-2
    depth_rows: int = 16  # random rows of the x4 map scored per image per step (of 4h)
    seg_steps: int = 1000
    seg_lr: float = 1e-2
    seg_rows: int = 8  # random rows of the label map scored per image per step (of H)
    cls_steps: int = 300
    cls_lr: float = 1e-2
    cls_wd: float = 1e-3
    knn_k: int = 20
    knn_temperature: float = 0.07
    weight_decay: float = 1e-4  # dense heads

    def shortened(self, fraction: float) -> "ProbeConfig":
        """The same probes with `fraction` of the training steps: a smoke test, not a measurement."""
        return dataclasses.replace(self, depth_steps=int(self.depth_steps * fraction),
                                   seg_steps=int(self.seg_steps * fraction), cls_steps=int(self.cls_steps * fraction))


def _object_boxes(instance, min_pixels):
    """[(id, [x0, y0, x1, y1], pixels)] for every object id covering at least min_pixels of the view."""
    ids, counts = np.unique(instance, return_counts=True)
    out = []
    for k, n in zip(ids.tolist(), counts.tolist()):
        if k == 0 or n < min_pixels:
            continue
        mask = instance == k
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        out.append((k, [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1], n))
    return out


def make_probe_sets(out_dir, n_images: int = 480, seed: int = 0, size: int = 224, views: int = 2,
                    min_pixels: int = 150, test_every: int = 4, overwrite: bool = False, log=print,
                    object_views: int | None = None) -> Path:
    """Render held-out scenes (`views` cameras each, n_images views in all) into a probe set directory, atomically
    (format in the module docstring): images with depth and semantic ground truth for the dense probes, and every
    object covering >= min_pixels of a view as a box with its category and its identity across the scene's views.
    object_views: only the first that many views give objects (the dense probes need many more views than the object
    probes, and each object crop costs an encoder pass)."""
    out = Path(out_dir)
    if n_images < 1 or test_every < 1 or views < 1:
        raise ValueError(f"n_images {n_images}, test_every {test_every}, views {views}: each must be >= 1")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")

    def write(tmp):
        for sub in DENSE:
            (tmp / sub).mkdir()
        images, objects = [], []
        n_scenes = -(-n_images // views)
        for s in range(n_scenes):
            rng = np.random.default_rng([PROBE_TAG, seed, s])
            scene = scenes.random_scene(rng)
            split = "test" if s % test_every == test_every - 1 else "train"
            for v in range(min(views, n_images - s * views)):
                view = scenes.render(scene, scenes.random_camera(rng, scene), size, size)
                files = {k: f"{k}/{s:05d}_{v}.{'npy' if k == 'depth' else 'png'}" for k in DENSE}
                np.save(tmp / files["depth"], view["depth"].astype(np.float32))
                for k, dtype in (("rgb", np.uint8), ("semantic", np.uint8), ("instance", np.uint16)):
                    Image.fromarray(view[k].astype(dtype)).save(tmp / files[k])
                boxes = _object_boxes(view["instance"], min_pixels) if len(images) < (object_views or n_images) else []
                for k, box, n in boxes:
                    category = scene.objects[k - 1].category
                    objects.append({"image": len(images), "instance": k, "category": category,
                                    "label": scenes.OBJECT_CATEGORIES.index(category), "box": box, "pixels": n,
                                    "key": f"{s}/{k}", "split": split})
                images.append({**files, "scene": s, "view": v, "split": split})
            if log and (s + 1) % 50 == 0:
                log(f"probe sets: {s + 1}/{n_scenes} scenes rendered")
        index = {"format": FORMAT, "seed": seed, "size": size, "views": views, "min_pixels": min_pixels,
                 "categories": list(scenes.CATEGORIES), "object_categories": list(scenes.OBJECT_CATEGORIES),
                 "images": images, "objects": objects}
        (tmp / "index.json").write_text(json.dumps(index))

    return write_dir_atomically(out, write)


@dataclass
class ProbeSet:
    """A probe set in memory. Dense part: images (N, H, W, 3) uint8, depth (N, H, W) float32 m (0 = unknown), labels
    (N, H, W) int64 class ids (-1 = unlabeled) or None, train (N,) bool. Object part: crops (M, c, c, 3) uint8,
    obj_label (M,), obj_key (M,) identity across views, obj_image (M,), obj_train (M,) bool."""
    root: Path
    fingerprint: str
    classes: list
    images: np.ndarray
    depth: np.ndarray
    labels: np.ndarray | None
    train: np.ndarray
    object_classes: list = None
    crops: np.ndarray | None = None
    obj_label: np.ndarray | None = None
    obj_key: np.ndarray | None = None
    obj_image: np.ndarray | None = None
    obj_train: np.ndarray | None = None


GRAY = (124, 116, 104)  # the ImageNet mean colour: what a normalized encoder input sees as zero


def object_crop(image: np.ndarray, mask: np.ndarray, box, size: int, margin: float = 0.15) -> np.ndarray:
    """The object alone: pixels outside `mask` set to GRAY, then the square around box (x0, y0, x1, y1) grown by
    `margin` on each side (GRAY outside the image), resized to size x size (bicubic). Masking keeps the room and
    the neighbours out of the crop: both views of a room share them, which would let retrieval match rooms instead
    of objects. (H, W, 3) uint8, (H, W) bool -> (size, size, 3) uint8."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    alone = np.where(mask[..., None], image, np.array(GRAY, np.uint8))
    canvas = Image.new("RGB", (region[2] - region[0], region[3] - region[1]), GRAY)
    canvas.paste(Image.fromarray(alone), (-region[0], -region[1]))
    return np.asarray(canvas.resize((size, size), Image.BICUBIC))


def _read(root: Path, rel: str, kind: str):
    path = root / rel
    if not path.exists():
        raise FileNotFoundError(f"{root}/index.json names {rel} ({kind}), which does not exist")
    return np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.asarray(Image.open(path))


def load_probe_set(root, crop_size: int = 112) -> ProbeSet:
    """Read a directory written by make_probe_sets (or mujoco_probes.make_mujoco_probe_set); object crops
    (object_crop) are cut at crop_size x crop_size. A set without objects has crops None (dense probes only)."""
    root = Path(root)
    path = root / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{root}: not a probe set (no index.json; write one with eval.py --make-probes)")
    raw = path.read_bytes()
    index = json.loads(raw)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    if not index.get("images"):
        raise ValueError(f"{path}: a probe set without images: make it again (eval.py --make-probes --n-images N)")
    read = lambda kind: np.stack([_read(root, im[kind], kind) for im in index["images"]])
    images, depth, labels = read("rgb"), read("depth").astype(np.float32), read("semantic").astype(np.int64) - 1
    if images.ndim != 4 or depth.shape != images.shape[:3] or labels.shape != depth.shape:
        raise ValueError(f"{root}: rgb {images.shape}, depth {depth.shape} and semantic {labels.shape} disagree")
    ps = ProbeSet(root=root, fingerprint=hashlib.sha256(raw).hexdigest()[:16], classes=index["categories"],
                  images=images, depth=depth, labels=labels,
                  train=np.array([im["split"] == "train" for im in index["images"]]),
                  object_classes=index["object_categories"])
    objs = index["objects"]
    if not objs:  # a dense-only set (evaluation/mujoco_probes.py): run_probes skips classification and retrieval
        return ps
    instance = {i: _read(root, index["images"][i]["instance"], "instance") for i in {o["image"] for o in objs}}
    crops = [object_crop(images[o["image"]], instance[o["image"]] == o["instance"], o["box"], crop_size) for o in objs]
    return dataclasses.replace(ps, crops=np.stack(crops), obj_label=np.array([o["label"] for o in objs]),
                               obj_key=np.unique([o["key"] for o in objs], return_inverse=True)[1],
                               obj_image=np.array([o["image"] for o in objs]),
                               obj_train=np.array([o["split"] == "train" for o in objs]))


def load_rgbd_set(root, size: int = 224, test_every: int = 4, depth_scale: float = 1.0) -> ProbeSet:
    """Depth-only probe set from RGB-D frame folders under root (scenes.load_rgbd's format), resized to size x size
    (images bicubic, depth nearest); every test_every-th frame (sorted by name) is a test frame."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{root}: expected RGB-D frame folders (rgb.png, depth.npy|png, ...) inside")
    images, depth = [], []
    for f in folders:
        frame = scenes.load_rgbd(f, depth_scale)
        images.append(np.asarray(Image.fromarray(frame["rgb"]).resize((size, size), Image.BICUBIC)))
        depth.append(np.asarray(Image.fromarray(frame["depth"]).resize((size, size), Image.NEAREST)))
    images, depth = np.stack(images), np.stack(depth).astype(np.float32)
    digest = hashlib.sha256(images.tobytes() + depth.tobytes()).hexdigest()[:16]  # the cache follows the content
    train = np.arange(len(folders)) % test_every != test_every - 1
    return ProbeSet(root=root, fingerprint=digest, classes=[], images=images, depth=depth, labels=None, train=train)


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None, per_image=False) -> dict:
    """pred, gt (N, H, W) meters; valid (N, H, W) bool. Each metric computed per image, then averaged over images
    (images without a valid pixel skipped); per_image: one value per image instead, NaN for those."""
    if pred.shape != gt.shape:
        raise ValueError(f"depth_metrics: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ")
    if pred.dim() == 2:
        pred, gt = pred[None], gt[None]
        valid = None if valid is None else valid[None]
    pred, gt = pred.double(), gt.double()
    valid = (gt > 0) if valid is None else valid & (gt > 0)
    m = valid.flatten(1).double()  # (N, P)
    keep = m.sum(1) > 0
    p, g, m = pred.clamp_min(1e-6).flatten(1)[keep], gt.flatten(1)[keep].clamp_min(1e-6), m[keep]
    n = m.sum(1)
    mean = lambda t: (t * m).sum(1) / n  # per-image mean over valid pixels
    ratio = torch.maximum(p / g, g / p)
    d = p.log() - g.log()
    out = {"rmse": mean((p - g) ** 2).sqrt(), "absrel": mean((p - g).abs() / g),
           "d1": mean((ratio < 1.25).double()), "d2": mean((ratio < 1.25**2).double()),
           "d3": mean((ratio < 1.25**3).double()), "si_rmse": (mean(d**2) - mean(d) ** 2).clamp_min(0).sqrt()}
    # least-squares scale and shift per image: min_{s,t} sum m (s p + t - g)^2
    sp, sg = mean(p), mean(g)
    s = (mean(p * g) - sp * sg) / (mean(p * p) - sp**2).clamp_min(1e-12)
    a = (s[:, None] * p + (sg - s * sp)[:, None]).clamp_min(1e-6)
    ratio_a = torch.maximum(a / g, g / a)
    out.update({"rmse_aligned": mean((a - g) ** 2).sqrt(), "absrel_aligned": mean((a - g).abs() / g),
                "d1_aligned": mean((ratio_a < 1.25).double())})
    if per_image:
        return {k: torch.full((len(keep),), float("nan"), dtype=torch.float64).masked_scatter(keep, v)
                for k, v in out.items()}
    return {k: v.mean().item() for k, v in out.items()}


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, n_classes: int, ignore_index: int = -1) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = ground truth, columns = prediction."""
    keep = (gt != ignore_index) & (gt >= 0) & (gt < n_classes)
    idx = gt[keep].long() * n_classes + pred[keep].long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def miou(conf: torch.Tensor) -> dict:
    """Mean IoU over the classes present in the ground truth or the prediction, and pixel accuracy."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"miou": iou.mean().item() if present.any() else float("nan"),
            "pixel_acc": (tp.sum() / conf.sum().clamp_min(1)).item()}


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, per_item: bool = False):
    """Weighted k-NN on cosine similarity: each of the k nearest training vectors votes exp(sim / T) for its label."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    k = min(k, len(train_x))
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    sim, idx = (test_x @ train_x.T).topk(k, dim=1)  # (Q, k)
    votes = torch.zeros(len(test_x), n_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    correct = votes.argmax(1) == test_y
    return correct if per_item else correct.float().mean().item()


def retrieval_map(x, key, image) -> dict:
    """x (N, D) one vector per crop, key (N,) instance identity, image (N,) its image: each query ranks every crop of
    the other images (positives share its key; queries without one skipped) -> mAP, recall@1, number of queries."""
    x = F.normalize(x.float(), dim=1)
    sim = (x @ x.T).masked_fill(image[:, None] == image[None, :], float("-inf"))  # (N, N); own image, self excluded
    pos = (key[:, None] == key[None, :]) & (image[:, None] != image[None, :])
    has = pos.any(1)
    order = sim[has].argsort(dim=1, descending=True)
    hits = pos[has].gather(1, order).double()  # (Q, N) 1 where the ranked crop is a positive
    precision = hits.cumsum(1) / torch.arange(1, x.shape[0] + 1, dtype=torch.float64)
    ap = (precision * hits).sum(1) / hits.sum(1)
    return {"map": ap.mean().item(), "recall@1": hits[:, 0].mean().item(), "queries": int(has.sum())}


def sig_loss(pred, gt, valid, lam: float = 0.85):
    """Scale-invariant log loss (Eigen et al.; SigLoss of the depth toolboxes): sqrt(mean(g^2) - lam * mean(g)^2),
    g = log pred - log gt over the valid pixels of the batch."""
    g = pred[valid].clamp_min(1e-6).log() - gt[valid].log()
    return (g.pow(2).mean() - lam * g.mean().pow(2)).clamp_min(1e-12).sqrt()


def feature_stats(x: torch.Tensor, chunk: int = 64):
    """Per-channel mean and std over every leading position of x (..., C), in chunks of the first axis (fp64 sums)."""
    C, n = x.shape[-1], 0
    s, ss = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        c = x[i:i + chunk].reshape(-1, C).double()
        s += c.sum(0)
        ss += (c * c).sum(0)
        n += c.shape[0]
    mean = s / n
    std = (ss / n - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


class LinearProbe(nn.Module):
    """Standardize with fixed training-set statistics, then one linear layer. (..., C) -> (..., n_out). With
    `cls_stats`, forward(x, cls) is that layer on [x ; cls], as two products: cls is never copied to every patch."""

    def __init__(self, stats, n_out: int, cls_stats=None):
        super().__init__()
        self.register_buffer("mean", stats[0])
        self.register_buffer("std", stats[1])
        self.linear = nn.Linear(stats[0].numel(), n_out)
        self.cls_linear = None
        if cls_stats is not None:
            self.register_buffer("cls_mean", cls_stats[0])
            self.register_buffer("cls_std", cls_stats[1])
            self.cls_linear = nn.Linear(cls_stats[0].numel(), n_out, bias=False)

    def forward(self, x, cls=None):
        out = self.linear((x.float() - self.mean) / self.std)
        if self.cls_linear is not None:
            c = self.cls_linear((cls.float() - self.cls_mean) / self.cls_std)  # (B, n_out)
            out = out + c.view(c.shape[0], *([1] * (out.dim() - 2)), -1)
        return out


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): F.interpolate's 1-D linear resize (align_corners=False) as a matrix; bilinear is separable."""
    eye = torch.eye(n_in)[:, None, :]  # (n_in, 1, n_in): each row a unit impulse
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T


def resized_rows(values, rows, size):
    """Rows `rows` (B, r) of F.interpolate(values, size, bilinear) without computing the others: values (B, h, w, K)
    channels last -> (B, r, W, K). Bilinear resizing is separable: rows first, then columns."""
    B, h, w, K = values.shape
    uh = resize_matrix(h, size[0])[rows]  # (B, r, h)
    x = torch.bmm(uh, values.reshape(B, h, w * K)).view(B, -1, w, K)  # (B, r, w, K)
    return resize_matrix(w, size[1]) @ x  # (W, w) @ (B, r, w, K) -> (B, r, W, K)


def depth_from_bins(logits, cfg: ProbeConfig):
    """logits (..., K) -> depth (...): the bin centres weighted by DINOv2's 'linear' (relu + 0.1) or by softmax."""
    centres = torch.linspace(cfg.min_depth, cfg.max_depth, cfg.depth_bins)
    if cfg.depth_norm == "linear":
        w = F.relu(logits) + 0.1
    elif cfg.depth_norm == "softmax":
        w = (logits - logits.amax(-1, keepdim=True)).exp()
    else:
        raise ValueError(f"depth_norm must be 'linear' or 'softmax', got {cfg.depth_norm!r}")
    return (w @ centres) / w.sum(-1)


def _lr(step, steps, base):
    """Linear warm-up over the first 5 % of the steps, then cosine decay to zero."""
    warm = max(1, steps // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_head(head, lr, steps, wd, gen, n, batch, loss_of):
    """The shared loop (also training/teacher.py's warm start): AdamW, warm-up + cosine, minibatches drawn from a
    seeded generator. loss_of(indices) -> loss."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss_of(idx).backward()
        opt.step()
    return head.eval()


def _start(cfg: ProbeConfig):
    """Seed the head's init; return the generator of batches and points: the same draws for every encoder."""
    torch.manual_seed(cfg.seed)
    return torch.Generator().manual_seed(cfg.seed)


def _random_rows(gen, batch, height, n):
    return torch.rand(batch, height, generator=gen).argsort(1)[:, :min(n, height)]  # (B, r) distinct rows


def fit_depth(patches, cls, depth, cfg: ProbeConfig) -> LinearProbe:
    """patches (N, h, w, Cp), cls (N, Cc) or None: cached features (any float dtype); depth (N, H, W) m, 0 = unknown."""
    gen = _start(cfg)
    head = LinearProbe(feature_stats(patches), cfg.depth_bins, None if cls is None else feature_stats(cls))
    N, h, w, _ = patches.shape
    fine = (cfg.upsample * h, cfg.upsample * w)
    target = F.interpolate(depth[:, None].float(), size=fine, mode="nearest-exact")[:, 0]  # (N, 4h, 4w)
    batch = min(cfg.batch, N)

    def loss_of(idx):
        rows = _random_rows(gen, len(idx), fine[0], cfg.depth_rows)
        logits = head(patches[idx], None if cls is None else cls[idx])  # (B, h, w, K)
        pred = depth_from_bins(resized_rows(logits, rows, fine), cfg)  # (B, r, 4w)
        gt = target[idx[:, None], rows]
        return sig_loss(pred, gt, (gt > cfg.min_depth) & (gt < cfg.max_depth))

    return train_head(head, cfg.depth_lr, cfg.depth_steps, cfg.weight_decay, gen, N, batch, loss_of)


def fit_predict_depth(p_tr, c_tr, d_tr, p_te, c_te, cfg: ProbeConfig, out_size) -> torch.Tensor:
    """Train cfg.depth_heads depth heads (seeds cfg.seed + 1000 k) and average their predictions -> (N, H, W) m."""
    pred = 0.0
    for k in range(cfg.depth_heads):
        one = dataclasses.replace(cfg, seed=cfg.seed + 1000 * k)
        pred = pred + predict_depth(fit_depth(p_tr, c_tr, d_tr, one), p_te, c_te, one, out_size) / cfg.depth_heads
    return pred


@torch.no_grad()
def predict_depth(head, patches, cls, cfg: ProbeConfig, out_size, batch: int = 8) -> torch.Tensor:
    """The full protocol (logits at the patch grid, x4 bilinear, bins -> depth, resized to out_size) -> (N, H, W) m."""
    out = []
    for i in range(0, len(patches), batch):
        logits = head(patches[i:i + batch], None if cls is None else cls[i:i + batch]).permute(0, 3, 1, 2)
        logits = F.interpolate(logits, scale_factor=cfg.upsample, mode="bilinear", align_corners=False)
        depth = depth_from_bins(logits.permute(0, 2, 3, 1), cfg)[:, None]  # (B, 1, 4h, 4w)
        out.append(F.interpolate(depth, size=tuple(out_size), mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(out)


def fit_segmentation(patches, labels, n_classes: int, cfg: ProbeConfig, ignore_index: int = -1) -> LinearProbe:
    """patches (N, h, w, C); labels (N, H, W) class ids, ignore_index = unlabeled; logits upsampled to the labels."""
    gen = _start(cfg)
    head = LinearProbe(feature_stats(patches), n_classes)
    N, h, w, _ = patches.shape
    size = tuple(labels.shape[-2:])
    batch = min(cfg.batch, N)

    def loss_of(idx):
        rows = _random_rows(gen, len(idx), size[0], cfg.seg_rows)
        logits = resized_rows(head(patches[idx]), rows, size)  # (B, r, W, C)
        target = labels[idx[:, None], rows].long()
        return F.cross_entropy(logits.flatten(0, 2), target.flatten(), ignore_index=ignore_index)

    return train_head(head, cfg.seg_lr, cfg.seg_steps, cfg.weight_decay, gen, N, batch, loss_of)


@torch.no_grad()
def predict_segmentation(head, patches, out_size, batch: int = 8) -> torch.Tensor:
    out = []
    for i in range(0, len(patches), batch):
        logits = head(patches[i:i + batch]).permute(0, 3, 1, 2)
        out.append(F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False).argmax(1))
    return torch.cat(out)  # (N, H, W)


def fit_classifier(x, y, n_classes: int, cfg: ProbeConfig) -> LinearProbe:
    """Logistic regression, full batch: x (N, D), y (N,) class ids."""
    gen = _start(cfg)
    head = LinearProbe(feature_stats(x), n_classes)
    x = x.float()
    return train_head(head, cfg.cls_lr, cfg.cls_steps, cfg.cls_wd, gen, len(x), len(x),
                  lambda idx: F.cross_entropy(head(x[idx]), y[idx]))
