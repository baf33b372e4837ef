"""
Single-view data for stages 1 and 2, asked about a view's scene graph (objects, colours, supports, cubes, masks):

    python data.py captions --n 2000 --out data/captions      # stage 1 (alignment): one image, one caption turn
    python data.py instruct --n 2000 --out data/instruct      # stage 2: instruction QA, 5 turns per image

A caption's prompt is a LLaVA-Pretrain-style request, the image before or after it. Instruction QA asks QA_TURNS
questions of different kinds (QA) per image, and gives one short or long description. "Visible" means at least
views.min_pixels(H, W) pixels of the object's mask, "absent" not one pixel; objects in between (slivers) are never
asked about, nor counted. On RGB-D frames the categories are labels.json's labels and colours are unknown (no colour
questions); a frame's captions.txt replaces the generated caption.
"""

import json
from pathlib import Path

import numpy as np

from dataengine import scenes, views
from dataengine.text import (NUMBER_WORDS, TIE_CENTRE, Turn, article, capitalized, listing, meters, picker, place,
                             to_conversation)
from dataengine.views import save_view

CAPTION_PROMPTS = ["Describe the image concisely.", "Provide a brief description of the given image.",
                   "Offer a succinct explanation of the picture presented.",
                   "Summarize the visual content of the image.", "Give a short and clear explanation of the image.",
                   "Share a concise interpretation of the image.",
                   "Present a compact description of the photo's key features.",
                   "Write a short caption for this image.", "What does this picture show? Answer briefly.",
                   "Render a clear and concise summary of the photo."]
LONG_PROMPTS = ["Describe the image in detail.", "Give a detailed description of this scene.",
                "Describe every object in the picture and where it is.", "Explain the layout of this scene in detail."]
THIRD_MARGIN = 0.03     # position questions skip objects whose centroid is this close to a border between thirds
QA_TURNS = 4            # instruction-QA turns per image, plus one description


def plural(word: str) -> str:
    if word.endswith("f"):
        return word[:-1] + "ves"
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def facts_of(view: views.View) -> dict:
    """Visible objects left to right, and per category (view.labels) its visible ids and its slivers' ids."""
    H, W = view.instance.shape
    counts = np.bincount(view.instance.reshape(-1), minlength=max(view.labels, default=0) + 1)
    min_px, visible, sliver = views.min_pixels(H, W), {}, {}
    for i, c in view.labels.items():
        if counts[i] >= min_px:
            visible.setdefault(c, []).append(i)
        elif counts[i] > 0:
            sliver.setdefault(c, []).append(i)
    objects = sorted((o for o in view.objects if counts[o["id"]] >= min_px),
                     key=lambda o: o["cube"][0][0] + o["cube"][1][0])       # left to right
    return dict(objects=objects, by_id={o["id"]: o for o in view.objects}, visible=visible, sliver=sliver,
                synthetic=view.source == "synthetic",
                names={o["id"]: o["name"] for o in view.objects}, room=view.room, size=(H, W), instance=view.instance)


def first_sentence(facts: dict, pick) -> str:
    """The visible objects left to right, with the room when known."""
    items = listing([article(o["name"]) for o in facts["objects"]])
    Items, room = capitalized(items), facts["room"]
    return pick([f"A room with {room}, holding {items}.", f"{Items} in a room with {room}.",
                 f"An indoor scene with {room}: {items}."] if room else [f"A scene with {items}.", f"{Items}."])


def centre_z(o) -> float:
    return (o["cube"][0][2] + o["cube"][1][2]) / 2


def caption(facts: dict, pick) -> tuple:
    objs, text = facts["objects"], first_sentence(facts, pick)
    shown = {o["id"] for o in objs}
    on = [o for o in objs if o.get("on") in shown]
    z = sorted(objs, key=centre_z)
    extra = pick(["none", "supports", "depth"])
    if extra == "supports" and on:
        text += " " + " ".join(f"The {o['name']} stands on the {facts['names'][o['on']]}." for o in on[:2])
    elif (extra == "depth" and len(z) >= 2 and centre_z(z[1]) - centre_z(z[0]) >= TIE_CENTRE
          and centre_z(z[-1]) - centre_z(z[-2]) >= TIE_CENTRE):
        text += f" The {z[0]['name']} is nearest to the camera and the {z[-1]['name']} farthest."
    else:
        extra = "none"
    return text, dict(kind="caption", extra=extra)


