"""
Scenes: the built-in synthetic 3D world and its renderer, and the reader of real RGB-D frame folders.

    scene = random_scene(rng)                       # a room (floor, 4 walls, ceiling) holding 3-8 objects
    camera = random_camera(rng, scene)              # several cameras on one Scene = several views of it
    view = render(scene, camera, 448, 448)          # rgb, depth, instance, semantic, K, cam_to_world
    frame = load_rgbd("my_frames/0001")             # the same from a real RGB-D folder (+ labels, captions, pose)

Conventions (views.py and data.py build on them; docs/data.md states them to users):
- world: right-handed, Z up (against gravity), meters, the floor is z = 0, the room is [0, Lx] x [0, Ly] x [0, Lz];
- camera frame as in OpenCV: x right, y down, z forward; `cam_to_world` (4, 4) maps camera to world points;
- pixel (col, row) has its centre at (col + 0.5, row + 0.5); depth is z-depth (camera z) in meters, 0 = unknown.

Rendering casts rays against analytic primitives, each over its screen rectangle only, with one directional light
and an orthographic shadow map traced the same way: numpy, float32, no Python loop touches a pixel.
"""

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Semantic id = index + 1 (0 = no label). The room parts come first; the rest are the object categories.
CATEGORIES = ("floor", "wall", "ceiling", "box", "ball", "cylinder", "cone", "table", "chair", "stool", "lamp",
              "shelf", "plant", "bottle", "sofa")
OBJECT_CATEGORIES = CATEGORIES[3:]
# Named object colours (sRGB 0..1); the name is what the conversations call the object ("the red chair").
COLOURS = {"red": (0.78, 0.13, 0.12), "orange": (0.92, 0.48, 0.12), "yellow": (0.92, 0.80, 0.18),
           "green": (0.20, 0.58, 0.24), "blue": (0.16, 0.32, 0.78), "purple": (0.47, 0.24, 0.66),
           "pink": (0.92, 0.50, 0.66), "brown": (0.47, 0.29, 0.15), "white": (0.92, 0.92, 0.90),
           "gray": (0.50, 0.50, 0.50), "black": (0.12, 0.12, 0.13), "cyan": (0.16, 0.70, 0.75)}
WALL_COLOURS = {"white": (0.90, 0.89, 0.86), "cream": (0.93, 0.88, 0.74), "pale blue": (0.72, 0.81, 0.90),
                "pale green": (0.75, 0.86, 0.74), "beige": (0.84, 0.77, 0.65), "light gray": (0.76, 0.76, 0.76),
                "pale pink": (0.92, 0.78, 0.78)}
FLOORS = {"wooden": ((0.55, 0.36, 0.20), "wood"), "tiled": ((0.80, 0.78, 0.74), "tiles"),
          "carpeted": ((0.45, 0.42, 0.50), "carpet"), "gray concrete": ((0.55, 0.55, 0.53), "speckle")}
PATTERNS = ("plain", "stripes", "checker", "marble", "speckle", "wood", "tiles", "carpet", "wallpaper")
SUPPORTS = ("table", "stool", "shelf", "box")          # categories whose top can hold a small object
SMALL_OK = ("box", "ball", "cylinder", "cone", "lamp", "plant", "bottle")
F32 = np.float32


def _linear(rgb):
    """sRGB-ish 0..1 to linear with gamma 2 (render() encodes with a square root)."""
    return tuple(float(c) ** 2 for c in rgb)


@dataclass
class Part:
    """One analytic primitive, placed in the world."""
    kind: str              # "box" | "sphere" | "frustum" (vertical axis; a cylinder has r_bottom == r_top)
    centre: np.ndarray     # (3,) box, sphere: the centre; frustum: the centre of its bottom disk
    size: tuple            # box: half extents (ex, ey, ez); sphere: (r,); frustum: (r_bottom, r_top, height)
    yaw: float = 0.0       # rotation about world Z (boxes; orients the texture of the others)
    rgb: tuple = (0.5, 0.5, 0.5)     # linear albedo
    rgb2: tuple = (0.3, 0.3, 0.3)    # the pattern's second colour
    pattern: str = "plain"
    scale: float = 0.1     # pattern period, meters

    def bounds(self) -> np.ndarray:
        """(8, 3) corners of a world-axis-aligned box holding the part."""
        lo, hi = self.extent(np.eye(3), np.zeros(3))
        return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])

    def extent(self, rot: np.ndarray, origin: np.ndarray) -> np.ndarray:
        """Exact (2, 3) [min, max] of the part in the frame p' = rot @ (p - origin)."""
        c = rot @ (np.asarray(self.centre, float) - origin)
        if self.kind == "sphere":
            return np.stack([c - self.size[0], c + self.size[0]])
        if self.kind == "box":
            co, si = np.cos(self.yaw), np.sin(self.yaw)
            axes = np.array([[co, si, 0], [-si, co, 0], [0, 0, 1]]) * np.array(self.size)[:, None]  # (3, 3) rows
            half = np.abs(axes @ rot.T).sum(0)
            return np.stack([c - half, c + half])
        r0, r1, h = self.size        # a frustum: the hull of its two horizontal disks
        up = rot[:, 2]               # world Z in the frame
        disk = np.sqrt(np.clip(1 - up ** 2, 0, None))   # extent of a unit horizontal disk along each frame axis
        ends = np.stack([c - r0 * disk, c + r0 * disk, c + h * up - r1 * disk, c + h * up + r1 * disk])
        return np.stack([ends.min(0), ends.max(0)])


