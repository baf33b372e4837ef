"""
Data: the spatial conversations SpatialBoost trains on, and the writer every kind of data goes through (the
generators of the other kinds are instruct.py and multiview.py, the checker is datacheck.py, and the training
Dataset / collate live in loader.py, re-exported here as data.ConversationDataset, data.collate, data.LoaderReport).

    python data.py spatial --n 1000 --out data/spatial --workers 2        # built-in synthetic rooms (exact geometry)
    python data.py spatial --n 200 --out data/mine --rgbd my_frames/      # real RGB-D frame folders (scenes.py format)
    python data.py captions --n 1000 --out data/captions                  # stage 1: image + caption
    python data.py instruct --n 1000 --out data/instruct                  # stage 2: single-view instruction QA
    python data.py multiview --n 1000 --out data/multiview                # stage 2: two views, VQA
    python data.py spatial-multiview --n 1000 --out data/spatial-mv       # stage 3: two views, spatial turns
    python data.py check data/spatial                                     # recompute every answer from ground truth

One spatial sample = one image and 12 question/answer pairs built from its 3D ground truth, pixel -> object -> scene:
5 pixel-level (depth at a point, its 3D position, which of two points is closer, the displacement between two
points), 4 object-level (left/right, in front/behind, above/below, taller/wider/bigger; each answer cites the
pixel-level points that fell on those objects), 1 scene-level (distance between two objects, centre to centre and
between their closest surfaces) and 2 captions. Conventions: pixel coordinates are (u/W, v/H), origin top-left, 3
decimals; depth is z-depth in meters; every 3D answer is in the viewer-centred, gravity-aligned answer frame of
views.py (X right, Y up, Z forward along the horizontal viewing direction; meters, 2 decimals); relations compare
bounding-cube centres (or extents for sizes) and call near-ties ties rather than forcing an answer.

A sample's answers are computed from its ground truth exactly as stored (depth in millimetres, rounded K and
rotation), so `check` can recompute them from the files alone. Every kind is deterministic for a seed whatever
--workers, resumable (atomic shards), and refuses to mix with other options or another kind in one directory.
"""

import argparse
import io
import json
import multiprocessing as mp
import os
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import scenes
import views
from views import View

LEVEL_COUNTS = {"pixel": 5, "object": 4, "scene": 1, "caption": 2}
TIE_DEPTH = 0.05     # m: points whose depths differ by less are "at about the same depth"
TIE_CENTRE = 0.10    # m: cube centres closer than this along an axis are level
TIE_RATIO = 1.10     # sizes within this ratio of each other are "about as tall / wide / big"

