"""
Views: one image with its 3D ground truth, from the built-in synthetic world or a real RGB-D folder (both in
scenes.py), and the lifting that turns a depth map and instance masks into gravity-aligned bounding cubes.

    frame = scenes.load_rgbd("my_frames/0001")      # a real RGB-D frame folder, validated
    lifted = lift(frame["depth"], frame["K"], frame["instance"], rng)   # answer frame, gravity source, cubes
    view, inside = synthetic_view(rng, 448)         # what data.py asks questions about: a View + mask interiors
    view, inside = scene_view(scene, camera, 448)   # one given camera on one given scene
    view, inside = rgbd_view(frame, rng)

The answer frame (every 3D answer in data.py) is viewer-centred and gravity-aligned: origin at the camera, Y up
(against gravity), Z the viewing direction flattened onto the horizontal plane, X to the right, meters.
`answer_rotation(up)` (3, 3) maps camera coordinates (OpenCV axes) into it. Gravity is known for synthetic views;
for a real frame it comes from a RANSAC floor plane when a floor is visible, else the answer frame is the camera
frame with Y flipped (recorded as `gravity` = "known" | "floor" | "camera").
"""

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dataengine import scenes
from storage.atomic import write_file_atomically


def unproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W) z-depth -> (H, W, 3) camera-frame points (OpenCV axes); pixel centres at +0.5."""
    H, W = depth.shape
    x, y = (np.arange(W) + 0.5 - K[0, 2]) / K[0, 0], (np.arange(H) + 0.5 - K[1, 2]) / K[1, 1]
    return np.stack([depth * x[None, :], depth * y[:, None], depth], -1)


def answer_rotation(up=None) -> np.ndarray:
    """(3, 3) rotation camera -> answer frame (rows: its X, Y, Z axes in camera coordinates); up: gravity's 'up' in
    camera coordinates, None = the camera's own -y."""
    if up is None:
        return np.diag([1.0, -1.0, 1.0])
    up = np.asarray(up, float) / np.linalg.norm(up)
    forward = np.array([0, 0, 1.0]) - up[2] * up
    if np.linalg.norm(forward) < 1e-3:
        raise ValueError("the camera looks straight up or down: no horizontal viewing direction for the answer frame")
    forward /= np.linalg.norm(forward)
    return np.stack([np.cross(forward, up), up, forward])


NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))     # 4 first, then 8


