"""
A real photograph with real depth: the Middlebury 2014 "Motorcycle" stereo pair that scikit-image's wheel ships
(`skimage.data.stereo_motorcycle`, 500 x 741, downsampled 4x from the benchmark's 2964 x 2000), as a scenes.load_rgbd
frame folder, and as the rectified pair with ground-truth disparity the correspondence probe reads
(evaluation/stereo.py). scikit-image is imported inside `motorcycle` only: `pip install scikit-image`.

    pair = motorcycle()                      # left, right (500, 741, 3) uint8; disparity (500, 741), NaN = unknown
    write_frame("frames/motorcycle")         # rgb.png, depth.npy, intrinsics.json, instance.png, labels.json
    python tools/motorcycle.py frames/motorcycle
    python data.py spatial --rgbd frames/motorcycle --n 8 --out data/motorcycle && python data.py check data/motorcycle

Depth. Middlebury's calib format gives, for the rectified views, Z = baseline * f / (d + doffs), with d the disparity
in pixels, doffs the x-difference of the two principal points (cx1 - cx0) and Z in the baseline's unit. The numbers
are skimage's docstring's, valid for the 4x-downsampled images: f = 994.978 px, baseline 193.001 mm, doffs 31.086 px
(the benchmark's 3979.911 px and 124.343 px over 4). So depth_m = 0.193001 * 994.978 / (d + 31.086): 2.11 m (the
motorcycle's near side) to 5.02 m (the back wall). The disparity says which pixels match: left (row, col) is right
(row, col - d); the docstring's example has the sign the other way, the images agree with this one. Unknown
disparity (7.3 % of pixels, occlusions and unmatched areas; skimage 0.26 stores inf where its docstring says NaN) is
NaN here and depth 0 in the frame folder, which is how load_rgbd marks unknown depth.

Intrinsics. skimage gives cx = 311.193, cy = 254.877, the benchmark's over 4 (an integer pixel index at a pixel's
centre, as OpenCV). This repo puts pixel centres at index + 0.5 (views.unproject), and a 4x block average maps the
original index x to (x + 0.5) / 4 - 0.5: so cx = 311.193 + 0.125 here, cy = 254.877 + 0.125.

Instances. The photograph has no instance masks, and the spatial conversation asks about objects (views.rgbd_view
needs two). They are made here without any learned model: the floor is the RANSAC plane views.floor_up finds (within
3 cm); the rest is cut at depth discontinuities (4-neighbours more than 1 cm + 2 % of the depth apart, or unknown)
into connected regions; the regions that hold the hand-placed SEEDS pixels get the seeds' labels (read off the
photograph by a person), every other pixel is 0 (no object). The checker recomputes every answer from this depth
and these masks; it cannot know whether "bench" is the right word, and the seeds are the only human input.
"""

import io
import json
from pathlib import Path

import numpy as np

from dataengine import views
from dataengine.views import png_bytes
from storage.atomic import write_file_atomically, write_text_atomically

FOCAL_PX = 994.978          # f of both rectified views, 4x-downsampled pixels
BASELINE_M = 0.193001       # 193.001 mm
DOFFS_PX = 31.086           # cx1 - cx0
CX, CY = 311.193 + 0.125, 254.877 + 0.125     # moved to this repo's pixel-centre convention (module docstring)
SHAPE = (500, 741)

FLOOR_TOL_M = 0.03          # floor pixels: within this of the RANSAC floor plane
JUMP_M, JUMP_REL = 0.01, 0.02
# label -> (row, col) pixels of the left view lying on it, read off the photograph; a label's regions are merged
SEEDS = {"floor": [(480, 400)],
         "motorcycle": [(236, 306), (427, 652), (156, 533)],     # tank, seat, engine; front wheel, fork; headlight
         "bench": [(119, 140), (226, 57)],                       # the wooden bench: backrest; left arm and leg
         "shelving unit": [(218, 648), (100, 430)]}             # the metal shelves with their boxes, two levels
MIN_REGION = 1000           # pixels a seeded region must have: a smaller one means the segmentation broke


