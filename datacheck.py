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
"""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from data import CLOSER_WORDS, LEVEL_COUNTS, PIXEL_KINDS, RELATIONS, TIE_DEPTH, cited, cube_distance, f3, relation
from scenes import CATEGORIES
from views import load_depth

NUMBER = re.compile(r"-?\d+\.\d+")


def _numbers(text: str, expected: list, where: str) -> list:
    """Compare the decimals in text with expected [(value, decimals)]: a correct rounding is within half a unit."""
    got = [float(x) for x in NUMBER.findall(text)]
    if len(got) != len(expected) or any(abs(g - v) > 0.5 * 10 ** -k + 1e-6 for g, (v, k) in zip(got, expected)):
        return [f"{where}: numbers {got} != expected {[round(float(v), k) for v, k in expected]}"]
    return []


def check_sample(rec: dict, out: Path, stats: dict) -> list:
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
    P = lambda k: f"({f3(uv[k, 0])}, {f3(uv[k, 1])})"
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


def check(out, limit: int | None = None) -> tuple:
    """Check every sample of out/data.jsonl -> (problems [str], stats {name: count})."""
    out, problems, stats = Path(out), [], {"samples": 0}
    with open(out / "data.jsonl") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                break
            rec = json.loads(line)
            stats["samples"] += 1
            try:
                problems += [f"{rec['id']}: {p}" for p in check_sample(rec, out, stats)]
            except (KeyError, OSError, ValueError, IndexError) as e:
                problems.append(f"{rec.get('id', f'line {n + 1}')}: unreadable sample ({type(e).__name__}: {e})")
    return problems, stats
