"""scenes.py (the synthetic world and renderer against analytic geometry, RGB-D folders) and views.py (lifting)."""

import json

import numpy as np
import pytest
from PIL import Image

from dataengine import scenes
from dataengine import views


def world_points(view):
    """(H, W, 3) world coordinates of every pixel's hit point, from the rendered depth alone."""
    cam = views.unproject(view["depth"].astype(np.float64), view["K"])
    return cam @ view["cam_to_world"][:3, :3].T + view["cam_to_world"][:3, 3]


def one_object_scene(parts, category="box"):
    return scenes.Scene(np.array([6.0, 8.0, 3.0]), [scenes.Object(category, "red", parts)])


def test_wall_and_floor_depth_are_analytic():
    # a level camera 7 m from the far wall: wall depth is exactly 7, floor depth is height * fy / (v + 0.5 - cy)
    scene = one_object_scene([scenes.Part("sphere", np.array([0.5, 0.5, 0.2]), (0.1,))], "ball")
    cam = scenes.Camera(scenes.look_at(np.array([3.0, 1.0, 1.5]), np.array([3.0, 8.0, 1.5])), hfov=60)
    v = scenes.render(scene, cam, 96, 128)
    K, depth, sem = v["K"], v["depth"], v["semantic"]
    wall = sem == scenes.CATEGORIES.index("wall") + 1
    centre = np.zeros_like(wall)
    centre[30:60, 40:90] = True
    assert (wall & centre).sum() > 500
    np.testing.assert_allclose(depth[wall & centre], 7.0, atol=1e-4)
    floor = sem == scenes.CATEGORIES.index("floor") + 1
    rows = np.nonzero(floor)[0]
    np.testing.assert_allclose(depth[floor], 1.5 * K[1, 1] / (rows + 0.5 - K[1, 2]), rtol=1e-4)
    assert (v["instance"] == 0).all() and v["rgb"].shape == (96, 128, 3) and v["rgb"].dtype == np.uint8


@pytest.mark.parametrize("yaw", [0.0, 0.7])
def test_box_pixels_lie_on_the_box_and_lift_to_its_cube(yaw):
    centre, half = np.array([3.0, 4.0, 0.3]), np.array([0.4, 0.25, 0.3])
    scene = one_object_scene([scenes.Part("box", centre, tuple(half), yaw)])
    cam = scenes.Camera(scenes.look_at(np.array([2.2, 1.8, 1.6]), centre), hfov=55)
    v = scenes.render(scene, cam, 300, 360)
    box = v["instance"] == 1
    assert box.sum() > 5000 and (v["semantic"][box] == scenes.CATEGORIES.index("box") + 1).all()
    c, s = np.cos(yaw), np.sin(yaw)
    q = world_points(v)[box] - centre
    local = np.stack([c * q[:, 0] + s * q[:, 1], c * q[:, 1] - s * q[:, 0], q[:, 2]], 1) / half
    assert np.abs(local).max() < 1 + 1e-3                                  # inside the box ...
    np.testing.assert_allclose(np.abs(local).max(1), 1, atol=1e-3)         # ... and on its surface
    # lifting the rendered depth (gravity known, no erosion) recovers the exact gravity-aligned cube: from above
    # the camera sees the top face and two sides, whose extremes are the box's extremes, up to a pixel's footprint
    # (2.5 cm where the top face is seen at a grazing 20 degrees)
    R_cw, origin = v["cam_to_world"][:3, :3], v["cam_to_world"][:3, 3]
    depth = v["depth"].astype(np.float64)
    lifted = views.lift(depth, v["K"], v["instance"], np.random.default_rng(0), up=R_cw[2], radius=0)
    exact = scene.objects[0].cube(lifted["R"] @ R_cw.T, origin)
    assert lifted["gravity"] == "known"
    np.testing.assert_allclose(lifted["cubes"][1], exact, atol=0.03)


def test_sphere_and_frustum_surfaces():
    ball = scenes.Part("sphere", np.array([2.5, 4.0, 0.35]), (0.35,))
    cone = scenes.Part("frustum", np.array([3.8, 4.2, 0.0]), (0.3, 0.1, 0.9))
    objects = [scenes.Object("ball", "red", [ball]), scenes.Object("cone", "blue", [cone])]
    scene = scenes.Scene(np.array([6.0, 8.0, 3.0]), objects)
    cam = scenes.Camera(scenes.look_at(np.array([3.0, 1.5, 1.4]), np.array([3.1, 4.0, 0.4])))
    v = scenes.render(scene, cam, 160, 160)
    p = world_points(v)
    on_ball = p[v["instance"] == 1]
    assert len(on_ball) > 300
    np.testing.assert_allclose(np.linalg.norm(on_ball - ball.centre, axis=1), 0.35, atol=1e-3)
    q = p[v["instance"] == 2] - cone.centre
    assert len(q) > 300 and q[:, 2].min() > -1e-3 and q[:, 2].max() < 0.9 + 1e-3
    rho, expected = np.hypot(q[:, 0], q[:, 1]), 0.3 - (0.2 / 0.9) * q[:, 2]
    on_side, on_top = np.abs(rho - expected) < 2e-3, (np.abs(q[:, 2] - 0.9) < 1e-3) & (rho <= 0.1 + 1e-3)
    assert (on_side | on_top).all() and on_top.sum() > 10


