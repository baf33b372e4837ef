"""
The data checker: recompute every number and every yes/no of a dataset from its stored ground truth.

    python data.py check data/spatial          # prints each disagreement; exit status 1 if there is any
    data/spatial/data.jsonl:line 7: spatial-000006: turn 0 (depth): numbers [2.41] != expected [2.21]

Every problem names its line; a line that is not a sample at all (not JSON, NaN or Infinity in it, missing or mistyped
fields, roles out of order, an image missing or outside the dataset folder, ground truth that does not fit) is one
problem, never a crash, and an empty file is one too. Images are decoded by images.read_rgb, as training decodes them:
what training would skip (a truncated, float or oversized image) is a problem here too.

It reads only the files and `meta` (depth, masks, K, the camera->answer rotation, poses, points, cubes) and
recomputes the facts with its own arithmetic, not the generator's (the inverse of K, the instance mask rather than
the bookkeeping of which point fell on which object, its own projection between views), then compares every decimal,
verdict, yes/no, multiple-choice letter and caption object list. For synthetic data it also checks that every object
pixel lies inside its object's cube (a wrong frame or cube) and that the semantic mask agrees with the categories.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dataengine.images import read_rgb
from dataengine.scenes import CATEGORIES
from dataengine.text import (CLOSER_WORDS, DIRECTIONS, LEVEL_COUNTS, NUMBER_WORDS, PIXEL_KINDS, RELATIONS, TIE_CENTRE,
                             TIE_DEPTH, coord, cube_distance, place, relation)
from dataengine.views import load_depth

NUMBER = re.compile(r"-?\d+\.\d+")


def _numbers(text: str, expected: list, where: str) -> list:
    """Compare the decimals in text with expected [(value, decimals)]: a correct rounding is within half a unit."""
    got = [float(x) for x in NUMBER.findall(text)]
    if len(got) != len(expected) or any(abs(g - v) > 0.5 * 10 ** -k + 1e-6 for g, (v, k) in zip(got, expected)):
        return [f"{where}: numbers {got} != expected {[round(float(v), k) for v, k in expected]}"]
    return []


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def _depth(path: Path) -> np.ndarray:
    depth = load_depth(path)
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise ValueError(f"{path.name} holds NaN, inf or negative depths")
    return depth


def _pairs(conv: list) -> bool:
    """The conversation alternates human, gpt, human, gpt, ... and ends on gpt."""
    return len(conv) % 2 == 0 and [m.get("from") for m in conv] == ["human", "gpt"] * (len(conv) // 2)


def _images(conv: list) -> int:
    return sum(m["value"].count("<image>") for m in conv)


def check_spatial(rec: dict, out: Path, stats: dict) -> list:
    meta, conv, levels = rec["meta"], rec["conversations"], rec["levels"]
    if len(conv) != 24 or not _pairs(conv):
        return ["expected 12 human/gpt pairs"]
    bad = []
    if not conv[0]["value"].startswith("<image>\n") or _images(conv) != 1:
        bad.append("the first human turn must start with '<image>\\n' and no other turn may hold <image>")
    if {k: levels.count(k) for k in LEVEL_COUNTS} != LEVEL_COUNTS or len(meta["turns"]) != 12:
        bad.append(f"levels {levels} do not hold 5 pixel, 4 object, 1 scene, 2 caption turns")
    H, W = read_rgb(out / rec["image"]).shape[:2]
    depth, inst = _depth(out / meta["depth"]), _mask(out / meta["instance"])
    if depth.shape != (H, W) or inst.shape != (H, W) or meta["size"] != [H, W]:
        return bad + [f"image {(H, W)}, depth {depth.shape}, instance {inst.shape}, meta size {meta['size']} disagree"]
    Kinv, R = np.linalg.inv(np.array(meta["K"])), np.array(meta["answer_from_camera"])
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-4:
        bad.append("answer_from_camera is not a rotation")
    px = np.array([p["px"] for p in meta["points"]]).reshape(-1, 2)
    uv = np.array([p["uv"] for p in meta["points"]]).reshape(-1, 2)
    if np.abs(uv - (px + 0.5) / (W, H)).max(initial=0) > 0.0005 + 1e-9:
        bad.append("point uv does not match its pixel")
    d = depth[px[:, 1], px[:, 0]]
    if (d <= 0).any():
        bad.append("a point has no depth")
    objs = {o["id"]: o for o in meta["objects"]}
    counts = np.bincount(inst.reshape(-1), minlength=max(objs) + 1)
    if meta["cube_source"] == "scene":
        bad += _scene_agrees(meta, out, inst, depth, Kinv, R, len(counts))
    f = dict(d=d, xyz=(np.c_[px + 0.5, np.ones(len(px))] @ Kinv.T * d[:, None]) @ R.T,    # (n, 3) answer frame
             objs=objs, visible=[o for o in meta["objects"] if counts[o["id"]] >= meta["min_pixels"]],
             P=lambda k: f"({coord(uv[k, 0])}, {coord(uv[k, 1])})")
    for t, (turn, level) in enumerate(zip(meta["turns"], levels)):
        q, a, kind, where = conv[2 * t]["value"], conv[2 * t + 1]["value"], turn["kind"], f"turn {t} ({turn['kind']})"
        if kind in PIXEL_KINDS:
            bad += _pixel_turn(kind, q, a, turn, level, f, where, stats)
        elif kind in RELATIONS:
            bad += _relation_turn(kind, q, a, turn, level, f, where, stats)
        elif kind == "distance":
            ca, cb = (np.sum(objs[x]["cube"], 0) / 2 for x in turn["objects"])
            centre, gap = cube_distance(*(objs[x]["cube"] for x in turn["objects"]))
            bad += _numbers(a, [(v, 2) for v in (*ca, *cb, centre, gap)], where)
        elif kind in ("caption_list", "caption_depth"):
            bad += _caption_turn(kind, a, f, meta["objects"], where)
    return bad


def _scene_agrees(meta: dict, out: Path, inst: np.ndarray, depth: np.ndarray, Kinv, R, n: int) -> list:
    """Exact synthetic geometry (n = instance ids): object pixels lie in their cubes, semantic ids match categories."""
    bad = []
    rows, cols = np.nonzero((inst > 0) & (depth > 0))
    pts = (np.c_[cols + 0.5, rows + 0.5, np.ones(len(rows))] @ Kinv.T * depth[rows, cols][:, None]) @ R.T
    lo, hi, category = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros(n, np.int64)
    for o in meta["objects"]:
        lo[o["id"]], hi[o["id"]] = o["cube"]
        category[o["id"]] = CATEGORIES.index(o["category"]) + 1
    outside = ((pts < lo[inst[rows, cols]] - 0.005) | (pts > hi[inst[rows, cols]] + 0.005)).any(1)
    if outside.any():
        bad.append(f"{int(outside.sum())} object pixels lie outside their cubes")
    if ((_mask(out / meta["semantic"]) != category[inst]) & (inst > 0)).any():
        bad.append("the semantic mask disagrees with the objects' categories")
    return bad


def _each_point(a: str, expected: list, where: str) -> list:
    """An answer about several points, one group of decimals per point in the question's order (expected: [[(value,
    decimals)] per point]): each point is compared on its own, so a wrong value names its point."""
    got, n = NUMBER.findall(a), len(expected[0])
    if len(expected) == 1 or len(got) != n * len(expected):
        return _numbers(a, [e for point in expected for e in point], where)
    return [b for k, point in enumerate(expected) for b in
            _numbers(" ".join(got[k * n:(k + 1) * n]), point, f"{where}: point {k + 1} of {len(expected)}")]


def _pixel_turn(kind: str, q: str, a: str, turn: dict, level: str, f: dict, where: str, stats: dict) -> list:
    """Depth and 3D position of each point the turn names, displacement and closer-or-farther of its two points."""
    ks, P, d, xyz = turn["points"], f["P"], f["d"], f["xyz"]
    at = [q.find(P(k)) for k in ks]           # the answer follows the question's order of the (distinct) points
    bad = [] if level == "pixel" and ks and -1 not in at and at == sorted(set(at)) else [
        f"{where}: level {level} or the question does not name its distinct points in order"]
    if kind == "depth":
        return bad + _each_point(a, [[(d[k], 2)] for k in ks], where)
    if kind == "position":
        return bad + _each_point(a, [[(v, 2) for v in xyz[k]] for k in ks], where)
    if kind == "displacement":
        v = xyz[ks[1]] - xyz[ks[0]]
        return bad + _numbers(a, [(c, 2) for c in v] + [(np.linalg.norm(v), 2)], where)
    m = re.search(r"[Tt]he (first|second) point is (" + "|".join(CLOSER_WORDS) + r") the (first|second):", a)
    i, j = ks
    if not m or m.group(1) == m.group(3):
        return bad + [f"{where}: no verdict 'the first / second point is closer than / ... the second / first'"]
    s, o = (i, j) if m.group(1) == "first" else (j, i)
    rel = lambda x, y: 2 if abs(d[x] - d[y]) < TIE_DEPTH else int(d[x] > d[y])
    bad += _verdict(where, a, turn, rel(i, j), rel(s, o), CLOSER_WORDS.index(m.group(2)), stats)
    return bad + _numbers(a, [(d[s], 2), (d[o], 2)], where)


def _relation_turn(kind: str, q: str, a: str, turn: dict, level: str, f: dict, where: str, stats: dict) -> list:
    """The verdict 'the <A> is <relation> the <B>' from the cubes, and the values compared."""
    spec, (ia, ib), objs = RELATIONS[kind], turn["objects"], f["objs"]
    names = "|".join(re.escape(objs[x]["name"]) for x in (ia, ib))
    m = re.search(f"[Tt]he ({names}) is ({'|'.join(spec['words'])}) the ({names})[ :]", a)
    if level != "object" or not all(objs[x]["name"] in q for x in (ia, ib)) or not m or m.group(1) == m.group(3):
        return [f"{where}: level {level}, names missing from the question, or no 'the <A> is <rel> the <B>'"]
    s, o = (ia, ib) if m.group(1) == objs[ia]["name"] else (ib, ia)
    out = relation(kind, objs[ia]["cube"], objs[ib]["cube"])[0]
    said, vs, vo, margin = relation(kind, objs[s]["cube"], objs[o]["cube"])
    bad = _verdict(where, a, turn, out, said, spec["words"].index(m.group(2)), stats)
    if spec.get("measure") == "volume":
        expected = [(v, 2) for x in (s, o) for v in np.subtract(*objs[x]["cube"][::-1])]
    else:
        expected = ([(margin, 2)] if said != 2 else []) + [(vs, 2), (vo, 2)]
    return bad + _numbers(a, expected, where)


def _caption_turn(kind: str, a: str, f: dict, objects: list, where: str) -> list:
    """The visible objects left to right (caption_list) or near to far with their supports (caption_depth)."""
    axis, visible, shown = 0 if kind == "caption_list" else 2, f["visible"], {o["id"] for o in f["visible"]}
    order = sorted(visible, key=lambda o: o["cube"][0][axis] + o["cube"][1][axis])
    plain = re.sub(r" \(on the [^)]*\)", "", a)        # entries only, not "(on the <support>)"
    bad = _listed(plain, order, [o for o in objects if o not in visible], where)
    support = [o["name"] for o in order if kind == "caption_depth" and o["on"] in shown
               and f"the {o['name']} (on the {f['objs'][o['on']]['name']})" not in a]
    return bad + ([f"{where}: supports missing {support}"] if support else [])


def _verdict(where, answer, turn, truth_asked, truth_said, said, stats) -> list:
    """The stated relation must be the true one; a yes/no prefix must answer the question asked; a 'which'
    answer names the object that has the asked-about property (unless it is a tie)."""
    bad = [] if said == truth_said else [f"{where}: says relation {said}, ground truth {truth_said}"]
    if turn["form"] == "yesno":
        word = "Not clearly" if truth_asked == 2 else ("Yes" if truth_asked == turn["want"] else "No")
        stats[word] = stats.get(word, 0) + 1
        if not re.match(rf"{word}[.,:]", answer):
            bad.append(f"{where}: answer should start with {word!r}")
    elif said != 2 and said != turn["want"] or (said == 2) != answer.startswith("Neither"):
        bad.append(f"{where}: a 'which' answer must name the object with the asked property, or say 'Neither'")
    return bad


# ----------------------------------------------------------------------------------------------------------------
# Single-view captions and instruction QA (instruct.py), from the instance mask, the labels and the objects in meta.

WORDS = {w: k for k, w in enumerate(NUMBER_WORDS)}


def _single_facts(meta: dict, inst: np.ndarray) -> dict:
    labels = {int(i): c for i, c in meta["labels"].items()}
    counts = np.bincount(inst.reshape(-1), minlength=max([0, *labels, *(o["id"] for o in meta["objects"])]) + 1)
    px = lambda i: int(counts[i]) if i < len(counts) else 0
    visible = [o for o in meta["objects"] if px(o["id"]) >= meta["min_pixels"]]
    cats = {c: {"visible": [], "sliver": []} for c in labels.values()}
    for i, c in labels.items():
        if px(i) >= meta["min_pixels"]:
            cats[c]["visible"].append(i)
        elif px(i) > 0:
            cats[c]["sliver"].append(i)
    return dict(objs={o["id"]: o for o in meta["objects"]}, cats=cats, px=px,
                visible=sorted(visible, key=lambda o: o["cube"][0][0] + o["cube"][1][0]),
                hidden=[o for o in meta["objects"] if px(o["id"]) < meta["min_pixels"]])


def _listed(text: str, order: list, hidden: list, where: str) -> list:
    """The visible objects all named in text, in order; no hidden object named."""
    at = lambda o: re.search(rf"\b(a|an|the|A|An|The) {re.escape(o['name'])}\b", text)
    found, named = [at(o).start() if at(o) else -1 for o in order], [o["name"] for o in hidden if at(o)]
    if -1 in found or found != sorted(found) or named:
        return [f"{where}: visible objects missing or out of order, or hidden ones named {named}"]
    return []


def check_single(rec: dict, out: Path, stats: dict) -> list:
    meta, conv = rec["meta"], rec["conversations"]
    if not _pairs(conv):
        return ["expected human/gpt pairs"]
    first = conv[0]["value"]
    if _images(conv) != 1 or not (first.startswith("<image>\n") or first.endswith("\n<image>")):
        return ["the first human turn must start (or end) with the one <image>"]
    inst = _mask(out / meta["instance"])
    if list(inst.shape) != meta["size"] or read_rgb(out / rec["image"]).shape[:2] != tuple(meta["size"]):
        return [f"image, instance {inst.shape} and meta size {meta['size']} disagree"]
    f, bad = _single_facts(meta, inst), []
    for t, turn in enumerate(meta["turns"]):
        a, where = conv[2 * t + 1]["value"], f"turn {t} ({turn['kind']})"
        if turn["kind"] in ("caption", "long_description"):
            bad += _description(turn["kind"], a, f, where)
        else:
            bad += _single_qa(turn, a, f, meta["source"], inst, where, stats)
    return bad


def _description(kind: str, a: str, f: dict, where: str) -> list:
    """A caption or long description: objects listed, supports, nearest / farthest, (long) each distance ahead."""
    objs, shown = f["objs"], {o["id"] for o in f["visible"]}
    z = lambda o: (o["cube"][0][2] + o["cube"][1][2]) / 2
    bad = _listed(a.split(". ")[0], f["visible"], f["hidden"], where)
    for x, y in re.findall(r"The ([\w ]+?) stands on the ([\w ]+?)\.", a):
        ox = next((o for o in f["visible"] if o["name"] == x), None)
        if ox is None or ox["on"] not in shown or objs[ox["on"]]["name"] != y:
            bad.append(f"{where}: the {x} does not stand on the {y}")
    m = re.search(r"The ([\w ]+?) is nearest to the camera and the ([\w ]+?) farthest", a)
    if m:
        near = sorted(f["visible"], key=z)
        if (m.groups() != (near[0]["name"], near[-1]["name"]) or z(near[1]) - z(near[0]) < TIE_CENTRE or
                z(near[-1]) - z(near[-2]) < TIE_CENTRE):
            bad.append(f"{where}: nearest / farthest is not {m.groups()} by a clear margin")
    if kind == "long_description":
        said = re.findall(r"The ([\w ]+?) is (-?\d+\.\d+) m ahead(?:, on the ([\w ]+?))?\.", a)
        want = [(o["name"], z(o), objs[o["on"]]["name"] if o["on"] in shown else "") for o in f["visible"]]
        if [s[0] for s in said] != [w[0] for w in want] or [s[2] for s in said] != [w[2] for w in want]:
            bad.append(f"{where}: per-object sentences {[s[0] for s in said]} != {[w[0] for w in want]}")
        else:
            bad += _numbers(" ".join(s[1] for s in said), [(w[1], 2) for w in want], where)
    return bad


def _single_qa(turn: dict, a: str, f: dict, source: str, inst: np.ndarray, where: str, stats: dict) -> list:
    """Count, colour, is-there, support, position (thirds of the mask's centroid) and height questions."""
    kind, objs, c = turn["kind"], f["objs"], f["cats"].get(turn.get("category"), {"visible": [], "sliver": []})
    if kind == "count":
        m = re.match(r"There (?:is|are) (\w+) ", a)
        colours = sorted(objs[i]["colour"] for i in c["visible"] if i in objs and objs[i]["colour"])
        if c["sliver"] or not m or WORDS.get(m.group(1), -1) != len(c["visible"]):
            return [f"{where}: {len(c['visible'])} visible, {len(c['sliver'])} slivers; answer {a!r}"]
        if sorted(re.findall(r"an? (\w+) one", a)) != (colours if source == "synthetic" else []):
            return [f"{where}: colours in {a!r} are not {colours}"]
    elif kind == "colour":
        right = len(c["visible"]) == 1 and not c["sliver"]
        if not right or a != f"The {turn['category']} is {objs[c['visible'][0]]['colour']}.":
            return [f"{where}: not the one visible {turn['category']}'s colour"]
    elif kind == "exists":
        if "colour" in turn:
            hit = [i for i in c["visible"] + c["sliver"] if objs[i]["colour"] == turn["colour"]]
            truth = "No" if not hit and c["visible"] else None
        else:
            truth = "Yes" if c["visible"] else "No" if not c["sliver"] else None
        stats[str(truth)] = stats.get(str(truth), 0) + 1
        if truth is None or not a.startswith(truth):
            return [f"{where}: answer {a[:20]!r}, ground truth {truth}"]
    elif kind == "support":
        o = objs[turn["object"]]
        where_on = "the floor" if o["on"] is None else f"the {objs[o['on']]['name']}"
        if a != f"The {o['name']} stands on {where_on}.":
            return [f"{where}: the {o['name']} stands on {where_on}"]
    elif kind == "position":
        (H, W), (rows, cols) = inst.shape, np.nonzero(inst == turn["object"])
        u, v = (cols.mean() + 0.5) / W, (rows.mean() + 0.5) / H
        word = place(min(int(u * 3), 2), min(int(v * 3), 2))
        near = min(abs(x - b) for x in (u, v) for b in (1 / 3, 2 / 3))
        if near < 0.03 or f" in the {word} part of the image" not in a:
            return [f"{where}: the centroid ({u:.3f}, {v:.3f}) is in the {word} part (margin {near:.3f})"]
    elif kind == "height":
        o = objs[turn["object"]]
        return _numbers(a, [(o["cube"][1][1] - o["cube"][0][1], 2)], where)
    return []


# ----------------------------------------------------------------------------------------------------------------
# Pairs of views (multiview.py), with this file's own projection (inverse K, world round trip).


def _pixels_to(view: dict, depth, other: dict, px: np.ndarray) -> tuple:
    """px (n, 2) (col, row) of a view -> (camera points (n, 3), points in the other camera (n, 3), (u, v) there)."""
    d = depth[px[:, 1], px[:, 0]]
    cam = (np.c_[px + 0.5, np.ones(len(px))] @ np.linalg.inv(np.array(view["K"])).T) * d[:, None]
    A, B = np.array(view["cam_to_world"]), np.array(other["cam_to_world"])
    cam_to = (np.c_[cam, np.ones(len(cam))] @ (np.linalg.inv(B) @ A).T)[:, :3]
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = cam_to @ np.array(other["K"]).T
        uv = proj[:, :2] / proj[:, 2:]
    uv[cam_to[:, 2] <= 1e-6] = np.nan
    return cam, cam_to, uv


def _state(depth_to, uv, z) -> np.ndarray:
    """'seen' | 'outside' | 'hidden' | 'unknown' (n,) of points at uv (n, 2) with depth z (n,) in the other view."""
    H, W = depth_to.shape
    with np.errstate(invalid="ignore"):
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
    there = np.zeros(len(z))
    there[inside] = depth_to[uv[inside, 1].astype(int), uv[inside, 0].astype(int)]
    return np.where(~inside, "outside", np.where(there <= 0, "unknown", np.where(there < z - 0.03 - 0.03 * z,
                                                                                   "hidden", "seen")))


def _covis(va, da, vb, db, stride) -> float:
    """The share of view a's pixels with depth (every stride-th row and column, from stride // 2) that b sees."""
    H, W = da.shape
    rows, cols = np.mgrid[stride // 2:H:stride, stride // 2:W:stride].reshape(2, -1)
    px = np.c_[cols, rows][da[rows, cols] > 0]
    _, cam_b, uv = _pixels_to(va, da, vb, px)
    return float(np.mean(_state(db, uv, cam_b[:, 2]) == "seen"))


def _view_states(view: dict, inst: np.ndarray, synthetic: bool) -> dict:
    """name -> 'visible' | 'absent' | 'unclear' in one view: synthetic objects by their pixels; an RGB-D label only
    when one instance of it is seen and it is lifted under its plain name."""
    f = _single_facts(view, inst)
    if synthetic:
        px = [f["px"](o["id"]) for o in view["objects"]]
        return {o["name"]: "visible" if n >= view["min_pixels"] else "unclear" if n else "absent"
                for o, n in zip(view["objects"], px)}
    named = {o["name"]: o["id"] for o in view["objects"] if o["name"] == o["category"]}
    return {c: "visible" if len(ids["visible"] + ids["sliver"]) == 1 and named.get(c) in ids["visible"] else
            "absent" if not ids["visible"] + ids["sliver"] else "unclear" for c, ids in f["cats"].items()}


def _motion(v1: dict, v2: dict) -> tuple:
    A, B = np.array(v1["cam_to_world"]), np.array(v2["cam_to_world"])
    rel = np.linalg.inv(A) @ B                                           # camera 2 -> camera 1
    R1, R2 = np.array(v1["answer_from_camera"]), np.array(v2["answer_from_camera"])
    t, forward = R1 @ rel[:3, 3], R1 @ rel[:3, :3] @ R2.T @ np.array([0, 0, 1.0])
    return t, np.degrees(np.arctan2(-forward[0], forward[2]))


def _degrees(text: str, yaw: float, where: str) -> list:
    deg = round(abs(yaw))
    if deg == 0:
        ok = "kept its heading" in text or "facing the same way" in text
    else:
        m = re.search(r"turned (\d+) degrees to the (left|right)", text)
        ok = m and abs(int(m.group(1)) - abs(yaw)) <= 0.5 + 1e-6 and m.group(2) == ("left" if yaw > 0 else "right")
    return [] if ok else [f"{where}: the camera turned {yaw:.2f} degrees (+ = left); answer {text!r}"]


def check_pair(rec: dict, out: Path, stats: dict) -> list:
    meta, conv, V = rec["meta"], rec["conversations"], rec["meta"]["views"]
    if not _pairs(conv):
        return ["expected human/gpt pairs"]
    if (not conv[0]["value"].startswith("<image>\n<image>\n") or _images(conv) != 2
            or rec["image"] != [v["image"] for v in V]):
        return ["two images, both named in the first human turn ('<image>\\n<image>\\n')"]
    depth, inst = [_depth(out / v["depth"]) for v in V], [_mask(out / v["instance"]) for v in V]
    for v, d, i in zip(V, depth, inst):
        rgb = read_rgb(out / v["image"]).shape[:2]
        if list(d.shape) != v["size"] or list(i.shape) != v["size"] or list(rgb) != v["size"]:
            return [f"a view's image, depth {d.shape}, instance {i.shape} and size {v['size']} disagree"]
    bad, posed = [], all(v["cam_to_world"] is not None for v in V)
    if posed:
        covis = [_covis(V[a], depth[a], V[1 - a], depth[1 - a], meta["covis_stride"]) for a in (0, 1)]
        if meta["covis"] is None or np.abs(np.subtract(covis, meta["covis"])).max() > 0.002:
            bad.append(f"co-visibility {covis} != meta {meta['covis']}")
        elif meta["feature_distance"] is None and not meta["band"][0] <= covis[0] <= meta["band"][1]:
            bad.append(f"co-visibility {covis[0]:.3f} outside the band {meta['band']}")
    st = [_view_states(v, i, meta["source"] == "synthetic") for v, i in zip(V, inst)]
    f = dict(V=V, depth=depth, st=st, motion=_motion(*V) if posed else (None, None),
             state=lambda n, k: st[k].get(n, "absent"),
             cube=lambda n, k: next(o["cube"] for o in V[k]["objects"] if o["name"] == n),
             P=lambda k: f"({coord(meta['points'][k]['uv'][0])}, {coord(meta['points'][k]['uv'][1])})")
    for n in meta["absent"]:
        if f["state"](n, 0) != "absent" or f["state"](n, 1) != "absent":
            bad.append(f"'absent' {n} is {f['state'](n, 0)} / {f['state'](n, 1)} in the views")
    for j, turn in enumerate(meta["turns"]):
        q, a, where = conv[2 * j]["value"], conv[2 * j + 1]["value"], f"turn {j} ({turn['kind']})"
        if turn["kind"] in ("match", "position_across", "distance_across"):
            bad += _pair_points_turn(turn, q, a, f, meta["points"], where)
        elif turn["kind"] in ("motion", "choice_direction", "camera_motion"):
            bad += _pair_camera_turn(turn["kind"], q, a, *f["motion"], where)
        else:
            bad += _pair_objects_turn(turn, q, a, f, where, stats)
    return bad


def _pair_objects_turn(turn: dict, q: str, a: str, f: dict, where: str, stats: dict) -> list:
    """What each view shows (false premises included), which view shows an object closer, relations per view."""
    tk, st, state, cube = turn["kind"], f["st"], f["state"], f["cube"]
    both = sorted((n for n in st[0] if state(n, 0) == state(n, 1) == "visible"),
                  key=lambda n: cube(n, 0)[0][0] + cube(n, 0)[1][0])
    zc = lambda n, k: (cube(n, k)[0][2] + cube(n, k)[1][2]) / 2
    n, k = turn.get("object"), turn.get("view")
    if tk == "common":
        ok = a == "No object is clearly visible in both views." if not both else a.startswith("Both views show")
        named = [n for n in st[0] if re.search(rf"\b(a|an) {re.escape(n)}\b", a)]
        if not ok or sorted(named) != sorted(both) or sorted(named, key=a.index) != both:
            return [f"{where}: objects in both views are {both}; answer {a!r}"]
    elif tk in ("closer", "choice_closer") and state(n, 0) == state(n, 1) == "visible":
        out = 2 if abs(zc(n, 0) - zc(n, 1)) < TIE_CENTRE else int(zc(n, 1) < zc(n, 0))
        if tk == "choice_closer":
            return _choice(q, a, ["view 1", "view 2", "about the same in both"][out], where)
        bad = [] if a.startswith(["View 1", "View 2", "About the same"][out]) else [
            f"{where}: verdict should be {['view 1', 'view 2', 'about the same'][out]}"]
        return bad + _numbers(a, [(zc(n, 0), 2), (zc(n, 1), 2)], where)
    elif tk in ("closer", "choice_closer"):
        return [f"{where}: the {n} is not visible in both views"]
    elif tk == "exists":
        truth = {"visible": "Yes", "absent": "No"}.get(state(n, k))
        stats[str(truth)] = stats.get(str(truth), 0) + 1
        if truth is None or not a.startswith(truth) or (truth == "No" and f"no {n}" not in a):
            return [f"{where}: the {n} is {state(n, k)} in view {k + 1}; answer {a!r}"]
    elif tk == "premise":
        bad = []
        if state(n, 0) != "absent" or state(n, 1) != "absent" or n in a.replace(f"no {n}", ""):
            bad.append(f"{where}: a false premise about the {n} ({state(n, 0)} / {state(n, 1)}) must be denied")
        m = re.search(r"only the ([\w ]+?) is there", a)
        if m and state(m.group(1), k) != "visible":
            bad.append(f"{where}: the {m.group(1)} is not visible in view {k + 1}")
        return bad
    elif tk == "premise_one":
        if state(n, k) != "visible" or state(n, 1 - k) != "absent" or not a.startswith(f"Only view {k + 1}"):
            return [f"{where}: the {n} is {state(n, 0)} / {state(n, 1)}; answer {a!r}"]
    elif tk == "choice_common":
        right = [o for o in turn["options"] if o[4:] in both]
        if len(right) != 1 or [o for o in turn["options"] if "unclear" in (state(o[4:], 0), state(o[4:], 1))]:
            return [f"{where}: options {turn['options']} need exactly one object seen in both, none unclear"]
        return _choice(q, a, right[0], where)
    elif tk == "relation_across":
        (A, B), spec, expected, bad = turn["objects"], RELATIONS[turn["relation"]], [], []
        said = re.findall(rf"In view (\d) the {re.escape(A)} is ({'|'.join(spec['words'])}) the {re.escape(B)} ", a)
        for k in (0, 1):
            if state(A, k) != "visible" or state(B, k) != "visible":
                return bad + [f"{where}: {A} / {B} not visible in view {k + 1}"]
            out, va, vb, _ = relation(turn["relation"], cube(A, k), cube(B, k))
            expected += [(va, 2), (vb, 2)]
            if (str(k + 1), spec["words"][out]) not in said:
                bad.append(f"{where}: in view {k + 1} the {A} is {spec['words'][out]} the {B}")
        return bad + _numbers(a, expected, where)
    else:
        return [f"{where}: unknown turn kind"]
    return []


def _pair_camera_turn(kind: str, q: str, a: str, t, yaw: float, where: str) -> list:
    """The camera's motion t (view 1's answer frame) and turn yaw, in words, in numbers or as a main direction."""
    if kind == "camera_motion":
        return _numbers(a, [(x, 2) for x in t] + [(np.linalg.norm(t), 2)], where) + _degrees(a, yaw, where)
    if kind == "choice_direction":
        x, z = abs(t[0]), abs(t[2])
        if max(x, z) < 0.2 or max(x, z) < 1.5 * min(x, z):
            return [f"{where}: no dominant direction in {np.round(t, 2).tolist()}"]
        return _choice(q, a, DIRECTIONS[int(t[0] > 0) if x > z else 2 + int(t[2] < 0)], where)
    words = re.findall(r"(\d+\.\d+) m (?:to the )?(right|left|forward|backward|up|down)", a)
    signs = {"right": 1, "left": -1, "forward": 1, "backward": -1, "up": 1, "down": -1}
    got = {w: float(x) * signs[w] for x, w in words}
    axes = [got.get("right", got.get("left")), got.get("up", got.get("down")), got.get("forward", got.get("backward"))]
    bad = []
    if None in axes or any(abs(g - v) > 0.005 + 1e-6 for g, v in zip(axes, t)):
        bad.append(f"{where}: motion {np.round(t, 3).tolist()} (X, Y, Z); answer {a!r}")
    return bad + _degrees(a, yaw, where)


def _pair_points_turn(turn: dict, q: str, a: str, f: dict, points: list, where: str) -> list:
    """A point of one view in the other, its 3D position in both frames, two points' distance (same in both)."""
    V, depth, P = f["V"], f["depth"], f["P"]
    R = [np.array(v["answer_from_camera"]) for v in V]
    if turn["kind"] == "distance_across":
        here, there, Q, bad = [], [], [], []
        for k in turn["points"]:
            cam, cam_to, uv = _pixels_to(V[0], depth[0], V[1], np.array([points[k]["px"]]))
            if _state(depth[1], uv, cam_to[:, 2])[0] != "seen":
                bad.append(f"{where}: point {P(k)} is not seen in view 2")
            here.append(R[0] @ cam[0])
            there.append(R[1] @ cam_to[0])
            Q += [(x, 3) for x in uv[0] / depth[1].shape[::-1]]
        bad += _numbers(q, [(v, 3) for k in turn["points"] for v in points[k]["uv"]] + Q, where + " question")
        d = np.linalg.norm(here[0] - here[1])
        bad += _numbers(a, [(x, 2) for p in here + there for x in p] + [(d, 2)], where)
        if abs(np.linalg.norm(there[0] - there[1]) - d) > 1e-3:
            bad.append(f"{where}: the distance differs between the views' frames")
        return bad
    k = turn["point"]
    s = points[k]["view"]
    cam, cam_to, uv = _pixels_to(V[s], depth[s], V[1 - s], np.array([points[k]["px"]]))
    if turn["kind"] == "position_across":
        return _numbers(a, [(x, 2) for x in R[1 - s] @ cam_to[0]] + [(x, 2) for x in R[s] @ cam[0]], where)
    said = _state(depth[1 - s], uv, cam_to[:, 2])[0]
    Q = [(x, 3) for x in uv[0] / depth[1 - s].shape[::-1]]
    bad = [] if P(k) in q else [f"{where}: the question does not name point {P(k)}"]
    if said == "seen" and a.startswith("It appears at"):
        return bad + _numbers(a, Q + [(cam_to[0, 2], 2), (cam[0, 2], 2)], where)
    if said == "hidden" and a.startswith("It is hidden"):
        return bad + _numbers(a, Q + [(cam_to[0, 2], 2), (depth[1 - s][int(uv[0, 1]), int(uv[0, 0])], 2)], where)
    if not ((said == "outside" and a.startswith("It is outside")) or (said == "unknown" and "no depth" in a)):
        bad.append(f"{where}: view {2 - s} {said} the point; answer {a!r}")
    return bad


def _choice(q: str, a: str, right: str, where: str) -> list:
    """A multiple-choice answer 'L. option' must pick the option that is right, as the question lists it."""
    options, m = dict(re.findall(r"\n([A-D])\. ([^\n]+)", q)), re.match(r"([A-D])\. (.+)$", a)
    if not m or options.get(m.group(1)) != right or m.group(2) != right:
        return [f"{where}: the right option is {right!r}; answer {a!r}"]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Grounding (stage 2): every answer re-derived from the instance (and semantic) mask and the question's own text.

POINT_TEXT = re.compile(r"\((\d\.\d{3}), (\d\.\d{3})\)")


def _pixel(u: str, v: str, H: int, W: int) -> tuple:
    """The pixel a normalized pixel-centre coordinate names (exact for images under 1000 px)."""
    return int(float(v) * H), int(float(u) * W)


def check_grounding(rec: dict, out: Path, stats: dict) -> list:
    meta, conv = rec["meta"], rec["conversations"]
    inst = _mask(out / meta["instance"])
    sem = _mask(out / meta["semantic"]) if meta.get("semantic") else None
    (H, W), names = inst.shape, {o["id"]: o["name"] for o in meta["objects"]}
    what = lambda r, c: (f"no object: the {CATEGORIES[sem[r, c] - 1]}" if inst[r, c] == 0 and sem is not None
                         else names.get(int(inst[r, c])))
    bad = []
    for t, turn in enumerate(meta["turns"]):
        q, a, where = conv[2 * t]["value"], conv[2 * t + 1]["value"], f"turn {t} ({turn['kind']})"
        points = [_pixel(u, v, H, W) for u, v in POINT_TEXT.findall(q)]
        if turn["kind"] == "point":
            name = what(*points[0])
            if name is None or a.rstrip(".").lower() not in (name.lower(), f"the {name.lower()}"):
                bad.append(f"{where}: {a!r} but the mask says {name!r} at {points[0]}")
        elif turn["kind"] == "box":
            mask = inst == turn["object"]
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = [cols[0] / W, rows[0] / H, (cols[-1] + 1) / W, (rows[-1] + 1) / H]
            bad += _numbers(a, [(v, 2) for v in box], where)
            if names[turn["object"]] not in q:
                bad.append(f"{where}: the question does not name the {names[turn['object']]}")
        elif turn["kind"] == "which":
            said = [_pixel(u, v, H, W) for u, v in POINT_TEXT.findall(a)]
            on = [int(inst[r, c]) == turn["object"] for r, c in points]
            if len(points) != 2 or len(said) != 1 or sum(on) != 1 or said[0] != points[on.index(True)]:
                bad.append(f"{where}: {a!r} is not the one of {points} on object {turn['object']}")
        stats[f"grounding_{turn['kind']}"] = stats.get(f"grounding_{turn['kind']}", 0) + 1
    return bad


CHECKERS = {"spatial": check_spatial, "captions": check_single, "instruct": check_single, "grounding": check_grounding,
            "multiview": check_pair, "spatial-multiview": check_pair}
FILE_KEYS = ("image", "depth", "instance", "semantic")     # meta's keys that name a file of the dataset


def _finite(text: str) -> float:
    x = float(text)
    if not np.isfinite(x):
        raise ValueError(f"number {text} is not finite")
    return x


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _files(x) -> list:
    """Every file a record's meta names (images, depth, masks), at any depth."""
    if isinstance(x, dict):
        return [v for k, v in x.items() if k in FILE_KEYS and isinstance(v, str)] + [
            f for k, v in x.items() for f in _files(v)]
    return [f for v in x for f in _files(v)] if isinstance(x, list) else []


def _shape(rec, out: Path) -> list:
    """What makes a line no sample of ours: fields missing or mistyped, roles out of order, files missing or
    outside the dataset folder, turns in meta that do not match the conversation."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    conv, meta, image = rec.get("conversations"), rec.get("meta"), rec.get("image")
    wrong = [k for k, kind in (("id", str), ("conversations", list), ("meta", dict))
             if not isinstance(rec.get(k), kind)]
    if wrong:
        return [f"{' and '.join(map(repr, wrong))} missing or mistyped: expected 'id' a string, 'conversations' a "
                "list, 'meta' an object"]
    if not all(isinstance(m, dict) and isinstance(m.get("value"), str) for m in conv):
        return ["every turn must be {'from': 'human' | 'gpt', 'value': a string}"]
    if not conv or not _pairs(conv):
        return [f"roles {[m.get('from') for m in conv][:8]}: expected human, gpt, human, gpt, ... ending on an answer"]
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        return [f"'image' = {json.dumps(image)[:60]}: expected a path or a list of paths"]
    if meta.get("kind", "spatial") not in CHECKERS:
        return [f"meta kind {meta.get('kind')!r}: expected one of {', '.join(CHECKERS)}"]
    if not isinstance(meta.get("turns"), list) or len(meta["turns"]) != len(conv) // 2:
        return [f"meta 'turns' must list one entry per human/gpt pair ({len(conv) // 2})"]
    marks = [m["value"].count("<image>") for m in conv]
    if sum(marks[::2]) != len(images) or sum(marks[1::2]):
        return [f"{sum(marks[::2])} '<image>' marks in the human turns ({sum(marks[1::2])} in answers) for "
                f"{len(images)} image(s)"]
    files = sorted(set(images + _files(meta)))
    outside = [p for p in files if os.path.isabs(p) or os.path.normpath(p).split(os.sep)[0] == ".."]
    if outside:
        return [f"files {outside[:3]} lie outside the dataset folder {out}"]
    missing = [p for p in files if not (out / p).is_file()]
    if missing:
        return [f"files {missing[:3]} not found under {out}"]
    for p in images:           # decoded as training decodes them: what it would skip or misread is a problem here
        try:
            read_rgb(out / p)
        except ValueError as e:
            return [str(e)]
    return []


def check_line(line: bytes, out: Path, stats: dict) -> list:
    """One line of data.jsonl -> its problems ["<id>: what is wrong"]."""
    try:
        rec = json.loads(line, parse_float=_finite, parse_constant=_no_constant)  # bytes, as the loader reads them
    except ValueError as e:                    # UnicodeDecodeError too
        return [f"not valid JSON ({e})"]
    bad = _shape(rec, out)
    name = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else "(no id)"
    if bad:
        return [f"{name}: {b}" for b in bad]
    try:
        return [f"{name}: {p}" for p in CHECKERS[rec["meta"].get("kind", "spatial")](rec, out, stats)]
    except KeyError as e:
        return [f"{name}: missing field {e}"]
    except Exception as e:      # files or meta that do not fit the kind's ground truth: named, never a traceback
        return [f"{name}: bad files or meta ({type(e).__name__}: {e})"]


def check(out, limit: int | None = None) -> tuple:
    """Check every sample of a dataset (a directory's data.jsonl, or that file), or its first `limit` ->
    (problems ["<file>:line N: <id>: what is wrong"], stats {name: count})."""
    out, problems, stats = Path(out), [], {"samples": 0}
    path = out if out.is_file() else out / "data.jsonl"
    if not path.is_file():
        return [f"{path}: not found (a dataset directory holds data.jsonl)"], stats
    with open(path, "rb") as f:                # bytes: a line that is not UTF-8 is one problem, not a crash
        for n, line in enumerate(f, 1):
            if limit is not None and stats["samples"] >= limit:
                break
            if line.strip():                   # blank lines are not samples (as for training)
                stats["samples"] += 1
                problems += [f"{path}:line {n}: {p}" for p in check_line(line, path.parent, stats)]
    if stats["samples"] == 0:
        problems.append(f"{path}: no samples (the file is empty)")
    return problems, stats
