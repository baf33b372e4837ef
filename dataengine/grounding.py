"""
Grounding turns for stage 2: the coordinate interface a frozen LLM needs in stage 3, taught as LLaVA-1.5's mix
teaches it (RefCOCO / Visual Genome regions as normalized text). Written by writer.py as kind "grounding", checked by
check.py from the instance mask alone. No depth and no 3D: that knowledge is stage 3's to inject.

    python data.py grounding --n 2000 --out data/grounding --seed 7      # images disjoint from stage 3's seeds

Per image, TURNS turns of three kinds, in random order:
- point: "What is at (u, v)?" -> "The red chair." (a point well inside an object's mask), or, in synthetic rooms,
  "No object: the floor." for a point inside the floor, a wall or the ceiling;
- box: "Give the bounding box of the red chair as [x1, y1, x2, y2]." -> "[0.12, 0.40, 0.55, 0.93]" (normalized, the
  mask's extent: x2 and y2 are the right and bottom edges of its last column and row);
- which: "Which of the points (u1, v1) and (u2, v2) lies on the red chair?" -> "(u1, v1)."
Points are pixel centres (u/W, v/H), 3 decimals, drawn from eroded mask interiors so that a point never sits on an
edge; boxes are 2 decimals.
"""

import json

import numpy as np

from dataengine import scenes, views
from dataengine.text import Turn, coord, picker, to_conversation
from dataengine.views import save_view

TURNS = 6
POINT_QUESTIONS = ["What is at {p}?", "Which object is at the point {p}?", "What do you see at {p}?",
                   "Name what is at {p} in the image."]
BOX_QUESTIONS = ["Give the bounding box of the {a} as [x1, y1, x2, y2].", "Where is the {a}? Answer with its box "
                 "[x1, y1, x2, y2].", "Locate the {a}: its bounding box, [x1, y1, x2, y2]."]
WHICH_QUESTIONS = ["Which of the points {p} and {q} lies on the {a}?", "Is the {a} at {p} or at {q}?",
                   "Of {p} and {q}, which point is on the {a}?"]
BACKGROUND = ("floor", "wall", "ceiling")


def point_text(c: int, r: int, H: int, W: int) -> str:
    return f"({coord((c + 0.5) / W)}, {coord((r + 0.5) / H)})"


def box_of(mask: np.ndarray) -> list:
    """[x1, y1, x2, y2] of a mask, normalized by the image size: the outer edges of its first and last pixels."""
    H, W = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [cols[0] / W, rows[0] / H, (cols[-1] + 1) / W, (rows[-1] + 1) / H]


def box_text(box) -> str:
    return "[" + ", ".join(f"{round(float(v), 2) + 0.0:.2f}" for v in box) + "]"


def regions(view: views.View) -> dict:
    """{name: (H, W) bool interior} of every object with enough interior pixels, and (synthetic) of the floor, walls
    and ceiling under the name "no object: the floor" etc."""
    H, W = view.instance.shape
    inside = views.interior(view.instance, views.erosion(H, W))
    need = views.min_pixels(H, W)
    out = {}
    for o in view.objects:
        region = inside & (view.instance == o["id"])
        if region.sum() >= need:
            out[o["name"]] = region
    if view.semantic is not None:
        for k, part in enumerate(BACKGROUND):
            region = inside & (view.instance == 0) & (view.semantic == scenes.CATEGORIES.index(part) + 1)
            if region.sum() >= need:
                out[f"no object: the {part}"] = region
    return out


def draw_point(region: np.ndarray, rng) -> tuple:
    r, c = np.argwhere(region)[int(rng.integers(region.sum()))]
    return int(c), int(r)


def conversation(view: views.View, rng) -> tuple:
    """-> (conversation, levels, records): TURNS grounding turns about the view's objects."""
    pick = picker(rng)
    H, W = view.instance.shape
    areas = regions(view)
    objects = [n for n in areas if not n.startswith("no object")]
    if not objects:
        raise ValueError("no object with enough interior pixels to ground")
    names = {o["name"]: o["id"] for o in view.objects}
    turns = []
    for _ in range(TURNS):
        kind = pick(["point", "point", "box", "which"] if len(areas) > 1 else ["point", "box"])
        if kind == "point":
            name = pick(sorted(areas))
            c, r = draw_point(areas[name], rng)
            p = point_text(c, r, H, W)
            answer = f"{name[0].upper()}{name[1:]}." if name.startswith("no object") else f"The {name}."
            turns.append(Turn("grounding", pick(POINT_QUESTIONS).format(p=p), answer,
                              dict(kind="point", px=[c, r], name=name)))
        elif kind == "box":
            name = pick(objects)
            box = box_of(view.instance == names[name])
            turns.append(Turn("grounding", pick(BOX_QUESTIONS).format(a=name), box_text(box),
                              dict(kind="box", object=names[name])))
        else:
            name = pick(objects)
            other = pick([n for n in sorted(areas) if n != name])
            on, off = draw_point(areas[name], rng), draw_point(areas[other], rng)
            first = int(rng.integers(2))
            p, q = (on, off) if first == 0 else (off, on)
            P, Q = point_text(*p, H, W), point_text(*q, H, W)
            turns.append(Turn("grounding", pick(WHICH_QUESTIONS).format(p=P, q=Q, a=name), f"{P if first == 0 else Q}.",
                              dict(kind="which", object=names[name], px=[list(p), list(q)], answer=first)))
    return to_conversation(turns), [t.level for t in turns], [t.record for t in turns]


# ----------------------------------------------------------------------------------------------------------------
# Writing (called by writer.py for kind "grounding").


def prepare(spec, embed=None) -> list:
    """The RGB-D frame folders (empty for the synthetic rooms)."""
    return scenes.frame_folders(spec.rgbd) if spec.rgbd else []


def make_sample(spec, index: int, out, frames: list) -> str:
    rng = np.random.default_rng([spec.seed, index])
    if spec.rgbd:
        view, _ = views.rgbd_view(scenes.load_rgbd(frames[index % len(frames)]), rng)
    else:
        view, _ = views.synthetic_view(rng, spec.size)
    conv, levels, turns = conversation(view, rng)
    sid = f"{index:06d}"
    files = save_view(out, sid, view, f"images/{sid}.png", depth=False)
    H, W = view.instance.shape
    meta = dict(kind="grounding", source=view.source, seed=spec.seed, index=index, size=[H, W],
                instance=files["instance"], semantic=files.get("semantic"),
                objects=[dict(id=o["id"], name=o["name"]) for o in view.objects], turns=turns)
    return json.dumps(dict(id=f"grounding-{sid}", image=files["image"], conversations=conv, levels=levels, meta=meta))