def test_shadows_match_shadow_rays():
    # a tall box lit from the side: floor pixels are dark exactly where a ray towards the light hits the box
    centre, half = np.array([3.0, 4.0, 0.5]), np.array([0.3, 0.3, 0.5])
    light = np.array([0.6, 0.0, 0.8])
    box = scenes.Object("box", "white", [scenes.Part("box", centre, tuple(half))])
    scene = scenes.Scene(np.array([6.0, 8.0, 3.0]), [box], light=light, ambient=0.4, floor="tiled")
    cam = scenes.Camera(scenes.look_at(np.array([3.0, 1.0, 2.0]), np.array([2.4, 4.0, 0.0])), hfov=70)
    lit = scenes.render(scene, cam, 120, 160)
    unlit = scenes.render(scene, cam, 120, 160, shadows=False)
    dark = unlit["rgb"].astype(int).sum(2) - lit["rgb"].astype(int).sum(2) > 30
    floor = lit["semantic"] == 1
    p = world_points(lit)[floor]
    with np.errstate(divide="ignore", invalid="ignore"):            # slab test of the shadow ray p + s * light
        t1, t2 = (centre - half - p) / light, (centre + half - p) / light
    blocked = np.minimum(t1, t2).max(1) <= np.maximum(t1, t2).min(1)
    assert blocked.sum() > 100
    assert (blocked == dark[floor]).mean() > 0.97                       # the shadow map's texels blur the edge only


def test_random_scenes_are_varied_and_valid():
    seen, counts = set(), []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        scene = scenes.random_scene(rng)
        counts.append(len(scene.objects))
        seen |= {o.category for o in scene.objects}
        assert len({o.name for o in scene.objects}) == len(scene.objects)        # names identify objects
        for o in scene.objects:
            lo, hi = o.cube(np.eye(3), np.zeros(3))
            assert (lo >= -1e-9).all() and (hi[:2] <= scene.room[:2]).all() and lo[2] > -1e-9
            if o.on is not None:        # standing on its support's top
                assert abs(lo[2] - scene.objects[o.on - 1].cube(np.eye(3), np.zeros(3))[1][2]) < 1e-6
        cam = scenes.random_camera(rng, scene)
        K = cam.intrinsics(448, 448)
        assert 0.5 * 448 / np.tan(np.radians(37.5)) <= K[0, 0] <= 0.5 * 448 / np.tan(np.radians(25))
        assert 1.0 <= cam.cam_to_world[2, 3] <= 1.9
    assert min(counts) >= 3 and max(counts) <= 8 and len(seen) >= 10


def test_render_is_deterministic_and_has_float32_depth():
    rng = np.random.default_rng(7)
    scene = scenes.random_scene(rng)
    cam = scenes.random_camera(rng, scene)
    a, b = scenes.render(scene, cam, 64, 80), scenes.render(scene, cam, 64, 80)
    for k in ("rgb", "depth", "instance", "semantic"):
        assert np.array_equal(a[k], b[k])
    assert a["depth"].dtype == np.float32 and (a["depth"] > 0).all() and a["instance"].shape == (64, 80)


# ---------------------------------------------------------------------------------------------------------------
# Lifting


