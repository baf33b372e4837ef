"""data.py: the 12-turn spatial conversations, the writer (deterministic, resumable) and the checker."""

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from dataengine import check as datacheck
from dataengine import scenes
from dataengine import spatial, text, views


def build(out, n=8, size=72, workers=1, **kw):
    options = dict(dict(seed=3, shard_size=3), **kw)
    data.generate("spatial", out, n, size=size, workers=workers, progress=False, **options)
    return [json.loads(line) for line in open(Path(out) / "data.jsonl")]


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("spatial")
    return out, build(out, n=40, size=64, shard_size=16)


def test_every_answer_agrees_with_ground_truth(dataset):
    out, records = dataset
    problems, stats = datacheck.check(out)
    assert problems == [] and stats["samples"] == 40
    # yes/no answers are balanced; near-ties are answered as ties
    yes, no = stats.get("Yes", 0), stats.get("No", 0)
    assert yes + no > 60 and 0.35 < yes / (yes + no) < 0.65 and stats.get("Not clearly", 0) > 0


def test_conversation_format(dataset):
    out, records = dataset
    assert [r["id"] for r in records] == [f"spatial-{i:06d}" for i in range(40)]
    for r in records:
        conv, meta = r["conversations"], r["meta"]
        assert len(conv) == 24 and [m["from"] for m in conv] == ["human", "gpt"] * 12
        assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in m["value"] for m in conv) == 1
        assert r["levels"] == ["pixel"] * 5 + ["object"] * 4 + ["scene"] + ["caption"] * 2
        assert (out / r["image"]).exists() and all((out / meta[k]).exists() for k in ("depth", "instance", "semantic"))
        assert meta["gravity"] == "known" and meta["cube_source"] == "scene" and len(meta["K"]) == 3
        R = np.array(meta["answer_from_camera"])
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-5)
    # answers carry the image, not the question: no answer echoes a query coordinate, and every pixel- and
    # object-level answer holds a number the conversation has not shown before it
    for r in records:
        conv = r["conversations"]
        for k, level in enumerate(r["levels"]):
            answer, before = conv[2 * k + 1]["value"], " ".join(m["value"] for m in conv[:2 * k + 1])
            assert not re.search(r"\(\d\.\d{3}, \d\.\d{3}\)", answer)
            if level in ("pixel", "object"):
                assert any(x not in before for x in re.findall(r"-?\d+\.\d+", answer)), answer
    # several phrasings per question type
    depth_questions = {r["conversations"][0]["value"].split("(")[0] for r in records}
    assert len(depth_questions) >= 3


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = build(tmp_path / "a", n=5, workers=1)
    b = build(tmp_path / "b", n=5, workers=2)
    assert a == b and digest(tmp_path / "a") == digest(tmp_path / "b")
    c = build(tmp_path / "c", n=5, seed=4)
    assert c != a


def test_interrupted_run_resumes_without_duplicates(tmp_path, monkeypatch):
    real = spatial.make_sample

    def crash_at_7(cfg, index, out, frames=()):
        if index == 7:
            raise KeyboardInterrupt
        return real(cfg, index, out, frames)

    monkeypatch.setattr(spatial, "make_sample", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "run", n=10)
    shards = sorted(p.name for p in (tmp_path / "run" / "shards").glob("*.jsonl"))
    assert shards == ["000000-000003.jsonl", "000003-000006.jsonl"]
    assert not (tmp_path / "run" / "data.jsonl").exists()
    monkeypatch.setattr(spatial, "make_sample", real)
    resumed = build(tmp_path / "run", n=10)
    assert [r["id"] for r in resumed] == [f"spatial-{i:06d}" for i in range(10)]
    fresh = build(tmp_path / "fresh", n=10)
    assert resumed == fresh
    more = build(tmp_path / "run", n=13)             # a larger --n continues the same dataset
    assert more[:9] == fresh[:9] and len({r["id"] for r in more}) == 13
    with pytest.raises(SystemExit, match="seed"):    # other options would mix two datasets
        build(tmp_path / "run", n=10, seed=5)


def test_orders_keep_the_turns(tmp_path):
    fwd = build(tmp_path / "f", n=3)
    reversed_levels = ["caption"] * 2 + ["scene"] + ["object"] * 4 + ["pixel"] * 5
    for order, levels in (("reversed", reversed_levels), ("shuffled", None)):
        other = build(tmp_path / order, n=3, order=order)
        assert datacheck.check(tmp_path / order)[0] == []
        for a, b in zip(fwd, other):
            strip = lambda r: sorted((q["value"].replace("<image>\n", ""), g["value"])
                                     for q, g in zip(r["conversations"][::2], r["conversations"][1::2]))
            assert strip(a) == strip(b) and b["conversations"][0]["value"].startswith("<image>\n")
            assert levels is None or b["levels"] == levels
            assert sorted(b["levels"]) == sorted(a["levels"])


def tamper(out, index, edit):
    lines = (out / "data.jsonl").read_text().splitlines()
    rec = json.loads(lines[index])
    edit(rec)
    lines[index] = json.dumps(rec)
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")


