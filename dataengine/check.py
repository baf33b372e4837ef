"""
The data checker: recompute every number and every yes/no of a spatial dataset from its stored ground truth.

    python data.py check data/spatial          # prints each disagreement; exit status 1 if there is any

It reads only the files (depth PNG/npy, instance PNG, K, the camera->answer rotation, the points and cubes in
`meta`) and recomputes the facts with its own arithmetic (the inverse of K instead of the generator's
fx/cx form, the instance mask instead of the generator's bookkeeping of which point fell on which object), then
compares every decimal in each answer, each verdict ("the <A> is <relation> the <B>", "<point> is closer than
<point>"), each yes/no, and the object lists of the captions. For synthetic data it also checks that every
object pixel lies inside its object's cube (which catches a wrong frame or cube) and that the semantic mask
agrees with the objects' categories.

The other kinds are checked the same way: captions and instruction QA (counts, colours, yes/no, supports, positions
in thirds of the image, heights, and the object lists of captions and descriptions) from the instance mask, the
labels and the objects in meta; multi-view pairs from both views' depth, masks, K and poses, with this file's own
projection: the co-visibility (and that it lies in the band), which objects each view shows, which premises are
false, camera motion, point correspondences (seen / hidden / outside), 3D positions in both frames, relations per
view, distances that must agree, and every multiple-choice letter.
"""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dataengine.scenes import CATEGORIES
from dataengine.text import (CLOSER_WORDS, LEVEL_COUNTS, PIXEL_KINDS, RELATIONS, TIE_CENTRE, TIE_DEPTH, cited, coord,
                             cube_distance, relation)
from dataengine.views import load_depth

NUMBER = re.compile(r"-?\d+\.\d+")


def _numbers(text: str, expected: list, where: str) -> list:
    """Compare the decimals in text with expected [(value, decimals)]: a correct rounding is within half a unit."""
    got = [float(x) for x in NUMBER.findall(text)]
    if len(got) != len(expected) or any(abs(g - v) > 0.5 * 10 ** -k + 1e-6 for g, (v, k) in zip(got, expected)):
        return [f"{where}: numbers {got} != expected {[round(float(v), k) for v, k in expected]}"]
    return []


