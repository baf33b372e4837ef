"""
Two diagnostics of a trained VLM that need no generation, on any stage directory and any held-out spatial or
grounding dataset (python eval.py --vlm runs/NAME/stage2 --diagnose --qa data/heldout):

- image dependence: the loss on the answers' digits with the true image vs with another image of the set. Zero
  means the answers' numbers do not depend on the image at all.
- localization gap: the loss on a point question's answer digits with the true query coordinates vs another
  point's coordinates of the same image (the answer kept); an answer without digits (grounding's "What is at
  (u, v)?" -> "The red chair.") on every answer token. Zero means the LLM does not read the queried place.
- answer image dependence: the same as the first over every answer token of the whole conversation, in context (a
  caption's words too): zero means the LLM answers without looking at the image at all, not only without finding
  the queried place in it.

Each is a mean per digit token, paired per sample, with a bootstrap 95 % interval over samples.

    result = diagnose(vlm, tok, image_size, samples, data_dir)     # {"image_dependence": ..., "localization_gap": ...}
"""

import re

import numpy as np
import torch
from PIL import Image

from evaluation.stats import bootstrap_ci
from language.tokenizer import query_points
from model import preprocess

POINT = re.compile(r"\(\d\.\d{3}, \d\.\d{3}\)")
POINT_KINDS = ("depth", "position", "point")      # single-point questions whose answer is that point's value


def digit_weights(tok, ids: list, mask: list) -> list:
    """1 on the supervised tokens that hold a digit, else 0."""
    has_digit, out = {}, []
    for i, m in zip(ids, mask):
        if m and i not in has_digit:
            has_digit[i] = any(ch.isdigit() for ch in tok.decode([i]))
        out.append(int(bool(m) and has_digit[i]))
    return out


@torch.no_grad()
def digit_loss(vlm, tok, conversation: list, image: np.ndarray, image_size: int, n_image_tokens: int,
               digits: bool = True):
    """(summed loss, count) over the answer digits of one single-image conversation (digits=False: every answer
    token)."""
    ids, mask = tok.render(conversation, n_image_tokens)
    weights = digit_weights(tok, ids, mask) if digits else [int(bool(m)) for m in mask]
    if not any(weights):
        return 0.0, 0
    dev = next(vlm.parameters()).device
    pixels = preprocess([image], vlm.vit.cfg, size=image_size).to(dev)
    points = [(0, u, v) for u, v in query_points(conversation)] if tok.point_id is not None else []
    points = torch.tensor(points, dtype=torch.float32, device=dev) if points else None
    loss = vlm(torch.tensor([ids], device=dev), pixels, torch.tensor([weights], device=dev), points=points)
    return float(loss), sum(weights)


def first_image(sample: dict, data_dir) -> np.ndarray:
    path = sample["image"][0] if isinstance(sample["image"], list) else sample["image"]
    with Image.open(f"{data_dir}/{path}") as im:
        return np.asarray(im.convert("RGB"))


def point_turns(sample: dict) -> list:
    """(turn index, its question's point text, another point of the same sample) of each single-point question."""
    conv, turns = sample["conversations"], sample["meta"]["turns"]
    found = []
    for t, rec in enumerate(turns):
        q = conv[2 * t]["value"]
        points = POINT.findall(q)
        if rec.get("kind") in POINT_KINDS and len(points) == 1:
            others = sorted({p for m in conv[::2] for p in POINT.findall(m["value"])} - {points[0]})
            if others:
                found.append((t, points[0], others[0]))
    return found


def ask(question: str) -> dict:
    return {"from": "human", "value": "<image>\n" + question.replace("<image>\n", "").replace("<image>", "")}


def diagnose(vlm, tok, image_size: int, samples: list, data_dir, log=print) -> dict:
    """The diagnostics over samples (held-out data with meta.turns); losses per digit token."""
    n_img = vlm.n_image_tokens(image_size)
    images = [first_image(s, data_dir) for s in samples]
    true_l, other_l, point_l, swap_l, whole_true, whole_other = [], [], [], [], [], []
    for k, s in enumerate(samples):
        conv, own = s["conversations"], {}           # own: turn -> (loss, count) with its true image
        whole = [ask(conv[0]["value"]), *conv[1:]]   # the whole conversation, every answer token
        a, n = digit_loss(vlm, tok, whole, images[k], image_size, n_img, digits=False)
        b, _ = digit_loss(vlm, tok, whole, images[(k + 1) % len(images)], image_size, n_img, digits=False)
        if n:
            whole_true.append(a / n)
            whole_other.append(b / n)
        for t in range(len(conv) // 2):               # every turn asked alone, with its image
            turn = [ask(conv[2 * t]["value"]), conv[2 * t + 1]]
            own[t] = a, n = digit_loss(vlm, tok, turn, images[k], image_size, n_img)
            b, _ = digit_loss(vlm, tok, turn, images[(k + 1) % len(images)], image_size, n_img)
            if n:
                true_l.append(a / n)
                other_l.append(b / n)
        for t, p, q in point_turns(s):
            (a, n), question, answer = own[t], conv[2 * t]["value"], conv[2 * t + 1]
            digits = n > 0  # an answer without digits ("The red chair.") is scored on every answer token
            if not digits:
                a, n = digit_loss(vlm, tok, [ask(question), answer], images[k], image_size, n_img, digits=False)
            b, _ = digit_loss(vlm, tok, [ask(question.replace(p, q)), answer], images[k], image_size, n_img,
                              digits=digits)
            if n:
                point_l.append(a / n)
                swap_l.append(b / n)
        if log and (k + 1) % 8 == 0:
            log(f"  diagnostics: {k + 1}/{len(samples)} samples")
    return {"image_dependence": summary(true_l, other_l, "true image", "other image"),
            "localization_gap": summary(point_l, swap_l, "true point", "swapped point"),
            "answer_image_dependence": summary(whole_true, whole_other, "true image", "other image")}


def summary(true: list, changed: list, a: str, b: str) -> dict:
    true, changed = np.asarray(true), np.asarray(changed)
    if len(true) == 0:
        return {"n": 0}
    lo, hi = bootstrap_ci(changed - true)
    return {"n": len(true), a: float(true.mean()), b: float(changed.mean()), "gap": float((changed - true).mean()),
            "gap_ci95": [lo, hi]}
