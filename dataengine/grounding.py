"""
Grounding turns for stage 2: the coordinate interface a frozen LLM needs in stage 3, taught as LLaVA-1.5's mix
teaches it (RefCOCO / Visual Genome regions as normalized text). check.py checks them from the masks alone: no
depth and no 3D, that knowledge is stage 3's to inject.

    python data.py grounding --n 2000 --out data/grounding --seed 7      # images disjoint from stage 3's seeds

Per image, TURNS turns in random order: what is at a point ("The red chair.", or in synthetic rooms "No object: the
floor."), an object's box [x1, y1, x2, y2], and which of two points lies on an object. Points are pixel centres
(u/W, v/H), 3 decimals, drawn from eroded mask interiors so that a point never sits on an edge; boxes are 2 decimals.
"""

import json

import numpy as np

from dataengine import scenes, views
from dataengine.text import Turn, capitalized, coord, meters, picker, to_conversation
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


def regions(view: views.View) -> dict:
    """{name: (H, W) bool interior} of every object with enough interior pixels, and (synthetic) of the floor, walls
    and ceiling under the name "no object: the floor" etc."""
    H, W = view.instance.shape
    masks = {o["name"]: view.instance == o["id"] for o in view.objects}
    for part in BACKGROUND if view.semantic is not None else ():
        masks[f"no object: the {part}"] = (view.instance == 0) & (view.semantic == scenes.CATEGORIES.index(part) + 1)
    inside = views.interior(view.instance, views.erosion(H, W))
    interiors = {name: inside & mask for name, mask in masks.items()}
    return {name: region for name, region in interiors.items() if region.sum() >= views.min_pixels(H, W)}


def draw_point(region: np.ndarray, rng) -> tuple:
    r, c = np.argwhere(region)[int(rng.integers(region.sum()))]
    return int(c), int(r)


def conversation(view: views.View, rng) -> tuple:
    """-> (conversation, levels, records): TURNS grounding turns about the view's objects."""
    pick, (H, W), areas = picker(rng), view.instance.shape, regions(view)
    objects = [n for n in areas if not n.startswith("no object")]
    if not objects:
        raise ValueError("no object with enough interior pixels to ground")
    names, turns = {o["name"]: o["id"] for o in view.objects}, []
    for _ in range(TURNS):
        kind = pick(["point", "point", "box", "which"] if len(areas) > 1 else ["point", "box"])
        if kind == "point":
            name = pick(sorted(areas))
            c, r = draw_point(areas[name], rng)
            answer = f"{capitalized(name)}." if name.startswith("no object") else f"The {name}."
            turns.append(Turn("grounding", pick(POINT_QUESTIONS).format(p=point_text(c, r, H, W)), answer,
                              dict(kind="point", px=[c, r], name=name)))
        elif kind == "box":
            name = pick(objects)
            box = ", ".join(meters(v) for v in box_of(view.instance == names[name]))
            turns.append(Turn("grounding", pick(BOX_QUESTIONS).format(a=name), f"[{box}]",
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


def prepare(spec, embed=None) -> list:       # the RGB-D frame folders, if any
    return scenes.frame_folders(spec.rgbd) if spec.rgbd else []


def make_sample(spec, index: int, out, frames: list) -> str:
    rng = np.random.default_rng([spec.seed, index])
    view, _ = views.sample_view(spec, index, frames, rng)
    conv, levels, turns = conversation(view, rng)
    sid, (H, W) = f"{index:06d}", view.instance.shape
    files = save_view(out, sid, view, f"images/{sid}.png", depth=False)
    meta = dict(kind="grounding", source=view.source, seed=spec.seed, index=index, size=[H, W],
                instance=files["instance"], semantic=files.get("semantic"),
                objects=[dict(id=o["id"], name=o["name"]) for o in view.objects], turns=turns)
    return json.dumps(dict(id=f"grounding-{sid}", image=files["image"], conversations=conv, levels=levels, meta=meta))
