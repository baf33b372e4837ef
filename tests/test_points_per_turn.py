"""data.py spatial --points-per-turn K: the depth and 3D-position turns ask about K points and answer with K values in
the question's order; K = 1 is today's data byte for byte; `data.py check` verifies each of the K values on its own."""

import hashlib
import json
import re
import shutil

import pytest

import data
from dataengine import check as datacheck

# What data.generate("spatial", out, 4, seed=3, size=64, shard_size=3) said before --points-per-turn existed: the
# conversations and the points' pixels (text rounded to 2-3 decimals and integer pixels, not data.jsonl's bytes,
# whose full-precision floats may differ in the last bit with another numpy or CPU). One point per turn must keep
# drawing the same random numbers, so saying the same.
TODAY = "5efd79b4066a322d2a7cbb3be2eab10c4ec618868690ae386bcecf68c92a8876"
COORD = r"\(\d\.\d{3}, \d\.\d{3}\)"


def build(out, n=4, size=64, **kw):
    return data.generate("spatial", out, n, seed=3, size=size, shard_size=3, progress=False, **kw)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    out = tmp_path_factory.mktemp("k3") / "d"
    build(out, n=6, points_per_turn=3)
    return out


def said(path) -> str:
    records = [json.loads(line) for line in open(path)]
    text = json.dumps([[r["conversations"], [p["px"] for p in r["meta"]["points"]]] for r in records])
    return hashlib.sha256(text.encode()).hexdigest()


def test_one_point_per_turn_is_todays_data(tmp_path):
    default, one = build(tmp_path / "default"), build(tmp_path / "k1", points_per_turn=1)
    assert said(default) == TODAY and default.read_bytes() == one.read_bytes()
    assert json.loads((tmp_path / "k1" / "spatial.json").read_text())["config"]["points_per_turn"] == 1


def test_three_points_per_turn_pass_check(three, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(three)])
    assert e.value.code == 0, capsys.readouterr().out
    assert json.loads((three / "spatial.json").read_text())["config"]["points_per_turn"] == 3
    asked = 0
    for line in open(three / "data.jsonl"):
        r = json.loads(line)
        for t, turn in enumerate(r["meta"]["turns"]):
            q, a = r["conversations"][2 * t]["value"], r["conversations"][2 * t + 1]["value"]
            if turn["kind"] in ("depth", "position"):
                uv = [tuple(r["meta"]["points"][k]["uv"]) for k in turn["points"]]
                assert len(uv) == len(set(uv)) == len(re.findall(COORD, q)) == 3, q
                # one value per point, concise, no coordinate echoed
                assert len(re.findall(r"-?\d+\.\d+", a)) == 3 * (1 if turn["kind"] == "depth" else 3), a
                assert not re.search(COORD, a) and " and " in a, a
                asked += 1
            elif turn["kind"] in ("closer", "displacement"):      # these compare two points, as before
                assert len(turn["points"]) == 2
    assert asked >= 12


def test_a_turns_points_are_distinct_pixels_even_on_small_objects(tmp_path):
    # at 32 x 32 an object may have 4 interior pixels: 8 points on it cannot keep 2 pixels apart, but stay distinct
    build(tmp_path / "d", n=4, size=32, points_per_turn=8)   # 8: the most (issue 29's image-dependent share)
    assert datacheck.check(tmp_path / "d")[0] == []
    for line in open(tmp_path / "d" / "data.jsonl"):
        r = json.loads(line)
        for turn in r["meta"]["turns"]:
            px = [tuple(r["meta"]["points"][k]["px"]) for k in turn.get("points", [])]
            assert len(px) == len(set(px)) and len(px) in (0, 2, 8), turn


def corrupt(out, turn_kind: str, point: int) -> str:
    """Add 0.3 m to one point's value (its depth, or its Z) in the first `turn_kind` turn of line 2 -> its place."""
    lines = (out / "data.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    t = next(t for t, turn in enumerate(rec["meta"]["turns"]) if turn["kind"] == turn_kind)
    answer = rec["conversations"][2 * t + 1]["value"]
    per = 1 if turn_kind == "depth" else 3
    m = list(re.finditer(r"-?\d+\.\d+", answer))[(point + 1) * per - 1]
    rec["conversations"][2 * t + 1]["value"] = f"{answer[:m.start()]}{float(m.group()) + 0.3:.2f}{answer[m.end():]}"
    lines[1] = json.dumps(rec)
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    return f"turn {t} ({turn_kind}): point {point + 1} of 3: numbers "


@pytest.mark.parametrize("kind, point", [("depth", 1), ("depth", 2), ("position", 0), ("position", 2)])
def test_one_wrong_value_of_three_is_named(three, tmp_path, kind, point, capsys):
    out = tmp_path / "d"
    shutil.copytree(three, out)
    where = corrupt(out, kind, point)
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert e.value.code == 1 and len(printed) == 2, printed       # the one problem, then the summary
    assert printed[0].startswith(f"{out / 'data.jsonl'}:line 2: spatial-000001: {where}"), printed


def test_values_in_another_order_than_the_points_are_caught(three, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(three, out)
    lines = (out / "data.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    t = next(t for t, turn in enumerate(rec["meta"]["turns"]) if turn["kind"] == "depth")
    rec["meta"]["turns"][t]["points"] = rec["meta"]["turns"][t]["points"][::-1]       # the question's order reversed
    lines[0] = json.dumps(rec)
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    problems = datacheck.check(out)[0]
    assert any(f"line 1: spatial-000000: turn {t} (depth): level pixel or the question does not name its distinct "
               "points in order" in p for p in problems), problems


@pytest.mark.parametrize("value", ["0", "9", "-1", "two"])
def test_bad_points_per_turn_is_refused(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["spatial", "--n", "2", "--out", str(tmp_path / "d"), "--points-per-turn", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --points-per-turn: invalid" in err and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()
    for kind, k, message in (("spatial", 9, "points_per_turn 9: expected a whole number of points from 1 to 8"),
                             ("spatial", 2.5, "points_per_turn 2.5: expected a whole number"),
                             ("grounding", 2, "points_per_turn 2: applies to the depth / 3D-position turns of spatial "
                                              "data, not to 'grounding'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            data.generate(kind, tmp_path / "api", 2, points_per_turn=k, progress=False)
    assert not (tmp_path / "api").exists()


def test_a_manifest_from_before_resumes_with_one_point(tmp_path):
    out = tmp_path / "d"
    build(out, n=3)
    manifest = json.loads((out / "spatial.json").read_text())
    del manifest["config"]["points_per_turn"]                   # as written before the option existed
    (out / "spatial.json").write_text(json.dumps(manifest))
    assert said(build(out, n=4)) == TODAY
    with pytest.raises(SystemExit, match="'points_per_turn': 1}, not .*'points_per_turn': 3}"):
        build(out, n=5, points_per_turn=3)