def interior(instance: np.ndarray, radius: int, depth: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: pixels at least `radius` pixels (square window) inside their instance region and the image,
    and, given depth, with valid depth and no depth jump to a 4-neighbour (> 2 cm + 5 %)."""
    if radius <= 0:
        return np.ones(instance.shape, bool) if depth is None else depth > 0
    H, W = instance.shape
    shifted = lambda a, dr, dc: a[1 + dr:H - 1 + dr, 1 + dc:W - 1 + dc]     # (H - 2, W - 2): a's neighbours
    ok = np.zeros(instance.shape, bool)
    ok[1:-1, 1:-1] = True
    for dr, dc in NEIGHBOURS:
        ok[1:-1, 1:-1] &= instance[1:-1, 1:-1] == shifted(instance, dr, dc)
    if depth is not None:
        d = depth[1:-1, 1:-1]
        ok[1:-1, 1:-1] &= d > 0
        for dr, dc in NEIGHBOURS[:4]:
            ok[1:-1, 1:-1] &= np.abs(shifted(depth, dr, dc) - d) <= 0.02 + 0.05 * d
    for _ in range(radius - 1):     # erode the boolean map: all 8 neighbours must be ok too
        before = ok.copy()
        for dr, dc in NEIGHBOURS:
            ok[1:-1, 1:-1] &= shifted(before, dr, dc)
    return ok


def floor_up(points: np.ndarray, rng: np.random.Generator, min_points: int, max_tilt_deg: float = 40.0,
             tol: float = 0.02, iters: int = 256):
    """RANSAC for a floor in camera-frame points (N, 3): a plane below the camera, its normal within max_tilt_deg of
    -y, with >= min_points inliers within tol m. -> (up (3,), camera height above it) or None."""
    if len(points) < max(min_points, 3):
        return None
    sub = points[rng.choice(len(points), min(len(points), 3000), replace=False)]
    tri = sub[rng.integers(0, len(sub), (iters, 3))]                               # (I, 3 points, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
    n *= np.where(n[:, 1] > 0, -1.0, 1.0)[:, None]                                   # point up (camera -y)
    height = -(n * tri[:, 0]).sum(1)                                                 # camera's signed distance
    ok = (-n[:, 1] > np.cos(np.radians(max_tilt_deg))) & (height > 0.1)
    score = (np.abs(sub @ n.T + height) < tol).sum(0) * ok                           # (I,)
    if score.max() == 0:
        return None
    best = int(score.argmax())
    inliers = points[np.abs(points @ n[best] + height[best]) < tol]
    if len(inliers) < min_points:
        return None
    centre = inliers.mean(0)                                                          # least-squares refit
    up = np.linalg.svd(inliers - centre, full_matrices=False)[2][2]
    up = -up if up[1] > 0 else up
    return up, float(-(centre @ up))


def robust_cube(points: np.ndarray) -> np.ndarray | None:
    """(2, 3) [min, max] of points (N, 3) without stray points (background pixels inside a mask): along each axis,
    keep the run of sorted values around the median with no jump above 10 cm or 5 % of the object's distance,
    whichever is larger, and bound the points inside all three runs. Unlike quantile fences this keeps the true
    extent of foreshortened surfaces, whose far end has few pixels. None for < 3 points."""
    if len(points) < 3:
        return None
    gap = max(0.1, 0.05 * float(np.median(np.linalg.norm(points, axis=1))))
    keep, runs = np.ones(len(points), bool), []
    for a in range(3):
        order = np.argsort(points[:, a], kind="stable")
        cuts = np.nonzero(np.diff(points[order, a]) > gap)[0] + 1                # a run starts at each cut
        mid = len(order) // 2
        start, stop = cuts[cuts <= mid][-1:].sum(), (cuts[cuts > mid][:1].tolist() or [len(order)])[0]
        run = np.zeros(len(points), bool)
        run[order[start:stop]] = True
        keep &= run
        runs.append(points[order[[start, stop - 1]], a])
    if keep.sum() < 3:          # the runs do not overlap (very sparse points): bound the runs themselves
        return np.array(runs).T
    return np.stack([points[keep].min(0), points[keep].max(0)])


def lift(depth: np.ndarray, K: np.ndarray, instance: np.ndarray, rng: np.random.Generator, up=None,
         floor_ids=(), radius: int = 1) -> dict:
    """Lift a frame to the answer frame: up (gravity in camera coordinates) when known, else a RANSAC floor (the
    instances floor_ids, else the unlabelled pixels), else the camera frame. -> R (3, 3) camera -> answer frame,
    gravity, camera_height (m or None), cubes {instance id: (2, 3) [min, max]} from each object's eroded mask."""
    points = unproject(depth, K)                                                     # (H, W, 3)
    gravity, height = "known" if up is not None else "camera", None
    if up is None:
        floor = np.isin(instance, list(floor_ids)) if len(floor_ids) else instance == 0
        found = floor_up(points[floor & (depth > 0)], rng, min_points=int(0.03 * depth.size))
        if found is not None:
            (up, height), gravity = found, "floor"
    R, inside = answer_rotation(up), interior(instance, radius, depth)
    ids = instance[inside]
    order = np.argsort(ids, kind="stable")
    ids, pts = ids[order], (points[inside] @ R.T)[order]                            # (N, 3) answer frame
    uniq, starts = np.unique(ids, return_index=True)
    cubes = {i: robust_cube(pts[a:b]) for i, a, b in zip(uniq.tolist(), starts, np.r_[starts[1:], len(ids)])
             if i != 0 and i not in floor_ids}
    return dict(R=R, gravity=gravity, camera_height=height, cubes={i: c for i, c in cubes.items() if c is not None})


@dataclass
class View:         # one image with its ground truth, exactly as stored (the builders write it, check.py reads it)
    rgb: np.ndarray              # (H, W, 3) uint8
    depth: np.ndarray            # (H, W) float64 meters as stored (millimetres), 0 = unknown
    instance: np.ndarray         # (H, W) int, 0 = no object
    semantic: np.ndarray | None  # (H, W) int, scenes.CATEGORIES index + 1 (synthetic only)
    K: list                      # 3x3 intrinsics, rounded as stored
    answer_from_camera: list     # 3x3 rotation camera (OpenCV axes) -> answer frame, rounded as stored
    cam_to_world: list | None    # 4x4, OpenCV camera axes
    gravity: str                 # "known" (synthetic) | "floor" (RANSAC) | "camera" (none found)
    objects: list                # [{"id", "name", "category", "colour", "cube": [[min xyz], [max xyz]], "on"}]
    room: str | None = None      # "a wooden floor and cream walls" (synthetic captions)
    captions: tuple = ()         # the user's captions (RGB-D folders)
    source: str = "synthetic"
    camera_height: float | None = None
    labels: dict = field(default_factory=dict)     # {instance id: category} of every id the frame knows, but floors


def stored(depth: np.ndarray) -> np.ndarray:
    """The depth exactly as a reader of the stored file gets it, in float64: millimetres in a uint16 PNG up to
    65.535 m, float32 meters (.npy) beyond. Answers are computed from this, never from float32 renders."""
    if depth.max() <= 65.535:
        return np.round(depth.astype(np.float64) * 1000) / 1000
    return depth.astype(np.float32).astype(np.float64)


def min_pixels(h: int, w: int) -> int:
    """Interior pixels an object needs to be asked about (and pixels to be named in a caption)."""
    return max(4, int(0.0004 * h * w))


def erosion(h: int, w: int) -> int:
    """Points are sampled this many pixels inside their object's mask (3 at 448 px), away from depth edges."""
    return max(1, round(min(h, w) / 150))


def candidates(view: View, inside: np.ndarray) -> list:
    counts = np.bincount(view.instance[inside], minlength=max(o["id"] for o in view.objects) + 1)
    return [o["id"] for o in view.objects if counts[o["id"]] >= min_pixels(*view.depth.shape)]


def scene_view(scene: scenes.Scene, camera: scenes.Camera, size: int) -> tuple:
    """(View, interior mask) of one camera on a synthetic scene: exact cubes in the answer frame, gravity known."""
    r = scenes.render(scene, camera, size, size)
    R_cw, origin = camera.cam_to_world[:3, :3], camera.cam_to_world[:3, 3]
    R = np.round(answer_rotation(R_cw[2]), 6)      # R_cw[2] = world up in camera coordinates
    objects = [dict(id=i + 1, name=o.name, category=o.category, colour=o.colour,
                    cube=np.round(o.cube(R @ R_cw.T, origin), 4).tolist(), on=o.on)
               for i, o in enumerate(scene.objects)]
    room = f"{'an' if scene.floor[0] in 'aeiou' else 'a'} {scene.floor} floor and {scene.wall_colour} walls"
    view = View(r["rgb"], stored(r["depth"]), r["instance"], r["semantic"], np.round(r["K"], 4).tolist(), R.tolist(),
                np.round(camera.cam_to_world, 6).tolist(), "known", objects, room, (), "synthetic",
                round(float(origin[2]), 4), {o["id"]: o["category"] for o in objects})
    return view, interior(view.instance, erosion(size, size), view.depth)


def synthetic_view(rng: np.random.Generator, size: int) -> tuple:
    """A random room and camera showing at least 2 objects well enough to ask about -> (View, interior mask)."""
    for _ in range(100):
        scene = scenes.random_scene(rng)
        for _ in range(3):
            view, inside = scene_view(scene, scenes.random_camera(rng, scene), size)
            if len(candidates(view, inside)) >= 2:
                return view, inside
    raise RuntimeError("no view with 2 visible objects in 300 tries: check random_scene / random_camera")


def sample_view(spec, index: int, frames: list, rng: np.random.Generator) -> tuple:
    """(View, interior mask) of a single-view sample: RGB-D frame folder index % len(frames), or a synthetic room."""
    if spec.rgbd:
        return rgbd_view(scenes.load_rgbd(frames[index % len(frames)], spec.depth_scale), rng)
    return synthetic_view(rng, spec.size)


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def rgbd_view(frame: dict, rng: np.random.Generator) -> tuple:
    """A View of a real frame (scenes.load_rgbd): cubes lifted from depth, gravity from a floor when one is seen.
    Objects sharing a label are named by their order from the left ("the second chair from the left")."""
    depth = stored(frame["depth"])
    floor_ids = [i for i, label in frame["labels"].items() if label.lower() in scenes.FLOOR_LABELS]
    lifted = lift(depth, frame["K"], frame["instance"], rng, floor_ids=floor_ids)
    kept = sorted(lifted["cubes"].items(), key=lambda kv: kv[1][:, 0].sum())        # left to right
    labels, objects = [frame["labels"][i] for i, _ in kept], []
    for k, (i, cube) in enumerate(kept):
        label, nth = labels[k], labels[:k + 1].count(labels[k])
        ordinal = ORDINALS[nth - 1] if nth <= 10 else f"{nth}th"
        name = label if labels.count(label) == 1 else f"{ordinal} {label} from the left"
        objects.append(dict(id=i, name=name, category=label, colour=None, cube=np.round(cube, 4).tolist(), on=None))
    pose = None if frame["cam_to_world"] is None else np.round(frame["cam_to_world"], 6).tolist()
    view = View(frame["rgb"], depth, frame["instance"], None, np.round(frame["K"], 4).tolist(),
                np.round(lifted["R"], 6).tolist(), pose, lifted["gravity"], objects, None, tuple(frame["captions"]),
                "rgbd", lifted["camera_height"], {i: c for i, c in frame["labels"].items() if i not in floor_ids})
    inside = interior(view.instance, erosion(*depth.shape), depth)
    if len(objects) < 2 or len(candidates(view, inside)) < 2:
        raise ValueError(f"RGB-D frame {frame['name']}: fewer than 2 labelled objects with {min_pixels(*depth.shape)} "
                         "interior pixels of valid depth; object-level questions need two")
    return view, inside


def load_depth(path: Path) -> np.ndarray:
    """Stored depth -> float64 meters: uint16 PNG millimetres or float32 .npy meters."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float64)
    return np.asarray(Image.open(path)).astype(np.float64) / 1000


def png_bytes(a: np.ndarray) -> bytes:
    """A PNG of a (H, W) or (H, W, 3) uint8/uint16 array: every row with the "Sub" filter, zlib level 1. Fixed
    settings give the same bytes for the same array; PIL's encoder spends 3x longer choosing filters per row."""
    h, w = a.shape[:2]
    bpp = (1 if a.ndim == 2 else a.shape[2]) * a.itemsize                    # bytes per pixel
    rows = a.astype(a.dtype.newbyteorder(">")).view(np.uint8).reshape(h, w * bpp)
    raw = np.empty((h, 1 + w * bpp), np.uint8)
    raw[:, 0] = 1                                                             # filter type 1 = Sub
    raw[:, 1:1 + bpp] = rows[:, :bpp]
    np.subtract(rows[:, bpp:], rows[:, :-bpp], out=raw[:, 1 + bpp:])          # each byte minus the one a pixel left
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    head = struct.pack(">IIBBBBB", w, h, 8 * a.itemsize, 0 if a.ndim == 2 else 2, 0, 0, 0)
    body = chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def save_view(out: Path, stem: str, view: View, image: str, depth: bool = True, semantic: bool = True) -> dict:
    """Write a view's image, instance ids, depth (as stored()) and semantic ids under out -> their paths there."""
    files = {}

    def put(key: str, path: str, data: bytes):
        files[key] = path
        write_file_atomically(out / path, lambda tmp: tmp.write_bytes(data))

    put("image", image, png_bytes(view.rgb))
    ids = view.instance.astype(np.uint8 if view.instance.max() < 256 else np.uint16)
    put("instance", f"gt/{stem}_instance.png", png_bytes(ids))
    if semantic and view.semantic is not None:
        put("semantic", f"gt/{stem}_semantic.png", png_bytes(view.semantic.astype(np.uint8)))
    if depth and view.depth.max() <= 65.535:
        put("depth", f"gt/{stem}_depth.png", png_bytes(np.round(view.depth * 1000).astype(np.uint16)))
    elif depth:
        buffer = io.BytesIO()
        np.save(buffer, view.depth.astype(np.float32), allow_pickle=False)
        put("depth", f"gt/{stem}_depth.npy", buffer.getvalue())
    return files