# Object relations: words = (A less than B, A more than B, a tie) along an answer-frame axis (cube centres) or a
# measure (cube extents); "ask" = yes/no questions about words[0] / words[1]; "which" = questions wanting them.
RELATIONS = {
    "left_right": dict(
        axis=0, cite="X", words=("to the left of", "to the right of", "roughly level, left to right, with"),
        ask=(["Is the {a} to the left of the {b}?", "From the camera's viewpoint, is the {a} left of the {b}?"],
             ["Is the {a} to the right of the {b}?", "Does the {a} appear to the right of the {b}?"]),
        which=(["Which is further to the left, the {a} or the {b}?", "Which of the {a} and the {b} is further left?"],
               ["Which is further to the right, the {a} or the {b}?", "Which of the two is further right, the {a} or "
                "the {b}?"])),
    "front_behind": dict(
        axis=2, cite="depth", words=("in front of", "behind", "about as far away as"),
        ask=(["Is the {a} in front of the {b}?", "Is the {a} closer to the camera than the {b}?"],
             ["Is the {a} behind the {b}?", "Is the {a} farther from the camera than the {b}?"]),
        which=(["Which is nearer to the camera, the {a} or the {b}?", "Which is in front, the {a} or the {b}?"],
               ["Which is farther back, the {a} or the {b}?", "Which of the {a} and the {b} is further away?"])),
    "above_below": dict(
        axis=1, cite="Y", words=("below", "above", "at about the same height as"),
        ask=(["Is the {a} below the {b}?", "Is the {a} lower than the {b}?"],
             ["Is the {a} above the {b}?", "Is the {a} higher up than the {b}?"]),
        which=(["Which is lower, the {a} or the {b}?", "Which of the {a} and the {b} sits lower?"],
               ["Which is higher, the {a} or the {b}?", "Which of the {a} and the {b} is higher up?"])),
    "taller": dict(
        measure="height", words=("shorter than", "taller than", "about as tall as"),
        ask=(["Is the {a} shorter than the {b}?", "Is the {a} less tall than the {b}?"],
             ["Is the {a} taller than the {b}?", "Does the {a} stand taller than the {b}?"]),
        which=(["Which is shorter, the {a} or the {b}?", "Which of the {a} and the {b} is shorter?"],
               ["Which is taller, the {a} or the {b}?", "Which of the {a} and the {b} is taller?"])),
    "wider": dict(
        measure="width", words=("narrower than", "wider than", "about as wide as"),
        ask=(["Is the {a} narrower than the {b}?", "Does the {a} look narrower than the {b}?"],
             ["Is the {a} wider than the {b}?", "Is the {a} broader than the {b}, left to right?"]),
        which=(["Which is narrower, the {a} or the {b}?", "Which of the {a} and the {b} is narrower?"],
               ["Which is wider, the {a} or the {b}?", "Which of the {a} and the {b} is wider?"])),
    "bigger": dict(
        measure="volume", words=("smaller than", "bigger than", "about as big as"),
        ask=(["Is the {a} smaller than the {b}?", "Does the {a} take up less space than the {b}?"],
             ["Is the {a} bigger than the {b}?", "Is the {a} larger than the {b}?"]),
        which=(["Which is smaller, the {a} or the {b}?", "Which of the {a} and the {b} is smaller?"],
               ["Which is bigger, the {a} or the {b}?", "Which of the {a} and the {b} is larger?"])),
}
CLOSER_WORDS = ("closer than", "farther than", "at about the same depth as")
FORMS = ("yesno", "which")      # a question asks "is A <words[want]> B?" or "which is <words[want]>, A or B?"
PIXEL_KINDS = ("depth", "position", "closer", "displacement")
Q = {
    "depth": ["What is the depth at {p}?", "How far from the camera, along the viewing axis, is the point {p}?",
              "Estimate the depth of pixel {p} in meters.", "What depth does the point at {p} have?"],
    "position": ["What are the 3D coordinates of the point at {p}?",
                 "Where is the point {p} in 3D, relative to the camera?",
                 "Give the 3D position of {p} (X right, Y up, Z forward, in meters).", "Locate pixel {p} in 3D space."],
    "closer": [(["Is {p} closer to the camera than {q}?", "Is the point {p} nearer than {q}?"],
                ["Is {p} farther from the camera than {q}?", "Is the point {p} further away than {q}?"]),
               (["Which point is closer to the camera, {p} or {q}?", "Of {p} and {q}, which is nearer?"],
                ["Which point is farther away, {p} or {q}?", "Of {p} and {q}, which is farther?"])],
    "displacement": ["What is the 3D displacement from {p} to {q}?", "Give the vector from {p} to {q} in meters.",
                     "How do you get from the point {p} to the point {q} in 3D?"],
    "distance": ["How far apart are the {a} and the {b}?", "What is the distance between the {a} and the {b}?",
                 "How much space is there between the {a} and the {b}?"],
    "caption_list": ["Describe the image briefly.", "What does this image show?",
                     "Give a short caption for this picture."],
    "caption_depth": ["List the objects from nearest to farthest.", "Describe how the objects are arranged in depth.",
                      "Which objects are closest to the camera, and which are farther?"],
    "caption_user": ["Describe the image in other words.", "Describe the picture once more, differently."],
}


def f2(x) -> str:
    return f"{round(float(x), 2) + 0.0:.2f}"    # + 0.0 turns -0.00 into 0.00


def f3(x) -> str:
    return f"{round(float(x), 3) + 0.0:.3f}"


def article(name: str) -> str:
    return "the " + name if name.endswith(" from the left") else ("an " if name[0] in "aeiou" else "a ") + name


def listing(items) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------------------------
# Relations between objects, from their cubes.


def cited(on: np.ndarray, obj: int) -> list:
    """The pixel-level points an object-level answer cites for obj: the first two that fell on it."""
    return [k for k in range(len(on)) if on[k] == obj][:2]


