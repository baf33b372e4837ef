"""
The words and numbers every kind of generated data shares: relation phrasings and their tie tolerances, how numbers
are written, the named `Turn` and the one path from turns to a LLaVA conversation. The bottom of the data engine: it
imports nothing of ours, so the builders and the checker can all import it.

    turns = [Turn("pixel", "What is the depth at (0.241, 0.766)?", "2.35 m.", {"kind": "depth", "points": [0]})]
    conversation = to_conversation(turns)   # [{"from": "human", "value": "<image>\nWhat is ..."}, {"from": "gpt", ...}]
"""

from typing import NamedTuple

import numpy as np

LEVEL_COUNTS = {"pixel": 5, "object": 4, "scene": 1, "caption": 2}
TIE_DEPTH = 0.05     # m: points whose depths differ by less are "at about the same depth"
TIE_CENTRE = 0.10    # m: cube centres closer than this along an axis are level
TIE_RATIO = 1.10     # sizes within this ratio of each other are "about as tall / wide / big"

# Object relations: words = (A less than B, A more than B, a tie) along an answer-frame axis (cube centres) or a
# measure (cube extents). A question wanting words[k] asks "Is the {a} <words[k]> the {b}?" or PHRASES[words[k]][0]
# (yes/no), or "Which is <MOST[kind][k]>, the {a} or the {b}?" or PHRASES[words[k]][1] (relation_questions).
RELATIONS = {
    "left_right": dict(axis=0, words=("to the left of", "to the right of", "roughly level, left to right, with")),
    "front_behind": dict(axis=2, words=("in front of", "behind", "about as far away as")),
    "above_below": dict(axis=1, words=("below", "above", "at about the same height as")),
    "taller": dict(measure="height", words=("shorter than", "taller than", "about as tall as")),
    "wider": dict(measure="width", words=("narrower than", "wider than", "about as wide as")),
    "bigger": dict(measure="volume", words=("smaller than", "bigger than", "about as big as")),
}
PHRASES = {
    "to the left of": ("From the camera's viewpoint, is the {a} left of the {b}?",
                       "Which of the {a} and the {b} is further left?"),
    "to the right of": ("Does the {a} appear to the right of the {b}?",
                        "Which of the two is further right, the {a} or the {b}?"),
    "in front of": ("Is the {a} closer to the camera than the {b}?", "Which is in front, the {a} or the {b}?"),
    "behind": ("Is the {a} farther from the camera than the {b}?", "Which of the {a} and the {b} is further away?"),
    "below": ("Is the {a} lower than the {b}?", "Which of the {a} and the {b} sits lower?"),
    "above": ("Is the {a} higher up than the {b}?", "Which of the {a} and the {b} is higher up?"),
    "shorter than": ("Is the {a} less tall than the {b}?", "Which of the {a} and the {b} is shorter?"),
    "taller than": ("Does the {a} stand taller than the {b}?", "Which of the {a} and the {b} is taller?"),
    "narrower than": ("Does the {a} look narrower than the {b}?", "Which of the {a} and the {b} is narrower?"),
    "wider than": ("Is the {a} broader than the {b}, left to right?", "Which of the {a} and the {b} is wider?"),
    "smaller than": ("Does the {a} take up less space than the {b}?", "Which of the {a} and the {b} is smaller?"),
    "bigger than": ("Is the {a} larger than the {b}?", "Which of the {a} and the {b} is larger?"),
}
MOST = {"left_right": ("further to the left", "further to the right"), "front_behind": ("nearer to the camera",
        "farther back"), "above_below": ("lower", "higher"), "taller": ("shorter", "taller"),
        "wider": ("narrower", "wider"), "bigger": ("smaller", "bigger")}
