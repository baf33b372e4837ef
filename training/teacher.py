"""
Stage 3 without the language model (issue 27, the paper's Table 6 in miniature): the same dual-channel encoder, the
same images in the same order, the same steps and rates, taught by a linear depth head instead of the frozen LLM.

    python train.py --stage 3 --teacher depth-points --data data/spatial ...   # depth at the pixels the
                                                                                # conversations ask about
    python train.py --stage 3 --teacher depth-dense --data data/spatial ...    # depth at every pixel: the ceiling

The head is the lin.1 depth probe of evaluation/probes.py ([patch ; CLS] of the last block, standardized with the
frozen encoder's statistics, 256 bins, x4 bilinear, SigLoss per image). Before the first step it is fitted on the
frozen encoder's features with the mode's supervision (the probe's budget), as stage 2 trains the LLM before the
boost, on other images than stage 3's (--teacher-data; on stage 3's own ~8 points per image a 196K-weight head
overfits: stage 3's first loss was 0.015, its second 0.24); then it trains with Attn+ and the gates at the
projector's rate. The head belongs to the teacher: the stage directory keeps it, the exported encoder never has it.
The LLM is never loaded: a step on DINOv2-S/14 is ~11x faster than the llm arm's and needs ~1/6 of its memory.

The supervision comes from each record's ground truth (dataengine/spatial.py writes it): meta.depth (the depth map)
and meta.points (the pixels the conversation asks about). depth-points scores the head's depth at those pixels only,
which is what the conversation's answers tell; depth-dense scores every pixel with a depth in (min, max).
"""

import copy
import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dataengine.views import load_depth
from evaluation import probes
from evaluation.probes import LinearProbe, ProbeConfig
from model import ViT
from training.dataset import PROBLEMS, ConversationDataset, Mix, check_record

MODES = ("depth-points", "depth-dense")


class DepthData(ConversationDataset):
    """The depth teachers' view of stage-3 data: the same mix and order as ConversationDataset over the same sources.
    ds[i] -> dict(pixels (1, 3, S, S), target (4h, 4w) meters (nearest; 0 = unknown), uv (P, 2), depth (P,) meters at
    the conversation's points, problem None | str). A record without the ground truth the mode needs (no meta.depth,
    several images, no point with a valid depth) is a counted problem, as an unusable conversation is."""

    def __init__(self, sources, vit: ViT, image_size: int, mode: str, cfg: ProbeConfig, limit: int | None = None,
                 outside_images: bool = False):
        self.vit_cfg, self.image_size, self.mode, self.outside_images = vit.cfg, image_size, mode, outside_images
        self.range = (cfg.min_depth, cfg.max_depth)
        h, w = vit.grid(image_size, image_size)
        self.fine, self.n_patches = (cfg.upsample * h, cfg.upsample * w), h * w  # the probe's x4 map
        mixed = sources if isinstance(sources, Mix) else Mix(sources, limit)
        self.records, self.counts, self.index = mixed.records, mixed.counts, mixed.index

    def other(self, sources) -> "DepthData":
        """The same reading of other sources (the head's warm-start images: train.py --teacher-data)."""
        twin, mixed = copy.copy(self), Mix(sources)
        twin.records, twin.counts, twin.index = mixed.records, mixed.counts, mixed.index
        return twin

    def __getitem__(self, i: int) -> dict:
        s, k = (int(x) for x in self.index[i])
        raw, where = self.records[s].get(k)
        try:
            return dict(self.sample(json.loads(raw), self.records[s].root), problem=None)
        except PROBLEMS as e:
            return dict(problem=f"{where}: {e}")

    def sample(self, rec: dict, root) -> dict:
        _, paths = check_record(rec)
        meta = rec.get("meta") or {}
        if len(paths) != 1 or "depth" not in meta:
            raise ValueError(f"a depth teacher needs one image and meta.depth; this record has {len(paths)} image(s)"
                             f" and {'a' if 'depth' in meta else 'no'} meta.depth")
        depth = load_depth(root / meta["depth"]).astype(np.float32)  # (H, W) meters
        H, W = depth.shape
        px = np.array([p["px"] for p in meta.get("points", [])], np.int64).reshape(-1, 2)  # (P, 2) column, row
        uv = np.stack([(px[:, 0] + 0.5) / W, (px[:, 1] + 0.5) / H], 1) if len(px) else np.zeros((0, 2))
        at = depth[px[:, 1], px[:, 0]] if len(px) else np.zeros(0, np.float32)
        target = np.asarray(Image.fromarray(depth).resize(self.fine[::-1], Image.NEAREST))
        lo, hi = self.range
        useful = ((at > lo) & (at < hi)).any() if self.mode == "depth-points" else ((target > lo) & (target < hi)).any()
        if not useful:
            raise ValueError(f"no {'queried point' if self.mode == 'depth-points' else 'pixel'} with a depth in "
                             f"({lo}, {hi}) m")
        return dict(pixels=self.images(root, paths), target=torch.from_numpy(target.copy()),
                    uv=torch.from_numpy(uv).float(), depth=torch.from_numpy(at).float(), n_patches=self.n_patches)


