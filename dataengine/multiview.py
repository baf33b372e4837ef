"""
Multi-view data: two views of one scene, paired by how much of the first the second sees, and the questions about
them: stage 2's multi-view VQA (kind "multiview") and stage 3's multi-view spatial turns ("spatial-multiview").

    python data.py multiview --n 2000 --out data/multiview                          # synthetic rooms, 2 cameras each
    python data.py spatial-multiview --n 500 --out data/smv --rgbd scans/           # scene folders of posed frames
    python data.py multiview --n 500 --out data/mv --rgbd scans/ --encoder weights/dinov2-s14      # no poses

Pairing. The paper keeps view pairs whose LPIPS distance lies in a band: neither near-duplicates nor unrelated.
With depth and poses the idea is geometric: the co-visibility of view 1 in view 2, the share of view 1's pixels (with
depth) whose 3D points land inside view 2, in front of it and not hidden there (OCCLUSION), kept within BAND. It is
directional (a camera that steps back sees all of the other's pixels, not the other way round); meta stores both.
Frames without poses fall back on the encoder's feature_distance, kept within FEATURE_BAND (the 10th-90th percentiles
of BAND's pairs, DINOv2-S/14 on synthetic rooms; Spearman ~0.3 with co-visibility: a coarse filter), and make
"multiview" data without camera-motion questions.

Objects are matched across views by name: unique in a synthetic scene (colour + category), a label seen once in each
view on RGB-D frames. An object is asked about only where it is "visible" (views.min_pixels) or "absent" (no pixel).

Stage 2, "multiview": 6 turns in random order, each turn's level naming its group: common, adversarial (false
premises, answered as absent) or choice (A-D). Stage 3, "spatial-multiview": 7 turns pixel -> object -> scene
(--order applies). 3D answers are in a view's answer frame (views.py); pixel coordinates (u/W, v/H) in the view named.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataengine import scenes, views
from dataengine.text import (DIRECTIONS, RELATIONS, TIE_CENTRE, Turn, article, coord, listing, meters, ordered, picker,
                             position, relation, to_conversation)
from dataengine.views import View, save_view

BAND = (0.35, 0.65)             # co-visibility of view 1 in view 2
FEATURE_BAND = (0.74, 0.94)     # feature_distances, for frames without poses (see bench/bench_pairs.py)
OCCLUSION = (0.03, 0.03)        # a point is hidden when the other view's depth there is nearer by > 3 cm + 3 %
VQA_TURNS = 6
SEEN, OUTSIDE, HIDDEN, UNKNOWN = 0, 1, 2, 3     # what the other view shows of a point
ORDINAL = ("first", "second")


def transfer(depth: np.ndarray, K, pose, K_to, pose_to, cols, rows):
    """Pixels (cols, rows) (n,) of a view -> their 3D points in the view's camera frame (n, 3), in the other
    view's camera frame (n, 3), and their continuous pixel coordinates there (u, v) (n,) each (NaN behind it)."""
    K, pose, K_to, pose_to = (np.asarray(m, float) for m in (K, pose, K_to, pose_to))
    ray = np.stack([(cols + 0.5 - K[0, 2]) / K[0, 0], (rows + 0.5 - K[1, 2]) / K[1, 1], np.ones(len(cols))], 1)
    cam = ray * depth[rows, cols][:, None]
    cam_to = (cam @ pose[:3, :3].T + pose[:3, 3] - pose_to[:3, 3]) @ pose_to[:3, :3]     # world, then R^T (p - o)
    z = cam_to[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(z > 1e-6, K_to[0, 0] * cam_to[:, 0] / z + K_to[0, 2], np.nan)
        v = np.where(z > 1e-6, K_to[1, 1] * cam_to[:, 1] / z + K_to[1, 2], np.nan)
    return cam, cam_to, u, v


def visibility(depth_to: np.ndarray, u, v, z) -> np.ndarray:
    """(n,) int8: what the other view (depth_to) shows of points at (u, v) with depth z there: SEEN, OUTSIDE (its
    field of view, or behind it), HIDDEN (its depth there is nearer by more than OCCLUSION) or UNKNOWN (no depth)."""
    H, W = depth_to.shape
    with np.errstate(invalid="ignore"):
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    state = np.full(len(z), OUTSIDE, np.int8)
    there = depth_to[v[inside].astype(int), u[inside].astype(int)]
    zi = z[inside]
    state[inside] = np.where(there <= 0, UNKNOWN, np.where(there < zi - OCCLUSION[0] - OCCLUSION[1] * zi, HIDDEN, SEEN))
    return state


def stride_for(H: int, W: int) -> int:
    """Co-visibility samples every stride-th pixel: 1 up to 223 px, 4 at 448 px (12.5 K points)."""
    return max(1, min(H, W) // 112)


def covisibility(depth_a, K_a, pose_a, depth_b, K_b, pose_b, stride: int = 1) -> float:
    """Share of view A's pixels with depth (every stride-th row and column, from stride // 2) that view B sees."""
    H, W = depth_a.shape
    rows, cols = (x.reshape(-1) for x in np.meshgrid(np.arange(stride // 2, H, stride),
                                                      np.arange(stride // 2, W, stride), indexing="ij"))
    keep = depth_a[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    if len(rows) == 0:
        return 0.0
    _, cam_b, u, v = transfer(depth_a, K_a, pose_a, K_b, pose_b, cols, rows)
    return float(np.mean(visibility(depth_b, u, v, cam_b[:, 2]) == SEEN))


def covis_both(va: View, vb: View) -> list:
    """[view a in view b, b in a], both sampling every stride_for(a's size)-th pixel (meta's covis_stride)."""
    s = stride_for(*va.depth.shape)
    return [covisibility(x.depth, x.K, x.cam_to_world, y.depth, y.K, y.cam_to_world, s)
            for x, y in ((va, vb), (vb, va))]


def motion(view_a: View, view_b: View):
    """Camera B's centre in A's answer frame (3,), and B's turn from A about the vertical in degrees (+ = left)."""
    Pa, Pb = np.array(view_a.cam_to_world), np.array(view_b.cam_to_world)
    Ra, Rb = np.array(view_a.answer_from_camera), np.array(view_b.answer_from_camera)
    t = Ra @ (Pa[:3, :3].T @ (Pb[:3, 3] - Pa[:3, 3]))
    forward = Ra @ Pa[:3, :3].T @ Pb[:3, :3] @ Rb.T @ np.array([0, 0, 1.0])      # B's forward in A's answer frame
    return t, float(np.degrees(np.arctan2(-forward[0], forward[2])))


@dataclass
class Pair:
    views: list                      # [View, View]
    insides: list                    # [(H, W) bool] mask interiors, where points are sampled
    covis: list | None = None        # [view 1 in view 2, view 2 in view 1]; None without poses
    feature_distance: float | None = None
    absent: list = field(default_factory=list)      # names of objects that neither view shows (false premises)
    frames: list | None = None       # RGB-D frame folders

    @property
    def posed(self) -> bool:
        return all(v.cam_to_world is not None for v in self.views)


def states(pair: Pair) -> dict:
    """name -> [(state, object) in view 1, in view 2]; state "visible" (object: its dict, with the cube in that view's
    answer frame), "absent" or "unclear" (object None)."""
    out = {}
    for k, view in enumerate(pair.views):
        labels, counts = view.labels, np.bincount(view.instance.reshape(-1), minlength=max(view.labels, default=0) + 1)
        min_px = views.min_pixels(*view.instance.shape)
        if view.source == "synthetic":
            found = {o["name"]: ("visible" if counts[o["id"]] >= min_px else "absent" if counts[o["id"]] == 0 else
                                 "unclear", o) for o in view.objects}
        else:       # a label seen once, lifted under its plain name, is identifiable; twice or more it is not
            named, found = {o["name"]: o for o in view.objects if o["name"] == o["category"]}, {}
            for c in sorted(set(labels.values())):     # sorted: a set's order changes with PYTHONHASHSEED
                seen = [i for i, l in labels.items() if l == c and counts[i] > 0]
                ok = len(seen) == 1 and c in named and counts[named[c]["id"]] >= min_px
                found[c] = ("visible" if ok else "absent" if not seen else "unclear", named.get(c))
        for name, (state, o) in found.items():
            out.setdefault(name, [("absent", None), ("absent", None)])[k] = (state, o if state == "visible" else None)
    return out


def nearby_camera(rng, scene: scenes.Scene, cam: scenes.Camera) -> scenes.Camera:
    """A second hand-held camera 0.3-2.2 m from the first, in the object-free near part of the room, looking at a
    point between where the first looks and one of the objects."""
    Lx, Ly, _ = scene.room
    pos, forward = cam.cam_to_world[:3, 3], cam.cam_to_world[:3, 2]
    centres = np.array([np.mean([p.centre for p in o.parts], 0) for o in scene.objects])
    for _ in range(100):
        step, heading = rng.uniform(0.3, 2.2), rng.uniform(0, 2 * np.pi)
        new = pos + (step * np.cos(heading), step * np.sin(heading), rng.uniform(-0.3, 0.3))
        if 0.4 <= new[0] <= Lx - 0.4 and 0.3 <= new[1] <= 0.42 * Ly and 0.9 <= new[2] <= 2.0:
            break
    else:
        new = pos
    target = 0.5 * (pos + forward * rng.uniform(2.0, 4.0)) + 0.5 * centres[rng.integers(len(centres))]
    target = target + (*rng.uniform(-0.4, 0.4, 2), 0.0)
    target[2] = rng.uniform(0.2, 0.8)
    look = scenes.look_at(np.array(new), target, np.radians(rng.uniform(-3, 3)))
    return scenes.Camera(look, float(rng.uniform(50, 75)), tuple(0.5 + rng.uniform(-0.02, 0.02, 2)))


def both_visible(pair: Pair) -> list:
    """Names visible in both views, left to right in view 1."""
    st = states(pair)
    names = [n for n, (a, b) in st.items() if a[0] == b[0] == "visible"]
    return sorted(names, key=lambda n: sum(st[n][0][1]["cube"][k][0] for k in (0, 1)))


def synthetic_pair(rng, size: int, band=BAND, shared: int = 2, screen: int = 48) -> Pair:
    """Two views of one random room whose co-visibility (view 1 in view 2) lies in band, each with >= 2 objects to ask
    about and `shared` objects visible in both. Candidates are screened on depth-only renders at `screen` px."""
    for _ in range(200):
        scene = scenes.random_scene(rng)
        cam_a = scenes.random_camera(rng, scene)
        low_a, full_a = scenes.render(scene, cam_a, screen, screen, shadows=False), None
        for _ in range(6):
            cam_b = nearby_camera(rng, scene, cam_a)
            low_b = scenes.render(scene, cam_b, screen, screen, shadows=False)
            c = covisibility(low_a["depth"], low_a["K"], cam_a.cam_to_world, low_b["depth"], low_b["K"],
                             cam_b.cam_to_world)
            if not band[0] - 0.08 <= c <= band[1] + 0.08:
                continue
            full_a = full_a or views.scene_view(scene, cam_a, size)
            (va, inside_a), (vb, inside_b) = full_a, views.scene_view(scene, cam_b, size)
            pair = Pair([va, vb], [inside_a, inside_b], covis_both(va, vb))
            if (band[0] <= pair.covis[0] <= band[1] and len(views.candidates(va, inside_a)) >= 2
                    and len(views.candidates(vb, inside_b)) >= 2 and len(both_visible(pair)) >= shared):
                names = {o.name for o in scene.objects}
                unused = [f"{c} {k}" for k in scenes.OBJECT_CATEGORIES for c in scenes.COLOURS
                          if f"{c} {k}" not in names]
                pair.absent = [unused[i] for i in sorted(rng.choice(len(unused), 8, replace=False))]
                return pair
    raise RuntimeError(f"no pair of views with co-visibility in {band} in 1200 tries: is the band too narrow?")


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: multi-view VQA.


def closer(o1: dict, o2: dict) -> tuple:
    """(0 = view 1 shows it closer, 1 = view 2, 2 = about the same; Z of its centre in view 1, in view 2)."""
    z1, z2 = (sum(o["cube"][k][2] for k in (0, 1)) / 2 for o in (o1, o2))
    return (2 if abs(z1 - z2) < TIE_CENTRE else int(z2 < z1)), z1, z2


def direction(t) -> int | None:
    """The main horizontal direction of a motion t (answer frame): 0 left, 1 right, 2 forward, 3 backward, or None
    when neither X nor Z dominates (>= 0.2 m and 1.5 x the other)."""
    x, z = abs(t[0]), abs(t[2])
    if max(x, z) < 0.2 or max(x, z) < 1.5 * min(x, z):
        return None
    return int(t[0] > 0) if x > z else 2 + int(t[2] < 0)


def vqa_conversation(pair: Pair, rng) -> tuple:
    """VQA_TURNS turns in random order: the common ones, then one "is there", one false premise and one multiple
    choice when the pair has subjects for them, then more "is there" and false premises."""
    pick, st, both = picker(rng), states(pair), both_visible(pair)
    only = [(n, k) for n, s in st.items() for k in (0, 1) if s[k][0] == "visible" and s[1 - k][0] == "absent"]
    turns = common_turns(pair, st, both, pick)
    made = (exists_turn(st, only, pair.absent, rng, pick),
            premise_turn(st, only, pair.absent, rng, pick) if (pair.absent or only) else None,
            choice_turn(pair, st, both, only, rng, pick))
    turns += [t for t in made if t]
    while len(turns) < VQA_TURNS:
        maker = premise_turn if (pair.absent or only) and rng.random() < 0.5 else exists_turn
        turns.append(maker(st, only, pair.absent, rng, pick))
    return assemble([turns[k] for k in rng.permutation(len(turns))])


def common_turns(pair: Pair, st: dict, both: list, pick) -> list:
    q = pick(["Which objects can be seen in both views?", "What do the two views have in common?",
              "Name the objects that appear in both images."])
    a = f"Both views show {listing([article(n) for n in both])}." if both else \
        "No object is clearly visible in both views."
    turns = [Turn("common", q, a, dict(kind="common"))]
    if both:
        n = pick(both)
        out, z1, z2 = closer(st[n][0][1], st[n][1][1])
        q = pick([f"Which view shows the {n} closer to the camera?", f"In which image is the {n} nearer?"])
        a = (f"{['View 1', 'View 2', 'About the same in both'][out]}: the {n}'s centre is {meters(z1)} m ahead of the "
             f"camera in view 1 and {meters(z2)} m in view 2.")
        turns.append(Turn("common", q, a, dict(kind="closer", object=n)))
    if pair.posed:
        t, yaw = motion(*pair.views)
        deg = int(round(abs(yaw)))
        turn = f"turned {deg} degrees to the {'left' if yaw > 0 else 'right'}" if deg else "kept its heading"
        q = pick(["How did the camera move from view 1 to view 2?",
                  "Describe the camera motion between the two images.",
                  "How does the second viewpoint differ from the first?"])
        a = (f"The camera moved {meters(abs(t[0]))} m to the {'right' if t[0] >= 0 else 'left'}, {meters(abs(t[2]))} m "
             f"{'forward' if t[2] >= 0 else 'backward'} and {meters(abs(t[1]))} m {'up' if t[1] >= 0 else 'down'}, "
             f"and {turn}.")
        turns.append(Turn("common", q, a, dict(kind="motion")))
    return turns


def exists_turn(st: dict, only: list, nowhere: list, rng, pick) -> Turn:
    """Is there a <object> in view k: one it shows, one only the other view shows, or one neither shows."""
    k = int(rng.integers(2))
    yes = [n for n in st if st[n][k][0] == "visible"]
    other = [n for n, j in only if j != k]
    r = rng.random()
    if yes and (r < 0.5 or not (other or nowhere)):
        n, level, rec = pick(yes), "common", {}
        a = f"Yes, view {k + 1} shows {article(n)}."
    elif other and (r < 0.75 or not nowhere):
        n, level = pick(other), "adversarial"
        a, rec = f"No, there is no {n} in view {k + 1}; only view {2 - k} shows it.", {}
    else:
        n, level = pick(nowhere), "adversarial"
        a, rec = f"No, there is no {n} in view {k + 1}, nor in view {2 - k}.", dict(absent=[n])
    q = pick([f"Is there {article(n)} in view {k + 1}?", f"Does the {ORDINAL[k]} image show {article(n)}?"])
    return Turn(level, q, a, dict(kind="exists", object=n, view=k, **rec))


def premise_turn(st: dict, only: list, nowhere: list, rng, pick) -> Turn:
    """A false premise: a question about an object neither view shows, or comparing one that only one view shows."""
    k = int(rng.integers(2))
    if nowhere and (rng.random() < 0.6 or not only):
        n = pick(nowhere)
        seen_k = [m for m in st if st[m][k][0] == "visible"]
        options = [(f"Which view shows the {n} closer to the camera?",
                    f"Neither view shows it: there is no {n} in either image."),
                   (f"What is the {n} standing on in view {k + 1}?",
                    f"There is no {n} in view {k + 1}, nor in view {2 - k}.")]
        if seen_k:
            m = pick(seen_k)
            options.append((f"How far apart are the {n} and the {m} in view {k + 1}?",
                            f"There is no {n} in view {k + 1}, nor in view {2 - k}; only the {m} is there."))
        q, a = pick(options)
        return Turn("adversarial", q, a, dict(kind="premise", object=n, view=k, absent=[n]))
    n, j = pick(only)
    q = pick([f"Which view shows the {n} closer to the camera?", f"In which image is the {n} nearer?"])
    a = f"Only view {j + 1} shows the {n}; there is no {n} in view {2 - j}, so the two cannot be compared."
    return Turn("adversarial", q, a, dict(kind="premise_one", object=n, view=j))


def choice_turn(pair: Pair, st: dict, both: list, only: list, rng, pick) -> Turn | None:
    """Multiple choice A-D (None when the pair has no subject for one)."""
    distractors = pair.absent + [n for n, _ in only]
    kinds = (["choice_common"] if both and len(distractors) >= 2 else []) + (["choice_closer"] if both else [])
    if pair.posed and direction(motion(*pair.views)[0]) is not None:
        kinds.append("choice_direction")
    if not kinds:
        return None
    kind = pick(kinds)
    if kind == "choice_common":
        right = pick(both)
        wrong = [distractors[i] for i in rng.choice(len(distractors), min(3, len(distractors)), replace=False)]
        options, q = [f"the {n}" for n in [right] + wrong], "Which of these objects can be seen in both views?"
        right, rec = f"the {right}", dict(kind=kind)
    elif kind == "choice_closer":
        n, options = pick(both), ["view 1", "view 2", "about the same in both"]
        right = options[closer(st[n][0][1], st[n][1][1])[0]]
        q, rec = f"Which view shows the {n} closer to the camera?", dict(kind=kind, object=n)
    else:
        options, right = list(DIRECTIONS), DIRECTIONS[direction(motion(*pair.views)[0])]
        q, rec = "Which way did the camera mainly move from view 1 to view 2?", dict(kind=kind)
    options = [options[i] for i in rng.permutation(len(options))]
    letters = "ABCD"[:len(options)]
    q += "".join(f"\n{L}. {o}" for L, o in zip(letters, options)) + "\nAnswer with the option's letter."
    return Turn("choice", q, f"{letters[options.index(right)]}. {right}", dict(rec, options=options))


def assemble(turns: list) -> tuple:
    """Turns -> (conversation, levels, records); the first question carries both images."""
    return to_conversation(turns, "<image>\n<image>\n"), [t.level for t in turns], [t.record for t in turns]


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: multi-view spatial turns about points drawn from each view's interior object pixels (meta "points").


def uv(x, size) -> str:
    """(col, row) or continuous (u, v) pixel coordinates -> "(u/W, v/H)"; integer pixels are taken at their centre."""
    H, W = size
    return f"({coord(x[0] / W)}, {coord(x[1] / H)})"


def spatial_conversation(pair: Pair, rng, order: str = "forward") -> tuple:
    """-> (conversation, levels, points [{"view", "px", "uv"}], records)."""
    if not pair.posed:
        raise ValueError("spatial-multiview questions need both views' poses (pose.txt)")
    pick, st, both = picker(rng), states(pair), both_visible(pair)
    pools, points, used = point_pools(pair), [], set()
    relations = [str(r) for r in rng.choice(["left_right", "front_behind", "above_below"], 2, replace=False,
                                            p=[0.45, 0.45, 0.1])]
    turns = [match_turn(pair, pools, points, s, rng, pick) for s in (0, 1)]
    turns += [position_across_turn(pair, pools, points, rng, pick)]
    turns += [relation_across_turn(kind, st, both, used, rng, pick) for kind in relations]
    turns += [camera_turn(pair, pick), distance_across_turn(pair, st, both, pools, points, rng, pick)]
    turns = ordered(turns, order, rng)
    for p in points:
        del p["j"]
    conv, levels, records = assemble(turns)
    return conv, levels, points, records


def point_pools(pair: Pair) -> list:
    """Per view: interior object pixels, their 3D points in both cameras, where they land in the other view and what
    it shows there."""
    V, pools = pair.views, []
    for s, t in ((0, 1), (1, 0)):
        rows, cols = np.nonzero(pair.insides[s] & (V[s].instance > 0))
        cam, cam_t, u, v = transfer(V[s].depth, V[s].K, V[s].cam_to_world, V[t].K, V[t].cam_to_world, cols, rows)
        pools.append(dict(cols=cols, rows=rows, cam=cam, cam_t=cam_t, u=u, v=v, size=V[s].depth.shape,
                          state=visibility(V[t].depth, u, v, cam_t[:, 2]), on=V[s].instance[rows, cols]))
    return pools


def draw_point(pools: list, points: list, s: int, rng, want=None, on=None) -> int:
    """A pool pixel of view s, added to points (its index): with state `want` and on object id `on` when possible."""
    p = pools[s]
    ok = np.ones(len(p["cols"]), bool) if want is None else p["state"] == want
    if on is not None and (ok & (p["on"] == on)).any():
        ok &= p["on"] == on
    if not ok.any():
        ok = p["state"] != UNKNOWN if (p["state"] != UNKNOWN).any() else np.ones(len(ok), bool)
    j = int(rng.choice(np.nonzero(ok)[0]))
    c, r = int(p["cols"][j]), int(p["rows"][j])
    H, W = p["size"]
    points.append(dict(view=s, px=[c, r], uv=[round((c + 0.5) / W, 3), round((r + 0.5) / H, 3)], j=j))
    return len(points) - 1


def match_turn(pair: Pair, pools: list, points: list, s: int, rng, pick) -> Turn:
    t, want = 1 - s, SEEN if rng.random() < 0.7 else pick([OUTSIDE, HIDDEN])
    k = draw_point(pools, points, s, rng, want)
    p, j = pools[s], points[k]["j"]
    c, r = points[k]["px"]
    P, Q = uv((c + 0.5, r + 0.5), p["size"]), uv((p["u"][j], p["v"][j]), pools[t]["size"])
    z, state = p["cam_t"][j, 2], p["state"][j]
    if state == SEEN:
        a = f"It appears at {Q} in view {t + 1}, {meters(z)} m deep there ({meters(p['cam'][j, 2])} m in view {s + 1})."
    elif state == OUTSIDE:
        a = f"It is outside view {t + 1}'s field of view, so view {t + 1} does not show it."
    elif state == HIDDEN:
        there = pair.views[t].depth[int(p["v"][j]), int(p["u"][j])]
        a = (f"It is hidden in view {t + 1}: it would appear at {Q}, {meters(z)} m deep, but a nearer surface covers "
             f"it there, {meters(there)} m deep.")
    else:
        a = f"View {t + 1} has no depth at {Q}, where it would appear, so it cannot be confirmed."
    q = pick([f"Where does the point {P} of view {s + 1} appear in view {t + 1}?",
              f"Find the point {P} of the {ORDINAL[s]} image in the {ORDINAL[t]} image."])
    return Turn("pixel", q, a, dict(kind="match", point=k))


def position_across_turn(pair: Pair, pools: list, points: list, rng, pick) -> Turn:
    s = int(rng.integers(2))
    t, k = 1 - s, draw_point(pools, points, s, rng, SEEN)
    p, j, R = pools[s], points[k]["j"], [np.array(v.answer_from_camera) for v in pair.views]
    P = uv((points[k]["px"][0] + 0.5, points[k]["px"][1] + 0.5), p["size"])
    q = pick([f"Where is the point {P} of view {s + 1} in 3D, in view {t + 1}'s frame?",
              f"Give the 3D position of the point {P} of view {s + 1} relative to camera {t + 1}."])
    a = f"In view {t + 1}'s frame it is at {position(R[t] @ p['cam_t'][j])}; in view {s + 1}'s frame it is at " \
        f"{position(R[s] @ p['cam'][j])}."
    return Turn("pixel", q, a, dict(kind="position_across", point=k))


def relation_across_turn(kind: str, st: dict, both: list, used: set, rng, pick) -> Turn:
    """A relation between two objects in each view (it may flip between views); pairs not `used` yet come first."""
    pairs = [(a, b) for a in both for b in both if a != b]
    fresh = [ab for ab in pairs if frozenset(ab) not in used] or pairs
    A, B = fresh[int(rng.integers(len(fresh)))]
    used.add(frozenset((A, B)))
    words, axis, texts = RELATIONS[kind]["words"], "XYZ"[RELATIONS[kind]["axis"]], []
    for v in (0, 1):
        out, va, vb, _ = relation(kind, st[A][v][1]["cube"], st[B][v][1]["cube"])
        texts.append(f"In view {v + 1} the {A} is {words[out]} the {B} ({axis} = {meters(va)} m and {meters(vb)} m).")
    q = pick({"left_right": [f"Is the {A} left or right of the {B} in each view?",
                             f"Compare the {A} and the {B} from left to right in both views."],
              "front_behind": [f"Is the {A} in front of or behind the {B} in each view?",
                               f"Which is nearer to the camera in each view, the {A} or the {B}?"],
              "above_below": [f"Is the {A} above or below the {B} in each view?",
                              f"Which is higher up in each view, the {A} or the {B}?"]}[kind])
    return Turn("object", q, " ".join(texts), dict(kind="relation_across", relation=kind, objects=[A, B]))


def camera_turn(pair: Pair, pick) -> Turn:
    t, yaw = motion(*pair.views)
    deg = int(round(abs(yaw)))
    turn = f"turned {deg} degrees to the {'left' if yaw > 0 else 'right'}" if deg else "facing the same way"
    q = pick(["Where is the second camera relative to the first?", "How did the camera move from view 1 to view 2?",
              "Give the position and heading of camera 2 in view 1's frame."])
    a = (f"Camera 2 is at {position(t)} in view 1's frame (X right, Y up, Z forward), {meters(np.linalg.norm(t))} m "
         f"from camera 1, {turn}.")
    return Turn("scene", q, a, dict(kind="camera_motion"))


def distance_across_turn(pair: Pair, st: dict, both: list, pools: list, points: list, rng, pick) -> Turn:
    """Two points of view 1 on two objects both views show: their 3D distance, from either view's frame."""
    ids = [st[n][0][1]["id"] for n in both]
    a_id = pick(ids)
    b_id = pick([i for i in ids if i != a_id] or ids)
    k1, k2 = draw_point(pools, points, 0, rng, SEEN, a_id), draw_point(pools, points, 0, rng, SEEN, b_id)
    p, js, R = pools[0], [points[k]["j"] for k in (k1, k2)], [np.array(v.answer_from_camera) for v in pair.views]
    here, there = [R[0] @ p["cam"][j] for j in js], [R[1] @ p["cam_t"][j] for j in js]
    P = [uv((points[k]["px"][0] + 0.5, points[k]["px"][1] + 0.5), p["size"]) for k in (k1, k2)]
    Q = [uv((p["u"][j], p["v"][j]), pools[1]["size"]) for j in js]
    q = f"The points {P[0]} and {P[1]} of view 1 appear at {Q[0]} and {Q[1]} in view 2. How far apart are they in 3D?"
    a = (f"In view 1's frame they are at {position(here[0])} and {position(here[1])}; in view 2's at "
         f"{position(there[0])} and {position(there[1])}. Either way they are "
         f"{meters(np.linalg.norm(here[0] - here[1]))} m apart.")
    return Turn("scene", q, a, dict(kind="distance_across", points=[k1, k2]))


def scene_folders(root) -> list:
    """[[frame folder, ...] per scene]: root/<scene>/<frame>/, or root/<frame>/ as one scene."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"--rgbd {root}: not a directory")
    is_frame = lambda p: (p / "labels.json").exists()
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    if any(is_frame(p) for p in subs):
        return [[str(p) for p in subs if is_frame(p)]]
    groups = [[str(f) for f in sorted(s.iterdir()) if f.is_dir() and is_frame(f)] for s in subs]
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        raise SystemExit(f"--rgbd {root}: no scene folder holds two frame folders (rgb, depth, intrinsics, "
                         "instance.png, labels.json, pose.txt)")
    return groups


def feature_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit-length patch tokens a (P, D) of one image, b (m, P, D) of m others -> (m,) 1 - the share of a's patches
    that are mutual nearest neighbours (cosine) with a patch of the other image: 0 for the same image, symmetric."""
    sim = a @ b.transpose(0, 2, 1)                                   # (m, P, P)
    best_ab, best_ba = sim.argmax(2), sim.argmax(1)                  # (m, P) nearest in b, nearest in a
    mutual = np.take_along_axis(best_ba, best_ab, 1) == np.arange(a.shape[0])
    return 1 - mutual.mean(1)


def feature_distances(features: np.ndarray) -> np.ndarray:
    """(n, P, D) unit-length patch tokens of n images -> (n, n) feature_distance between all of them."""
    return np.stack([feature_distance(features[k], features) for k in range(len(features))])


def rgbd_view(frame: dict) -> tuple:
    """(View, interior) of a frame, its RANSAC seeded by the frame's name: the same View in every pair."""
    seed = int.from_bytes(frame["name"].encode()[-8:].rjust(8, b"\0"), "little")
    return views.rgbd_view(frame, np.random.default_rng(seed))


def prepare(cfg, embed=None) -> dict:
    """RGB-D: the frame pairs of each scene whose co-visibility (with cfg.encoder: feature distance of embed(images))
    lies in cfg.band and that share enough identifiable objects, and the label vocabulary. Synthetic: nothing."""
    if not cfg.rgbd:
        return {}
    need = 2 if cfg.kind == "spatial-multiview" else 1
    pairs, vocabulary, skipped = [], set(), []
    for group in scene_folders(cfg.rgbd):
        loaded = []
        for f in group:
            frame = scenes.load_rgbd(f, cfg.depth_scale)
            vocabulary |= {c for c in frame["labels"].values() if c.lower() not in scenes.FLOOR_LABELS}
            if frame["cam_to_world"] is None and not cfg.encoder:
                raise SystemExit(f"{f}: no pose.txt; co-visibility needs poses (or pair such frames with --encoder)")
            try:
                loaded.append((f, rgbd_view(frame)[0], frame["rgb"]))
            except ValueError as e:
                skipped.append(f"{f} ({e})")
        dist = feature_distances(embed([x[2] for x in loaded])) if cfg.encoder and loaded else None
        for i, (fa, va, _) in enumerate(loaded):
            for j, (fb, vb, _) in enumerate(loaded):
                if i == j or (dist is not None and j < i):
                    continue
                pair = Pair([va, vb], [None, None])
                if len(both_visible(pair)) < need or (need == 2 and not pair.posed):
                    continue
                score = dist[i, j] if dist is not None else covisibility(
                    va.depth, va.K, va.cam_to_world, vb.depth, vb.K, vb.cam_to_world, stride_for(*va.depth.shape))
                if cfg.band[0] <= score <= cfg.band[1]:
                    pairs.append([fa, fb, None if dist is None else float(score)])
    if skipped:
        print(f"multiview: skipped {len(skipped)} frames with fewer than 2 usable objects, e.g. {skipped[0]}")
    if not pairs:
        raise SystemExit(f"--rgbd {cfg.rgbd}: no pair of frames in the band {cfg.band} sharing {need} identifiable "
                         "objects")
    return dict(pairs=pairs, vocabulary=sorted(vocabulary), depth_scale=cfg.depth_scale)


def rgbd_pair(source: dict, index: int, rng) -> Pair:
    fa, fb, dist = source["pairs"][index % len(source["pairs"])]
    if dist is not None and rng.random() < 0.5:         # feature pairs are unordered
        fa, fb = fb, fa
    (va, inside_a), (vb, inside_b) = (rgbd_view(scenes.load_rgbd(f, source["depth_scale"])) for f in (fa, fb))
    pair = Pair([va, vb], [inside_a, inside_b], None, dist, [], [fa, fb])
    pair.covis = covis_both(va, vb) if pair.posed else None
    seen = {c for view in pair.views for i, c in view.labels.items() if (view.instance == i).any()}
    pair.absent = [c for c in source["vocabulary"] if c not in seen]
    return pair


def make_sample(cfg, index: int, out, source: dict) -> str:
    rng = np.random.default_rng([cfg.seed, index])
    pair = rgbd_pair(source, index, rng) if cfg.rgbd else synthetic_pair(rng, cfg.size, cfg.band)
    if cfg.kind == "spatial-multiview":
        conv, levels, points, turns = spatial_conversation(pair, rng, cfg.order)
    else:
        (conv, levels, turns), points = vqa_conversation(pair, rng), []
    sid, metas = f"{index:06d}", []
    for k, view in enumerate(pair.views):
        files = save_view(out, f"{sid}_{k}", view, f"images/{sid}_{k}.png", semantic=False)
        H, W = view.depth.shape
        labels = view.labels
        counts = np.bincount(view.instance.reshape(-1), minlength=max([*labels, *(o["id"] for o in view.objects)]) + 1)
        metas.append(dict(image=files["image"], size=[H, W], depth=files["depth"], instance=files["instance"],
                          K=view.K, cam_to_world=view.cam_to_world, answer_from_camera=view.answer_from_camera,
                          gravity=view.gravity, camera_height=view.camera_height, room=view.room,
                          min_pixels=views.min_pixels(H, W), labels={str(i): c for i, c in labels.items()},
                          objects=[dict(o, pixels=int(counts[o["id"]])) for o in view.objects],
                          frame=None if pair.frames is None else pair.frames[k]))
    H, W = pair.views[0].depth.shape
    meta = dict(kind=cfg.kind, source=pair.views[0].source, seed=cfg.seed, index=index, band=cfg.band,
                covis=pair.covis, covis_stride=stride_for(H, W), feature_distance=pair.feature_distance, views=metas,
                absent=pair.absent, points=points, turns=turns)
    return json.dumps(dict(id=f"{cfg.kind}-{sid}", image=[m["image"] for m in metas], conversations=conv,
                           levels=levels, meta=meta))