def relation(kind: str, a, b):
    """(outcome: 0 = words[0], 1 = words[1], 2 = tie; value for a; value for b; margin) of two cubes [min, max]."""
    spec = RELATIONS[kind]
    a, b = np.array(a), np.array(b)
    if "axis" in spec:
        va, vb = (a.sum(0) / 2)[spec["axis"]], (b.sum(0) / 2)[spec["axis"]]
        return (2 if abs(va - vb) < TIE_CENTRE else int(va > vb)), va, vb, abs(va - vb)
    ea, eb = a[1] - a[0], b[1] - b[0]
    va, vb = {"height": (ea[1], eb[1]), "width": (ea[0], eb[0]), "volume": (ea.prod(), eb.prod())}[spec["measure"]]
    return (2 if max(va, vb) < TIE_RATIO * min(va, vb) else int(va > vb)), va, vb, abs(va - vb)


def cube_distance(a, b):
    """Centre-to-centre distance and the gap between the closest points of two cubes (0 when they touch)."""
    a, b = np.array(a), np.array(b)
    gap = np.maximum(0, np.maximum(a[0] - b[1], b[0] - a[1]))
    return float(np.linalg.norm(a.sum(0) / 2 - b.sum(0) / 2)), float(np.linalg.norm(gap))


# ----------------------------------------------------------------------------------------------------------------
# The 12-turn conversation. A turn is (level, question, answer, record); the record (meta "turns") says which
# points / objects it is about and what was asked, which is all datacheck.py needs to recompute the answer.