@dataclass
class Object:
    category: str
    colour: str
    parts: list
    on: int | None = None  # instance id of the object it stands on; None = the floor

    @property
    def name(self) -> str:
        return f"{self.colour} {self.category}"

    def cube(self, rot: np.ndarray, origin: np.ndarray) -> np.ndarray:
        """(2, 3) [min, max] bounding cube of the whole object in the frame p' = rot @ (p - origin)."""
        ext = np.stack([p.extent(rot, origin) for p in self.parts])
        return np.stack([ext[:, 0].min(0), ext[:, 1].max(0)])


@dataclass
class Scene:
    room: np.ndarray                 # (3,) (Lx, Ly, Lz): the room is [0, Lx] x [0, Ly] x [0, Lz]
    objects: list                    # instance id = index + 1
    light: np.ndarray = field(default_factory=lambda: np.array([0.3, 0.2, 0.93]) / np.linalg.norm([0.3, 0.2, 0.93]))
    ambient: float = 0.5             # (the light is a unit vector towards a directional light)
    floor: str = "wooden"            # a key of FLOORS
    wall_colour: str = "white"       # a key of WALL_COLOURS
    wall_pattern: str = "plain"      # or "wallpaper"
    tint: tuple = (1.0, 1.0, 1.0)    # multiplies the floor colour
    scale: float = 0.12              # floor pattern size, meters

    def room_parts(self) -> list:
        """Material-only Parts for the 6 room faces (floor, ceiling, 4 walls): patterns use world coordinates."""
        floor = np.clip(np.array(FLOORS[self.floor][0]) * self.tint, 0, 1)
        wall = np.array(WALL_COLOURS[self.wall_colour])
        faces = [(floor, FLOORS[self.floor][1]), ((0.93, 0.93, 0.92), "plain")] + [(wall, self.wall_pattern)] * 4
        return [Part("room", np.zeros(3), (), 0.0, _linear(c), _linear(np.array(c) * 0.8), p, self.scale)
                for c, p in faces]


@dataclass
class Camera:
    cam_to_world: np.ndarray       # (4, 4), OpenCV camera axes
    hfov: float = 60.0             # horizontal field of view, degrees
    principal: tuple = (0.5, 0.5)  # principal point as fractions of (width, height)

    def intrinsics(self, height: int, width: int) -> np.ndarray:
        f = 0.5 * width / np.tan(np.radians(self.hfov) / 2)
        return np.array([[f, 0, self.principal[0] * width], [0, f, self.principal[1] * height], [0, 0, 1.0]])


def _build(rng, category: str, small: bool):
    """An object in its own coordinates (origin on the floor under it, yaw 0): its parts as (kind, centre, size,
    role), its footprint radius, and its top as a support (half_x, half_y, height) or None. role 0 = the object's
    named colour, 1 = a darker shade of it, 2 = fixed (metal, or a plant's foliage)."""
    u = rng.uniform

    def box(x, y, z, hx, hy, hz, role=0):              # centre and half sizes
        return "box", (x, y, z), (hx, hy, hz), role

    def disk(z, r0, r1, h, role=0):                    # a frustum on the vertical axis, bottom at height z
        return "frustum", (0, 0, z), (r0, r1, h), role

    def legs(w, d, h, leg):
        return [box(sx * (w / 2 - leg), sy * (d / 2 - leg), h / 2, leg / 2, leg / 2, h / 2, 1)
                for sx in (-1, 1) for sy in (-1, 1)]

    if category == "box":
        s = u(0.08, 0.25, 3) if small else u(0.3, 0.8, 3)
        top = (s[0] / 2, s[1] / 2, s[2]) if min(s[:2]) > 0.4 else None
        return [box(0, 0, s[2] / 2, *(s / 2))], np.hypot(s[0], s[1]) / 2, top
    if category == "ball":
        r = u(0.05, 0.12) if small else u(0.12, 0.35)
        return [("sphere", (0, 0, r), (r,), 0)], r, None
    if category in ("cylinder", "cone"):
        r, h = (u(0.04, 0.1), u(0.1, 0.3)) if small else (u(0.1, 0.3), u(0.3, 1.0))
        return [disk(0, r, r if category == "cylinder" else 0.0, h)], r, None
    if category == "table":
        w, d, h, leg = u(0.8, 1.6), u(0.6, 0.9), u(0.7, 0.78), u(0.04, 0.07)
        top = [box(0, 0, h - 0.02, w / 2, d / 2, 0.02)]
        return top + legs(w, d, h - 0.04, leg), np.hypot(w, d) / 2, (w / 2, d / 2, h)
    if category == "chair":
        s, h, back = u(0.4, 0.5), u(0.42, 0.48), u(0.35, 0.5)
        seat = [box(0, 0, h - 0.025, s / 2, s / 2, 0.025), box(0, 0.02 - s / 2, h + back / 2, s / 2, 0.02, back / 2)]
        return seat + legs(s, s, h - 0.05, 0.04), s * 0.71, None
    if category == "stool":
        r, h = u(0.15, 0.2), u(0.45, 0.7)
        stand = [disk(0.03, 0.025, 0.025, h - 0.08, 2), disk(0, 0.8 * r, 0.7 * r, 0.03, 2)]
        return [disk(h - 0.05, r, r, 0.05)] + stand, r, (0.65 * r, 0.65 * r, h)
    if category == "lamp":       # small: a table lamp
        k = 0.3 if small else 1.0
        base, pole, shade = 0.14 * k + 0.03, u(1.2, 1.6) * k, max(k, 0.6)
        r0, r1, hs = u(0.18, 0.25) * shade, u(0.08, 0.13), u(0.2, 0.3) * shade
        stand = [disk(0, base, base * 0.8, 0.03, 2), disk(0.03, 0.015, 0.015, pole, 2)]
        return stand + [disk(0.03 + pole - hs * 0.6, r0, r1, hs)], max(base, r0), None
    if category == "shelf":
        w, d, h, t = u(0.6, 1.2), u(0.25, 0.4), u(0.9, 1.8), 0.025
        heights = np.linspace(t / 2 + 0.05, h - t / 2, rng.integers(3, 6))
        boards = [box(0, 0, z, w / 2 - t, d / 2, t / 2) for z in heights]
        sides = [box(sx * (w / 2 - t / 2), 0, h / 2, t / 2, d / 2, h / 2, 1) for sx in (-1, 1)]
        back = box(0, 0.005 - d / 2, h / 2, w / 2 - t, 0.005, h / 2, 1)
        return boards + sides + [back], np.hypot(w, d) / 2, (w / 2 - t, d / 2, h)
    if category == "plant":
        k = 0.5 if small else 1.0
        r, hp = u(0.1, 0.16) * k, u(0.18, 0.3) * k
        leaves = [("sphere", (u(-0.5, 0.5) * r, u(-0.5, 0.5) * r, hp + rr * (0.8 + 0.6 * j)), (rr,), 2)
                  for j, rr in enumerate(u(0.15, 0.28, rng.integers(1, 4)) * k)]
        return [disk(0, r, r * 1.25, hp)] + leaves, max(r * 1.25, *(leaf[2][0] for leaf in leaves)), None
    if category == "bottle":
        r, h = u(0.04, 0.08), u(0.18, 0.35)
        neck = [disk(h, r, 0.35 * r, 0.05), disk(h + 0.05, 0.35 * r, 0.35 * r, 0.06, 1)]
        return [disk(0, r, r, h)] + neck, r, None
    if category == "sofa":
        w, d, hb = u(1.4, 2.1), u(0.8, 0.95), 0.42
        arms = [box(sx * (w / 2 - 0.09), 0.1, hb + 0.1, 0.09, d / 2 - 0.1, 0.1, 1) for sx in (-1, 1)]
        seat = [box(0, 0, hb / 2, w / 2, d / 2, hb / 2), box(0, 0.1 - d / 2, hb + 0.2, w / 2, 0.1, 0.2, 1)]
        return seat + arms, np.hypot(w, d) / 2, None
    raise ValueError(f"unknown category {category!r}; known: {OBJECT_CATEGORIES}")


