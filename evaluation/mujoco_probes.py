"""
An out-of-domain probe set rendered by MuJoCo: MetaWorld scenes (a robot arm at a table with a task's objects, none of
it from our renderer) seen from several cameras in random arm and object states, with metric depth and per-pixel
segmentation, written in the probe-set format of probes.py, so that run_probes runs the same linear depth (lin.1,
lin.4) and segmentation probes on it unchanged. It holds no object crops: classification and retrieval are skipped.

    make_mujoco_probe_set("data/mujoco-probes")      # 240 views, 224 px (~1 min on a CPU core)
    results, _ = run_probes(vit, load_probe_set("data/mujoco-probes"), ProbeConfig())   # evaluation/suite.py

Scenes: scene s is task PROBE_TASKS[s % 10] (CortexBench's five MetaWorld tasks and five more for variety) at the
random object/goal placement of a seeded reset, then up to 120 random decisions (2 environment steps each), each the
scripted expert's action plus noise or, with a per-scene probability, a uniformly random action: arms anywhere from
the start pose to mid-task, objects grasped, drawers half open. `views` distinct cameras per scene out of
PROBE_CAMERAS (four fixed corner views, the top view, one behind the gripper). Scenes are split whole: every
test_every-th scene is a test scene, so no test view shares an arm/object state with a training view.

Ground truth per pixel:
- depth: z-distance in metres from mujoco.Renderer; 0 (unknown) where no geometry is hit (the far plane) or beyond
  MAX_DEPTH.
- semantic: CLASSES, from the geom each pixel shows, by the body tree the geom belongs to:
    background  no geometry (the far plane)
    floor       geoms of the world body (the floor plane)
    table       the table and its retaining walls (bodies under `tablelink`, `RetainingWall`)
    robot       the Sawyer robot under body `base` (pedestal, torso, head, arm links, wrist), gripper excepted
    gripper     the gripper: bodies `hand`, `leftclaw`, `rightclaw`, `leftpad`, `rightpad` and their children
    object      every other geom: the task's objects (drawer, hammer, nut and peg, button box, bins, door...)
  Sites (goal markers) and the invisible mocap body are left unlabeled (label 0, ignored by the probe).
- instance: the index of the top body (child of the world) a pixel's geom belongs to, 0 for the world and background.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation import mujoco_sim as sim
from evaluation.probes import DENSE, FORMAT
from storage.atomic import write_dir_atomically

MUJOCO_TAG = int.from_bytes(b"mujoco", "big")  # first word of every scene seed: a namespace of its own
CLASSES = ("background", "floor", "table", "robot", "gripper", "object")
PROBE_TASKS = sim.TASKS + ("door-open", "pick-place", "shelf-place", "window-open", "coffee-push")
PROBE_CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper")
TABLE_BODIES = ("tablelink", "RetainingWall")
ROBOT_BODY = "base"
GRIPPER_BODIES = ("hand", "leftclaw", "rightclaw", "leftpad", "rightpad")
UNLABELED_BODIES = ("mocap",)
MAX_DEPTH = 10.0  # metres: the depth probe's top bin (ProbeConfig.max_depth)
MAX_DECISIONS = 120


def geom_classes(model) -> np.ndarray:
    """(ngeom,) int: each geom's index into CLASSES by the rules of the module docstring, -1 = unlabeled."""
    names = [model.body(b).name for b in range(model.nbody)]
    out = np.full(model.ngeom, -1, np.int64)
    for g in range(model.ngeom):
        chain, b = [], int(model.geom_bodyid[g])
        while b != 0:  # the body and its ancestors up to the world's child
            chain.append(names[b])
            b = int(model.body_parentid[b])
        if not chain:
            out[g] = CLASSES.index("floor")
        elif chain[-1] in UNLABELED_BODIES:
            continue
        elif chain[-1] in TABLE_BODIES:
            out[g] = CLASSES.index("table")
        elif chain[-1] == ROBOT_BODY:
            out[g] = CLASSES.index("gripper" if set(chain) & set(GRIPPER_BODIES) else "robot")
        else:
            out[g] = CLASSES.index("object")
    return out


def geom_roots(model) -> np.ndarray:
    """(ngeom,) int: the top body (the world's child) each geom belongs to, 0 for the world's own geoms."""
    out = np.zeros(model.ngeom, np.int64)
    for g in range(model.ngeom):
        b = int(model.geom_bodyid[g])
        while b != 0 and model.body_parentid[b] != 0:
            b = int(model.body_parentid[b])
        out[g] = b
    return out