def conversation(view: View, inside: np.ndarray, rng: np.random.Generator, order: str = "forward"):
    """-> (conversations [{"from", "value"}] x 24, levels x 12, points [{"px", "uv"}], turn records x 12)."""
    H, W = view.depth.shape
    pick = lambda options: options[int(rng.integers(len(options)))]
    # up to 4 focus objects; the 4 object turns and the scene turn ask about pairs spread over them
    focus = [int(i) for i in rng.permutation(views.candidates(view, inside))[:4]]
    uses = dict.fromkeys(focus, 0)

    def least_used(exclude=None):
        pool = [f for f in focus if f != exclude]
        f = pick([f for f in pool if uses[f] == min(uses[g] for g in pool)])
        uses[f] += 1
        return f

    object_kinds = ["left_right", "front_behind", "above_below", pick(["taller", "wider", "bigger"])]
    pairs = [(a, least_used(a)) for a in (least_used() for _ in object_kinds)]
    # the pixel-level points land on those objects: "closer" on the front/behind pair, "displacement" on the
    # above/below pair, single points on objects not covered yet
    pixel_kinds = sorted(list(PIXEL_KINDS) + [pick(PIXEL_KINDS)], key=PIXEL_KINDS.index)
    two = {"closer": [pairs[1], pairs[3]], "displacement": [pairs[2], pairs[0]]}
    wanted = [list(two[k].pop(0)) if k in two else None for k in pixel_kinds]
    covered = {o for w in wanted if w for o in w}
    for k, w in enumerate(wanted):
        if w is None:
            rest = [f for f in focus if f not in covered]
            wanted[k] = [rest[0] if rest else pick(focus)]
            covered.add(wanted[k][0])
    flat = np.nonzero(inside.reshape(-1))[0]
    owner = view.instance.reshape(-1)[flat]
    px, taken = [], np.zeros((H, W), bool)        # points keep 2 pixels apart when the object allows it
    for o in (o for w in wanted for o in w):
        pool = flat[owner == o]
        free = pool[~taken.reshape(-1)[pool]]
        pool = free if len(free) else pool
        r, c = divmod(int(pool[rng.integers(len(pool))]), W)
        taken[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = True
        px.append((c, r))
    px = np.array(px)
    facts = dict(P=[f"({f3((c + 0.5) / W)}, {f3((r + 0.5) / H)})" for c, r in px], on=view.instance[px[:, 1], px[:, 0]],
                 names={o["id"]: o["name"] for o in view.objects}, cubes={o["id"]: o["cube"] for o in view.objects})
    facts["d"], facts["xyz"] = views.point_facts(view, px)
    turns, n = [], 0
    for kind, objs in zip(pixel_kinds, wanted):
        turns.append(pixel_turn(kind, list(range(n, n + len(objs))), facts, rng, pick))
        n += len(objs)
    turns += [object_turn(kind, a, b, facts, rng, pick) for kind, (a, b) in zip(object_kinds, pairs)]
    a = least_used()
    turns.append(scene_turn(a, least_used(a), facts, pick))
    turns += caption_turns(view, facts, pick)
    if order == "reversed":
        turns = [t for level in ("caption", "scene", "object", "pixel") for t in turns if t[0] == level]
    elif order == "shuffled":
        turns = [turns[k] for k in rng.permutation(len(turns))]
    elif order != "forward":
        raise ValueError(f"order {order!r}: expected forward, reversed or shuffled")
    conv = []
    for k, (_, q, a, _) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    points = [dict(px=[int(c), int(r)], uv=[round((c + 0.5) / W, 3), round((r + 0.5) / H, 3)]) for c, r in px]
    return conv, [t[0] for t in turns], points, [t[3] for t in turns]


def pixel_turn(kind: str, idx: list, facts: dict, rng, pick) -> tuple:
    P, d, xyz = facts["P"], facts["d"], facts["xyz"]
    i, j = idx[0], idx[-1]
    rec = dict(kind=kind, points=idx)
    if kind == "depth":
        a = pick([f"The depth at {P[i]} is {f2(d[i])} m.", f"{P[i]} lies at a depth of {f2(d[i])} m.",
                  f"The point {P[i]} is {f2(d[i])} m from the camera along the viewing axis."])
        return "pixel", pick(Q["depth"]).format(p=P[i]), a, rec
    if kind == "position":
        x, y, z = (f2(v) for v in xyz[i])
        a = pick([f"The point {P[i]} is at ({x}, {y}, {z}) m.", f"{P[i]} is at X = {x} m, Y = {y} m, Z = {z} m.",
                  f"In the viewer's frame (X right, Y up, Z forward), {P[i]} is at ({x}, {y}, {z}) m."])
        return "pixel", pick(Q["position"]).format(p=P[i]), a, rec
    if kind == "closer":
        form, want = int(rng.integers(2)), int(rng.integers(2))      # yes/no or which; about "closer" or "farther"
        out = 2 if abs(d[i] - d[j]) < TIE_DEPTH else int(d[i] > d[j])
        if form == 0:      # the verdict keeps the question's order; Yes / No / Not clearly answers it
            s, o, rel, prefix = i, j, out, ["No, ", "Yes, ", "Not clearly: "][2 if out == 2 else int(out == want)]
        else:              # the verdict names the point that has the asked-about property first
            s, o = (i, j) if out in (2, want) else (j, i)
            rel, prefix = (2, "Neither: ") if out == 2 else (want, "")
        a = (f"{prefix}{P[s]} is {CLOSER_WORDS[rel]} {P[o]}: depths {f2(d[s])} m and {f2(d[o])} m, "
             f"a difference of {f2(abs(d[s] - d[o]))} m.")
        return "pixel", pick(Q["closer"][form][want]).format(p=P[i], q=P[j]), a, dict(rec, form=FORMS[form], want=want)
    v, dist = [f2(c) for c in xyz[j] - xyz[i]], f2(np.linalg.norm(xyz[j] - xyz[i]))
    a = pick([f"From {P[i]} to {P[j]} the displacement is ({v[0]}, {v[1]}, {v[2]}) m, a distance of {dist} m.",
              f"Going from {P[i]} to {P[j]} means moving ({v[0]}, {v[1]}, {v[2]}) m (X right, Y up, Z forward), "
              f"{dist} m in all."])
    return "pixel", pick(Q["displacement"]).format(p=P[i], q=P[j]), a, rec


def object_turn(kind: str, a: int, b: int, facts: dict, rng, pick) -> tuple:
    """A relation between objects a and b from their cubes, citing the pixel-level points that fell on them."""
    spec, names, cubes = RELATIONS[kind], facts["names"], facts["cubes"]
    P, d, xyz = facts["P"], facts["d"], facts["xyz"]
    A, B = names[a], names[b]
    out, va, vb, margin = relation(kind, cubes[a], cubes[b])
    form, want = int(rng.integers(2)), int(rng.integers(2))
    if form == 0:
        s, o, rel, prefix = a, b, out, ["No. ", "Yes. ", "Not clearly. "][2 if out == 2 else int(out == want)]
    else:
        s, o = (a, b) if out in (2, want) else (b, a)
        rel, prefix = (2, "Neither. ") if out == 2 else (want, "")
    value = {"X": lambda k: f" is at X = {f2(xyz[k, 0])} m", "Y": lambda k: f" is at Y = {f2(xyz[k, 1])} m",
             "depth": lambda k: f" has depth {f2(d[k])} m"}.get(spec.get("cite"), lambda k: "")
    cites = [f"{P[k]}{' on' if 'cite' in spec else ' is on'} the {names[x]}{value(k)}"
             for x in (a, b) for k in cited(facts["on"], x)]
    text = prefix
    if cites:
        text += pick(["Points on them: ", "From the points measured on them: ", "Evidence from the pixels: "])
        text += "; ".join(cites) + ". "
    if "axis" in spec:
        axis = "XYZ"[spec["axis"]]
        text += f"The {A}'s centre is at {axis} = {f2(va)} m and the {B}'s at {axis} = {f2(vb)} m. "
    elif spec["measure"] == "volume":
        ea, eb = (" x ".join(f2(v) for v in np.subtract(*cubes[x][::-1])) for x in (a, b))
        text += f"The {A} measures {ea} m (width x height x depth) and the {B} {eb} m. "
    else:
        text += f"The {A} is {f2(va)} m {'tall' if spec['measure'] == 'height' else 'wide'} and the {B} {f2(vb)} m. "
    by = f" by {f2(margin)} m" if rel != 2 and spec.get("measure") != "volume" else ""
    text += f"{pick(['So', 'Hence', 'Therefore'])} the {names[s]} is {spec['words'][rel]} the {names[o]}{by}."
    q = pick(spec["ask" if form == 0 else "which"][want]).format(a=A, b=B)
    return "object", q, text, dict(kind=kind, objects=[a, b], form=FORMS[form], want=want)


def scene_turn(a: int, b: int, facts: dict, pick) -> tuple:
    names, cubes = facts["names"], facts["cubes"]
    centre, gap = cube_distance(cubes[a], cubes[b])
    ca, cb = (", ".join(f2(v) for v in np.sum(cubes[x], 0) / 2) for x in (a, b))
    text = pick([f"The {names[a]}'s centre is at ({ca}) m and the {names[b]}'s at ({cb}) m: they are {f2(centre)} m "
                 f"apart centre to centre, and their closest surfaces are {f2(gap)} m apart.",
                 f"Centre to centre: ({ca}) m for the {names[a]} and ({cb}) m for the {names[b]}, "
                 f"{f2(centre)} m apart; between their closest surfaces there are {f2(gap)} m."])
    return "scene", pick(Q["distance"]).format(a=names[a], b=names[b]), text, dict(kind="distance", objects=[a, b])


def caption_turns(view: View, facts: dict, pick) -> list:
    """The objects that are visible, left to right (with the room), and near to far (with what each stands on, from
    the scene graph); a user's captions replace them when the RGB-D folder has some."""
    names, (H, W) = facts["names"], view.depth.shape
    counts = np.bincount(view.instance.reshape(-1), minlength=max(names) + 1)
    visible = [o for o in view.objects if counts[o["id"]] >= views.min_pixels(H, W)]
    items = listing([article(o["name"]) for o in sorted(visible, key=lambda o: o["cube"][0][0] + o["cube"][1][0])])
    if view.captions:
        first = ("caption", pick(Q["caption_list"]), view.captions[0], dict(kind="caption_user"))
    else:
        text = pick([f"A room with {view.room}, holding {items}.", f"An indoor scene with {view.room}: {items}.",
                     f"{items[0].upper()}{items[1:]} in a room with {view.room}."] if view.room else
                    [f"A scene with {items}.", f"{items[0].upper()}{items[1:]}."])
        first = ("caption", pick(Q["caption_list"]), text, dict(kind="caption_list"))
    if len(view.captions) > 1:
        return [first, ("caption", pick(Q["caption_user"]), view.captions[1], dict(kind="caption_user"))]
    shown = {o["id"] for o in visible}
    near = [f"the {o['name']}" + (f" (on the {names[o['on']]})" if o["on"] in shown else "")
            for o in sorted(visible, key=lambda o: o["cube"][0][2] + o["cube"][1][2])]
    text = pick(["From nearest to farthest: ", "Nearest first: "]) + listing(near) + "."
    return [first, ("caption", pick(Q["caption_depth"]), text, dict(kind="caption_depth"))]


# ----------------------------------------------------------------------------------------------------------------
# Writing: one sample per index, seeded from (seed, index), so content never depends on --workers; shards of
# samples are written atomically and data.jsonl is assembled from them, so a re-run continues where one stopped.
# Every kind goes through this writer; the generators of the other kinds live in instruct.py ("captions",
# "instruct") and multiview.py ("multiview", "spatial-multiview").

KINDS = ("spatial", "captions", "instruct", "multiview", "spatial-multiview")
ORDERED = ("spatial", "spatial-multiview")      # kinds whose turns go pixel -> object -> scene: --order applies


@dataclass
class Config:          # what fixes a dataset's content; saved in <kind>.json, a resumed run must match it
    seed: int = 0
    size: int = 448
    order: str | None = "forward"      # None for kinds without levels
    rgbd: str | None = None
    shard_size: int = 256
    kind: str = "spatial"
    band: list | None = None           # multi-view kinds: [lo, hi] of the co-visibility (or feature-distance) band
    encoder: str | None = None         # multi-view kinds on RGB-D frames without poses: the encoder of that band


def _atomic(path: Path, write):
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


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


def npy_bytes(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def save_png(path: Path, array: np.ndarray):
    _atomic(path, lambda tmp: tmp.write_bytes(png_bytes(array)))


def save_view(out: Path, stem: str, view: View, image: str, depth: bool = True, semantic: bool = True) -> dict:
    """Write a view's image and ground truth under out: instance ids (PNG), depth (uint16 millimetres up to 65.535 m,
    float32 .npy beyond) and semantic ids when asked for. Returns their paths relative to out."""
    files = dict(image=image, instance=f"gt/{stem}_instance.png")
    save_png(out / image, view.rgb)
    save_png(out / files["instance"], view.instance.astype(np.uint8 if view.instance.max() < 256 else np.uint16))
    if semantic and view.semantic is not None:
        files["semantic"] = f"gt/{stem}_semantic.png"
        save_png(out / files["semantic"], view.semantic.astype(np.uint8))
    if depth and view.depth.max() <= 65.535:
        files["depth"] = f"gt/{stem}_depth.png"
        save_png(out / files["depth"], np.round(view.depth * 1000).astype(np.uint16))
    elif depth:
        files["depth"] = f"gt/{stem}_depth.npy"
        _atomic(out / files["depth"], lambda tmp: tmp.write_bytes(npy_bytes(view.depth.astype(np.float32))))
    return files


def make_sample(cfg: Config, index: int, out: Path, frames=()) -> str:
    """Generate, write the files of, and return the JSON line of sample `index`. frames: what `prepare` gave (the
    RGB-D frame folders for spatial data)."""
    if cfg.kind != "spatial":
        return _generator(cfg.kind).make_sample(cfg, index, out, frames)
    rng = np.random.default_rng([cfg.seed, index])
    if cfg.rgbd:
        view, inside = views.rgbd_view(scenes.load_rgbd(frames[index % len(frames)]), rng)
    else:
        view, inside = views.synthetic_view(rng, cfg.size)
    conv, levels, points, turns = conversation(view, inside, rng, cfg.order)
    sid = f"{index:06d}"
    H, W = view.depth.shape
    files = save_view(out, sid, view, f"images/{sid}.png")
    counts = np.bincount(view.instance.reshape(-1), minlength=max(o["id"] for o in view.objects) + 1)
    meta = dict(source=view.source, seed=cfg.seed, index=index, size=[H, W], depth=files["depth"],
                instance=files["instance"], semantic=files.get("semantic"), K=view.K, cam_to_world=view.cam_to_world,
                answer_from_camera=view.answer_from_camera, gravity=view.gravity, camera_height=view.camera_height,
                cube_source="scene" if view.source == "synthetic" else "lifted", room=view.room,
                min_pixels=views.min_pixels(H, W), objects=[dict(o, pixels=int(counts[o["id"]])) for o in view.objects],
                points=points, turns=turns)
    return json.dumps(dict(id=f"spatial-{sid}", image=files["image"], conversations=conv, levels=levels, meta=meta))


def prepare(cfg: Config):
    """What every sample needs from the source, computed once and handed to each worker: the RGB-D frame folders
    (spatial data), or what instruct.prepare / multiview.prepare return (label vocabularies, view pairs)."""
    frames = rgbd_frames(cfg.rgbd) if cfg.rgbd and "multiview" not in cfg.kind else []
    if cfg.kind == "spatial":
        return frames
    return _generator(cfg.kind).prepare(cfg, frames)


def _generator(kind: str):
    """The module that writes kind (imported here, not at the top: both modules import this file)."""
    import importlib
    return importlib.import_module("multiview" if "multiview" in kind else "instruct")


_worker = {}


def fast_malloc():
    """Keep large numpy temporaries on the heap. A 448x448 float32 image (800 KB) is above glibc's mmap threshold,
    so every temporary is a fresh mmap whose pages fault in one by one: rendering is ~1.7x faster without that.
    glibc only (elsewhere a no-op); affects this process's allocator, so only data generation calls it."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)    # M_MMAP_THRESHOLD (32 MB is glibc's largest)
        libc.mallopt(-1, 64 << 20)    # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _init(cfg, out, frames):
    fast_malloc()
    _worker.update(cfg=cfg, out=Path(out), frames=frames)


def _job(index):
    return index, make_sample(_worker["cfg"], index, _worker["out"], _worker["frames"])


def rgbd_frames(root) -> list:
    """Frame folders under root (root itself when it is one), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"--rgbd {root}: not a directory")
    frames = [root] if (root / "labels.json").exists() else sorted(p for p in root.iterdir() if p.is_dir())
    if not frames:
        raise SystemExit(f"--rgbd {root}: no frame folders (rgb, depth, intrinsics, instance.png, labels.json)")
    return [str(f) for f in frames]


def generate(kind: str, out, n: int, seed: int = 0, size: int = 448, order: str = "forward", workers: int = 1,
             rgbd=None, shard_size: int = 256, progress: bool = True, band=None, encoder=None) -> Path:
    """Write (or finish writing) n samples of `kind` (one of KINDS) to out; returns the path of its data.jsonl.
    rgbd: a folder of RGB-D frame folders instead of the synthetic rooms (size then does not apply; multi-view kinds
    want scene folders of frames, see multiview.py). order: turn order of the spatial kinds (ignored by the others).
    band: multi-view kinds' [lo, hi] co-visibility band (default multiview.BAND), or the encoder feature-distance
    band when `encoder` (an encoder directory for load_vit) pairs RGB-D frames that have no poses."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: data.py writes {', '.join(KINDS)}")
    if order not in ("forward", "reversed", "shuffled"):
        raise ValueError(f"order {order!r}: expected forward, reversed or shuffled")
    multi = "multiview" in kind
    if (band is not None or encoder) and not multi:
        raise ValueError(f"band / encoder select view pairs: they apply to the multi-view kinds, not {kind!r}")
    if encoder and not rgbd:
        raise ValueError("encoder: the feature-distance band pairs RGB-D frames without poses; give rgbd too")
    if multi:
        defaults = _generator(kind)
        band = [float(b) for b in (band if band is not None else defaults.FEATURE_BAND if encoder else defaults.BAND)]
        if len(band) != 2 or not 0 <= band[0] < band[1] <= (2 if encoder else 1):
            raise ValueError(f"band {band}: expected [lo, hi] with 0 <= lo < hi <= {2 if encoder else 1}")
    cfg = Config(seed, size, order if kind in ORDERED else None, str(Path(rgbd).resolve()) if rgbd else None,
                 shard_size, kind, band, str(Path(encoder).resolve()) if encoder else None)
    out = Path(out)
    for sub in ("images", "gt", "shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    others = [k for k in KINDS if k != kind and (out / f"{k}.json").exists()]
    if others:
        raise SystemExit(f"{out} holds {others[0]} data ({others[0]}.json): write {kind} data to another --out")
    manifest = out / f"{kind}.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())["config"]
        if old != asdict(cfg):
            raise SystemExit(f"{out} was written with {old}, not {asdict(cfg)}: use the same options or a new --out")
    else:
        info = dict(kind=kind, config=asdict(cfg), categories=list(scenes.CATEGORIES),
                    frame="answers: X right, Y up (gravity), Z forward (horizontal), meters; pixels (u/W, v/H)")
        _atomic(manifest, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
    frames = prepare(cfg)
    fast_malloc()
    plan = [(a, min(a + cfg.shard_size, n)) for a in range(0, n, cfg.shard_size)]
    shard = lambda a, b: out / "shards" / f"{a:06d}-{b:06d}.jsonl"
    todo = [(a, b) for a, b in plan if not shard(a, b).exists()]
    indices = [i for a, b in todo for i in range(a, b)]
    lines, t0, shown = {}, time.time(), 0.0
    if workers > 1 and len(indices) > 1:
        pool = mp.get_context("spawn").Pool(workers, _init, (cfg, str(out), frames))
        results = pool.imap(_job, indices, chunksize=4)
    else:
        pool, results = None, ((i, make_sample(cfg, i, out, frames)) for i in indices)
    try:
        for done, (i, line) in enumerate(results, 1):
            lines[i] = line
            while todo and all(k in lines for k in range(*todo[0])):
                a, b = todo.pop(0)
                _atomic(shard(a, b), lambda tmp: tmp.write_text("".join(lines.pop(k) + "\n" for k in range(a, b))))
            if progress and (time.time() - shown > 0.5 or done == len(indices)):
                shown, rate = time.time(), done / max(time.time() - t0, 1e-9)
                eta = (len(indices) - done) / max(rate, 1e-9)
                print(f"\r{kind} {n - len(indices) + done}/{n}  {rate:.1f} samples/s  eta {eta:.0f}s ",
                      end="", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if progress and indices:
        print(file=sys.stderr)
    data = out / "data.jsonl"

    def assemble(tmp):
        with open(tmp, "w") as f:
            for a, b in plan:
                f.write(shard(a, b).read_text())
    _atomic(data, assemble)
    return data


def __getattr__(name):
    """data.ConversationDataset, data.collate and data.LoaderReport, the training side, live in loader.py and are
    imported on first use: generating data (and its worker processes) never imports torch."""
    if name in ("ConversationDataset", "collate", "LoaderReport"):
        import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


HELP = {"spatial": "single-view spatial conversations, 12 turns pixel -> object -> scene (stage 3)",
        "captions": "one image and one caption turn, phrasings varied (stage 1, alignment)",
        "instruct": "single-view instruction QA from the scene graph: counting, colour, existence, attributes, "
                    "short and long descriptions (stage 2)",
        "multiview": "two views of a scene in a co-visibility band: common, false-premise and multiple-choice "
                     "questions (stage 2)",
        "spatial-multiview": "two views of a scene: the same point across views, camera motion, relations and "
                             "distances across views, pixel -> object -> scene (stage 3)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description="SpatialBoost data. Kinds: " + "; ".join(f"{k}: {v}" for k, v in
                                 HELP.items()) + "; check: recompute every answer of a dataset from its ground truth.")
    sub = ap.add_subparsers(dest="kind", required=True)
    for kind, text in HELP.items():
        sp = sub.add_parser(kind, help=text, description=text)
        sp.add_argument("--n", type=int, required=True, help="number of samples")
        sp.add_argument("--out", required=True, help="dataset directory (re-running continues an interrupted run)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--workers", type=int, default=1, help="processes (results do not depend on it)")
        source = sp.add_mutually_exclusive_group()
        source.add_argument("--source", choices=["synthetic"], default="synthetic", help="built-in rooms (the default)")
        source.add_argument("--rgbd", default=None, help="a folder of RGB-D frame folders (format: scenes.load_rgbd)"
                            + ("; for pairs, a folder of scene folders of frames (pose.txt gives the co-visibility "
                               "band, else --encoder)" if "multiview" in kind else ""))
        sp.add_argument("--size", type=int, default=448, help="synthetic image size (square), pixels")
        if kind in ORDERED:
            sp.add_argument("--order", choices=["forward", "reversed", "shuffled"], default="forward",
                            help="turn order: pixel->object->scene(->caption), its reverse, or shuffled (the paper's "
                                 "ablation)")
        if "multiview" in kind:
            sp.add_argument("--band", default=None, metavar="LO,HI",
                            help="co-visibility band: the share of view-1 pixels that view 2 sees unoccluded "
                                 "(default 0.35,0.65); with --encoder, the feature-distance band (default 0.74,0.94)")
            sp.add_argument("--encoder", default=None, help="RGB-D frames without pose.txt: pair them by this "
                            "encoder's feature distance (a directory load_vit reads)")
        sp.add_argument("--shard-size", type=int, default=256, help="samples per atomically written shard")
    ck = sub.add_parser("check", help="recompute every numeric and yes/no answer of a dataset from its ground truth")
    ck.add_argument("dir")
    ck.add_argument("--limit", type=int, default=None, help="check only the first N samples")
    args = ap.parse_args(argv)
    if args.kind == "check":
        from datacheck import check       # here, not at the top: datacheck imports this file
        problems, stats = check(args.dir, args.limit)
        for p in problems:
            print(p)
        print(f"checked {stats.pop('samples')} samples; yes/no answers {stats}; {len(problems)} problems")
        sys.exit(1 if problems else 0)
    band = getattr(args, "band", None)
    if band is not None:
        try:
            band = [float(x) for x in band.split(",")]
        except ValueError:
            ap.error(f"--band {band!r}: expected two numbers LO,HI")
    print(generate(args.kind, args.out, args.n, args.seed, args.size, getattr(args, "order", "forward"), args.workers,
                   args.rgbd, args.shard_size, band=band, encoder=getattr(args, "encoder", None)))


if __name__ == "__main__":
    main()