def _material(rng, colour: str, role: int):
    """(rgb, rgb2, pattern, scale) of a part in the object's own colour; role 0 or 1 as in _build."""
    base = np.array(COLOURS[colour]) * (0.75 if role == 1 else 1.0) * rng.uniform(0.9, 1.05)
    pattern = rng.choice(["plain", "stripes", "checker", "marble", "speckle"], p=[0.4, 0.15, 0.15, 0.15, 0.15])
    second = base * rng.uniform(0.55, 0.75) if rng.random() < 0.6 else base + (1 - base) * rng.uniform(0.2, 0.35)
    return _linear(np.clip(base, 0, 1)), _linear(np.clip(second, 0, 1)), str(pattern), float(rng.uniform(0.05, 0.2))


def _place(rng, spec, pos, yaw: float, colour: str, category: str):
    """World Parts of an object built by _build at floor position pos (x, y, z) with rotation yaw."""
    co, si = np.cos(yaw), np.sin(yaw)
    metal, leaf = _linear((0.35, 0.35, 0.37)), _linear(np.array((0.16, 0.45, 0.14)) * rng.uniform(0.8, 1.1))
    own, parts = {0: _material(rng, colour, 0), 1: _material(rng, colour, 1)}, []
    for kind, (x, y, z), size, role in spec:
        if role == 2:   # poles and bases are metal; spheres of a plant are foliage
            rgb = leaf if (category == "plant" and kind == "sphere") else metal
            mat = (rgb, tuple(c * 0.7 for c in rgb), "marble" if rgb is leaf else "plain", 0.05)
        else:
            mat = own[role]
        centre = np.array([pos[0] + co * x - si * y, pos[1] + si * x + co * y, pos[2] + z])
        parts.append(Part(kind, centre, tuple(float(s) for s in size), float(yaw), *mat))
    return parts


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A room with n_objects (default 3-8) objects; the objects stand in its far part (y > 0.45 Ly) so that a
    camera in the near part (random_camera) sees most of them. Every (colour, category) occurs at most once."""
    room = np.array([rng.uniform(4.5, 8.0), rng.uniform(5.0, 8.0), rng.uniform(2.6, 3.2)])
    n, pairs = int(n_objects or rng.integers(3, 9)), set()
    while len(pairs) < n:
        pairs.add((str(rng.choice(OBJECT_CATEGORIES)), str(rng.choice(list(COLOURS)))))
    wanted = sorted(pairs, key=lambda p: (p[0] in SMALL_OK, p))   # big things first, then the small ones
    objects, footprints, surfaces = [], [], []      # footprints: (x, y, r) on the floor; surfaces: free supports
    for category, colour in wanted:
        on_top = category in SMALL_OK and surfaces and rng.random() < 0.45
        spec, radius, top = _build(rng, category, small=bool(on_top))
        yaw, pos, support = float(rng.uniform(0, 2 * np.pi)), None, None
        if on_top:     # a random free support whose top is big enough
            for k in rng.permutation(len(surfaces)):
                sid, sx, sy, hx, hy, sz, syaw, taken = surfaces[k]
                if min(hx, hy) < radius + 0.02 or taken >= 2:
                    continue
                lx, ly = rng.uniform(-1, 1, 2) * (np.array([hx, hy]) - radius - 0.01)
                c, s = np.cos(syaw), np.sin(syaw)
                pos, support = (sx + c * lx - s * ly, sy + s * lx + c * ly, sz), sid
                surfaces[k][7] += 1
                break
            if pos is None:
                spec, radius, top = _build(rng, category, small=False)
        if pos is None:
            for _ in range(60):
                x = rng.uniform(radius + 0.2, room[0] - radius - 0.2)
                y = rng.uniform(min(0.45 * room[1] + radius, room[1] - radius - 0.2), room[1] - radius - 0.2)
                if all(np.hypot(x - fx, y - fy) > radius + fr + 0.15 for fx, fy, fr in footprints):
                    pos = (x, y, 0.0)
                    footprints.append((x, y, radius))
                    break
        if pos is None:
            continue
        objects.append(Object(category, colour, _place(rng, spec, pos, yaw, colour, category), support))
        if top is not None and category in SUPPORTS and support is None:
            surfaces.append([len(objects), pos[0], pos[1], top[0], top[1], top[2], yaw, 0])
    if len(objects) < min(n, 3):        # crowded out (rare): draw again
        return random_scene(rng, n_objects)
    floor, wall = str(rng.choice(list(FLOORS))), str(rng.choice(list(WALL_COLOURS)))
    elevation, azimuth = np.radians(rng.uniform(45, 75)), rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    tint = tuple(rng.uniform(0.85, 1.1) * rng.uniform(0.95, 1.05, 3))
    return Scene(room, objects, light, float(rng.uniform(0.4, 0.55)), floor, wall,
                 "wallpaper" if rng.random() < 0.3 else "plain", tint, float(rng.uniform(0.08, 0.16)))


def look_at(position, target, roll: float = 0.0) -> np.ndarray:
    """(4, 4) cam_to_world of a camera at `position` looking at `target` (OpenCV axes), rolled by `roll` radians."""
    f = np.asarray(target, float) - position
    f /= np.linalg.norm(f)
    r = np.cross(f, (0, 0, 1.0))
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    r, d = np.cos(roll) * r + np.sin(roll) * d, np.cos(roll) * d - np.sin(roll) * r
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = np.stack([r, d, f], 1), position
    return m


def random_camera(rng: np.random.Generator, scene: Scene, hfov=(50.0, 75.0), height=(1.0, 1.9),
                  distance=(1.8, 4.5), roll_deg: float = 3.0) -> Camera:
    """A hand-held-like camera in the near part of the room, looking at the objects: horizontal field of view in
    `hfov` degrees (phones and Kinect-style sensors span 55-75), eye height in `height` m, a little roll, the
    principal point within 2 % of the image centre."""
    centres = np.array([np.mean([p.centre for p in o.parts], 0) for o in scene.objects])
    Lx, Ly, _ = scene.room
    for _ in range(100):
        target = centres[rng.integers(len(centres))] * 0.5 + centres.mean(0) * 0.5
        target = target + (rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), 0)
        target[2] = rng.uniform(0.2, 0.8)
        pos = np.array([rng.uniform(0.4, Lx - 0.4), rng.uniform(0.3, 0.35 * Ly), rng.uniform(*height)])
        if distance[0] <= np.hypot(*(target - pos)[:2]) <= distance[1]:
            break
    cam = look_at(pos, target, np.radians(rng.uniform(-roll_deg, roll_deg)))
    return Camera(cam, float(rng.uniform(*hfov)), tuple(0.5 + rng.uniform(-0.02, 0.02, 2)))


# ----------------------------------------------------------------------------------------------------------------
# Ray casting. A ray is o + t·d; camera rays have d's camera-z equal to 1, so t is the z-depth itself. Inputs are
# float32 arrays of one rectangle of rays (h, w) or Python floats (one origin for all); scalars are cast to Python
# floats so that numpy keeps float32.

EPS = 1e-4


def _hit(part: Part, ox, oy, oz, dx, dy, dz):
    """Nearest hit t > 0 of each ray (inf on a miss) and the unit world normal there (nx, ny, nz)."""
    cx, cy, cz = (float(c) for c in part.centre)
    px, py, pz, inf = ox - cx, oy - cy, oz - cz, np.float32(np.inf)
    if part.kind == "box":
        co, si = float(np.cos(part.yaw)), float(np.sin(part.yaw))
        lo = (co * px + si * py, co * py - si * px, pz)            # ray in the box's own axes
        ld = (co * dx + si * dy, co * dy - si * dx, dz)
        near, far = [], []
        for a in range(3):
            e, inv = float(part.size[a]), 1.0 / ld[a]
            t1, t2 = (-e - lo[a]) * inv, (e - lo[a]) * inv
            near.append(np.minimum(t1, t2))
            far.append(np.maximum(t1, t2))
        tn = np.maximum(np.maximum(near[0], near[1]), near[2])
        t = np.where((tn <= np.minimum(np.minimum(far[0], far[1]), far[2])) & (tn > EPS), tn, inf)
        # the face hit is the slab entered last; its normal points against the ray
        lnx = np.where(near[0] == tn, -np.sign(ld[0]), 0).astype(F32)
        lny = np.where((near[1] == tn) & (lnx == 0), -np.sign(ld[1]), 0).astype(F32)
        lnz = np.where((lnx == 0) & (lny == 0), -np.sign(ld[2]), 0).astype(F32)
        return t, co * lnx - si * lny, si * lnx + co * lny, lnz
    if part.kind == "sphere":
        r = float(part.size[0])
        a, b = dx * dx + dy * dy + dz * dz, px * dx + py * dy + pz * dz
        disc = b * b - a * (px * px + py * py + pz * pz - r * r)
        t = (-b - np.sqrt(np.maximum(disc, 0))) / a
        t = np.where((disc >= 0) & (t > EPS), t, inf)
        return t, (px + t * dx) / r, (py + t * dy) / r, (pz + t * dz) / r
    # vertical frustum: radius r0 + k·z over 0 <= z <= h (z from the bottom disk); side, bottom and top disks
    r0, r1, h = (float(s) for s in part.size)
    k = (r1 - r0) / h
    rho = r0 + k * pz
    A = dx * dx + dy * dy - k * k * dz * dz
    B = 2 * (px * dx + py * dy - k * rho * dz)
    disc = B * B - 4 * A * (px * px + py * py - rho * rho)
    sq, t = np.sqrt(np.maximum(disc, 0)), np.full(np.broadcast(px, dx).shape, inf, F32)
    for root in ((-B - sq) / (2 * A), (-B + sq) / (2 * A)):
        z = pz + root * dz
        t = np.where((disc >= 0) & (root > EPS) & (z >= 0) & (z <= h) & (root < t), root, t)
    cap = np.zeros(t.shape, F32)                   # 0 = the side, -1 / +1 = the bottom / top disk
    for zc, rc, sign in ((0.0, r0, -1), (h, r1, 1)):
        tc = (zc - pz) / dz
        x, y = px + tc * dx, py + tc * dy
        take = (tc > EPS) & (x * x + y * y <= rc * rc) & (tc < t)
        t, cap = np.where(take, tc, t), np.where(take, sign, cap)
    x, y, z, side = px + t * dx, py + t * dy, pz + t * dz, cap == 0
    nx, ny, nz = np.where(side, x, 0), np.where(side, y, 0), np.where(side, -k * (r0 + k * z), cap)
    norm = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-12
    return t, nx / norm, ny / norm, nz / norm


def _trace(parts, rects, origin, dirs, t, sid, normal=None, first_id: int = 6):
    """z-buffer the parts into t (h, w), sid and, if given, normal (3 x (h, w)) in place; part i gets the surface id
    first_id + i and is only intersected over its rectangle rects[i] = (r0, r1, c0, c1) (None = not in view)."""
    for i, (part, rect) in enumerate(zip(parts, rects)):
        if rect is None:
            continue
        sl = (slice(rect[0], rect[1]), slice(rect[2], rect[3]))
        o = [v[sl] if isinstance(v, np.ndarray) else v for v in origin]
        d = [v[sl] if isinstance(v, np.ndarray) else v for v in dirs]
        th, *nh = _hit(part, *o, *d)
        closer = th < t[sl]
        np.copyto(t[sl], th, where=closer)
        np.copyto(sid[sl], first_id + i, where=closer)
        for n, v in zip(normal or (), nh):
            np.copyto(n[sl], v, where=closer)


def _rect(a, b, a0, b0, step, rows, cols):
    """Pixel rectangle (r0, r1, c0, c1) covering image coordinates a (cols) and b (rows), one pixel of margin."""
    c0, c1 = int(np.floor((a.min() - a0) / step)) - 1, int(np.ceil((a.max() - a0) / step)) + 1
    r0, r1 = int(np.floor((b.min() - b0) / step)) - 1, int(np.ceil((b.max() - b0) / step)) + 1
    c0, c1, r0, r1 = max(c0, 0), min(c1, cols), max(r0, 0), min(r1, rows)
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def _hash(i, j, seed: int = 0):
    """Deterministic value in [0, 1) per integer cell (i, j)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (seed * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h >> 7) & 0xFFFF).astype(F32) / 65535


