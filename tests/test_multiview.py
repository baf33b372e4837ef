"""multiview.py: co-visibility against analytic cameras, camera motion, the multi-view VQA and spatial turns (checked
by datacheck.py, false premises never affirmed), RGB-D pairs with poses and by encoder feature distance."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from dataengine import check as datacheck
from dataengine import multiview
from dataengine import scenes
from test_data import tamper, write_frame


def wall_camera(x, distance_to_wall, W=100, H=60):
    """A level camera at (x, 8 - d, 1.5) looking along +y at the wall y = 8; focal 50 px (90 degrees) so that one
    meter at 4 m is 12.5 px. -> (depth (H, W) of the wall, K, pose)."""
    pose = scenes.look_at(np.array([x, 8.0 - distance_to_wall, 1.5]), np.array([x, 8.0, 1.5]))
    K = np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])
    return np.full((H, W), float(distance_to_wall)), K, pose


def test_covisibility_is_analytic_and_symmetric_for_a_sideways_step():
    # B is 2 m right of A, both 4 m from a wall: every point shifts by 50 * 2 / 4 = 25 px, so 75 of 100 columns stay
    a, b = wall_camera(3.0, 4.0), wall_camera(5.0, 4.0)
    assert multiview.covisibility(*a, *b) == pytest.approx(0.75, abs=1e-12)
    assert multiview.covisibility(*b, *a) == pytest.approx(0.75, abs=1e-12)
    assert multiview.covisibility(*a, *a) == 1.0
    assert multiview.covisibility(*a, *wall_camera(13.0, 4.0)) == 0.0          # no overlap at all
    # stride 2 samples columns 1, 3, ..., 99, of which those >= 25 stay: 38 of 50
    assert multiview.covisibility(*a, *b, stride=2) == pytest.approx(0.76, abs=1e-12)


def test_covisibility_is_directional_when_one_camera_steps_back():
    near, far = wall_camera(3.0, 2.0), wall_camera(3.0, 4.0)
    # the far camera sees all of the near one's wall; the near one sees the middle half (in each axis) of the far one's
    assert multiview.covisibility(*near, *far) == 1.0
    H, W = far[0].shape
    cols = np.arange(W) + 0.5 - W / 2
    rows = np.arange(H) + 0.5 - H / 2
    inside = (np.abs(2 * rows)[:, None] < H / 2) & (np.abs(2 * cols)[None, :] < W / 2)   # u_near = 2 (u_far - cx) + cx
    assert multiview.covisibility(*far, *near) == pytest.approx(inside.mean(), abs=1e-12)


def test_occluded_points_do_not_count():
    a, b = wall_camera(3.0, 4.0), wall_camera(5.0, 4.0)
    blocked = b[0].copy()
    blocked[:, :50] = 1.0                      # something 1 m in front of B covers its left half
    # A's columns 25..74 land on B's columns 0..49 (hidden), 75..99 on 50..74 (seen)
    assert multiview.covisibility(a[0], a[1], a[2], blocked, b[1], b[2]) == pytest.approx(0.25, abs=1e-12)
    # a surface only slightly nearer (within 3 cm + 3 %) is the same surface, not an occluder
    close = b[0] - 0.1
    assert multiview.covisibility(a[0], a[1], a[2], close, b[1], b[2]) == pytest.approx(0.75, abs=1e-12)


def test_camera_motion_in_the_first_view_frame():
    R = lambda deg: np.array([[np.cos(np.radians(deg)), -np.sin(np.radians(deg)), 0],
                              [np.sin(np.radians(deg)), np.cos(np.radians(deg)), 0], [0, 0, 1]])
    A = scenes.look_at(np.array([2.0, 1.0, 1.5]), np.array([2.0, 5.0, 1.0]))
    B = A.copy()
    B[:3, :3] = R(30) @ A[:3, :3]               # turned 30 degrees left (counter-clockwise seen from above)
    B[:3, 3] = A[:3, 3] + (1.0, 0.5, 0.2)       # 1 m right (+x), 0.5 m forward (+y), 0.2 m up
    view = lambda pose: multiview.View(None, None, None, None, None,
                                  multiview.views.answer_rotation(pose[:3, :3][2]).tolist(), pose.tolist(), "known", [])
    t, yaw = multiview.motion(view(A), view(B))
    np.testing.assert_allclose(t, [1.0, 0.2, 0.5], atol=1e-9)
    assert yaw == pytest.approx(30.0)
    t, yaw = multiview.motion(view(B), view(A))
    assert yaw == pytest.approx(-30.0) and np.linalg.norm(t) == pytest.approx(np.linalg.norm([1.0, 0.5, 0.2]))


def test_transfer_agrees_with_rendering():
    rng = np.random.default_rng(4)
    pair = multiview.synthetic_pair(rng, 96, (0.3, 0.7))
    a, b = pair.views
    rows, cols = np.nonzero(a.instance > 0)
    _, cam_b, u, v = multiview.transfer(a.depth, a.K, a.cam_to_world, b.K, b.cam_to_world, cols, rows)
    seen = multiview.visibility(b.depth, u, v, cam_b[:, 2]) == multiview.SEEN
    assert seen.mean() > 0.2
    # a point B sees lands on the same object, at the depth B measured there
    same = b.instance[v[seen].astype(int), u[seen].astype(int)] == a.instance[rows[seen], cols[seen]]
    assert same.mean() > 0.9
    assert pair.covis[0] == pytest.approx(multiview.covisibility(a.depth, a.K, a.cam_to_world, b.depth, b.K,
                                                                 b.cam_to_world, multiview.stride_for(96, 96)))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mv")
    out = {}
    for kind in ("multiview", "spatial-multiview"):
        data.generate(kind, root / kind, 24, seed=1, size=64, progress=False, shard_size=8)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["multiview", "spatial-multiview"])
def test_pairs_are_in_the_band_and_every_answer_checks(datasets, kind):
    problems, stats = datacheck.check(datasets[kind])
    assert problems == [] and stats["samples"] == 24
    records = [json.loads(line) for line in open(datasets[kind] / "data.jsonl")]
    for r in records:
        assert len(r["image"]) == 2 and r["conversations"][0]["value"].startswith("<image>\n<image>\n")
        assert all((datasets[kind] / p).exists() for p in r["image"])
        assert multiview.BAND[0] <= r["meta"]["covis"][0] <= multiview.BAND[1]
    levels = [lv for r in records for lv in r["levels"]]
    if kind == "multiview":
        assert {"common", "adversarial", "choice"} <= set(levels) and all(len(r["levels"]) == 6 for r in records)
        assert 0.3 < stats["Yes"] / (stats["Yes"] + stats["No"]) < 0.7
    else:
        assert all(r["levels"] == ["pixel"] * 3 + ["object"] * 2 + ["scene"] * 2 for r in records)
        answers = " ".join(m["value"] for r in records for m in r["conversations"][1::2])
        assert "It appears at" in answers and ("hidden" in answers or "outside" in answers)


def test_false_premises_are_never_affirmed(datasets):
    """Every object a turn presents as absent (from both views, or from the view asked about) is only ever named after
    'no ' in the answer, apart from saying which view does show it."""
    n_turns = 0
    for line in open(datasets["multiview"] / "data.jsonl"):
        r = json.loads(line)
        for t, (turn, level) in enumerate(zip(r["meta"]["turns"], r["levels"])):
            if level != "adversarial":
                continue
            n_turns += 1
            a, name = r["conversations"][2 * t + 1]["value"], turn["object"]
            assert re.match(r"(No|Neither|There is no|Only view \d)\b", a), a
            rest = a.replace(f"no {name}", "")
            rest = re.sub(rf"Only view \d shows the {re.escape(name)}", "", rest)
            assert name not in rest, a
            if turn.get("absent"):
                assert name in r["meta"]["absent"]
    assert n_turns >= 24


def test_checker_catches_wrong_multiview_answers(datasets, tmp_path):
    import shutil
    out = {k: tmp_path / k for k in datasets}
    for k, src in datasets.items():
        shutil.copytree(src, out[k])

    def answer(rec, kind):
        t = next(t for t, turn in enumerate(rec["meta"]["turns"]) if turn["kind"] == kind)
        return rec["conversations"][2 * t + 1]

    def flip_exists(rec):
        a = answer(rec, "exists")
        a["value"] = "Yes, it does." if a["value"].startswith("No") else "No, there is no such thing."

    def move_point(rec):     # the first match answer: shift the reported position in view 2
        a = answer(rec, "match")
        a["value"] = re.sub(r"\((\d\.\d+),", lambda m: f"({float(m.group(1)) + 0.05:.3f},", a["value"], count=1)

    def wrong_covis(rec):
        rec["meta"]["covis"][0] += 0.1

    def wrong_motion(rec):
        a = answer(rec, "camera_motion")
        a["value"] = a["value"].replace("to the left", "to the @").replace("to the right", "to the left").replace(
            "to the @", "to the right")

    tamper(out["multiview"], 0, flip_exists)
    tamper(out["multiview"], 1, wrong_covis)
    records = [json.loads(line) for line in open(out["spatial-multiview"] / "data.jsonl")]
    first = next(i for i, r in enumerate(records) if answer(r, "match")["value"].startswith("It appears"))
    tamper(out["spatial-multiview"], first, move_point)
    turned = next(i for i, r in enumerate(records) if "turned" in answer(r, "camera_motion")["value"] and i != first)
    tamper(out["spatial-multiview"], turned, wrong_motion)
    problems = datacheck.check(out["multiview"])[0] + datacheck.check(out["spatial-multiview"])[0]
    for sid in ("multiview-000000", "multiview-000001", f"spatial-multiview-{first:06d}",
                f"spatial-multiview-{turned:06d}"):
        assert any(f": {sid}: " in p for p in problems), (sid, problems)
    assert len({p.split(": ")[1] for p in problems}) == 4


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = data.generate("spatial-multiview", tmp_path / "a", 4, seed=5, size=48, workers=1, progress=False)
    b = data.generate("spatial-multiview", tmp_path / "b", 4, seed=5, size=48, workers=2, progress=False)
    assert a.read_text() == b.read_text()
    with pytest.raises(SystemExit, match="holds spatial-multiview data"):
        data.generate("multiview", tmp_path / "a", 4, size=48, progress=False)


def write_frames(root: Path, posed: bool):
    """Two scenes of three overlapping frames each, rendered by the synthetic world, as RGB-D folders."""
    for s in range(2):
        rng = np.random.default_rng(20 + s)
        scene = scenes.random_scene(rng, n_objects=6)
        first = scenes.random_camera(rng, scene)
        for k, cam in enumerate([first] + [multiview.nearby_camera(rng, scene, first) for _ in range(2)]):
            write_frame(root / f"scene{s}" / f"frame{k}", scene, scenes.render(scene, cam, 72, 96), posed=posed)


def test_rgbd_pairs_with_poses(tmp_path):
    write_frames(tmp_path / "frames", posed=True)
    for kind in ("multiview", "spatial-multiview"):
        data.generate(kind, tmp_path / kind, 6, rgbd=tmp_path / "frames", band=(0.2, 0.95), progress=False)
        assert datacheck.check(tmp_path / kind)[0] == []
        records = [json.loads(line) for line in open(tmp_path / kind / "data.jsonl")]
        for r in records:
            frames = [v["frame"] for v in r["meta"]["views"]]
            assert Path(frames[0]).parent == Path(frames[1]).parent and frames[0] != frames[1]     # one scene
            assert 0.2 <= r["meta"]["covis"][0] <= 0.95 and r["meta"]["source"] == "rgbd"


def test_rgbd_pairs_without_poses_use_the_encoder_feature_band(tmp_path):
    import torch

    from model import ViT, ViTConfig, save_vit
    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)),
             tmp_path / "vit")
    write_frames(tmp_path / "frames", posed=False)
    with pytest.raises(SystemExit, match="no pose.txt"):
        data.generate("multiview", tmp_path / "x", 2, rgbd=tmp_path / "frames", progress=False)
    images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "frames").glob("*/*/rgb.png"))]
    dist = multiview.feature_distances(data.encoder_embedding(tmp_path / "vit")(images))
    # (ties between identical patch tokens keep an image a hair away from itself)
    assert dist.shape == (6, 6) and np.diag(dist).max() < 0.05 and np.allclose(dist, dist.T, atol=0.02)
    same_scene = np.kron(np.eye(2), np.ones((3, 3))).astype(bool) & ~np.eye(6, dtype=bool)
    assert dist[same_scene].max() < dist[~np.kron(np.eye(2), np.ones((3, 3))).astype(bool)].min()
    band = (0.0, 2.0)
    data.generate("multiview", tmp_path / "mv", 6, rgbd=tmp_path / "frames", band=band, encoder=tmp_path / "vit",
                  progress=False)
    assert datacheck.check(tmp_path / "mv")[0] == []
    for line in open(tmp_path / "mv" / "data.jsonl"):
        r = json.loads(line)
        assert r["meta"]["covis"] is None and band[0] <= r["meta"]["feature_distance"] <= band[1]
        assert "motion" not in [t["kind"] for t in r["meta"]["turns"]]       # no poses: no camera-motion questions