def test_unproject_plane_and_answer_frame():
    K = np.array([[100.0, 0, 40], [0, 100.0, 30], [0, 0, 1]])
    pts = views.unproject(np.full((60, 80), 2.5), K)
    np.testing.assert_allclose(pts[..., 2], 2.5)
    np.testing.assert_allclose(pts[0, :, 0], (np.arange(80) + 0.5 - 40) / 100 * 2.5)
    np.testing.assert_allclose(views.answer_rotation(None), np.diag([1.0, -1, 1]))
    np.testing.assert_allclose(views.answer_rotation([0, -1.0, 0]), np.diag([1.0, -1, 1]), atol=1e-12)
    # camera pitched down by 30 deg: world up (in camera coordinates) becomes the answer frame's Y
    cam = scenes.look_at(np.zeros(3), np.array([0, np.cos(np.radians(30)), -np.sin(np.radians(30))]))
    up = cam[:3, :3].T @ [0, 0, 1.0]
    R = views.answer_rotation(up)
    np.testing.assert_allclose(R @ up, [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(R @ cam[:3, :3].T @ [1.0, 0, 0], [1, 0, 0], atol=1e-12)   # world +x is to the right


def test_floor_ransac_recovers_gravity():
    rng = np.random.default_rng(3)
    scene = scenes.random_scene(rng)
    v = scenes.render(scene, scenes.random_camera(rng, scene), 120, 120)
    lifted = views.lift(v["depth"].astype(np.float64), v["K"], v["instance"], np.random.default_rng(0))
    true_up = v["cam_to_world"][2, :3]
    assert lifted["gravity"] == "floor"
    assert np.degrees(np.arccos(np.clip(lifted["R"][1] @ true_up, -1, 1))) < 1.0
    assert abs(lifted["camera_height"] - v["cam_to_world"][2, 3]) < 0.02
    # a wall filling the view (no floor) falls back to the camera frame
    cam = scenes.Camera(scenes.look_at(np.array([3.0, 6.0, 1.5]), np.array([3.0, 8.0, 1.5])), hfov=40)
    v = scenes.render(scenes.Scene(np.array([6.0, 8.0, 3.0]), []), cam, 64, 64)
    lifted = views.lift(v["depth"].astype(np.float64), v["K"], v["instance"], np.random.default_rng(0))
    assert lifted["gravity"] == "camera"


def test_robust_cube_and_interior():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform([0, 0, 2], [1, 0.5, 2.4], (500, 3)), [[0.5, 0.2, 9.0], [0.4, 3.0, 2.2]]])
    lo, hi = views.robust_cube(pts)
    assert hi[2] < 2.41 and hi[1] < 0.51 and lo[0] < 0.01 and hi[0] > 0.99     # stray points dropped, extent kept
    inst = np.zeros((20, 20), int)
    inst[5:15, 4:16] = 3
    inside = views.interior(inst, 2)
    assert inside[7:13, 6:14].all() and inside.sum() == 6 * 8 + ((inst == 0) & inside).sum()
    assert not inside[5].any() and not inside[:, 0].any()


# ---------------------------------------------------------------------------------------------------------------
# RGB-D folders


def write_frame(folder, h=48, w=64, depth_format="png"):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / "rgb.png")
    depth = np.full((h, w), 2.0) + np.linspace(0, 1, w)
    if depth_format == "png":
        Image.fromarray((depth * 1000).astype(np.uint16)).save(folder / "depth.png")
    else:
        np.save(folder / "depth.npy", depth.astype(np.float32))
    inst = np.zeros((h, w), np.uint8)
    inst[10:30, 5:25], inst[20:40, 35:60] = 1, 2
    Image.fromarray(inst).save(folder / "instance.png")
    (folder / "labels.json").write_text(json.dumps({"1": "chair", "2": "table"}))
    (folder / "intrinsics.json").write_text(json.dumps({"fx": 60.0, "fy": 60.0, "cx": w / 2, "cy": h / 2}))
    (folder / "captions.txt").write_text("A chair next to a table.\n\nA small room.\n")
    return depth, inst


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_load_rgbd(tmp_path, fmt):
    depth, inst = write_frame(tmp_path / "f", depth_format=fmt)
    f = scenes.load_rgbd(tmp_path / "f")
    np.testing.assert_allclose(f["depth"], depth, atol=1e-3)
    assert f["depth"].dtype == np.float32 and (f["instance"] == inst).all()
    assert f["labels"] == {1: "chair", 2: "table"} and f["captions"] == ["A chair next to a table.", "A small room."]
    assert f["K"][0, 0] == 60 and f["cam_to_world"] is None and f["rgb"].shape == (48, 64, 3)


def break_missing_depth(f):
    (f / "depth.png").unlink()


def break_nan_depth(f):
    (f / "depth.png").unlink()
    d = np.full((48, 64), 2.0, np.float32)
    d[3, 4] = np.nan
    np.save(f / "depth.npy", d)


def break_mask_size(f):
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(f / "instance.png")


def break_unknown_label(f):
    inst = np.asarray(Image.open(f / "instance.png")).copy()
    inst[0:3, 0:3] = 7
    Image.fromarray(inst).save(f / "instance.png")


def break_depth_size(f):
    Image.fromarray(np.full((48, 60), 2000, np.uint16)).save(f / "depth.png")


def break_intrinsics(f):
    (f / "intrinsics.json").write_text(json.dumps({"focal": 60}))


def break_depth_dtype(f):
    Image.fromarray(np.full((48, 64), 20, np.uint8)).save(f / "depth.png")


@pytest.mark.parametrize("breaker, message", [
    (break_missing_depth, "missing depth"), (break_nan_depth, "NaN"),
    (break_mask_size, "instance.png has shape (40, 64)"), (break_unknown_label, "ids [7] with no label"),
    (break_depth_size, "depth.png has shape"),
    (break_intrinsics, "intrinsics.json has keys"), (break_depth_dtype, "16-bit millimeters")])
def test_load_rgbd_errors(tmp_path, breaker, message):
    write_frame(tmp_path / "f")
    breaker(tmp_path / "f")
    with pytest.raises(ValueError) as e:
        scenes.load_rgbd(tmp_path / "f")
    assert message in str(e.value) and str(tmp_path / "f") in str(e.value)