def _albedo(table: dict, sid: np.ndarray, p):
    """Linear albedo, 3 x (n,), of n hit points p (3 x (n,)) on surfaces sid (n,) (intp), with the surfaces'
    patterns, evaluated in world coordinates turned by the surface's yaw (so they follow rotated boxes)."""
    pat = np.take(table["pattern"], sid)
    w, m = np.zeros(len(sid), F32), np.ones(len(sid), F32)     # weight of the second colour, brightness
    for k, count in enumerate(np.bincount(pat, minlength=len(PATTERNS))):
        name = PATTERNS[k]
        if name == "plain" or count == 0:
            continue
        sel = np.nonzero(pat == k)[0]
        ss = np.take(sid, sel)
        cs, sn, sk = np.take(table["cos"], ss), np.take(table["sin"], ss), np.take(table["scale"], ss)
        px, py, z = np.take(p[0], sel), np.take(p[1], sel), np.take(p[2], sel)
        x, y = cs * px + sn * py, cs * py - sn * px
        if name == "stripes":
            w[sel] = np.sin(6.2832 * z / sk) > 0
        elif name == "wallpaper":
            w[sel] = 0.35 * (np.sin(6.2832 * (x + y) / sk) > 0.3)
        elif name == "checker":
            w[sel] = (np.floor(x / sk) + np.floor(y / sk) + np.floor(z / sk)) % 2
        elif name == "marble":
            phase = 2 * (x + y + z) / sk + 2.5 * np.sin(1.3 * y / sk) + 1.7 * np.sin(0.9 * z / sk)
            w[sel] = (0.5 + 0.5 * np.sin(phase)) ** 3
        elif name == "speckle":
            m[sel] = 0.85 + 0.2 * _hash(np.floor((x + z) * 80), np.floor((y - z) * 80))
        elif name == "wood":
            v = y / (1.5 * sk)
            plank = np.floor(v)
            m[sel] = (0.8 + 0.3 * _hash(plank, plank, 1)) * (1 - 0.45 * (v - plank < 0.03))
            w[sel] = 0.4 * (0.5 + 0.5 * np.sin(x * 23 + 9 * _hash(plank, plank, 2) + 2 * np.sin(x * 2.7 + plank)))
        elif name == "tiles":
            tx, ty = x / (4 * sk), y / (4 * sk)
            fx, fy = np.floor(tx), np.floor(ty)
            grout = (tx - fx < 0.03) | (ty - fy < 0.03)
            m[sel] = (0.92 + 0.1 * _hash(fx, fy, 3)) * (1 - 0.33 * grout)
        elif name == "carpet":
            m[sel] = (0.85 + 0.2 * _hash(np.floor(x * 66), np.floor(y * 66), 4)) * (0.95 + 0.05 * np.sin(3 * x + 2 * y))
    return [(np.take(a, sid) * (1 - w) + np.take(b, sid) * w) * m for a, b in zip(table["rgb"], table["rgb2"])]


