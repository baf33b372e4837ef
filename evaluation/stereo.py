"""
A correspondence probe on a real photograph: does the frozen encoder's patch feature find the same surface point in
the other view of a rectified stereo pair? On the Middlebury 2014 Motorcycle pair (dataengine/middlebury.py, ground-
truth disparity from structured light), scored as PCK: the share of left-image query points whose match lies within
t pixels of the true one (t = 4, 8, 16 in the original 741 x 500 image).

    pair = middlebury.motorcycle()
    result = stereo_probe(load_vit("weights/dinov2-s14"), pair, height=224)    # {"pck4", "pck8", "pck16", ...}
    python eval.py --vision weights/dinov2-s14 --vision runs/random-dinov2-s14 --stereo

The protocol. Both views are resized to `height` pixels high and the width that keeps the aspect, each rounded to the
patch size (224 x 336 for a /14 encoder: a 16 x 24 grid, one patch = 31 original pixels), with the preprocessing's
bicubic antialiased resize and the encoder's mean/std; features are the last block's patch tokens after the final
norm (as the dense probes read them). The queries: the centre of every left patch, snapped to the original pixel it
falls in, kept when that pixel's ground-truth disparity is known and its true match (column - disparity) lies inside
the right image (346 of 384 at 224 px). Two searches, both by cosine similarity, neither with a prior on the
disparity's sign or range:
- pck<t> (t = 4, 8, 16): along the epipolar line, as stereo matching does. The pair is rectified, so the match is on
  the query's own pixel row, inside the same patch row of the right feature map; that row's features are linearly
  interpolated (and renormalized) to every original pixel column between its first and last patch centres, and the
  best column is the match. The error is its distance to the true column.
- image_pck<t> (t = 16, 32): anywhere in the right image, at patch resolution: the centre of the best right patch.
  The error is the 2D distance to the true match; below half a patch (16 px at 224) only the right patch counts.
On a rectified pair with the same exposure the row search is close to block matching, which even random features
(a random projection of the pixels) do fairly well; the whole-image search asks more of the features.
`reference` gives what a matcher that always answers "disparity 0" scores (the features do no work): the
disparities span 7-60 px, so that floor is far from zero at 16 px.
"""

import numpy as np
import torch
import torch.nn.functional as F

from model import ViT

THRESHOLDS = (4, 8, 16)     # PCK thresholds of the epipolar search, original-image pixels
IMAGE_THRESHOLDS = (16, 32)     # of the whole-image search: it answers a patch centre (31 px apart at 224 px)


def input_size(H: int, W: int, height: int, patch: int) -> tuple:
    """(h_in, w_in): `height` and the width that keeps H:W, each a multiple of the patch size (at least one patch)."""
    h = max(patch, round(height / patch) * patch)
    return h, max(patch, round(W * h / H / patch) * patch)


@torch.no_grad()
def patch_features(vit: ViT, image: np.ndarray, size: tuple) -> torch.Tensor:
    """(H, W, 3) uint8 -> (h, w, D) float32 unit-length last-block patch tokens at input size (h_in, w_in)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()       # (1, 3, H, W)
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    x = (x / 255.0 - torch.tensor(vit.cfg.mean).view(1, 3, 1, 1)) / torch.tensor(vit.cfg.std).view(1, 3, 1, 1)
    param = next(vit.parameters())
    patches = vit.eval().features(x.to(param.device, param.dtype))["patches"][0]           # (h, w, D)
    return F.normalize(patches.float().cpu(), dim=-1)


def queries(h: int, w: int, H: int, W: int) -> np.ndarray:
    """(h * w, 2) int (row, col): the original pixel holding each patch centre of an h x w grid, row-major."""
    rows = np.floor((np.arange(h) + 0.5) * H / h).astype(int)
    cols = np.floor((np.arange(w) + 0.5) * W / w).astype(int)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def match_along_rows(left: torch.Tensor, right: torch.Tensor, H: int, W: int) -> np.ndarray:
    """left, right (h, w, D) unit patch features -> (h * w, 2) float (x, y) in original pixels: for each left patch
    (row-major) the right-image column (a pixel centre, c + 0.5) whose feature, interpolated along the same patch
    row and renormalized, is most cosine-similar to it (columns between the outer patch centres); y is the centre of
    the left patch's own pixel row."""
    h, w, _ = right.shape
    pos = (np.arange(W) + 0.5) * w / W - 0.5                              # each original column in patch units
    # beyond the outer patch centres interpolation has nothing to blend: those columns would all tie with the edge
    # patch, so candidates run from the first centre to the last (a match in the outer half patch snaps to it)
    inside = torch.from_numpy((pos >= 0) & (pos <= w - 1))
    pos = np.clip(pos, 0, w - 1)
    lo = np.floor(pos).astype(int)                                         # (W,) the patch centre at or left of it
    hi, frac = np.minimum(lo + 1, w - 1), torch.from_numpy(pos - lo).float()[None, :, None]
    lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
    dense = F.normalize(right[:, lo] * (1 - frac) + right[:, hi] * frac, dim=-1)        # (h, W, D)
    sim = torch.einsum("hjd,hcd->hjc", left, dense).masked_fill(~inside, -2.0)          # (h, w, W) per row
    x = sim.argmax(-1).reshape(-1).numpy() + 0.5
    return np.stack([x, queries(h, w, H, W)[:, 0] + 0.5], -1)