def long_description(facts: dict, pick) -> tuple:
    """The first sentence, then per visible object how far ahead its centre is (answer-frame Z) and its support."""
    names, shown = facts["names"], {o["id"] for o in facts["objects"]}
    parts = [first_sentence(facts, pick)]
    for o in facts["objects"]:
        support = f", on the {names[o['on']]}" if o.get("on") in shown else ""
        parts.append(f"The {o['name']} is {meters(centre_z(o))} m ahead{support}.")
    return " ".join(parts), dict(kind="long_description")


def caption_conversation(facts: dict, user_captions, rng) -> tuple:
    pick = picker(rng)
    prompt = pick(CAPTION_PROMPTS)
    text, rec = (pick(list(user_captions)), dict(kind="caption_user")) if user_captions else caption(facts, pick)
    question = f"<image>\n{prompt}" if rng.random() < 0.8 else f"{prompt}\n<image>"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": text}], ["caption"], [rec]


# ----------------------------------------------------------------------------------------------------------------
# Instruction QA (stage 2). Each maker returns (question, answer, record) or None when the image has no subject.


def count_turn(facts, vocabulary, rng, pick):
    known = [c for c in vocabulary if c not in facts["sliver"]]     # slivers would make the count ambiguous
    if not known:
        return None
    seen = [c for c in known if c in facts["visible"]]
    c = pick(seen) if seen and rng.random() < 0.75 else pick(known)
    ids = facts["visible"].get(c, [])
    n = len(ids)
    q = pick([f"How many {plural(c)} are there in the image?", f"How many {plural(c)} can you see?",
              f"Count the {plural(c)} in the picture."])
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    colours = [facts["by_id"][i]["colour"] for i in ids] if facts["synthetic"] else []
    if n == 0:
        a = f"There are no {plural(c)} in the image."
    elif n == 1:
        a = f"There is one {c}" + (f", a {colours[0]} one." if colours else ".")
    else:
        a = f"There are {word} {plural(c)}" + (f": {listing([f'a {k} one' for k in sorted(colours)])}." if colours
                                               else ".")
    return q, a, dict(kind="count", category=c)


def colour_turn(facts, vocabulary, rng, pick):
    single = [c for c, ids in facts["visible"].items() if len(ids) == 1 and c not in facts["sliver"]
              and facts["by_id"].get(ids[0], {}).get("colour")]
    if not single:
        return None
    c = pick(sorted(single))
    colour = facts["by_id"][facts["visible"][c][0]]["colour"]
    q = pick([f"What colour is the {c}?", f"Which colour does the {c} have?", f"What is the colour of the {c}?"])
    return q, f"The {c} is {colour}.", dict(kind="colour", category=c)


def exists_turn(facts, vocabulary, rng, pick):
    """Half true, half false premises: a category with no pixel in the image, or (synthetic) a colour that no object
    of a visible category has."""
    present = sorted(facts["visible"])
    absent = [c for c in vocabulary if c not in facts["visible"] and c not in facts["sliver"]]
    ask = lambda c: pick([f"Is there a {c} in the image?", f"Can you see a {c}?", f"Does the picture show a {c}?"])
    r = rng.random()
    if present and (r < 0.5 or not absent):
        c = pick(present)
        if facts["synthetic"]:
            what = listing([article(facts["by_id"][i]["name"]) for i in facts["visible"][c]])
        else:
            n = len(facts["visible"][c])
            what = f"{'one' if n == 1 else NUMBER_WORDS[min(n, 10)]} {c if n == 1 else plural(c)}"
        return ask(c), f"Yes, there is {what}.", dict(kind="exists", category=c)
    seen = {c: {facts["by_id"][i]["colour"] for i in facts["visible"][c] + facts["sliver"].get(c, [])}
            for c in present} if facts["synthetic"] else {}
    swapped = [(c, k) for c in sorted(seen) for k in scenes.COLOURS if k not in seen[c]]
    if swapped and (r > 0.8 or not absent):
        c, k = swapped[int(rng.integers(len(swapped)))]
        others = listing([article(facts["by_id"][i]["name"]) for i in facts["visible"][c]])
        q = pick([f"Is there a {k} {c} in the image?", f"Can you see a {k} {c}?"])
        return q, f"No, there is no {k} {c}; there is {others}.", dict(kind="exists", category=c, colour=k)
    if not absent:
        return None
    c = pick(absent)
    return ask(c), f"No, there is no {c} in the image.", dict(kind="exists", category=c)


def support_turn(facts, vocabulary, rng, pick):
    objs = facts["objects"] if facts["synthetic"] else []     # RGB-D frames do not say what stands on what
    if not objs:
        return None
    stacked = [o for o in objs if o["on"] is not None]
    o = pick(stacked) if stacked and rng.random() < 0.6 else pick(objs)
    where = "the floor" if o["on"] is None else f"the {facts['names'][o['on']]}"
    q = pick([f"What is the {o['name']} standing on?", f"What is under the {o['name']}?",
              f"What does the {o['name']} rest on?"])
    return q, f"The {o['name']} stands on {where}.", dict(kind="support", object=o["id"])