@np.errstate(all="ignore")   # misses divide by zero and take square roots of negatives; they are masked out
def render(scene: Scene, camera: Camera, height: int, width: int, shadows: bool = True) -> dict:
    """One view: rgb uint8 (H, W, 3), depth float32 (H, W) in meters, instance int32 (H, W) (0 = the room, i =
    scene.objects[i - 1]), semantic int32 (H, W) (CATEGORIES index + 1), K (3, 3) and cam_to_world (4, 4)."""
    K = camera.intrinsics(height, width)
    R, o = camera.cam_to_world[:3, :3], camera.cam_to_world[:3, 3]
    xs = ((np.arange(width) + 0.5 - K[0, 2]) / K[0, 0]).astype(F32)[None, :]    # (1, W) camera x of the ray
    ys = ((np.arange(height) + 0.5 - K[1, 2]) / K[1, 1]).astype(F32)[:, None]   # (H, 1) camera y of the ray
    d = [float(R[i, 0]) * xs + float(R[i, 1]) * ys + float(R[i, 2]) for i in range(3)]   # 3 x (H, W) world
    origin = [float(v) for v in o]
    # the room is a box seen from inside: each ray leaves it through the nearest of three exit planes
    up = [d[a] > 0 for a in range(3)]
    exits = [(origin[a] + up[a] * F32(scene.room[a] - 2 * o[a])) / np.abs(d[a]) for a in range(3)]
    t = np.minimum(np.minimum(exits[0], exits[1]), exits[2])
    on_x = exits[0] == t
    on_y = (exits[1] == t) & ~on_x
    on_z = ~(on_x | on_y)
    sid = (on_z & up[2]) + on_x * (2 + up[0]) + on_y * (4 + up[1])       # intp: floor, ceiling, x0, x1, y0, y1
    normal = [(on * (1 - 2 * u)).astype(F32) for on, u in zip((on_x, on_y, on_z), up)]   # facing into the room
    # objects, each part over its screen rectangle
    parts, rects = [p for obj in scene.objects for p in obj.parts], []
    for p in parts:
        pc = (p.bounds() - o) @ R                                                   # (8, 3) camera coordinates
        if (pc[:, 2] < 1e-3).all():
            rects.append(None)
        elif (pc[:, 2] < 1e-3).any():
            rects.append((0, height, 0, width))
        else:
            uv = pc[:, :2] / pc[:, 2:] * (K[0, 0], K[1, 1]) + K[:2, 2]
            rects.append(_rect(uv[:, 0], uv[:, 1], 0, 0, 1, height, width))
    _trace(parts, rects, origin, d, t, sid, normal)
    # per-surface tables: 6 room faces, then the parts
    surfaces = scene.room_parts() + parts
    owner = np.array([0] * 6 + [i + 1 for i, obj in enumerate(scene.objects) for _ in obj.parts], np.int32)
    categories = [CATEGORIES.index(o.category) + 1 for o in scene.objects for _ in o.parts]
    sem = np.array([1, 3, 2, 2, 2, 2] + categories, np.int32)             # floor, ceiling, 4 walls, parts
    table = dict(rgb=np.array([s.rgb for s in surfaces], F32).T, rgb2=np.array([s.rgb2 for s in surfaces], F32).T,
                 pattern=np.array([PATTERNS.index(s.pattern) for s in surfaces]),
                 scale=np.array([s.scale for s in surfaces], F32),
                 cos=np.cos([s.yaw for s in surfaces]).astype(F32), sin=np.sin([s.yaw for s in surfaces]).astype(F32))
    p = [origin[a] + t * d[a] for a in range(3)]                                   # 3 x (H, W) world hit points
    lit = _shadow_test(scene, parts, p, sid) if shadows else 1.0
    L = [float(v) for v in scene.light]
    diffuse = np.maximum(normal[0] * L[0] + normal[1] * L[1] + normal[2] * L[2], 0) * lit
    shade = scene.ambient * (0.8 + 0.2 * normal[2]) + (1 - scene.ambient) * 1.1 * diffuse      # (H, W)
    albedo, shade = _albedo(table, sid.reshape(-1), [v.reshape(-1) for v in p]), shade.reshape(-1)  # 3 x (H*W,)
    rgb = np.stack([np.sqrt(np.minimum(a * shade, 1)) * 255 + 0.5 for a in albedo], -1)   # sqrt: inverse of _linear
    rgb = rgb.astype(np.uint8).reshape(height, width, 3)
    return dict(rgb=rgb, depth=t, instance=np.take(owner, sid), semantic=np.take(sem, sid), K=K,
                cam_to_world=camera.cam_to_world.copy())


