"""dataengine/grounding.py: stage 2's grounding turns, every answer re-derived by the checker from the masks."""

import json

import pytest

import data
from dataengine import check as datacheck
from test_data import tamper


@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding")
    data.generate("grounding", out, 30, seed=4, size=96, progress=False)
    return out, [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def test_every_grounding_answer_agrees_with_the_masks(grounding):
    out, records = grounding
    problems, stats = datacheck.check(out)
    assert problems == [] and stats["samples"] == 30
    assert all(stats.get(f"grounding_{k}", 0) > 10 for k in ("point", "box", "which"))
    assert any(a["value"].startswith("No object: the ") for r in records for a in r["conversations"][1::2])
    for r in records:
        assert r["levels"] == ["grounding"] * 6 and r["conversations"][0]["value"].startswith("<image>\n")
        assert not any(w in m["value"].lower() for m in r["conversations"] for w in (" depth", " meters", " m."))


@pytest.mark.parametrize("kind", ["point", "box", "which"])
def test_checker_catches_wrong_grounding_answers(grounding, tmp_path, kind):
    out, records = grounding
    k, t = next((k, t) for k, r in enumerate(records) for t, turn in enumerate(r["meta"]["turns"])
                if turn["kind"] == kind)
    wrong = {"point": "The purple elephant.", "box": "[0.01, 0.02, 0.03, 0.04]", "which": "(0.999, 0.999)."}[kind]
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.iterdir():
        (bad / p.name).symlink_to(p)
    (bad / "data.jsonl").unlink()
    (bad / "data.jsonl").write_text((out / "data.jsonl").read_text())
    tamper(bad, k, lambda rec: rec["conversations"][2 * t + 1].update(value=wrong))
    problems, _ = datacheck.check(bad)
    assert len(problems) == 1 and f"turn {t} ({kind})" in problems[0]
