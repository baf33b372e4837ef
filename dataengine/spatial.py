"""
The spatial conversation stage 3 trains on: one image and 12 question/answer pairs built from its 3D ground truth,
pixel -> object -> scene -> caption: 5 pixel turns (depth, 3D position, closer, displacement), 4 object relations, 1
distance between objects and 2 captions. writer.py writes it as kind "spatial"; check.py recomputes every answer.

    view, inside = views.synthetic_view(rng, 448)
    conv, levels, points, records = conversation(view, inside, rng, order="forward")

Answers carry the image, not the question: "2.35 m.", "(0.12, -0.40, 2.35) m.", "Yes, the first point is closer
than the second: 2.10 m vs 2.35 m." -- no query coordinate is echoed, so nearly every supervised number is one the
encoder must supply (tools/answer_stats.py measures the share). With points_per_turn K > 1 (data.py spatial
--points-per-turn K) each depth and 3D-position turn asks about K points and answers in their order: "What is the
depth at (0.241, 0.766), (0.512, 0.300) and (0.700, 0.650)?" -> "2.35 m, 1.80 m and 3.02 m.". Relations compare
bounding-cube centres (or extents) in views.py's answer frame and call near-ties ties.
"""

import json
from pathlib import Path

import numpy as np

from dataengine import scenes, views
from dataengine.text import (CLOSER_WORDS, FORMS, PIXEL_KINDS, QUESTIONS, RELATIONS, TIE_DEPTH, Turn, article,
                             capitalized, coord, cube_distance, listing, meters, ordered, picker, position, relation,
                             relation_questions, to_conversation)
from dataengine.views import View, save_view


def conversation(view: View, inside: np.ndarray, rng: np.random.Generator, order: str = "forward", k: int = 1):
    """-> (conversations [{"from", "value"}] x 24, levels x 12, points [{"px", "uv"}], turn records x 12). The depth
    and 3D-position turns ask about k points each."""
    (H, W), pick = view.depth.shape, picker(rng)
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
    # above/below pair, the k points of a depth / position turn on objects not covered yet, then on other objects
    # than the turn's own, then on any
    pixel_kinds = sorted(list(PIXEL_KINDS) + [pick(PIXEL_KINDS)], key=PIXEL_KINDS.index)
    two = {"closer": [pairs[1], pairs[3]], "displacement": [pairs[2], pairs[0]]}
    wanted = [list(two[kind].pop(0)) if kind in two else None for kind in pixel_kinds]
    covered = {o for w in wanted if w for o in w}
    for t, w in enumerate(wanted):
        if w is None:
            wanted[t] = []
            for _ in range(k):
                rest = [f for f in focus if f not in covered]
                wanted[t].append(rest[0] if rest else pick([f for f in focus if f not in wanted[t]] or focus))
                covered.add(wanted[t][-1])
    px = sample_points(view, inside, wanted, rng)
    cam = views.unproject(view.depth, np.array(view.K))[px[:, 1], px[:, 0]]          # (n, 3) camera frame
    facts = dict(P=[f"({coord((c + 0.5) / W)}, {coord((r + 0.5) / H)})" for c, r in px], d=cam[:, 2],
                 xyz=cam @ np.array(view.answer_from_camera).T, names={o["id"]: o["name"] for o in view.objects},
                 cubes={o["id"]: o["cube"] for o in view.objects})
    turns, n = [], 0
    for kind, objs in zip(pixel_kinds, wanted):
        turns.append(pixel_turn(kind, list(range(n, n + len(objs))), facts, rng, pick))
        n += len(objs)
    turns += [object_turn(kind, a, b, facts, rng, pick) for kind, (a, b) in zip(object_kinds, pairs)]
    a = least_used()
    turns.append(scene_turn(a, least_used(a), facts, pick))
    turns += caption_turns(view, facts, pick)
    turns = ordered(turns, order, rng)
    points = [dict(px=[int(c), int(r)], uv=[round((c + 0.5) / W, 3), round((r + 0.5) / H, 3)]) for c, r in px]
    return to_conversation(turns), [t.level for t in turns], points, [t.record for t in turns]


