"""The MuJoCo probe set (evaluation/mujoco_probes.py, evaluation/mujoco_sim.py): what the camera renders agrees with
the scene's own geometry (depth in metres, segmentation, the corner cameras' flip), the class rules, the probe-set
format that load_probe_set and run_probes read (dense probes only), and eval.py --mujoco. Needs
requirements-robot.txt; CI (SPATIALBOOST_REQUIRE_WEIGHTS=1) fails instead of skipping when it is missing."""

import json

import numpy as np
import pytest
import torch

from model import ViT, ViTConfig, save_vit

TINY = dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)


pytestmark = pytest.mark.usefixtures("mujoco", "one_thread")


@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    from evaluation import mujoco_probes
    root = tmp_path_factory.mktemp("mj") / "set"
    mujoco_probes.make_mujoco_probe_set(root, n_images=8, size=48, views=2, test_every=2,
                                        tasks=("drawer-open", "hammer"), log=None)
    return root


def _project(model, data, cam_name, point, size):
    """Pinhole projection of a world point into camera cam_name, from MuJoCo's camera pose and fovy alone ->
    (row, col, z-distance in metres), row 0 at the top of an upright picture of the camera's own 'up'."""
    cam = model.camera(cam_name).id
    rel = data.cam_xmat[cam].reshape(3, 3).T @ (point - data.cam_xpos[cam])  # camera frame: x right, y up, -z ahead
    z = -rel[2]
    f = (size / 2) / np.tan(np.radians(model.cam_fovy[cam]) / 2)
    return size / 2 - f * rel[1] / z, size / 2 + f * rel[0] / z, z


@pytest.mark.parametrize("camera", ["corner", "corner3", "topview"])  # flipped and upright
def test_render_agrees_with_geometry(camera):
    """Project every visible geom's centre with the camera's pose: unless something nearer covers it, the pixel there
    shows the geom's class at a depth within the geom's bounding radius of the centre's z-distance. With the
    correct flip 75-90 % of the geoms agree, with the wrong one 10-15 %: a wrong flip, a depth that is not metric or
    shuffled classes fail."""
    from evaluation import mujoco_probes, mujoco_sim as sim
    env = sim.make_env("drawer-open")
    sim.reset(env, 7)
    size = 96
    cam = sim.Camera(env, camera, size)
    _, depth, seg = cam.render(depth=True, segmentation=True)
    cam.close()
    classes = mujoco_probes.geom_classes(env.model)
    labels = mujoco_probes.labels_of(seg, classes)
    m, d = env.model, env.data
    hits, checked = 0, 0
    for g in range(m.ngeom):
        if classes[g] < 0 or m.geom_rgba[g][3] == 0 or m.geom_group[g] > 2 or m.geom_rbound[g] == 0:
            continue
        r, c, z = _project(m, d, camera, d.geom_xpos[g], size)
        if cam.flip:  # sim.Camera rotates the corner cameras' pictures by 180 degrees
            r, c = size - r, size - c
        r, c = int(r), int(c)
        if not (2 <= r < size - 2 and 2 <= c < size - 2) or z <= 0:
            continue
        if depth[r, c] < z - m.geom_rbound[g] - 0.02:  # something else in front: no evidence either way
            continue
        checked += 1
        hits += bool(labels[r, c] == classes[g] and abs(depth[r, c] - z) <= m.geom_rbound[g] + 0.02)
    assert checked >= 8, checked
    assert hits >= 0.7 * checked, (hits, checked)


def test_class_rules_by_name():
    from evaluation import mujoco_probes, mujoco_sim as sim
    env = sim.make_env("hammer")
    m = env.model
    classes = mujoco_probes.geom_classes(m)
    by_body = {}
    for g in range(m.ngeom):
        by_body.setdefault(m.body(int(m.geom_bodyid[g])).name, set()).add(mujoco_probes.CLASSES[classes[g]]
                                                                          if classes[g] >= 0 else None)
    want = {"world": "floor", "tablelink": "table", "RetainingWall": "table", "pedestal": "robot",
            "right_l3": "robot", "right_hand": "robot", "hand": "gripper", "rightpad": "gripper",
            "leftpad": "gripper", "hammer": "object", "nail_link": "object", "mocap": None}
    for body, cls in want.items():
        assert by_body[body] == {cls}, (body, by_body[body])