def check_spatial(rec: dict, out: Path, stats: dict) -> list:
    meta, conv, levels = rec["meta"], rec["conversations"], rec["levels"]
    if len(conv) != 24 or [m["from"] for m in conv] != ["human", "gpt"] * 12:
        return ["expected 12 human/gpt pairs"]
    bad = []
    if not conv[0]["value"].startswith("<image>\n") or sum(m["value"].count("<image>") for m in conv) != 1:
        bad.append("the first human turn must start with '<image>\\n' and no other turn may hold <image>")
    if {k: levels.count(k) for k in LEVEL_COUNTS} != LEVEL_COUNTS or len(meta["turns"]) != 12:
        bad.append(f"levels {levels} do not hold 5 pixel, 4 object, 1 scene, 2 caption turns")
    rgb = Image.open(out / rec["image"])
    W, H = rgb.size
    depth = load_depth(out / meta["depth"])
    inst = np.asarray(Image.open(out / meta["instance"])).astype(np.int64)
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
    xyz = (np.c_[px + 0.5, np.ones(len(px))] @ Kinv.T * d[:, None]) @ R.T       # (n, 3) answer frame
    on = inst[px[:, 1], px[:, 0]]
    if (d <= 0).any():
        bad.append("a point has no depth")
    objs = {o["id"]: o for o in meta["objects"]}
    counts = np.bincount(inst.reshape(-1), minlength=max(objs) + 1)
    visible = [o for o in meta["objects"] if counts[o["id"]] >= meta["min_pixels"]]
    if meta["cube_source"] == "scene":    # every pixel of an object lies inside its cube (exact synthetic geometry)
        rows, cols = np.nonzero((inst > 0) & (depth > 0))
        pts = (np.c_[cols + 0.5, rows + 0.5, np.ones(len(rows))] @ Kinv.T * depth[rows, cols][:, None]) @ R.T
        lo = np.zeros((len(counts), 3))
        hi = np.zeros((len(counts), 3))
        for o in meta["objects"]:
            lo[o["id"]], hi[o["id"]] = o["cube"]
        outside = ((pts < lo[inst[rows, cols]] - 0.005) | (pts > hi[inst[rows, cols]] + 0.005)).any(1)
        if outside.any():
            bad.append(f"{int(outside.sum())} object pixels lie outside their cubes")
        semantic = np.asarray(Image.open(out / meta["semantic"])).astype(np.int64)
        category = np.zeros(len(counts), np.int64)
        for o in meta["objects"]:
            category[o["id"]] = CATEGORIES.index(o["category"]) + 1
        if ((semantic != category[inst]) & (inst > 0)).any():
            bad.append("the semantic mask disagrees with the objects' categories")
    P = lambda k: f"({coord(uv[k, 0])}, {coord(uv[k, 1])})"
    pt = lambda k: [(uv[k, 0], 3), (uv[k, 1], 3)]
    for t, (turn, level) in enumerate(zip(meta["turns"], levels)):
        q, a, kind, where = conv[2 * t]["value"], conv[2 * t + 1]["value"], turn["kind"], f"turn {t} ({turn['kind']})"
        if kind in PIXEL_KINDS:
            ks = turn["points"]
            if level != "pixel" or any(P(k) not in q for k in ks):
                bad.append(f"{where}: level {level} or the question does not name its points")
        if kind == "depth":
            bad += _numbers(a, pt(ks[0]) + [(d[ks[0]], 2)], where)
        elif kind == "position":
            bad += _numbers(a, pt(ks[0]) + [(v, 2) for v in xyz[ks[0]]], where)
        elif kind == "displacement":
            v = xyz[ks[1]] - xyz[ks[0]]
            bad += _numbers(a, pt(ks[0]) + pt(ks[1]) + [(c, 2) for c in v] + [(np.linalg.norm(v), 2)], where)
        elif kind == "closer":
            m = re.search(r"(\([\d.]+, [\d.]+\)) is (" + "|".join(CLOSER_WORDS) + r") (\([\d.]+, [\d.]+\))", a)
            i, j = ks
            if not m or {m.group(1), m.group(3)} != {P(i), P(j)}:
                bad.append(f"{where}: no verdict '<point> is closer than / farther than / ... <point>'")
                continue
            s, o = (i, j) if m.group(1) == P(i) else (j, i)
            rel = lambda x, y: 2 if abs(d[x] - d[y]) < TIE_DEPTH else int(d[x] > d[y])
            bad += _verdict(where, a, turn, rel(i, j), rel(s, o), CLOSER_WORDS.index(m.group(2)), stats)
            bad += _numbers(a, pt(s) + pt(o) + [(d[s], 2), (d[o], 2), (abs(d[s] - d[o]), 2)], where)
        elif kind in RELATIONS:
            spec, (ia, ib) = RELATIONS[kind], turn["objects"]
            names = "|".join(re.escape(objs[x]["name"]) for x in (ia, ib))
            m = re.search(f"the ({names}) is ({'|'.join(spec['words'])}) the ({names})[ .]", a)
            named = all(objs[x]["name"] in q for x in (ia, ib))
            if level != "object" or not named or not m or m.group(1) == m.group(3):
                bad.append(f"{where}: level {level}, names missing from the question, or no 'the <A> is <rel> the <B>'")
                continue
            s, o = (ia, ib) if m.group(1) == objs[ia]["name"] else (ib, ia)
            out = relation(kind, objs[s]["cube"], objs[o]["cube"])
            bad += _verdict(where, a, turn, relation(kind, objs[ia]["cube"], objs[ib]["cube"])[0], out[0],
                            spec["words"].index(m.group(2)), stats)
            cite = {"X": lambda k: [(xyz[k, 0], 2)], "Y": lambda k: [(xyz[k, 1], 2)], "depth": lambda k: [(d[k], 2)]}
            value = cite.get(spec.get("cite"), lambda k: [])
            expected = [v for x in (ia, ib) for k in cited(on, x) for v in pt(k) + value(k)]
            _, va, vb, margin = relation(kind, objs[ia]["cube"], objs[ib]["cube"])
            if spec.get("measure") == "volume":
                expected += [(v, 2) for x in (ia, ib) for v in np.subtract(*objs[x]["cube"][::-1])]
            else:
                expected += [(va, 2), (vb, 2)] + ([(margin, 2)] if out[0] != 2 else [])
            bad += _numbers(a, expected, where)
        elif kind == "distance":
            ca, cb = (np.sum(objs[x]["cube"], 0) / 2 for x in turn["objects"])
            centre, gap = cube_distance(*(objs[x]["cube"] for x in turn["objects"]))
            bad += _numbers(a, [(v, 2) for v in (*ca, *cb, centre, gap)], where)
        elif kind in ("caption_list", "caption_depth"):
            axis = 0 if kind == "caption_list" else 2
            order = sorted(visible, key=lambda o: o["cube"][0][axis] + o["cube"][1][axis])
            plain = re.sub(r" \(on the [^)]*\)", "", a)        # entries only, not "(on the <support>)"
            at = lambda o: re.search(rf"\b(a|an|the|A|An|The) {re.escape(o['name'])}\b", plain)
            found = [at(o).start() if at(o) else -1 for o in order]
            hidden = [o["name"] for o in meta["objects"] if o not in visible and at(o)]
            shown = {o["id"] for o in visible}
            support = [o["name"] for o in order if kind == "caption_depth" and o["on"] in shown
                       and f"the {o['name']} (on the {objs[o['on']]['name']})" not in a]
            if -1 in found or found != sorted(found) or hidden or support:
                bad.append(f"{where}: visible objects missing or out of order, hidden ones named {hidden}, "
                           f"supports missing {support}")
    return bad


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
# Single-view captions and instruction QA (instruct.py): counts, colours, presence, supports, positions, heights and
# the object lists of captions, from the instance mask, the labels and the objects in meta.