def motorcycle() -> dict:
    """The pair -> left, right (500, 741, 3) uint8; disparity (500, 741) float32 left-view pixels, NaN = unknown;
    K (3, 3) of the left view in this repo's convention; baseline_m, doffs_px."""
    try:
        from skimage.data import stereo_motorcycle
    except ImportError as e:
        raise ImportError("the Middlebury Motorcycle pair comes with scikit-image: pip install scikit-image") from e
    left, right, disparity = stereo_motorcycle()
    if left.shape != SHAPE + (3,) or right.shape != left.shape or disparity.shape != SHAPE:
        raise ValueError(f"skimage.data.stereo_motorcycle(): shapes {left.shape}, {right.shape}, {disparity.shape}; "
                         f"expected {SHAPE + (3,)} twice and {SHAPE}: the calibration here is for that size")
    disparity = np.where(np.isfinite(disparity), disparity, np.nan).astype(np.float32)
    K = np.array([[FOCAL_PX, 0, CX], [0, FOCAL_PX, CY], [0, 0, 1]])
    return dict(left=left, right=right, disparity=disparity, K=K, baseline_m=BASELINE_M, doffs_px=DOFFS_PX)


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
    """(H, W) disparity in pixels (NaN/inf = unknown) -> z-depth in meters, 0 = unknown (load_rgbd's marker)."""
    ok = np.isfinite(disparity) & (disparity + DOFFS_PX > 0)
    return np.where(ok, BASELINE_M * FOCAL_PX / np.where(ok, disparity + DOFFS_PX, 1.0), 0.0)


def segment(depth: np.ndarray, K: np.ndarray, seeds: dict = SEEDS, seed: int = 0) -> tuple:
    """(H, W) depth (0 = unknown) -> (instance (H, W) uint8, labels {id: label}) as the module docstring says: a
    RANSAC floor, then regions between depth discontinuities, labelled where a seed pixel lies."""
    from skimage.measure import label as connected          # scikit-image is here anyway (motorcycle)

    H, W = depth.shape
    known = depth > 0
    points = views.unproject(depth, K)                                           # (H, W, 3) camera frame
    found = views.floor_up(points[known], np.random.default_rng(seed), min_points=int(0.03 * depth.size))
    if found is None:
        raise ValueError("no floor plane in the depth map: the segmentation needs one")
    up, height = found
    floor = known & (np.abs(points @ up + height) < FLOOR_TOL_M)
    cut = ~known
    for dr, dc in ((0, 1), (1, 0)):                                              # 4-neighbour depth jumps
        a, b = depth[:H - dr, :W - dc], depth[dr:, dc:]
        jump = np.abs(a - b) > JUMP_M + JUMP_REL * np.minimum(a, b)
        cut[:H - dr, :W - dc] |= jump
        cut[dr:, dc:] |= jump
    regions = connected(~cut & ~floor, connectivity=1)                          # (H, W) int, 0 = cut or floor
    instance, labels = np.zeros((H, W), np.uint8), {}
    for i, (name, pixels) in enumerate(seeds.items(), start=1):
        for r, c in pixels:
            mask = floor if name == "floor" else regions == regions[r, c]
            if not (floor[r, c] if name == "floor" else regions[r, c]) or mask.sum() < MIN_REGION:
                raise ValueError(f"seed {name!r} at (row {r}, col {c}) lies in no region of {MIN_REGION}+ pixels")
            if (instance[mask] != 0).any():
                raise ValueError(f"seed {name!r} at (row {r}, col {c}) lies in a region already labelled "
                                 f"{labels[int(instance[mask].max())]!r}")
            instance[mask] = i
        labels[i] = name
    return instance, labels


def write_frame(out) -> Path:
    """The left view as a scenes.load_rgbd frame folder at out (rgb.png, depth.npy float32 meters with 0 = unknown,
    intrinsics.json, instance.png, labels.json, and middlebury.json: the source and the depth formula) -> out."""
    out = Path(out)
    pair = motorcycle()
    depth = disparity_to_depth(pair["disparity"])
    instance, labels = segment(depth, pair["K"])
    K = pair["K"]
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / "rgb.png", lambda tmp: tmp.write_bytes(png_bytes(pair["left"])))
    buffer = io.BytesIO()                     # np.save(path) would append .npy to the temporary name
    np.save(buffer, depth.astype(np.float32), allow_pickle=False)
    write_file_atomically(out / "depth.npy", lambda tmp: tmp.write_bytes(buffer.getvalue()))
    write_file_atomically(out / "instance.png", lambda tmp: tmp.write_bytes(png_bytes(instance)))
    write_text_atomically(out / "intrinsics.json", json.dumps(dict(fx=K[0, 0], fy=K[1, 1], cx=K[0, 2], cy=K[1, 2])))
    write_text_atomically(out / "labels.json", json.dumps({str(i): name for i, name in labels.items()}, indent=1))
    write_text_atomically(out / "middlebury.json", json.dumps(dict(
        source="Middlebury 2014 Motorcycle (Scharstein et al., GCPR 2014), left view, 4x downsampled, as "
               "skimage.data.stereo_motorcycle", depth="z_m = baseline_m * focal_px / (disparity_px + doffs_px); "
               "0 where the disparity is unknown", focal_px=FOCAL_PX, baseline_m=BASELINE_M, doffs_px=DOFFS_PX,
        instances="floor: RANSAC plane within 3 cm; objects: regions between depth jumps > 1 cm + 2 %, labelled at "
                  "hand-placed seed pixels", seeds={k: v for k, v in SEEDS.items()}), indent=1))
    return out