def test_checker_catches_wrong_answers(tmp_path, capsys):
    out = tmp_path / "d"
    records = build(out, n=4)

    def wrong_depth(rec):       # turn 0 is a depth question in forward order: change its number
        a = rec["conversations"][1]["value"]
        d = datacheck.NUMBER.findall(a)[-1]
        rec["conversations"][1]["value"] = a.replace(d + " m", f"{float(d) + 0.2:.2f} m")

    def flip_yes_no(rec):
        for t, turn in enumerate(rec["meta"]["turns"]):
            a = rec["conversations"][2 * t + 1]["value"]
            if turn.get("form") == "yesno" and a[:3] in ("Yes", "No.", "No,"):
                rec["conversations"][2 * t + 1]["value"] = ("No" + a[3:]) if a.startswith("Yes") else ("Yes" + a[2:])
                return
        raise AssertionError("no yes/no turn")

    def swap_relation(rec):     # "A is left of B" -> "A is right of B" in the first non-tie object answer
        for t, turn in enumerate(rec["meta"]["turns"]):
            a = rec["conversations"][2 * t + 1]["value"]
            w0, w1, _ = text.RELATIONS.get(turn["kind"], {}).get("words", "   ")
            if f" is {w0} the " in a or f" is {w1} the " in a:
                a = a.replace(f" is {w0} the ", " is @ the ").replace(f" is {w1} the ", f" is {w0} the ")
                rec["conversations"][2 * t + 1]["value"] = a.replace(" is @ the ", f" is {w1} the ")
                return
        raise AssertionError("no object relation to swap")

    tamper(out, 0, wrong_depth)
    tamper(out, 1, flip_yes_no)
    tamper(out, 2, swap_relation)
    depth = np.asarray(Image.open(out / records[3]["meta"]["depth"])).copy()
    p = records[3]["meta"]["points"][0]["px"]
    depth[p[1], p[0]] += 300
    Image.fromarray(depth).save(out / records[3]["meta"]["depth"])
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(out)])
    assert e.value.code == 1
    printed = capsys.readouterr().out
    assert all(f"spatial-00000{i}" in printed for i in range(4)), printed


def test_relations_and_ties():
    box = lambda x, y, z, w=0.4, h=0.4, d=0.4: [[x - w / 2, y - h / 2, z - d / 2], [x + w / 2, y + h / 2, z + d / 2]]
    assert text.relation("left_right", box(0, 0, 2), box(0.5, 0, 2))[0] == 0           # A left of B
    assert text.relation("left_right", box(0.55, 0, 2), box(0.5, 0, 2))[0] == 2        # 5 cm: roughly level
    assert text.relation("front_behind", box(0, 0, 3), box(0, 0, 2))[0] == 1           # A behind B
    assert text.relation("above_below", box(0, 1, 2), box(0, 0, 2))[0] == 1            # A above B
    assert text.relation("taller", box(0, 0, 2, h=0.42), box(0, 0, 2))[0] == 2         # within 10 %
    assert text.relation("bigger", box(0, 0, 2, w=1), box(0, 0, 2))[0] == 1
    assert text.cube_distance(box(0, 0, 2), box(1, 0, 2)) == pytest.approx((1.0, 0.6))
    assert text.cube_distance(box(0, 0, 2), box(0.2, 0, 2))[1] == 0                    # overlapping: touching


def test_png_writer_round_trips():
    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 256, (7, 9, 3)).astype(np.uint8), rng.integers(0, 256, (5, 4)).astype(np.uint8),
              rng.integers(0, 65536, (6, 5)).astype(np.uint16)):
        back = np.asarray(Image.open(io.BytesIO(views.png_bytes(a))))
        assert back.dtype.itemsize == a.itemsize and (back == a).all()


def write_frame(f: Path, scene, v: dict, depth_scale: float = 1.0, posed: bool = False):
    """A view rendered by the synthetic world (scenes.render) as an RGB-D frame folder, labels from the categories."""
    f.mkdir(parents=True)
    Image.fromarray(v["rgb"]).save(f / "rgb.png")
    np.save(f / "depth.npy", v["depth"] * depth_scale)
    Image.fromarray(v["instance"].astype(np.uint8)).save(f / "instance.png")
    (f / "labels.json").write_text(json.dumps({str(i + 1): o.category for i, o in enumerate(scene.objects)}))
    (f / "intrinsics.txt").write_text(" ".join(map(str, v["K"].ravel())))
    if posed:
        (f / "pose.txt").write_text(" ".join(map(str, v["cam_to_world"].ravel())))


def test_rgbd_folders(tmp_path):
    # real-data path on frames rendered by the synthetic world: labels from the categories, no gravity given
    root = tmp_path / "frames"
    for k in range(2):
        rng = np.random.default_rng(10 + k)
        scene = scenes.random_scene(rng, n_objects=5)
        v = scenes.render(scene, scenes.random_camera(rng, scene), 96, 128)
        write_frame(root / f"frame{k}", scene, v, depth_scale=1 + 19 * k)     # frame1 is 20x larger: beyond 65 m
    (root / "frame1" / "captions.txt").write_text("A user's caption.\n")
    records = build(tmp_path / "out", n=4, rgbd=str(root))
    assert datacheck.check(tmp_path / "out")[0] == []
    for r in records:
        meta = r["meta"]
        assert meta["gravity"] == "floor" and meta["cube_source"] == "lifted" and meta["semantic"] is None
    assert records[1]["conversations"][21]["value"] == "A user's caption."
    assert records[0]["meta"]["depth"].endswith(".png") and records[1]["meta"]["depth"].endswith(".npy")
    (root / "frame1" / "labels.json").write_text(json.dumps({"1": "thing"}))
    with pytest.raises(ValueError, match="no label"):
        build(tmp_path / "bad", n=2, rgbd=str(root))


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        data.main(["--help"])
    assert "spatial" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data.main(["spatial", "--help"])
    text = capsys.readouterr().out
    assert all(opt in text for opt in ("--n", "--out", "--seed", "--workers", "--rgbd", "--order"))