def match_whole_image(left: torch.Tensor, right: torch.Tensor, H: int, W: int) -> np.ndarray:
    """left, right (h, w, D) unit patch features -> (h * w, 2) float (x, y) in original pixels: for each left patch
    the centre of the most cosine-similar right patch anywhere in the image (patch resolution)."""
    h, w, D = right.shape
    best = (left.reshape(-1, D) @ right.reshape(-1, D).T).argmax(-1).numpy()            # (h * w,) right patch
    return np.stack([(best % w + 0.5) * W / w, (best // w + 0.5) * H / h], -1)


def pck(error: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """{"pck<t>": share of errors <= t} over finite errors (NaN = not a query)."""
    ok = np.isfinite(error)
    return {f"pck{t:g}": float((error[ok] <= t).mean()) if ok.any() else float("nan") for t in thresholds}


def errors(query: np.ndarray, matched: np.ndarray, disparity: np.ndarray) -> np.ndarray:
    """query (n, 2) (row, col) left pixels, matched (n, 2) (x, y) right-image positions in original pixels (pixel
    centres at index + 0.5), disparity (H, W) left-view ground truth (NaN = unknown) -> (n,) distance to the true
    match (col + 0.5 - d, row + 0.5) in pixels; NaN where the query is not kept (unknown disparity, or a true match
    outside the right image)."""
    d = disparity[query[:, 0], query[:, 1]].astype(np.float64)
    true = np.stack([query[:, 1] + 0.5 - d, query[:, 0] + 0.5], -1)          # (n, 2) x, y; NaN where unknown
    keep = np.isfinite(true[:, 0]) & (true[:, 0] >= 0) & (true[:, 0] < disparity.shape[1])
    return np.where(keep, np.hypot(*(matched - true).T), np.nan)


def score(query: np.ndarray, matched: np.ndarray, disparity: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """errors() summarized: PCK at thresholds, the median error (px), n (queries kept) and the reference: what
    "disparity 0" (the same pixel) scores."""
    error = errors(query, matched, disparity)
    keep = np.isfinite(error)
    zero = np.where(keep, np.abs(disparity[query[:, 0], query[:, 1]]), np.nan)   # off by the disparity itself
    return {**pck(error, thresholds), "err_px_median": float(np.nanmedian(error)) if keep.any() else float("nan"),
            "n": int(keep.sum()), "reference": {"zero_disparity": pck(zero, thresholds)}}


def stereo_probe(vit: ViT, pair: dict, height: int = 224, thresholds=THRESHOLDS, image_thresholds=IMAGE_THRESHOLDS,
                 per_query: bool = False) -> dict:
    """Both searches of a rectified pair {left, right (H, W, 3) uint8, disparity (H, W) NaN = unknown}
    (middlebury.motorcycle()): the epipolar row's PCK at thresholds, and as image_pck<t> the whole image's at
    image_thresholds; with the input size and grid. per_query: also each query's errors (NaN = not kept), for
    paired intervals (bench/bench_stereo.py)."""
    H, W = pair["disparity"].shape
    size = input_size(H, W, height, vit.cfg.patch_size)
    left, right = (patch_features(vit, pair[k], size) for k in ("left", "right"))          # (h, w, D) each
    h, w = left.shape[:2]
    q = queries(h, w, H, W)
    row, image = match_along_rows(left, right, H, W), match_whole_image(left, right, H, W)  # (h * w, 2) each
    res, whole = score(q, row, pair["disparity"], thresholds), score(q, image, pair["disparity"], image_thresholds)
    res.update({f"image_{k}": v for k, v in whole.items() if k.startswith("pck") or k == "err_px_median"})
    res.update(input=list(size), grid=[h, w])
    if per_query:
        res.update(errors=errors(q, row, pair["disparity"]).tolist(),
                   image_errors=errors(q, image, pair["disparity"]).tolist())
    return res