def collate_depth(items: list) -> dict:
    """DepthData items -> a batch with the keys train.py's loop reads (n_supervised counts images: the loss is a sum
    of one SigLoss per image; n_tokens counts the encoder's patch tokens)."""
    good = [it for it in items if it["problem"] is None]
    stack = lambda k: torch.stack([it[k] for it in good]) if good else torch.zeros(0)
    return dict(pixels=torch.cat([it["pixels"] for it in good]) if good else torch.zeros(0), target=stack("target"),
                uv=[it["uv"] for it in good], depth=[it["depth"] for it in good], n_supervised=len(good),
                n_tokens=sum(it["n_patches"] for it in good), n_samples=len(good),
                problems=[it["problem"] for it in items if it["problem"]],
                dropped_turns=0)


class DepthTeacher(nn.Module):
    """The encoder and its depth head. forward(pixels, target, uv, depth) -> the sum over images of each image's
    SigLoss (dense: against target; points: at uv against depth), like the VLM's summed token loss."""

    def __init__(self, vit: ViT, mode: str, cfg: ProbeConfig):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"teacher {mode!r}: expected one of {MODES}")
        self.vit, self.mode, self.cfg, self.head = vit, mode, cfg, None

    def features(self, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.vit.features(pixels)
        cls = f["cls"] if f["cls"] is not None else f["patches"].mean((1, 2))  # SigLIP has no CLS: as the probes do
        return f["patches"], cls  # (B, h, w, D), (B, D)

    def depth_map(self, patches, cls) -> torch.Tensor:
        """The probe's prediction before the final resize: (B, h, w, D), (B, D) -> (B, 4h, 4w) meters."""
        logits = self.head(patches, cls).permute(0, 3, 1, 2)  # (B, K, h, w)
        logits = F.interpolate(logits.float(), scale_factor=self.cfg.upsample, mode="bilinear", align_corners=False)
        return probes.depth_from_bins(logits.permute(0, 2, 3, 1), self.cfg)

    def loss_from_features(self, patches, cls, target, uv: list, depth: list) -> torch.Tensor:
        pred = self.depth_map(patches, cls)  # (B, 4h, 4w)
        lo, hi, total = self.cfg.min_depth, self.cfg.max_depth, pred.new_zeros(())
        for i in range(len(pred)):
            if self.mode == "depth-dense":
                p, g = pred[i], target[i].to(pred.device)
            else:  # bilinear at the pixel centres; grid_sample's (x, y) in [-1, 1] with align_corners=False
                grid = (2 * uv[i].to(pred.device) - 1).view(1, 1, -1, 2)
                p = F.grid_sample(pred[i][None, None], grid, mode="bilinear", align_corners=False).view(-1)
                g = depth[i].to(pred.device)
            total = total + probes.sig_loss(p, g, (g > lo) & (g < hi))
        return total

    def forward(self, pixels, target, uv, depth):
        return self.loss_from_features(*self.features(pixels), target, uv, depth)

    @torch.no_grad()
    def warm_start(self, ds: DepthData, seed: int, log=print, batch: int = 16):
        """Fit the head on the frozen encoder's features of every sample of ds, with the mode's supervision and the
        probe's budget (ProbeConfig: steps, batch, rate), before stage 3 moves the encoder."""
        items = [it for it in (ds[i] for i in range(len(ds))) if it["problem"] is None]
        if not items:
            raise ValueError("no sample has the ground truth the depth teacher needs (see the data report)")
        feats = [self.features(torch.cat([it["pixels"] for it in items[i:i + batch]]).to(self.device))
                 for i in range(0, len(items), batch)]
        patches, cls = (torch.cat([f[j].float().cpu() for f in feats]) for j in (0, 1))
        target = torch.stack([it["target"] for it in items])
        self.head = LinearProbe(probes.feature_stats(patches), self.cfg.depth_bins, probes.feature_stats(cls))
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            probes.train_head(self.head, self.cfg.depth_lr, self.cfg.depth_steps, self.cfg.weight_decay, gen,
                              len(items), min(self.cfg.batch, len(items)), lambda idx: self.loss_from_features(
                                  patches[idx], cls[idx], target[idx], [items[i]["uv"] for i in idx],
                                  [items[i]["depth"] for i in idx]) / len(idx))
        self.head.zero_grad(set_to_none=True)  # the fit's last gradient must not join stage 3's first update
        self.head.train().to(self.device)
        log(f"  teacher {self.mode}: head fitted on the frozen encoder's features of {len(items)} images "
            f"({self.cfg.depth_steps} steps)")

    @property
    def device(self):
        return next(self.vit.parameters()).device