CLOSER_WORDS = ("closer than", "farther than", "at about the same depth as")
FORMS = ("yesno", "which")      # a question asks "is A <words[want]> B?" or "which is <words[want]>, A or B?"
PIXEL_KINDS = ("depth", "position", "closer", "displacement")
QUESTIONS = {
    "depth": ["What is the depth at {p}?", "How far from the camera, along the viewing axis, is the point {p}?",
              "Estimate the depth of pixel {p} in meters.", "What depth does the point at {p} have?"],
    "position": ["What are the 3D coordinates of the point at {p}?",
                 "Where is the point {p} in 3D, relative to the camera?",
                 "Give the 3D position of {p} (X right, Y up, Z forward, in meters).", "Locate pixel {p} in 3D space."],
    "depths": ["What are the depths at {p}?", "How far from the camera, along the viewing axis, are the points {p}?",
               "Estimate the depths of pixels {p} in meters.", "What depths do the points at {p} have?"],
    "positions": ["What are the 3D coordinates of the points at {p}?",
                  "Where are the points {p} in 3D, relative to the camera?",
                  "Give the 3D positions of {p} (X right, Y up, Z forward, in meters).",
                  "Locate pixels {p} in 3D space."],
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

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = ("to the left", "to the right", "forward", "backward")     # of a camera motion, in the answer frame
THIRDS = (("left", "centre", "right"), ("upper", "middle", "lower"))    # columns and rows of the image


def meters(x) -> str:
    """A length or coordinate in meters as the answers write it: 2 decimals."""
    return f"{round(float(x), 2) + 0.0:.2f}"    # + 0.0 turns -0.00 into 0.00


def coord(x) -> str:
    """A normalized image coordinate as the questions write it: 3 decimals."""
    return f"{round(float(x), 3) + 0.0:.3f}"


def position(v) -> str:
    """A 3D point or vector as the answers write it: "(0.12, -0.40, 2.35) m"."""
    return f"({', '.join(meters(c) for c in v)}) m"


def capitalized(text: str) -> str:
    return text[0].upper() + text[1:]


def place(col: int, row: int) -> str:
    """A cell of the image's 3 x 3 grid in words: "centre", "left", "upper right", ..."""
    if (col, row) == (1, 1):
        return "centre"
    return THIRDS[0][col] if row == 1 else THIRDS[1][row] if col == 1 else f"{THIRDS[1][row]} {THIRDS[0][col]}"


def article(name: str) -> str:
    return "the " + name if name.endswith(" from the left") else ("an " if name[0] in "aeiou" else "a ") + name


def listing(items) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(kind: str, a, b):
    """(outcome: 0 = words[0], 1 = words[1], 2 = tie; value for a; value for b; margin) of two cubes [min, max]."""
    spec, a, b = RELATIONS[kind], np.array(a), np.array(b)
    if "axis" in spec:
        va, vb = (a.sum(0) / 2)[spec["axis"]], (b.sum(0) / 2)[spec["axis"]]
        return (2 if abs(va - vb) < TIE_CENTRE else int(va > vb)), va, vb, abs(va - vb)
    ea, eb = a[1] - a[0], b[1] - b[0]
    va, vb = {"height": (ea[1], eb[1]), "width": (ea[0], eb[0]), "volume": (ea.prod(), eb.prod())}[spec["measure"]]
    return (2 if max(va, vb) < TIE_RATIO * min(va, vb) else int(va > vb)), va, vb, abs(va - vb)


def relation_questions(kind: str, form: int, want: int) -> list:
    """The phrasings of a question wanting RELATIONS[kind]["words"][want]: yes/no (form 0) or "which" (form 1)."""
    word = RELATIONS[kind]["words"][want]
    if form == 0:
        return [f"Is the {{a}} {word} the {{b}}?", PHRASES[word][0]]
    return [f"Which is {MOST[kind][want]}, the {{a}} or the {{b}}?", PHRASES[word][1]]


def cube_distance(a, b):
    """Centre-to-centre distance and the gap between the closest points of two cubes (0 when they touch)."""
    a, b = np.array(a), np.array(b)
    gap = np.maximum(0, np.maximum(a[0] - b[1], b[0] - a[1]))
    return float(np.linalg.norm(a.sum(0) / 2 - b.sum(0) / 2)), float(np.linalg.norm(gap))


class Turn(NamedTuple):
    """One question/answer pair. `record` (meta "turns") says which points / objects it is about and what was
    asked: all the checker needs to recompute the answer."""
    level: str
    question: str
    answer: str
    record: dict


def picker(rng: np.random.Generator):
    """pick(options) -> one of them, drawn from rng: every phrasing choice goes through one of these."""
    return lambda options: options[int(rng.integers(len(options)))]


def ordered(turns: list, order: str, rng: np.random.Generator, levels=("caption", "scene", "object", "pixel")):
    """Turns in the ablation's --order: forward (as built), reversed (by level, in the order `levels`) or shuffled."""
    if order == "forward":
        return turns
    if order == "reversed":
        return [t for level in levels for t in turns if t.level == level]
    if order == "shuffled":
        return [turns[k] for k in rng.permutation(len(turns))]
    raise ValueError(f"order {order!r}: expected forward, reversed or shuffled")


def to_conversation(turns: list, image: str = "<image>\n") -> list:
    """A human and a gpt message per turn; `image` (the image markers) opens the first question."""
    conv = []
    for k, t in enumerate(turns):
        conv += [{"from": "human", "value": (image if k == 0 else "") + t.question}, {"from": "gpt", "value": t.answer}]
    return conv
