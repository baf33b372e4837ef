"""
MetaWorld scenes for the two evaluations in worlds we did not build (robot.py: behaviour cloning; mujoco_probes.py:
a depth and segmentation probe set): the optional imports with the line that installs them, one environment per task
with seeded random initial states, the scripted experts, and a fast offscreen camera giving RGB, metric depth and
per-pixel segmentation of the same view.

    env = make_env("drawer-open"); obs = reset(env, seed=3)   # the seed's random object placement
    cam = Camera(env, "corner", 112)
    rgb, depth, seg = cam.render(depth=True, segmentation=True)  # (H, W, 3) uint8 upright, (H, W) m, (H, W, 2)
    cam.close()

Needs `pip install -r requirements-robot.txt` (mujoco 3.3.0, metaworld 3.1.1, packaging: `import metaworld` needs
it). MUJOCO_GL defaults to egl, set here before mujoco is first imported: Mesa's software renderer on a machine
without a GPU (libegl1 + libgl1-mesa-dri); MUJOCO_GL=osmesa works too once libosmesa6 is installed.

Speed: MuJoCo's default offscreen render is 7-10 fps on a CPU core (a 4096² shadow map and 4x multisampling). Camera
sets `model.vis.quality.offsamples = 0` before its context is made and turns shadows and reflections off: 70-150 fps
per core at 112-224 px. Depth comes from mujoco.Renderer, float32 z-distance in metres (the background sits at the
far plane, tens of metres away); gymnasium's `depth_array` would be the raw z-buffer instead. MetaWorld's corner
cameras look at the table with their image 'up' pointing at the floor; their images are rotated by 180 degrees here
(a camera roll: the picture stays a real view, never a mirror image).
"""

import os
import warnings

import numpy as np

INSTALL = "pip install -r requirements-robot.txt"
TASKS = ("assembly", "bin-picking", "button-press-topdown", "drawer-open", "hammer")  # CortexBench's MetaWorld five
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
UPSIDE_DOWN = ("corner", "corner2", "corner3", "corner4")


def require():
    """mujoco and metaworld, or an ImportError that says what to install. Sets MUJOCO_GL=egl unless it is set."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
        import metaworld  # noqa: F401  (needs `packaging`)
    except ImportError as e:
        raise ImportError(f"the MuJoCo evaluations (robot control, MuJoCo probes) need mujoco and metaworld: {e}. "
                          f"Install them with `{INSTALL}`") from e
    # the experts' proportional gains exceed the action range on purpose (the env clips); said once per call
    warnings.filterwarnings("ignore", message="Constant.s. may be too high", module="metaworld")
    return mujoco


def make_env(task: str):
    """The goal-observable MetaWorld v3 environment of `task` (e.g. "drawer-open"), set to draw a fresh random
    object/goal placement at each reset() from its own seeded generator."""
    require()
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE as envs
    key = f"{task}-v3-goal-observable"
    if key not in envs:
        raise ValueError(f"unknown MetaWorld task {task!r} (no {key}); CortexBench's five are {', '.join(TASKS)}")
    env = envs[key](seed=0)
    env._freeze_rand_vec = False  # the goal-observable classes freeze the first placement; we want one per seed
    env.seeded_rand_vec = True  # ... drawn from env.np_random, which reset() re-seeds
    return env


def reset(env, seed: int) -> np.ndarray:
    """Reset env to the random placement of `seed` (the same seed gives the same state) -> its 39-d observation."""
    env.seed(int(seed))
    obs, _ = env.reset()
    return obs


def expert(task: str):
    """The scripted expert of `task` from metaworld.policies: .get_action(obs) -> (4,) action."""
    require()
    from metaworld import policies
    name = "Sawyer" + "".join(w.capitalize() for w in task.split("-")) + "V3Policy"
    if not hasattr(policies, name):
        raise ValueError(f"metaworld.policies has no expert {name} for task {task!r}")
    return getattr(policies, name)()


def proprio(obs: np.ndarray) -> np.ndarray:
    """CortexBench's MetaWorld proprioception: the hand position (3) and the gripper opening (1)."""
    return np.asarray(obs[:4], np.float32)


class Camera:
    """A named camera of one environment at size x size px, with the fast render settings (module docstring)."""

    def __init__(self, env, name: str, size: int):
        mujoco = require()
        self.env, self.size = env, size
        env.model.vis.quality.offsamples = 0  # read when the context is made: must precede the Renderer
        self.renderer = mujoco.Renderer(env.model, size, size)
        flags = self.renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.use(name)

    def use(self, name: str):
        """Look through another of the model's cameras (one GL context serves them all)."""
        if name not in CAMERAS:
            raise ValueError(f"camera {name!r}: MetaWorld's cameras are {', '.join(CAMERAS)}")
        self.name, self.flip = name, name in UPSIDE_DOWN

    def _upright(self, a):
        return np.ascontiguousarray(a[::-1, ::-1]) if self.flip else a

    def render(self, depth: bool = False, segmentation: bool = False):
        """rgb (H, W, 3) uint8; with depth (H, W) float32 metres (z-distance); with segmentation (H, W, 2) int32
        (object id, object type: mjOBJ_GEOM, mjOBJ_SITE...; -1 where no object). All of the same state and view."""
        r = self.renderer
        r.update_scene(self.env.data, camera=self.name)
        out = [self._upright(r.render())]
        if depth:
            r.enable_depth_rendering()
            out.append(self._upright(r.render()).astype(np.float32))
            r.disable_depth_rendering()
        if segmentation:
            r.enable_segmentation_rendering()
            out.append(self._upright(r.render()))
            r.disable_segmentation_rendering()
        return out[0] if len(out) == 1 else tuple(out)

    def close(self):
        """Free the GL context now (left to the garbage collector, it may outlive EGL at exit and print errors)."""
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