def _shadow_test(scene: Scene, parts, p, sid, size: int = 256):
    """1 where the hit points p (3 x (H, W)) see the light, 0 where another part blocks it: an orthographic shadow
    map along the light, traced like the camera view (each part over its rectangle), one lookup per pixel."""
    w = -scene.light
    u = np.cross(w, (0, 0, 1.0)) if abs(w[2]) < 0.999 else np.array([1.0, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(w, u)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)]) * scene.room
    a0, b0, back = float((corners @ u).min()), float((corners @ v).min()), float((corners @ w).min() - 1.0)
    step = float(max(np.ptp(corners @ u), np.ptp(corners @ v)) / size)
    A = (a0 + (np.arange(size) + 0.5) * step).astype(F32)[None, :]
    B = (b0 + (np.arange(size) + 0.5) * step).astype(F32)[:, None]
    origin = [float(u[i]) * A + float(v[i]) * B + float(w[i] * back) for i in range(3)]
    tmap, smap = np.full((size, size), np.inf, F32), np.full((size, size), -1, np.intp)
    # every part, in view or not, may cast a shadow into the view
    lrects = [_rect(c @ u, c @ v, a0, b0, step, size, size) for c in (q.bounds() for q in parts)]
    _trace(parts, lrects, origin, [F32(x) for x in w], tmap, smap)
    a, b, dist = (p[0] * float(x[0]) + p[1] * float(x[1]) + p[2] * float(x[2]) for x in (u, v, w))   # light frame
    col, row = (np.minimum(np.maximum(((x - x0) * (1 / step)).astype(np.intp), 0), size - 1) for x, x0 in
                ((a, a0), (b, b0)))
    texel = row * size + col
    blocker = np.take(smap, texel)
    return (blocker < 0) | (blocker == sid) | (np.take(tmap, texel) >= dist - back - 0.01)