def test_probe_set_format_and_split(probe_set):
    from evaluation import mujoco_probes, probes
    ps = probes.load_probe_set(probe_set)
    index = json.loads((probe_set / "index.json").read_text())
    assert index["format"] == probes.FORMAT and index["objects"] == [] and ps.crops is None
    assert ps.images.shape == (8, 48, 48, 3) and ps.classes == list(mujoco_probes.CLASSES)
    assert ps.labels.min() >= -1 and ps.labels.max() < len(mujoco_probes.CLASSES)
    background = ps.labels == mujoco_probes.CLASSES.index("background")
    assert (ps.depth[background] == 0).all() and (ps.depth[~background & (ps.labels >= 0)] > 0).mean() > 0.99
    assert 0.1 < ps.depth[ps.depth > 0].mean() < mujoco_probes.MAX_DEPTH  # metres, table-top scale
    for name in ("table", "robot", "object"):  # every view shows the table and the arm; objects across views
        assert (ps.labels == mujoco_probes.CLASSES.index(name)).any(), name
    scenes = [im["scene"] for im in index["images"]]
    train = {s for s, im in zip(scenes, index["images"]) if im["split"] == "train"}
    test = {s for s, im in zip(scenes, index["images"]) if im["split"] == "test"}
    assert train and test and not train & test  # split by scene: no arm/object state on both sides
    again = probes.load_probe_set(probe_set)
    assert again.fingerprint == ps.fingerprint and np.array_equal(again.depth, ps.depth)


def test_run_probes_dense_only_and_eval_cli(probe_set, tmp_path, monkeypatch):
    import eval as ev
    from evaluation import probes, suite
    small = probes.ProbeConfig(depth_steps=20, seg_steps=20, cls_steps=20, batch=4, depth_rows=4, seg_rows=4)
    res, _ = suite.run_probes(ViT(ViTConfig(**TINY)), probes.load_probe_set(probe_set), small, 32, 16, cache=False,
                              log=None)
    assert {"depth_lin1", "depth_lin4", "segmentation"} <= set(res) and "classification" not in res
    assert np.isfinite(res["depth_lin1"]["rmse"]) and 0 <= res["segmentation"]["miou"] <= 1

    monkeypatch.chdir(tmp_path)
    save_vit(ViT(ViTConfig(**TINY)), tmp_path / "enc")
    ev.main(["--vision", "enc", "--probes", "p", "--n-images", "8", "--image-size", "32", "--crop-size", "16",
             "--quick", "--threads", "1", "--out", "r", "--mujoco", "--mujoco-probes", str(probe_set)])
    report = json.loads((tmp_path / "r/report.json").read_text())
    got = report["encoders"][0]["results"]
    assert {"mujoco_depth_lin1", "mujoco_depth_lin4", "mujoco_segmentation"} <= set(got) and "depth_lin1" in got
    assert "mujoco_classification" not in got and "mujoco" in got["time_s"]
    assert report["mujoco_probe_set"]["images"] == 8
    assert "| mujoco_segmentation | miou (higher better) |" in (tmp_path / "r/report.md").read_text()

    # a MuJoCo set as eval.py's own probe set (issue 27's MuJoCo protocol): no object crops, dense probes only
    ev.main(["--vision", "enc", "--probes", str(probe_set), "--image-size", "32", "--quick", "--threads", "1",
             "--per-image", "--out", "m"])
    report = json.loads((tmp_path / "m/report.json").read_text())
    assert report["probe_set"]["objects"] == 0 and "depth_lin1" in report["encoders"][0]["results"]


def test_missing_set_is_made(tmp_path, monkeypatch, capsys):
    """eval.py --mujoco makes the set at --mujoco-probes when it is missing (a tiny one here)."""
    import eval as ev
    from evaluation import mujoco_probes
    real, made = mujoco_probes.make_mujoco_probe_set, []
    monkeypatch.setattr(mujoco_probes, "make_mujoco_probe_set", lambda out, overwrite: made.append(out) or real(
        out, n_images=4, size=32, views=2, test_every=2, overwrite=overwrite, log=None))
    monkeypatch.chdir(tmp_path)
    save_vit(ViT(ViTConfig(**TINY)), tmp_path / "enc")
    ev.main(["--vision", "enc", "--probes", "p", "--n-images", "8", "--image-size", "32", "--crop-size", "16",
             "--quick", "--threads", "1", "--no-cache", "--out", "r", "--mujoco", "--mujoco-probes", "mj"])
    assert made == ["mj"] and (tmp_path / "mj/index.json").exists()
    assert "no MuJoCo probe set at mj: making it" in capsys.readouterr().out
