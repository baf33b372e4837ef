"""instruct.py: stage-1 captions and stage-2 single-view instruction QA, every answer recomputed by datacheck.py."""

import json
import re

import numpy as np
import pytest

import data
from dataengine import check as datacheck
from dataengine import scenes
from test_data import tamper, write_frame


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    for kind in ("captions", "instruct"):
        data.generate(kind, root / kind, 40, seed=2, size=64, progress=False, shard_size=16)
    return root


def records(path):
    return [json.loads(line) for line in open(path / "data.jsonl")]


def test_captions(generated):
    problems, stats = datacheck.check(generated / "captions")
    assert problems == [] and stats["samples"] == 40
    recs = records(generated / "captions")
    prompts = {r["conversations"][0]["value"].replace("<image>", "").strip() for r in recs}
    assert len(prompts) >= 6                                              # phrasings vary
    firsts = [r["conversations"][0]["value"] for r in recs]
    assert any(f.startswith("<image>\n") for f in firsts) and any(f.endswith("\n<image>") for f in firsts)
    for r in recs:
        assert len(r["conversations"]) == 2 and r["levels"] == ["caption"]
        assert (generated / "captions" / r["image"]).exists()
    texts = [r["conversations"][1]["value"] for r in recs]
    for pattern in (", holding ", " in a room with ", "An indoor scene with ", " stands on the ",
                    " is nearest to the "):
        assert any(pattern in t for t in texts), pattern                 # every caption form occurs


def test_instruction_qa(generated):
    problems, stats = datacheck.check(generated / "instruct")
    assert problems == [] and stats["samples"] == 40
    assert 0.3 < stats["Yes"] / (stats["Yes"] + stats["No"]) < 0.7
    recs = records(generated / "instruct")
    kinds = [t["kind"] for r in recs for t in r["meta"]["turns"]]
    for kind in ("count", "colour", "exists", "support", "position", "height"):
        assert kinds.count(kind) >= 5, kind
    assert kinds.count("caption") + kinds.count("long_description") == 40
    assert kinds.count("caption") >= 10 and kinds.count("long_description") >= 10
    for r in recs:
        assert len(r["conversations"]) == 10 and r["conversations"][0]["value"].startswith("<image>\n")


def test_checker_catches_wrong_answers(generated, tmp_path):
    import shutil
    out = tmp_path / "instruct"
    shutil.copytree(generated / "instruct", out)
    recs = records(out)
    edits = {}

    def first(kind):
        for i, r in enumerate(recs):
            for t, turn in enumerate(r["meta"]["turns"]):
                if turn["kind"] == kind and i not in edits:
                    return i, t
        raise AssertionError(kind)

    def change(kind, fix):
        i, t = first(kind)
        edits[i] = kind
        def edit(rec):
            answer = rec["conversations"][2 * t + 1]
            answer["value"] = fix(answer["value"])
        tamper(out, i, edit)

    words = {"no": "one", "one": "two", "two": "three", "three": "no"}
    change("count", lambda a: re.sub(r"There (is|are) (\w+)", lambda m: f"There are {words.get(m.group(2), 'no')}", a))
    change("colour", lambda a: a.replace(a.split()[-1], "purple." if "purple" not in a else "orange."))
    change("exists", lambda a: ("No" + a[3:]) if a.startswith("Yes") else ("Yes" + a[2:]))
    change("height", lambda a: re.sub(r"(\d+\.\d+)", lambda m: f"{float(m.group(1)) + 0.1:.2f}", a))
    change("caption", lambda a: " ".join(a.split(" ")[::-1]))        # objects out of order (and more)
    problems = datacheck.check(out)[0]
    for i in edits:
        assert any(f"data.jsonl:line {i + 1}: instruct-{i:06d}: " in p for p in problems), (edits[i], problems)


def test_rgbd_frames(tmp_path):
    root = tmp_path / "frames"
    for k in range(2):
        rng = np.random.default_rng(30 + k)
        scene = scenes.random_scene(rng, n_objects=6)
        write_frame(root / f"frame{k}", scene, scenes.render(scene, scenes.random_camera(rng, scene), 72, 96))
    (root / "frame1" / "captions.txt").write_text("A user's own caption.\n")
    for kind in ("captions", "instruct"):
        data.generate(kind, tmp_path / kind, 6, rgbd=root, progress=False)
        assert datacheck.check(tmp_path / kind)[0] == []
    caps = records(tmp_path / "captions")
    assert caps[1]["conversations"][1]["value"] == "A user's own caption." and caps[1]["meta"]["source"] == "rgbd"
    kinds = {t["kind"] for r in records(tmp_path / "instruct") for t in r["meta"]["turns"]}
    assert not kinds & {"colour", "support"}                 # RGB-D labels carry no colours and no supports
