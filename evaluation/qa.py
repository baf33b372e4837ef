"""
Spatial QA: ask a trained VLM the held-out conversations' questions, parse its free-form answers, and score them
against the ground truth each sample stores (eval.py reports the scores).

    samples = load_conversations("data/heldout", limit=24)     # spatial data written with a seed training never used
    answer = vlm_answer_fn(vlm, tok, image_size=224, data_dir="data/heldout")
    scores, answers = evaluate_qa(samples, answer)              # per level and question type

The parser reads numbers with units (m, cm, mm, ft), signs, thousands separators and decimal commas; yes/no; and
relation wording ("to the left of", "behind", "roughly level with", ...), naming the objects of the question.
Scores: depth within 10 % and 25 %, relation accuracy, relative distance error, point-position error in meters.
"""

import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from language.tokenizer import query_points
from model import preprocess

_NUM = (r"[-+\u2212]?(?:\d+,\d{1,2}(?=\s*(?:m|cm|mm|meters?|metres?)\b)"  # a decimal comma before a unit
        r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_UNIT = (r"(?:millimet(?:er|re)s?|mm|centimet(?:er|re)s?|cm|kilomet(?:er|re)s?|km|met(?:er|re)s?|m|feet|foot|ft"
         r"|inch(?:es)?)\b")
UNIT_SCALE = {"mm": 1e-3, "millimet": 1e-3, "cm": 1e-2, "centimet": 1e-2, "km": 1e3, "kilomet": 1e3, "m": 1.0,
              "met": 1.0, "feet": 0.3048, "foot": 0.3048, "ft": 0.3048, "inch": 0.0254}
NUMBER = re.compile(rf"(?<![\w.])({_NUM})(?:\s*({_UNIT}))?", re.I)
POINT = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")  # (u, v): a pixel in our questions
VECTOR = re.compile(rf"\(\s*({_NUM})\s*(?:m\b)?\s*,\s*({_NUM})\s*(?:m\b)?\s*,\s*({_NUM})\s*(?:m\b)?\s*\)"
                    rf"(?:\s*({_UNIT}))?", re.I)
LABELLED = re.compile(rf"\bX\s*[=:]\s*({_NUM})\s*({_UNIT})?.*?\bY\s*[=:]\s*({_NUM})\s*({_UNIT})?"
                      rf".*?\bZ\s*[=:]\s*({_NUM})\s*({_UNIT})?", re.S | re.I)
WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def _float(s: str) -> float:
    s = s.replace("\u2212", "-")
    if re.fullmatch(r"[-+]?\d+,\d{1,2}", s):  # a decimal comma ("2,35 m")
        return float(s.replace(",", "."))
    return float(s.replace(",", ""))


def _scale(unit) -> float:
    longest_first = sorted(UNIT_SCALE.items(), key=lambda kv: -len(kv[0]))
    return next(v for k, v in longest_first if unit.lower().startswith(k)) if unit else 1.0


def parse_numbers(text: str) -> list:
    """Lengths in the text, in meters, as (value, has_unit), in order; pixel coordinates "(u, v)" and 3D vectors
    are left out. Handles signs (also U+2212), thousands separators, decimal commas before a unit, m/cm/mm/km/ft/
    inches, and the number words zero-twelve before a unit ("two meters")."""
    text = VECTOR.sub(" ", POINT.sub(" ", text))
    text = re.sub(r"\b(" + "|".join(WORDS) + rf")\s+(?={_UNIT})", lambda m: f"{WORDS[m.group(1).lower()]} ",
                  text, flags=re.I)
    return [(_float(m.group(1)) * _scale(m.group(2)), m.group(2) is not None) for m in NUMBER.finditer(text)]


def parse_length(text: str) -> float | None:
    """The answer's length in meters: the first number that carries a unit, else the last bare number."""
    nums = parse_numbers(text)
    with_unit = [v for v, u in nums if u]
    return with_unit[0] if with_unit else (nums[-1][0] if nums else None)


def parse_vector(text: str) -> np.ndarray | None:
    """A 3D vector in meters: "(x, y, z) m" or "X = x m, Y = y m, Z = z m"; None when there is none."""
    m = VECTOR.search(text)
    if m:
        return np.array([_float(g) for g in m.groups()[:3]]) * _scale(m.group(4))
    m = LABELLED.search(text)
    if m:
        return np.array([_float(m.group(i)) * _scale(m.group(i + 1)) for i in (1, 3, 5)])
    return None


TIE = (r"not clearly|neither|unclear|hard to (?:say|tell)|can(?:no|')t (?:say|tell)|about the same"
       r"|roughly (?:the )?same|roughly level|about as")
YES = r"yes|yeah|yep|correct|true|indeed|affirmative|that's right|sure"
NO = r"no|nope|not really|not at all|incorrect|false|negative|it is not|it isn't|it's not"


def parse_yes_no(text: str) -> int | None:
    """1 yes, 0 no, 2 "not clearly" (a tie), None when the answer takes no side. Reads the opening words first."""
    t = text.strip().lower()
    for pattern, value in ((TIE, 2), (YES, 1), (NO, 0)):
        if re.match(rf"(?:{pattern})\b", t):
            return value
    for pattern, value in ((TIE, 2), (r"\b(?:yes|yeah|yep)\b", 1), (r"\b(?:no|nope)\b", 0)):
        if re.search(pattern, t):
            return value
    return None


# Verdict phrases per question kind -> outcome for "<subject> <phrase> <object>": 0 = the first of the kind's
# words (left of, in front of, below, shorter, narrower, smaller, closer), 1 = the second, 2 = a tie. Ties first.
RELATION_PHRASES = {
    "left_right": [(r"roughly level|level,? left to right|same horizontal position", 2), (r"left of", 0),
                   (r"right of", 1)],
    "front_behind": [(r"about as far|same depth|same distance", 2),
                     (r"in front of|closer (?:to the camera )?than|nearer (?:to the camera )?than", 0),
                     (r"behind|(?:farther|further) (?:from the camera |away |back )?than", 1)],
    "above_below": [(r"(?:about|roughly) the same height|level with", 2), (r"below|lower than|beneath|under", 0),
                    (r"above|higher(?: up)? than|over", 1)],
    "taller": [(r"about as tall|same height", 2), (r"shorter than", 0), (r"taller than", 1)],
    "wider": [(r"about as wide|same width", 2), (r"narrower than", 0), (r"wider than", 1)],
    "bigger": [(r"about as big|about as large|same size", 2), (r"smaller than", 0), (r"(?:bigger|larger) than", 1)],
    "closer": [(r"(?:at )?about the same depth|same distance", 2),
               (r"closer than|nearer than|in front of", 0), (r"(?:farther|further) than|behind", 1)],
}


def _mark_entities(text: str, entities: list) -> str:
    """Replace mentions of the two entities by <0> / <1>: object names (also by a word only one of them has, as in
    "the red one"), or pixel coordinates matched to the nearest question point within 0.02."""
    if isinstance(entities[0], str):
        names = [e.lower() for e in entities]
        text = text.lower()
        for k in sorted(range(len(names)), key=lambda k: -len(names[k])):
            text = re.sub(rf"\b{re.escape(names[k])}\b", f"<{k}>", text)
        own = [set(n.split()) - set(names[1 - k].split()) for k, n in enumerate(names)]
        for k, words in enumerate(own):
            for w in (w for w in words if len(w) > 2):
                text = re.sub(rf"\b{re.escape(w)}(?:\s+one)?\b", f"<{k}>", text)
        return text

    text = re.sub(r"\b(?:the )?first(?: point)?\b", "<0>", text, flags=re.I)     # concise answers: question order
    text = re.sub(r"\b(?:the )?second(?: point)?\b", "<1>", text, flags=re.I)

    def nearest(m):
        uv = np.array([_float(m.group(1)), _float(m.group(2))])
        d = [np.abs(uv - np.array(e)).max() for e in entities]
        return f"<{int(np.argmin(d))}>" if min(d) <= 0.02 else m.group(0)
    return POINT.sub(nearest, text).lower()


def parse_relation(text: str, kind: str, entities: list, form: str, want: int) -> int | None:
    """The answer's outcome for "<entity 0> vs <entity 1>" (0, 1 or 2 as in RELATION_PHRASES). A yes/no question
    is read from its yes/no; otherwise from the last verdict "<A> <phrase> <B>", else from which entity is named."""
    if form == "yesno":
        yn = parse_yes_no(text)
        if yn is not None:
            return 2 if yn == 2 else (want if yn == 1 else 1 - want)
    marked = _mark_entities(text, entities)
    verdict = None
    for clause in re.split(r"[.;!?](?=\s|$)|:\s", marked):
        found = sorted((m.start(), m.end(), outcome) for pattern, outcome in RELATION_PHRASES[kind]
                       for m in re.finditer(rf"\b(?:{pattern})\b", clause))
        for start, end, outcome in found:
            before = re.findall(r"<([01])>", clause[:start])
            after = re.findall(r"<([01])>", clause[end:])
            if before and (not after or after[0] != before[-1]):
                verdict = outcome if before[-1] == "0" or outcome == 2 else 1 - outcome
    if verdict is not None:
        return verdict
    if re.search(rf"\b(?:{TIE})\b", marked):
        return 2
    named = set(re.findall(r"<([01])>", marked))
    if form == "which" and len(named) == 1:
        return want if named == {"0"} else 1 - want
    return None


def score_turn(sample: dict, t: int, answer: str) -> dict:
    """One turn of a held-out sample against its reference answer (both parsed the same way). Returns kind, level,
    parsed (the answer could be read), correct (relations: same outcome; lengths and vectors: within 25 %), and
    per kind: rel_err (depth, displacement and distance lengths), err_m (3D vectors), recall (captions)."""
    meta, turn, ref = sample["meta"], sample["meta"]["turns"][t], sample["conversations"][2 * t + 1]["value"]
    kind = turn["kind"]
    out = {"kind": kind, "level": sample["levels"][t], "parsed": False, "correct": False}
    if kind in ("depth", "displacement", "distance"):  # a length; displacement: its distance, else the vector's norm
        out.update(within10=False, within25=False)  # unparsed answers count as misses
        truth, guess = parse_length(ref), parse_length(answer)
        if guess is None and kind == "displacement" and parse_vector(answer) is not None:
            guess = float(np.linalg.norm(parse_vector(answer)))
        if truth is None:
            return {**out, "unscorable": True}
        if guess is not None:
            rel = abs(guess - truth) / max(abs(truth), 1e-6)
            out.update(parsed=True, correct=rel <= 0.25, rel_err=rel, within10=rel <= 0.10, within25=rel <= 0.25)
    elif kind == "position":
        truth, guess = parse_vector(ref), parse_vector(answer)
        if truth is None:
            return {**out, "unscorable": True}
        if guess is not None:
            err = float(np.linalg.norm(guess - truth))
            out.update(parsed=True, correct=err <= 0.25 * np.linalg.norm(truth), err_m=err)
    elif kind in RELATION_PHRASES:
        if kind == "closer":
            entities = [tuple(meta["points"][k]["uv"]) for k in turn["points"][:2]]
        else:
            names = {o["id"]: o["name"] for o in meta["objects"]}
            entities = [names[k] for k in turn["objects"]]
        truth = parse_relation(ref, kind, entities, turn["form"], turn["want"])
        guess = parse_relation(answer, kind, entities, turn["form"], turn["want"])
        if truth is None:
            return {**out, "unscorable": True}
        out.update(parsed=guess is not None, correct=guess == truth)
    elif kind.startswith("caption"):  # objects the reference names that the answer names too
        names = [o["name"].lower() for o in meta["objects"]]
        said = [n for n in names if n in ref.lower()]
        if not said:
            return {**out, "unscorable": True}
        recall = sum(n in answer.lower() for n in said) / len(said)
        out.update(parsed=True, correct=recall >= 0.5, recall=recall)
    elif kind in ("point", "box", "which"):   # grounding (stage 2)
        out.update(parsed=True, correct=grounded(kind, ref, answer))
    else:
        return {**out, "unscorable": True}
    return out


def grounded(kind: str, ref: str, answer: str) -> bool:
    """A grounding answer against the reference: the same name ("what is at"), a box of IoU >= 0.5, or the same
    point within 0.02 ("which of the points")."""
    if kind == "point":
        name = re.sub(r"^(?:the |no object: the )|\.$", "", ref.strip().lower())
        return re.search(rf"\b{re.escape(name)}\b", answer.lower()) is not None
    numbers = lambda t: [float(x) for x in re.findall(r"\d*\.\d+|\d+", t)]
    a, r = numbers(answer), numbers(ref)
    if kind == "which":
        return len(a) >= 2 and abs(a[0] - r[0]) <= 0.02 and abs(a[1] - r[1]) <= 0.02
    if len(a) < 4:
        return False
    (ax0, ay0, ax1, ay1), (rx0, ry0, rx1, ry1) = a[:4], r[:4]
    inter = max(0.0, min(ax1, rx1) - max(ax0, rx0)) * max(0.0, min(ay1, ry1) - max(ay0, ry0))
    union = (ax1 - ax0) * (ay1 - ay0) + (rx1 - rx0) * (ry1 - ry0) - inter
    return union > 0 and inter / union >= 0.5


def _mean(xs):
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def score_qa(samples: list, answers: list) -> dict:
    """answers[i][t]: the answer to turn t of samples[i] -> {"by_type": {kind: {...}}, "by_level", "overall"}, each
    with accuracy (unparsed answers count as wrong), parse_rate, n and where they apply within10/within25, mean and
    median relative and 3D (m) errors, caption recall. Turns with an unreadable reference count as unscorable_turns."""
    turns, unscorable = [], 0
    for sample, said in zip(samples, answers, strict=True):
        for t, answer in enumerate(said):
            r = score_turn(sample, t, answer)
            if r.pop("unscorable", False):
                unscorable += 1
            else:
                turns.append(r)

    def summary(rs):
        s = {"n": len(rs), "accuracy": _mean(r["correct"] for r in rs), "parse_rate": _mean(r["parsed"] for r in rs)}
        for key in ("within10", "within25", "rel_err", "err_m", "recall"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                s[key] = _mean(vals)
                if key in ("rel_err", "err_m"):
                    s[key + "_median"] = float(np.median(vals))
        return s

    group = lambda key: {k: summary([r for r in turns if r[key] == k]) for k in dict.fromkeys(r[key] for r in turns)}
    graded = [r for r in turns if r["level"] != "caption"]
    return {"by_type": group("kind"), "by_level": group("level"), "overall": summary(graded),
            "unscorable_turns": unscorable}


def evaluate_qa(samples: list, answer_fn, batch_size: int = 16, log=print) -> tuple[dict, list]:
    """Answer every turn of every sample with answer_fn(samples, turn_index) -> list[str] (one answer per sample;
    earlier turns are the conversation's own), then score_qa. Returns (scores, answers)."""
    answers = [[None] * (len(s["conversations"]) // 2) for s in samples]
    n_turns = max(len(a) for a in answers)
    t0 = time.time()
    for t in range(n_turns):
        todo = [i for i, a in enumerate(answers) if t < len(a)]
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            got = answer_fn([samples[i] for i in idx], t)
            if len(got) != len(idx):
                raise ValueError(f"answer_fn returned {len(got)} answers for {len(idx)} samples (turn {t})")
            for i, a in zip(idx, got):
                answers[i][t] = str(a)
        if log:
            log(f"  qa: turn {t + 1}/{n_turns} answered ({time.time() - t0:.0f} s)")
    return score_qa(samples, answers), answers


def load_conversations(data_dir, limit: int | None = None) -> list:
    """Samples of a dataset directory's data.jsonl (DESIGN.md format) that carry the turn records QA needs."""
    path = Path(data_dir) / "data.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (write held-out data with `python data.py spatial --seed <other>`)")
    samples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                s = json.loads(line)
                if "turns" not in s.get("meta", {}):
                    raise ValueError(f"{path}:{line_no}: sample {s.get('id')} has no meta.turns (not spatial data)")
                samples.append(s)
            if limit and len(samples) >= limit:
                break
    return samples


def read_answers(path, samples: list) -> list:
    """answers[i][t] for samples from a JSONL of {"id", "answers": [...]}; every sample must be answered."""
    by_id = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line) if line.strip() else None
                if rec is not None:
                    by_id[rec["id"]] = rec["answers"]
            except (ValueError, KeyError, TypeError) as e:      # JSONDecodeError, UnicodeDecodeError are ValueErrors
                raise ValueError(f"{path}:{n}: expected a JSON object {{'id': ..., 'answers': [str per turn]}} "
                                 f"({type(e).__name__}: {e})") from e
    missing = [s["id"] for s in samples if s["id"] not in by_id]
    if missing:
        raise KeyError(f"{path}: no answers for {len(missing)} samples, e.g. {missing[:3]}")
    for s in samples:
        if len(by_id[s["id"]]) != len(s["conversations"]) // 2:
            raise ValueError(f"{path}: sample {s['id']} has {len(by_id[s['id']])} answers for "
                             f"{len(s['conversations']) // 2} turns")
    return [by_id[s["id"]] for s in samples]


def vlm_answer_fn(vlm, tok, image_size: int, data_dir, max_new_tokens: int = 160, context: str = "none"):
    """answer_fn for evaluate_qa: batched KV-cache generation by `vlm`. context "none" asks each question on its own
    about the sample's images (cheap: short prompts); "gold" puts the conversation's own earlier turns before it,
    as in training (prompts grow to the whole conversation)."""
    if context not in ("none", "gold"):
        raise ValueError(f"context must be 'none' or 'gold', got {context!r}")
    data_dir = Path(data_dir)
    n_tokens = vlm.n_image_tokens(image_size)
    device = next(vlm.parameters()).device

    def answer(samples, t):
        prompts, images, points = [], [], []
        for s in samples:
            paths = s["image"] if isinstance(s["image"], list) else [s["image"]]
            question = dict(s["conversations"][2 * t])
            if context == "none" and t > 0:  # the images travel with the question
                question["value"] = "<image>\n" * len(paths) + question["value"]
            turns = (s["conversations"][:2 * t] if context == "gold" else []) + [question]
            ids, _ = tok.render(turns, n_image_tokens=n_tokens, add_generation_prompt=True)
            prompts.append(ids)
            if tok.point_id is not None:  # what render marked: query points of this sample's (single) image
                points += [(len(images), u, v) for u, v in query_points(turns)]
            images += [Image.open(data_dir / p).convert("RGB") for p in paths]
        pixels = preprocess(images, vlm.vit.cfg, size=image_size).to(device)
        points = torch.tensor(points, dtype=torch.float32, device=device) if points else None
        out = vlm.generate(prompts, pixels, points, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids)
        return [tok.decode(o, skip_special=True).strip() for o in out]

    return answer