# ----------------------------------------------------------------------------------------------------------------
# Real RGB-D frames: one folder per frame (what NYUv2, ScanNet frames or a Depth Pro + SAM 2 run provide).
#   rgb.png | rgb.jpg            the image
#   depth.npy | depth.png        float meters (.npy) or uint16 millimeters (.png); 0 = unknown; same size as rgb;
#                                known depths in (0, MAX_DEPTH] after load_rgbd's depth_scale (data.py --depth-scale)
#   intrinsics.json | .txt       {"fx", "fy", "cx", "cy"} or {"K": 3x3}; a .txt holds a 3x3 or 4x4 matrix
#   instance.png                 uint8/uint16 instance ids, 0 = no object; same size as rgb
#   labels.json                  {"<instance id>": "<category>", ...}, a label for every id in instance.png
#   captions.txt                 optional, one caption per line
#   pose.txt                     optional, 4x4 cam_to_world (OpenCV axes), for multi-view data: a rotation (orthonormal,
#                                det +1) and a translation in meters, last row 0 0 0 1

FLOOR_LABELS = ("floor", "ground", "carpet", "rug", "floor mat")
MAX_DEPTH = 250.0  # meters: beyond any room or street scene a depth sensor sees; more is a unit error (millimetres)


def frame_folders(root) -> list:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"--rgbd {root}: not a directory")
    frames = [root] if (root / "labels.json").exists() else sorted(p for p in root.iterdir() if p.is_dir())
    if not frames:
        raise SystemExit(f"--rgbd {root}: no frame folders (rgb, depth, intrinsics, instance.png, labels.json)")
    return [str(f) for f in frames]


def _fail_if(folder: Path, bad, message: str):
    if bad:
        raise ValueError(f"RGB-D folder {folder}: {message}")


def _one(folder: Path, names, what="", missing=None) -> Path | None:
    """The single existing file among names; None, or fail with `missing` when it is given."""
    found = [folder / n for n in names if (folder / n).exists()]
    _fail_if(folder, len(found) > 1, f"both {' and '.join(f.name for f in found[:2])} exist; keep one {what}")
    _fail_if(folder, not found and missing, missing)
    return found[0] if found else None


def _read(folder: Path, path: Path, read):
    """read(path), a library's error on a malformed file raised again naming the folder and the file."""
    try:
        return read(path)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(f"RGB-D folder {folder}: {path.name} is not readable ({type(e).__name__}: {e})") from e


def _numbers(path: Path) -> np.ndarray:
    return np.array(path.read_text().split(), float)


def _json(path: Path):
    return json.loads(path.read_text())


def _depth(folder: Path, H: int, W: int, depth_scale: float) -> np.ndarray:
    """(H, W) float64 meters, 0 = unknown; every known depth finite and in (0, MAX_DEPTH]."""
    path = _one(folder, ("depth.npy", "depth.png"), "depth map",
                "missing depth: expected depth.npy (float meters) or depth.png (uint16 millimeters)")
    if path.suffix == ".npy":
        depth = _read(folder, path, lambda p: np.load(p, allow_pickle=False))
        _fail_if(folder, depth.dtype.kind != "f", f"depth.npy has dtype {depth.dtype}; expected float meters")
    else:
        img = _read(folder, path, Image.open)
        _fail_if(folder, img.mode not in ("I;16", "I;16B", "I"),
                 f"depth.png has mode {img.mode}; expected 16-bit millimeters")
        depth = _read(folder, path, lambda p: np.asarray(img) / 1000.0)
    depth = np.asarray(depth, np.float64) * depth_scale
    fail_if = functools.partial(_fail_if, folder)
    fail_if(depth.shape != (H, W), f"{path.name} has shape {depth.shape}; expected {(H, W)} like the rgb image")
    nonfinite = int((~np.isfinite(depth)).sum())
    fail_if(nonfinite, f"{path.name} has {nonfinite} NaN/inf values; mark unknown depth with 0")
    fail_if((depth < 0).any() or not (depth > 0).any(),
            f"{path.name} has negative or no positive depths (range {depth.min():.3f} .. {depth.max():.3f})")
    far = int((depth > MAX_DEPTH).sum())
    fail_if(far, f"{path.name} has {far} depths beyond {MAX_DEPTH:g} m (up to {depth.max():.4g} m"
            f"{f' after --depth-scale {depth_scale:g}' if depth_scale != 1 else ''}): saved in millimetres? pass "
            "--depth-scale 0.001; a far background such as sky: store 0 (unknown)")
    return depth