def sample_points(view: View, inside: np.ndarray, wanted: list, rng) -> np.ndarray:
    """(n, 2) pixels (column, row): one on each object of each turn's list `wanted`. Points keep 2 pixels apart when
    the object allows it, and a turn's own points are distinct pixels in any case."""
    (H, W), flat = view.depth.shape, np.nonzero(inside.reshape(-1))[0]
    owner = view.instance.reshape(-1)[flat]
    px, taken = [], np.zeros((H, W), bool)
    for objects in wanted:
        mine = []
        for o in objects:
            pool = flat[owner == o]
            free, other = pool[~taken.reshape(-1)[pool]], np.setdiff1d(pool, mine)
            pool = free if len(free) else other if len(other) else pool
            mine.append(int(pool[rng.integers(len(pool))]))
            r, c = divmod(mine[-1], W)
            taken[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = True
            px.append((c, r))
    return np.array(px)


def pixel_turn(kind: str, idx: list, facts: dict, rng, pick) -> Turn:
    """A question about some points; the answer is only what the image tells (no echoed coordinates), one value per
    point in the question's order: "2.35 m, 1.80 m and 3.02 m." """
    P, d, xyz = facts["P"], facts["d"], facts["xyz"]
    i, j, rec = idx[0], idx[-1], dict(kind=kind, points=idx)
    if kind in ("depth", "position"):
        values = [f"{meters(d[x])} m" if kind == "depth" else position(xyz[x]) for x in idx]
        asked = QUESTIONS[kind if len(idx) == 1 else kind + "s"]
        return Turn("pixel", pick(asked).format(p=listing([P[x] for x in idx])), listing(values) + ".", rec)
    if kind == "closer":
        form, want = int(rng.integers(2)), int(rng.integers(2))      # yes/no or which; about "closer" or "farther"
        s, o, rel, prefix = verdict(form, want, 2 if abs(d[i] - d[j]) < TIE_DEPTH else int(d[i] > d[j]), i, j)
        nth = {i: "first", j: "second"}
        a = capitalized(f"{prefix}the {nth[s]} point is {CLOSER_WORDS[rel]} the {nth[o]}: {meters(d[s])} m vs "
                        f"{meters(d[o])} m.")
        question = pick(QUESTIONS["closer"][form][want]).format(p=P[i], q=P[j])
        return Turn("pixel", question, a, dict(rec, form=FORMS[form], want=want))
    v = xyz[j] - xyz[i]
    a = f"{position(v)}, {meters(np.linalg.norm(v))} m apart."
    return Turn("pixel", pick(QUESTIONS["displacement"]).format(p=P[i], q=P[j]), a, rec)


def object_turn(kind: str, a: int, b: int, facts: dict, rng, pick) -> Turn:
    """A relation between objects a and b from their cubes: the verdict, then the values it rests on."""
    spec, names, cubes = RELATIONS[kind], facts["names"], facts["cubes"]
    form, want = int(rng.integers(2)), int(rng.integers(2))
    s, o, rel, prefix = verdict(form, want, relation(kind, cubes[a], cubes[b])[0], a, b)
    _, vs, vo, margin = relation(kind, cubes[s], cubes[o])
    by = f" by {meters(margin)} m" if rel != 2 and spec.get("measure") != "volume" else ""
    if "axis" in spec:
        values = f"centres at {'XYZ'[spec['axis']]} = {meters(vs)} m and {meters(vo)} m"
    elif spec["measure"] == "volume":
        values = " and ".join(" x ".join(meters(v) for v in np.subtract(*cubes[x][::-1])) + " m" for x in (s, o))
    else:
        values = f"{meters(vs)} m and {meters(vo)} m {'tall' if spec['measure'] == 'height' else 'wide'}"
    text = capitalized(f"{prefix}the {names[s]} is {spec['words'][rel]} the {names[o]}{by}: {values}.")
    q = pick(relation_questions(kind, form, want)).format(a=names[a], b=names[b])
    return Turn("object", q, text, dict(kind=kind, objects=[a, b], form=FORMS[form], want=want))


def scene_turn(a: int, b: int, facts: dict, pick) -> Turn:
    names, cubes = facts["names"], facts["cubes"]
    centre, gap = cube_distance(cubes[a], cubes[b])
    ca, cb = (position(np.sum(cubes[x], 0) / 2) for x in (a, b))
    text = f"Centres at {ca} and {cb}: {meters(centre)} m apart, {meters(gap)} m between the closest surfaces."
    return Turn("scene", pick(QUESTIONS["distance"]).format(a=names[a], b=names[b]), text,
                dict(kind="distance", objects=[a, b]))


def verdict(form: int, want: int, out: int, a, b) -> tuple:
    """(subject, object, relation said, prefix) of the answer about a and b when the truth is `out` (2 = a tie). A
    yes/no question (form 0) keeps its order and is answered Yes / No / Not clearly; a "which" question wanting
    relation `want` is answered by naming first the one that has it."""
    if form == 0:
        return a, b, out, ["No, ", "Yes, ", "Not clearly: "][2 if out == 2 else int(out == want)]
    s, o = (a, b) if out in (2, want) else (b, a)
    return (s, o, 2, "Neither: ") if out == 2 else (s, o, want, "")


def caption_turns(view: View, facts: dict, pick) -> list:
    """Visible objects left to right (with the room), then near to far (with supports); or the frame's captions."""
    names, (H, W) = facts["names"], view.depth.shape
    counts = np.bincount(view.instance.reshape(-1), minlength=max(names) + 1)
    visible = [o for o in view.objects if counts[o["id"]] >= views.min_pixels(H, W)]
    items = listing([article(o["name"]) for o in sorted(visible, key=lambda o: o["cube"][0][0] + o["cube"][1][0])])
    if view.captions:
        first = Turn("caption", pick(QUESTIONS["caption_list"]), view.captions[0], dict(kind="caption_user"))
    else:
        text = pick([f"A room with {view.room}, holding {items}.", f"An indoor scene with {view.room}: {items}.",
                     f"{capitalized(items)} in a room with {view.room}."] if view.room else
                    [f"A scene with {items}.", f"{capitalized(items)}."])
        first = Turn("caption", pick(QUESTIONS["caption_list"]), text, dict(kind="caption_list"))
    if len(view.captions) > 1:
        return [first, Turn("caption", pick(QUESTIONS["caption_user"]), view.captions[1], dict(kind="caption_user"))]
    shown = {o["id"] for o in visible}
    near = [f"the {o['name']}" + (f" (on the {names[o['on']]})" if o["on"] in shown else "")
            for o in sorted(visible, key=lambda o: o["cube"][0][2] + o["cube"][1][2])]
    text = pick(["From nearest to farthest: ", "Nearest first: "]) + listing(near) + "."
    return [first, Turn("caption", pick(QUESTIONS["caption_depth"]), text, dict(kind="caption_depth"))]


def prepare(spec, embed=None) -> list:       # the RGB-D frame folders, if any
    return scenes.frame_folders(spec.rgbd) if spec.rgbd else []


def make_sample(spec, index: int, out: Path, frames: list) -> str:
    rng = np.random.default_rng([spec.seed, index])
    view, inside = views.sample_view(spec, index, frames, rng)
    conv, levels, points, turns = conversation(view, inside, rng, spec.order, spec.points_per_turn)
    sid, (H, W) = f"{index:06d}", view.depth.shape
    files = save_view(out, sid, view, f"images/{sid}.png")
    counts = np.bincount(view.instance.reshape(-1), minlength=max(o["id"] for o in view.objects) + 1)
    meta = dict(source=view.source, seed=spec.seed, index=index, size=[H, W], depth=files["depth"],
                instance=files["instance"], semantic=files.get("semantic"), K=view.K, cam_to_world=view.cam_to_world,
                answer_from_camera=view.answer_from_camera, gravity=view.gravity, camera_height=view.camera_height,
                cube_source="scene" if view.source == "synthetic" else "lifted", room=view.room,
                min_pixels=views.min_pixels(H, W), objects=[dict(o, pixels=int(counts[o["id"]])) for o in view.objects],
                points=points, turns=turns)
    return json.dumps(dict(id=f"spatial-{sid}", image=files["image"], conversations=conv, levels=levels, meta=meta))