def labels_of(seg: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """seg (H, W, 2) (object id, object type) from Camera.render -> (H, W) int64 CLASSES index, -1 = unlabeled."""
    mujoco = sim.require()
    obj, kind = seg[..., 0], seg[..., 1]
    out = np.full(obj.shape, -1, np.int64)
    out[obj < 0] = CLASSES.index("background")
    geom = (kind == int(mujoco.mjtObj.mjOBJ_GEOM)) & (obj >= 0)
    out[geom] = classes[obj[geom]]
    return out


def random_state(env, task: str, rng: np.random.Generator, repeat: int = 2):
    """A random arm/object state of env (already reset): up to MAX_DECISIONS decisions of the expert's action plus
    noise, or with a per-scene probability a uniformly random action, each held for `repeat` steps."""
    policy, obs = sim.expert(task), env._get_obs()
    p_random, noise = rng.uniform(0, 1), rng.uniform(0, 0.5)
    for _ in range(int(rng.integers(0, MAX_DECISIONS + 1))):
        if rng.uniform() < p_random:
            action = rng.uniform(-1, 1, 4)
        else:
            action = policy.get_action(obs) + rng.normal(0, noise, 4)
        for _ in range(repeat):
            obs, *_ = env.step(np.clip(action, -1, 1).astype(np.float32))
            if env.curr_path_length >= env.max_path_length:
                return


def make_mujoco_probe_set(out_dir, n_images: int = 240, seed: int = 0, size: int = 224, views: int = 3,
                          test_every: int = 4, tasks: tuple = PROBE_TASKS, overwrite: bool = False, log=print) -> Path:
    """Render n_images views (`views` cameras per random scene) into a probe-set directory, atomically, in the format
    of probes.make_probe_sets with no objects (module docstring: the scenes, classes and split)."""
    mujoco = sim.require()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    if views > len(PROBE_CAMERAS):
        raise ValueError(f"views={views}: there are only {len(PROBE_CAMERAS)} cameras ({', '.join(PROBE_CAMERAS)})")

    def write(tmp):
        for sub in DENSE:
            (tmp / sub).mkdir()
        worlds = {}  # task -> (env, camera, geom classes, geom roots), made once
        images, n_scenes = [], -(-n_images // views)
        try:
            for s in range(n_scenes):
                rng = np.random.default_rng([MUJOCO_TAG, seed, s])
                task = tasks[s % len(tasks)]
                if task not in worlds:
                    env = sim.make_env(task)
                    worlds[task] = (env, sim.Camera(env, PROBE_CAMERAS[0], size), geom_classes(env.model),
                                    geom_roots(env.model))
                env, cam, classes, roots = worlds[task]
                sim.reset(env, int(rng.integers(2**31)))
                random_state(env, task, rng)
                split = "test" if s % test_every == test_every - 1 else "train"
                for v, name in enumerate(rng.choice(PROBE_CAMERAS, min(views, n_images - s * views), replace=False)):
                    cam.use(str(name))
                    rgb, depth, seg = cam.render(depth=True, segmentation=True)
                    labels = labels_of(seg, classes)
                    depth = np.where((seg[..., 0] < 0) | (depth > MAX_DEPTH), 0, depth).astype(np.float32)
                    geom = (seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM)) & (seg[..., 0] >= 0)
                    instance = np.zeros(depth.shape, np.uint16)
                    instance[geom] = roots[seg[..., 0][geom]]
                    files = {k: f"{k}/{s:05d}_{v}.{'npy' if k == 'depth' else 'png'}" for k in DENSE}
                    np.save(tmp / files["depth"], depth)
                    Image.fromarray(rgb).save(tmp / files["rgb"])
                    Image.fromarray((labels + 1).astype(np.uint8)).save(tmp / files["semantic"])
                    Image.fromarray(instance).save(tmp / files["instance"])
                    images.append({**files, "scene": s, "view": v, "split": split, "task": task, "camera": str(name)})
                if log and (s + 1) % 20 == 0:
                    log(f"mujoco probes: {s + 1}/{n_scenes} scenes rendered")
        finally:
            for _, cam, _, _ in worlds.values():
                cam.close()
        index = {"format": FORMAT, "source": "mujoco-metaworld", "seed": seed, "size": size, "views": views,
                 "categories": list(CLASSES), "object_categories": [], "tasks": list(tasks),
                 "cameras": list(PROBE_CAMERAS), "images": images, "objects": []}
        (tmp / "index.json").write_text(json.dumps(index))

    return write_dir_atomically(out, write)