DIRECTIONS = ("to the left", "to the right", "forward", "backward")
WORDS = {w: k for k, w in enumerate(("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                     "ten"))}


def _single_facts(meta: dict, inst: np.ndarray) -> dict:
    labels = {int(i): c for i, c in meta["labels"].items()}
    counts = np.bincount(inst.reshape(-1), minlength=max([0, *labels, *(o["id"] for o in meta["objects"])]) + 1)
    objs = {o["id"]: o for o in meta["objects"]}
    px = lambda i: int(counts[i]) if i < len(counts) else 0
    visible = [o for o in meta["objects"] if px(o["id"]) >= meta["min_pixels"]]
    cats = {}
    for i, c in labels.items():
        cats.setdefault(c, {"visible": [], "sliver": []})
        if px(i) >= meta["min_pixels"]:
            cats[c]["visible"].append(i)
        elif px(i) > 0:
            cats[c]["sliver"].append(i)
    return dict(objs=objs, visible=sorted(visible, key=lambda o: o["cube"][0][0] + o["cube"][1][0]), cats=cats,
                hidden=[o for o in meta["objects"] if px(o["id"]) < meta["min_pixels"]])


def _listed(text: str, order: list, hidden: list, where: str) -> list:
    """The visible objects all named in text, in order; no hidden object named."""
    at = lambda o: re.search(rf"\b(a|an|the|A|An|The) {re.escape(o['name'])}\b", text)
    found = [at(o).start() if at(o) else -1 for o in order]
    named = [o["name"] for o in hidden if at(o)]
    if -1 in found or found != sorted(found) or named:
        return [f"{where}: visible objects missing or out of order, or hidden ones named {named}"]
    return []


def check_single(rec: dict, out: Path, stats: dict) -> list:
    meta, conv = rec["meta"], rec["conversations"]
    if len(conv) % 2 or [m["from"] for m in conv] != ["human", "gpt"] * (len(conv) // 2):
        return ["expected human/gpt pairs"]
    first = conv[0]["value"]
    if sum(m["value"].count("<image>") for m in conv) != 1 or not (first.startswith("<image>\n") or
                                                                 first.endswith("\n<image>")):
        return ["the first human turn must start (or end) with the one <image>"]
    inst = np.asarray(Image.open(out / meta["instance"])).astype(np.int64)
    if list(inst.shape) != meta["size"] or Image.open(out / rec["image"]).size != tuple(meta["size"][::-1]):
        return [f"image, instance {inst.shape} and meta size {meta['size']} disagree"]
    f = _single_facts(meta, inst)
    objs, cats = f["objs"], f["cats"]
    z = lambda o: (o["cube"][0][2] + o["cube"][1][2]) / 2
    bad = []
    for t, turn in enumerate(meta["turns"]):
        a, kind, where = conv[2 * t + 1]["value"], turn["kind"], f"turn {t} ({turn['kind']})"
        if kind in ("caption", "long_description"):
            bad += _listed(a.split(". ")[0], f["visible"], f["hidden"], where)
            shown = {o["id"] for o in f["visible"]}
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
        elif kind == "count":
            c = cats.get(turn["category"], {"visible": [], "sliver": []})
            m = re.match(r"There (?:is|are) (\w+) ", a)
            colours = sorted(objs[i]["colour"] for i in c["visible"] if i in objs and objs[i]["colour"])
            if c["sliver"] or not m or WORDS.get(m.group(1), -1) != len(c["visible"]):
                bad.append(f"{where}: {len(c['visible'])} visible, {len(c['sliver'])} slivers; answer {a!r}")
            elif sorted(re.findall(r"an? (\w+) one", a)) != (colours if meta["source"] == "synthetic" else []):
                bad.append(f"{where}: colours in {a!r} are not {colours}")
        elif kind == "colour":
            c = cats.get(turn["category"], {"visible": [], "sliver": []})
            right = len(c["visible"]) == 1 and not c["sliver"]
            if not right or a != f"The {turn['category']} is {objs[c['visible'][0]]['colour']}.":
                bad.append(f"{where}: not the one visible {turn['category']}'s colour")
        elif kind == "exists":
            c = cats.get(turn["category"], {"visible": [], "sliver": []})
            if "colour" in turn:
                hit = [i for i in c["visible"] + c["sliver"] if objs[i]["colour"] == turn["colour"]]
                truth = "No" if not hit and c["visible"] else None
            else:
                truth = "Yes" if c["visible"] else "No" if not c["sliver"] else None
            stats[str(truth)] = stats.get(str(truth), 0) + 1
            if truth is None or not a.startswith(truth):
                bad.append(f"{where}: answer {a[:20]!r}, ground truth {truth}")
        elif kind == "support":
            o = objs[turn["object"]]
            where_on = "the floor" if o["on"] is None else f"the {objs[o['on']]['name']}"
            if a != f"The {o['name']} stands on {where_on}.":
                bad.append(f"{where}: the {o['name']} stands on {where_on}")
        elif kind == "position":
            H, W = inst.shape
            rows, cols = np.nonzero(inst == turn["object"])
            u, v = (cols.mean() + 0.5) / W, (rows.mean() + 0.5) / H
            col, row = min(int(u * 3), 2), min(int(v * 3), 2)
            near = min(abs(x - b) for x in (u, v) for b in (1 / 3, 2 / 3))
            names = ("left", "centre", "right"), ("upper", "middle", "lower")
            word = ("centre" if (col, row) == (1, 1) else names[0][col] if row == 1 else names[1][row] if col == 1
                    else f"{names[1][row]} {names[0][col]}")
            if near < 0.03 or f" in the {word} part of the image" not in a:
                bad.append(f"{where}: the centroid ({u:.3f}, {v:.3f}) is in the {word} part (margin {near:.3f})")
        elif kind == "height":
            o = objs[turn["object"]]
            bad += _numbers(a, [(o["cube"][1][1] - o["cube"][0][1], 2)], where)
    return bad


# ----------------------------------------------------------------------------------------------------------------
# Pairs of views (multiview.py): co-visibility, object states per view, camera motion and every answer, with this
# file's own projection (inverse K, world round trip).


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


def _state(depth_to, uv, z) -> list:
    """'seen' | 'outside' | 'hidden' | 'unknown' of points at uv (n, 2) with depth z (n,) in the other view."""
    H, W = depth_to.shape
    out = []
    for (u, v), zz in zip(uv, z):
        if not (0 <= u < W and 0 <= v < H):
            out.append("outside")
            continue
        there = depth_to[int(v), int(u)]
        out.append("unknown" if there <= 0 else "hidden" if there < zz - 0.03 - 0.03 * zz else "seen")
    return out


def _covis(va, da, vb, db, stride) -> float:
    H, W = da.shape
    rows, cols = np.mgrid[stride // 2:H:stride, stride // 2:W:stride].reshape(2, -1)
    px = np.c_[cols, rows][da[rows, cols] > 0]
    _, cam_b, uv = _pixels_to(va, da, vb, px)
    u, v, z = uv[:, 0], uv[:, 1], cam_b[:, 2]
    with np.errstate(invalid="ignore"):
        ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    there = np.zeros(len(px))
    there[ok] = db[v[ok].astype(int), u[ok].astype(int)]
    return float(np.mean(ok & (there > 0) & (there >= z - 0.03 - 0.03 * z)))


def _view_states(view: dict, inst: np.ndarray, synthetic: bool) -> dict:
    """name -> 'visible' | 'absent' | 'unclear' in one view."""
    labels = {int(i): c for i, c in view["labels"].items()}
    px = lambda i: int((inst == i).sum())
    if synthetic:
        return {o["name"]: ("visible" if px(o["id"]) >= view["min_pixels"] else "absent" if px(o["id"]) == 0
                            else "unclear") for o in view["objects"]}
    named = {o["name"]: o for o in view["objects"] if o["name"] == o["category"]}
    out = {}
    for c in set(labels.values()):
        seen = [i for i, l in labels.items() if l == c and px(i) > 0]
        ok = len(seen) == 1 and c in named and px(named[c]["id"]) >= view["min_pixels"]
        out[c] = "visible" if ok else "absent" if not seen else "unclear"
    return out


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
        side = "left" if yaw > 0 else "right"
        ok = bool(m) and abs(int(m.group(1)) - abs(yaw)) <= 0.5 + 1e-6 and m.group(2) == side
    return [] if ok else [f"{where}: the camera turned {yaw:.2f} degrees (+ = left); answer {text!r}"]


def check_pair(rec: dict, out: Path, stats: dict) -> list:
    meta, conv = rec["meta"], rec["conversations"]
    V = meta["views"]
    if len(conv) % 2 or [m["from"] for m in conv] != ["human", "gpt"] * (len(conv) // 2):
        return ["expected human/gpt pairs"]
    if (not conv[0]["value"].startswith("<image>\n<image>\n") or sum(m["value"].count("<image>") for m in conv) != 2
            or rec["image"] != [v["image"] for v in V]):
        return ["two images, both named in the first human turn ('<image>\\n<image>\\n')"]
    depth = [load_depth(out / v["depth"]) for v in V]
    inst = [np.asarray(Image.open(out / v["instance"])).astype(np.int64) for v in V]
    for v, d, i in zip(V, depth, inst):
        rgb = Image.open(out / v["image"]).size[::-1]
        if list(d.shape) != v["size"] or list(i.shape) != v["size"] or list(rgb) != v["size"]:
            return [f"a view's image, depth {d.shape}, instance {i.shape} and size {v['size']} disagree"]
    bad, posed = [], all(v["cam_to_world"] is not None for v in V)
    if posed:
        covis = [_covis(V[a], depth[a], V[1 - a], depth[1 - a], meta["covis_stride"]) for a in (0, 1)]
        if meta["covis"] is None or np.abs(np.subtract(covis, meta["covis"])).max() > 0.002:
            bad.append(f"co-visibility {covis} != meta {meta['covis']}")
        elif meta["feature_distance"] is None and not meta["band"][0] <= covis[0] <= meta["band"][1]:
            bad.append(f"co-visibility {covis[0]:.3f} outside the band {meta['band']}")
    synthetic = meta["source"] == "synthetic"
    st = [_view_states(v, i, synthetic) for v, i in zip(V, inst)]
    state = lambda n, k: st[k].get(n, "absent")
    cube = lambda n, k: next(o["cube"] for o in V[k]["objects"] if o["name"] == n)
    for n in meta["absent"]:
        if state(n, 0) != "absent" or state(n, 1) != "absent":
            bad.append(f"'absent' {n} is {state(n, 0)} / {state(n, 1)} in the views")
    both = sorted((n for n in st[0] if state(n, 0) == state(n, 1) == "visible"),
                  key=lambda n: cube(n, 0)[0][0] + cube(n, 0)[1][0])
    zc = lambda n, k: (cube(n, k)[0][2] + cube(n, k)[1][2]) / 2
    nearer = lambda n: 2 if abs(zc(n, 0) - zc(n, 1)) < TIE_CENTRE else int(zc(n, 1) < zc(n, 0))
    t, yaw = _motion(*V) if posed else (None, None)
    points = [np.array([p["px"]]) for p in meta["points"]]
    P = lambda k: f"({coord(meta['points'][k]['uv'][0])}, {coord(meta['points'][k]['uv'][1])})"
    for j, turn in enumerate(meta["turns"]):
        q, a, tk, where = conv[2 * j]["value"], conv[2 * j + 1]["value"], turn["kind"], f"turn {j} ({turn['kind']})"
        if tk == "common":
            ok = a == "No object is clearly visible in both views." if not both else a.startswith("Both views show")
            named = [n for n in st[0] if re.search(rf"\b(a|an) {re.escape(n)}\b", a)]
            if not ok or sorted(named) != sorted(both) or sorted(named, key=a.index) != both:
                bad.append(f"{where}: objects in both views are {both}; answer {a!r}")
        elif tk in ("closer", "choice_closer") and state(turn["object"], 0) == state(turn["object"], 1) == "visible":
            n, out_ = turn["object"], nearer(turn["object"])
            if tk == "closer":
                if not a.startswith(["View 1", "View 2", "About the same"][out_]):
                    bad.append(f"{where}: verdict should be {['view 1', 'view 2', 'about the same'][out_]}")
                bad += _numbers(a, [(zc(n, 0), 2), (zc(n, 1), 2)], where)
            else:
                bad += _choice(q, a, ["view 1", "view 2", "about the same in both"][out_], where)
        elif tk in ("closer", "choice_closer"):
            bad.append(f"{where}: the {turn['object']} is not visible in both views")
        elif tk == "motion":
            words = re.findall(r"(\d+\.\d+) m (?:to the )?(right|left|forward|backward|up|down)", a)
            signs = {"right": 1, "left": -1, "forward": 1, "backward": -1, "up": 1, "down": -1}
            got = {w: float(x) * signs[w] for x, w in words}
            axes = [got.get("right", got.get("left")), got.get("up", got.get("down")),
                    got.get("forward", got.get("backward"))]
            if None in axes or any(abs(g - v) > 0.005 + 1e-6 for g, v in zip(axes, t)):
                bad.append(f"{where}: motion {np.round(t, 3).tolist()} (X, Y, Z); answer {a!r}")
            bad += _degrees(a, yaw, where)
        elif tk == "exists":
            n, k = turn["object"], turn["view"]
            truth = {"visible": "Yes", "absent": "No"}.get(state(n, k))
            stats[str(truth)] = stats.get(str(truth), 0) + 1
            if truth is None or not a.startswith(truth) or (truth == "No" and f"no {n}" not in a):
                bad.append(f"{where}: the {n} is {state(n, k)} in view {k + 1}; answer {a!r}")
        elif tk == "premise":
            n, k = turn["object"], turn["view"]
            if state(n, 0) != "absent" or state(n, 1) != "absent" or n in a.replace(f"no {n}", ""):
                bad.append(f"{where}: a false premise about the {n} ({state(n, 0)} / {state(n, 1)}) must be denied")
            m = re.search(r"only the ([\w ]+?) is there", a)
            if m and state(m.group(1), k) != "visible":
                bad.append(f"{where}: the {m.group(1)} is not visible in view {k + 1}")
        elif tk == "premise_one":
            n, k = turn["object"], turn["view"]
            if state(n, k) != "visible" or state(n, 1 - k) != "absent" or not a.startswith(f"Only view {k + 1}"):
                bad.append(f"{where}: the {n} is {state(n, 0)} / {state(n, 1)}; answer {a!r}")
        elif tk == "choice_common":
            right = [o for o in turn["options"] if o[4:] in both]
            unclear = [o for o in turn["options"] if "unclear" in (state(o[4:], 0), state(o[4:], 1))]
            if len(right) != 1 or unclear:
                bad.append(f"{where}: options {turn['options']} need exactly one object seen in both, none unclear")
            else:
                bad += _choice(q, a, right[0], where)
        elif tk == "choice_direction":
            x, z = abs(t[0]), abs(t[2])
            if max(x, z) < 0.2 or max(x, z) < 1.5 * min(x, z):
                bad.append(f"{where}: no dominant direction in {np.round(t, 2).tolist()}")
            else:
                word = DIRECTIONS[int(t[0] > 0) if x > z else 2 + int(t[2] < 0)]
                bad += _choice(q, a, word, where)
        elif tk == "match":
            k = turn["point"]
            s = meta["points"][k]["view"]
            cam, cam_to, uv = _pixels_to(V[s], depth[s], V[1 - s], points[k])
            said = _state(depth[1 - s], uv, cam_to[:, 2])[0]
            H, W = depth[1 - s].shape
            Q = [(uv[0, 0] / W, 3), (uv[0, 1] / H, 3)]
            if P(k) not in q:
                bad.append(f"{where}: the question does not name point {P(k)}")
            if said == "seen" and a.startswith("It appears at"):
                bad += _numbers(a, Q + [(cam_to[0, 2], 2), (cam[0, 2], 2)], where)
            elif said == "hidden" and a.startswith("It is hidden"):
                bad += _numbers(a, Q + [(cam_to[0, 2], 2), (depth[1 - s][int(uv[0, 1]), int(uv[0, 0])], 2)], where)
            elif not ((said == "outside" and a.startswith("It is outside")) or (said == "unknown" and "no depth" in a)):
                bad.append(f"{where}: view {2 - s} {said} the point; answer {a!r}")
        elif tk == "position_across":
            k = turn["point"]
            s = meta["points"][k]["view"]
            cam, cam_to, _ = _pixels_to(V[s], depth[s], V[1 - s], points[k])
            R = [np.array(v["answer_from_camera"]) for v in V]
            bad += _numbers(a, [(x, 2) for x in R[1 - s] @ cam_to[0]] + [(x, 2) for x in R[s] @ cam[0]], where)
        elif tk == "relation_across":
            A, B = turn["objects"]
            spec = RELATIONS[turn["relation"]]
            said = re.findall(rf"In view (\d) the {re.escape(A)} is ({'|'.join(spec['words'])}) the {re.escape(B)} ", a)
            expected = []
            for k in (0, 1):
                if state(A, k) != "visible" or state(B, k) != "visible":
                    bad.append(f"{where}: {A} / {B} not visible in view {k + 1}")
                    break
                out_, va, vb, _ = relation(turn["relation"], cube(A, k), cube(B, k))
                expected += [(va, 2), (vb, 2)]
                if (str(k + 1), spec["words"][out_]) not in said:
                    bad.append(f"{where}: in view {k + 1} the {A} is {spec['words'][out_]} the {B}")
            else:
                bad += _numbers(a, expected, where)
        elif tk == "camera_motion":
            bad += _numbers(a, [(x, 2) for x in t] + [(np.linalg.norm(t), 2)], where) + _degrees(a, yaw, where)
        elif tk == "distance_across":
            R = [np.array(v["answer_from_camera"]) for v in V]
            here, there, Q = [], [], []
            for k in turn["points"]:
                cam, cam_to, uv = _pixels_to(V[0], depth[0], V[1], points[k])
                if _state(depth[1], uv, cam_to[:, 2])[0] != "seen":
                    bad.append(f"{where}: point {P(k)} is not seen in view 2")
                here.append(R[0] @ cam[0])
                there.append(R[1] @ cam_to[0])
                H, W = depth[1].shape
                Q += [(uv[0, 0] / W, 3), (uv[0, 1] / H, 3)]
            named = [(v, 3) for k in turn["points"] for v in meta["points"][k]["uv"]] + Q
            bad += _numbers(q, named, where + " question")
            d = np.linalg.norm(here[0] - here[1])
            bad += _numbers(a, [(x, 2) for p in here + there for x in p] + [(d, 2)], where)
            if abs(np.linalg.norm(there[0] - there[1]) - d) > 1e-3:
                bad.append(f"{where}: the distance differs between the views' frames")
        else:
            bad.append(f"{where}: unknown turn kind")
    return bad


def _choice(q: str, a: str, right: str, where: str) -> list:
    """A multiple-choice answer 'L. option' must pick the option that is right, as the question lists it."""
    options = dict(re.findall(r"\n([A-D])\. ([^\n]+)", q))
    m = re.match(r"([A-D])\. (.+)$", a)
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
    inst = np.asarray(Image.open(out / meta["instance"])).astype(np.int64)
    sem = np.asarray(Image.open(out / meta["semantic"])).astype(np.int64) if meta.get("semantic") else None
    H, W = inst.shape
    names = {o["id"]: o["name"] for o in meta["objects"]}
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


def check(out, limit: int | None = None) -> tuple:
    """Check every sample of out/data.jsonl -> (problems [str], stats {name: count})."""
    out, problems, stats = Path(out), [], {"samples": 0}
    checkers = {"spatial": check_spatial, "captions": check_single, "instruct": check_single, "grounding": check_grounding,
                "multiview": check_pair, "spatial-multiview": check_pair}
    with open(out / "data.jsonl") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                break
            rec = json.loads(line)
            stats["samples"] += 1
            try:
                checker = checkers[rec["meta"].get("kind", "spatial")]
                problems += [f"{rec['id']}: {p}" for p in checker(rec, out, stats)]
            except (KeyError, OSError, ValueError, IndexError, StopIteration) as e:
                problems.append(f"{rec.get('id', f'line {n + 1}')}: unreadable sample ({type(e).__name__}: {e})")
    return problems, stats