def thirds(facts, i):
    """(column third, row third) of object i's mask centroid, or None near a border between thirds."""
    H, W = facts["size"]
    rows, cols = np.nonzero(facts["instance"] == i)
    u, v = (cols.mean() + 0.5) / W, (rows.mean() + 0.5) / H
    if min(abs(u - b) for b in (1 / 3, 2 / 3)) < THIRD_MARGIN or min(abs(v - b) for b in (1 / 3, 2 / 3)) < THIRD_MARGIN:
        return None
    return min(int(u * 3), 2), min(int(v * 3), 2)


def position_turn(facts, vocabulary, rng, pick):
    cells = [(o, thirds(facts, o["id"])) for o in facts["objects"]]
    cells = [(o, c) for o, c in cells if c is not None]
    if not cells:
        return None
    o, (col, row) = cells[int(rng.integers(len(cells)))]
    q = pick([f"Where in the image is the {o['name']}?", f"In which part of the picture is the {o['name']}?"])
    return q, f"The {o['name']} is in the {place(col, row)} part of the image.", dict(kind="position", object=o["id"])


def height_turn(facts, vocabulary, rng, pick):
    if not facts["objects"]:
        return None
    o = pick(facts["objects"])
    h = o["cube"][1][1] - o["cube"][0][1]
    q = pick([f"How tall is the {o['name']}?", f"What is the height of the {o['name']}?"])
    return q, f"The {o['name']} is {meters(h)} m tall.", dict(kind="height", object=o["id"])


QA = (count_turn, colour_turn, exists_turn, support_turn, position_turn, height_turn)


def instruct_conversation(facts: dict, vocabulary: list, rng) -> tuple:
    """QA_TURNS turns of different kinds (those with a subject here) and a description, in random order."""
    pick, turns = picker(rng), []
    for k in rng.permutation(len(QA)):
        made = QA[k](facts, vocabulary, rng, pick)
        if made:
            turns.append(made)
        if len(turns) == QA_TURNS:
            break
    text, rec = caption(facts, pick) if rng.random() < 0.5 else long_description(facts, pick)
    turns.append((pick(CAPTION_PROMPTS if rec["kind"] == "caption" else LONG_PROMPTS), text, rec))
    turns = [Turn(rec["kind"], q, a, rec) for q, a, rec in (turns[k] for k in rng.permutation(len(turns)))]
    return to_conversation(turns), [t.level for t in turns], [t.record for t in turns]


def prepare(cfg, embed=None) -> dict:
    """The RGB-D frame folders and the label vocabulary over all of them (for "is there a <label>?" questions)."""
    frames, labels = scenes.frame_folders(cfg.rgbd) if cfg.rgbd else [], set()
    for f in frames:
        raw = json.loads((Path(f) / "labels.json").read_text())
        labels |= {v.strip() for v in raw.values() if isinstance(v, str) and v.strip()}
    return dict(frames=frames, vocabulary=sorted(labels - set(scenes.FLOOR_LABELS)))


def make_sample(cfg, index: int, out, source: dict) -> str:
    rng = np.random.default_rng([cfg.seed, index])
    view, _ = views.sample_view(cfg, index, source["frames"], rng)
    vocabulary, facts = source["vocabulary"] if cfg.rgbd else list(scenes.OBJECT_CATEGORIES), facts_of(view)
    conv, levels, turns = (caption_conversation(facts, view.captions, rng) if cfg.kind == "captions" else
                           instruct_conversation(facts, vocabulary, rng))
    sid, (H, W) = f"{index:06d}", view.instance.shape
    files = save_view(out, sid, view, f"images/{sid}.png", depth=False, semantic=False)
    counts = np.bincount(view.instance.reshape(-1), minlength=max(view.labels, default=0) + 1)
    meta = dict(kind=cfg.kind, source=view.source, seed=cfg.seed, index=index, size=[H, W],
                instance=files["instance"], K=view.K, answer_from_camera=view.answer_from_camera, gravity=view.gravity,
                room=view.room, min_pixels=views.min_pixels(H, W), labels={str(i): c for i, c in view.labels.items()},
                vocabulary=vocabulary, objects=[dict(o, pixels=int(counts[o["id"]])) for o in view.objects],
                turns=turns)
    return json.dumps(dict(id=f"{cfg.kind}-{sid}", image=files["image"], conversations=conv, levels=levels, meta=meta))