def _intrinsics(folder: Path) -> np.ndarray:
    """(3, 3) pinhole K of finite numbers, fx and fy > 0."""
    path = _one(folder, ("intrinsics.json", "intrinsics.txt"), "intrinsics file",
                "missing intrinsics.json (fx, fy, cx, cy) or intrinsics.txt (3x3 or 4x4 matrix)")
    if path.suffix == ".json":
        k = _read(folder, path, _json)
        _fail_if(folder, not isinstance(k, dict) or not ("K" in k or all(n in k for n in ("fx", "fy", "cx", "cy"))),
                 f"intrinsics.json has keys {sorted(k) if isinstance(k, dict) else k}; expected 'K' or fx, fy, cx, cy")
        K = _read(folder, path, lambda p: np.array(
            k["K"] if "K" in k else [[k["fx"], 0, k["cx"]], [0, k["fy"], k["cy"]], [0, 0, 1]], float))
    else:
        m = _read(folder, path, _numbers)
        _fail_if(folder, m.size not in (9, 16), f"intrinsics.txt holds {m.size} numbers; expected a 3x3 or 4x4 matrix")
        K = m.reshape(3, 3) if m.size == 9 else m.reshape(4, 4)[:3, :3]   # ScanNet writes 4x4
    _fail_if(folder, K.shape != (3, 3) or not np.isfinite(K).all() or not (K[0, 0] > 0 and K[1, 1] > 0)
             or not np.allclose(K[2], (0, 0, 1)), f"{path.name}: {K.tolist()} is not a pinhole matrix "
             "[[fx, 0, cx], [0, fy, cy], [0, 0, 1]] of finite numbers with fx, fy > 0")
    return K


def _pose(folder: Path) -> np.ndarray | None:
    """(4, 4) cam_to_world from pose.txt, or None: finite, an orthonormal rotation (det +1), last row 0 0 0 1."""
    path = _one(folder, ["pose.txt"])
    if path is None:
        return None
    pose = _read(folder, path, _numbers)
    _fail_if(folder, pose.size != 16, f"pose.txt holds {pose.size} numbers; expected a 4x4 cam_to_world matrix")
    pose = pose.reshape(4, 4)
    R = pose[:3, :3]
    _fail_if(folder, not np.isfinite(pose).all() or not np.allclose(pose[3], (0, 0, 0, 1))
             or np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0,
             f"pose.txt {np.round(pose, 4).tolist()} is not a cam_to_world matrix of finite numbers: an orthonormal "
             "rotation (det +1), a translation, last row 0 0 0 1")
    return pose


def load_rgbd(folder, depth_scale: float = 1.0) -> dict:
    """Read and validate one RGB-D frame folder (format above); depth_scale multiplies the stored depth (0.001: a
    depth.npy in millimetres). Returns name, rgb uint8 (H, W, 3), depth float32 (H, W) meters (0 = unknown), K (3, 3),
    instance int32 (H, W), labels {id: str}, captions [str], cam_to_world (4, 4) or None. Bad input raises ValueError
    naming the folder, the file and what was expected."""
    folder = Path(folder)
    fail_if = functools.partial(_fail_if, folder)
    fail_if(not folder.is_dir(), "not a directory")
    rgb = _read(folder, _one(folder, ("rgb.png", "rgb.jpg", "rgb.jpeg"), "image", "missing rgb.png (or rgb.jpg)"),
                lambda p: np.asarray(Image.open(p).convert("RGB")))
    H, W = rgb.shape[:2]
    depth, K = _depth(folder, H, W, depth_scale), _intrinsics(folder)
    instance = _read(folder, _one(folder, ["instance.png"], missing="missing instance.png (uint8/uint16 instance "
                                                                    "ids, 0 = no object)"),
                     lambda p: np.asarray(Image.open(p)))
    fail_if(instance.shape != (H, W) or instance.dtype.kind not in "ui",
            f"instance.png has shape {instance.shape} ({instance.dtype}); expected {(H, W)} integer ids, as rgb")
    raw = _read(folder, _one(folder, ["labels.json"], missing='missing labels.json ({"<instance id>": "<category>", '
                                                             '...})'), _json)
    fail_if(not isinstance(raw, dict) or not all(isinstance(v, str) and v.strip() for v in raw.values()),
            "labels.json must map instance ids to non-empty strings")
    fail_if(not all(k.strip().isdigit() for k in raw), f"labels.json keys {sorted(raw)} must be integer instance ids")
    labels = {int(k): v.strip() for k, v in raw.items()}
    unknown = sorted(set(np.unique(instance).tolist()) - {0} - set(labels))
    fail_if(unknown, f"instance.png has ids {unknown} with no label in labels.json")
    path = _one(folder, ["captions.txt"])
    captions = [c.strip() for c in path.read_text().splitlines() if c.strip()] if path else []
    return dict(name=folder.name, rgb=rgb, depth=depth.astype(F32), K=K, instance=instance.astype(np.int32),
                labels=labels, captions=captions, cam_to_world=_pose(folder))
