"""
Robot control from a frozen encoder, CortexBench-style behaviour cloning on MetaWorld: for each task, demonstrations
from the scripted expert, a small MLP policy on the frozen encoder's embedding of the camera image plus the
proprioception, and the success rate of that policy over evaluation rollouts. eval.py --robot runs it per encoder.

    results = evaluate(load_vit("weights/dinov2-s14"), RobotConfig(), cache_dir="data/robot-cache")
    results["robot"]      # {task: success rate (mean over policy seeds), ..., "average"}; results["robot_sd"]: spread

The protocol (CortexBench's MetaWorld config, facebookresearch/eai-vc cortexbench/mujoco_vc), and where this CPU
version departs from it (every departure is a RobotConfig field):
- Tasks: assembly, bin-picking, button-press-topdown, drawer-open, hammer (CortexBench's five; MetaWorld v3 here,
  v2 there), goal-observable, a fresh random object/goal placement per episode seed.
- Observation: one RGB camera. CortexBench renders its own `top_cap2` camera at 256 px and feeds a 224 px centre
  crop; MetaWorld 3.1.1 has no top_cap2, so `camera` = "corner" (the whole workspace of all five tasks), rendered
  directly at `image_size` = 112 px (8 x 8 patches of 14 px: about 4x cheaper to encode than 224 px).
- Embedding: the encoder's pooled vector after the final norm (the CLS token for DINOv2, as CortexBench takes for
  ViTs), frozen. History of `history` = 3 frames fused as CortexBench's `fuse_embeddings_flare` does (the newest
  embedding and the differences between consecutive ones), then the proprioception (hand xyz, gripper opening).
- Policy: inputs standardized with training-set statistics (the eval-mode BatchNorm of CortexBench's BatchNormMLP),
  an MLP with hidden (256, 256, 256) and ReLU, linear output; MSE on the expert's actions (clipped to [-1, 1]), Adam at
  1e-3, batch 256, `epochs` = 100 as CortexBench (over far fewer frames: ~1 step per epoch here, ~49 there).
- Demonstrations: `demos` = 5 per task (CortexBench: 25), the expert run on the demo seeds until its first success
  (a seed where it does not succeed within the horizon is skipped and the next one tried; CortexBench's demos run the
  full 500 steps).
- Control: `action_repeat` = 2 (CortexBench: 1) and `horizon` = 100 decisions = 200 environment steps (CortexBench:
  500 steps). The experts still succeed with both: their first success comes after 29-60 decisions (bin-picking:
  up to 114; such a demo seed is skipped).
- Evaluation: `episodes` = 4 rollouts per task and policy seed (CortexBench: 25 every 5 epochs, reporting the best
  epoch); here one evaluation of the final policy. An episode succeeds when env info["success"] is set at any step,
  and ends there (CortexBench reads the flag at the last of 500 steps; stopping at the first success saves the rest).
  `seeds` = 3 policy seeds; the same episode seeds for every policy seed and every encoder (paired comparison), so
  the spread over policy seeds leaves out the sampling error of 4 placements per task (a rate's standard error is
  then up to 0.25 per task, about 0.1 for the five-task average): raise `episodes` for finer comparisons.
- Quick mode (RobotConfig.quick(), eval.py --robot-quick or --quick): button-press-topdown only, 2 demos, 2 policy
  seeds of 2 rollouts of at most 60 decisions: a smoke test of the whole path, not a measurement.

Demonstrations (images, proprioception, actions) are rendered once per setting and cached in cache_dir
(demos-TASK-KEY.safetensors), and their embeddings once per encoder (embed-TASK-KEY.safetensors, keyed by the
encoder's fingerprint, evaluation/suite.py, and the settings). Rollouts step every evaluation episode of a task
together (all policy seeds), encoding their frames in one batch per decision step.
"""

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from evaluation import mujoco_sim as sim
from evaluation.suite import fingerprint
from model import ViT, preprocess
from storage.atomic import write_file_atomically
from storage.tensors import load_safetensors

VERSION = 1  # bump when what a cache file holds changes: old files are then ignored


@dataclass
class RobotConfig:
    """The scaled-down CortexBench MetaWorld protocol (module docstring: CortexBench's value beside each)."""
    tasks: tuple = sim.TASKS
    camera: str = "corner"
    image_size: int = 112
    demos: int = 5
    episodes: int = 4  # evaluation rollouts per task and policy seed
    horizon: int = 100  # policy decisions per episode (demos and rollouts)
    action_repeat: int = 2  # environment steps per decision
    history: int = 3  # frames fused into one input
    hidden: tuple = (256, 256, 256)
    epochs: int = 100  # passes over the demo frames (CortexBench: 100)
    batch: int = 256
    lr: float = 1e-3
    seeds: int = 3  # policy seeds
    demo_seed: int = 0  # demonstrations use environment seeds demo_seed, demo_seed + 1, ...
    eval_seed: int = 10_000  # evaluation episodes use eval_seed, eval_seed + 1, ... (never a demo's placement)

    def __post_init__(self):
        self.tasks, self.hidden = tuple(self.tasks), tuple(self.hidden)
        if self.horizon * self.action_repeat > 500:
            raise ValueError(f"RobotConfig: horizon {self.horizon} x action_repeat {self.action_repeat} exceeds "
                             "MetaWorld's 500 steps per episode")
        for task in self.tasks:
            if task not in sim.TASKS:
                raise ValueError(f"RobotConfig: task {task!r} is not one of CortexBench's {', '.join(sim.TASKS)}")

    def quick(self) -> "RobotConfig":
        """One task (button-press-topdown when among the tasks: the expert's fastest), two demos, two policy seeds
        of two short rollouts: a smoke test of the whole path (CI), not a measurement."""
        task = "button-press-topdown" if "button-press-topdown" in self.tasks else self.tasks[0]
        return replace(self, tasks=(task,), demos=2, episodes=2, horizon=60, seeds=2)


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _demo_settings(task: str, cfg: RobotConfig) -> dict:
    return dict(v=VERSION, task=task, camera=cfg.camera, size=cfg.image_size, demos=cfg.demos, horizon=cfg.horizon,
                repeat=cfg.action_repeat, seed=cfg.demo_seed)


def step(env, action, repeat: int):
    """One decision: `action` held for `repeat` environment steps -> (obs, success), success as soon as env
    info["success"] is set (the remaining repeats are then skipped)."""
    for _ in range(repeat):
        obs, _, _, _, info = env.step(np.asarray(action, np.float32))
        if info["success"]:
            return obs, True
    return obs, False


def record_demos(task: str, cfg: RobotConfig, log=None) -> dict:
    """The expert on demo seeds until cfg.demos of them succeed within the horizon -> {images (N, S, S, 3) uint8,
    proprio (N, 4), actions (N, 4) float32 in [-1, 1], episode (N,) int64, seeds (demos,), success (demos,) bool}:
    one row per decision, each episode ending at the decision that reached success."""
    env, policy = sim.make_env(task), sim.expert(task)
    cam = sim.Camera(env, cfg.camera, cfg.image_size)
    rows, seeds, seed = {"images": [], "proprio": [], "actions": [], "episode": []}, [], cfg.demo_seed
    try:
        while len(seeds) < cfg.demos:
            if seed - cfg.demo_seed >= 3 * cfg.demos + 5:
                tried = seed - cfg.demo_seed
                raise RuntimeError(f"{task}: the scripted expert succeeded on only {len(seeds)} of {tried} demo "
                                   f"seeds within {cfg.horizon} decisions (x{cfg.action_repeat} steps)")
            obs, ep, ok = sim.reset(env, seed), [], False
            for _ in range(cfg.horizon):
                action = np.clip(policy.get_action(obs), -1, 1).astype(np.float32)
                ep.append((cam.render(), sim.proprio(obs), action))
                obs, ok = step(env, action, cfg.action_repeat)
                if ok:
                    break
            if ok:
                for image, p, a in ep:
                    for k, v in zip(("images", "proprio", "actions", "episode"), (image, p, a, len(seeds))):
                        rows[k].append(v)
                seeds.append(seed)
            elif log:
                log(f"  {task}: the expert did not succeed on demo seed {seed} within the horizon; skipped")
            seed += 1
    finally:
        cam.close()
    out = {k: torch.from_numpy(np.stack(v)) for k, v in rows.items()}
    out["seeds"] = torch.tensor(seeds)
    return out


def cached_demos(task: str, cfg: RobotConfig, cache_dir=None, log=None) -> dict:
    """record_demos, read from / written to cache_dir/demos-TASK-KEY.safetensors (no cache_dir: always recorded)."""
    name = f"demos-{task}-{_key(_demo_settings(task, cfg))}.safetensors"
    path = None if cache_dir is None else Path(cache_dir) / name
    if path is not None and path.exists():
        return load_safetensors(path)
    t = time.time()
    demos = record_demos(task, cfg, log)
    if log:
        log(f"  {task}: {len(demos['seeds'])} expert demos, {len(demos['actions'])} frames in {time.time() - t:.1f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in demos.items()}, tmp))
    return demos


@torch.no_grad()
def embed(vit: ViT, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, D) float32: the encoder's pooled vector (CLS for DINOv2) at the images' own size
    (rounded to the patch size)."""
    vit.eval()
    device, dtype = next(vit.parameters()).device, next(vit.parameters()).dtype
    p = vit.cfg.patch_size
    size = max(p, round(images.shape[1] / p) * p)
    out = []
    for i in range(0, len(images), batch):
        x = torch.as_tensor(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        out.append(vit.features(preprocess(x, vit.cfg, size=size).to(device, dtype))["pooled"].float().cpu())
    return torch.cat(out)


def cached_embeddings(vit: ViT, demos: dict, task: str, cfg: RobotConfig, cache_dir=None, log=None) -> torch.Tensor:
    """embed() of the demo images, read from / written to cache_dir/embed-TASK-KEY.safetensors, the key made of the
    demo settings and the encoder's fingerprint."""
    settings = dict(_demo_settings(task, cfg), encoder=fingerprint(vit), frames=len(demos["images"]))
    path = None if cache_dir is None else Path(cache_dir) / f"embed-{task}-{_key(settings)}.safetensors"
    if path is not None and path.exists():
        return load_safetensors(path)["embedding"]
    t = time.time()
    emb = embed(vit, demos["images"].numpy())
    if log:
        log(f"  {task}: embedded {len(emb)} demo frames in {time.time() - t:.1f} s")
    if path is not None:
        meta = {k: str(v) for k, v in settings.items()}
        write_file_atomically(path, lambda tmp: save_file({"embedding": emb.contiguous()}, tmp, meta))
    return emb


def fuse(history: torch.Tensor) -> torch.Tensor:
    """(B, k, D) embeddings oldest first -> (B, k * D): the k - 1 differences between consecutive embeddings, then
    the newest one (CortexBench's fuse_embeddings_flare)."""
    return torch.cat([(history[:, 1:] - history[:, :-1]).flatten(1), history[:, -1]], 1)


def demo_inputs(emb: torch.Tensor, episode: torch.Tensor, proprio: torch.Tensor, k: int) -> torch.Tensor:
    """Policy inputs of every demo frame: the fused history of its last k frames (repeating the episode's first frame
    before it began, as a rollout's buffer starts) and its proprioception. (N, D) -> (N, k * D + 4)."""
    pos = torch.arange(len(emb))
    start = torch.zeros_like(pos)
    new = torch.ones(len(emb), dtype=torch.bool)
    new[1:] = episode[1:] != episode[:-1]
    start = torch.cummax(torch.where(new, pos, start), 0).values  # index of each frame's episode start
    idx = torch.stack([torch.maximum(pos - (k - 1 - j), start) for j in range(k)], 1)  # (N, k) oldest first
    return torch.cat([fuse(emb[idx]), proprio.float()], 1)


class Policy(nn.Module):
    """Fixed standardization with training-set statistics, then an MLP: (B, F) -> (B, n_out) actions."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_out: int, hidden: tuple):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        layers, width = [], mean.numel()
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, n_out))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def train_policy(x: torch.Tensor, y: torch.Tensor, cfg: RobotConfig, seed: int) -> Policy:
    """Behaviour cloning: MSE to the expert's actions y (N, A) from inputs x (N, F); the seed fixes the init and the
    order of the batches."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = x.float(), y.float()
    policy = Policy(x.mean(0), x.std(0).clamp_min(1e-6), y.shape[1], cfg.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    batch, order, pos = min(cfg.batch, len(x)), torch.randperm(len(x), generator=gen), 0
    for _ in range(cfg.epochs * -(-len(x) // batch)):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        F.mse_loss(policy(x[idx]), y[idx]).backward()
        opt.step()
    return policy.eval()


def run_episodes(task: str, seeds: list, cfg: RobotConfig, act, encode=None) -> tuple[np.ndarray, np.ndarray]:
    """Episodes of `task` from the placements of `seeds`, all stepped together -> (success (n,) bool, decisions (n,)).
    act(idx, x, obs) -> (B, 4) actions of the still-running episodes idx (B,), given their policy inputs x (B, F)
    (None without `encode`) and their raw observations; encode(images (B, S, S, 3) uint8) -> (B, D) embeddings, one
    batch over the running episodes per decision step."""
    envs = [sim.make_env(task) for _ in seeds]
    obs = [sim.reset(env, s) for env, s in zip(envs, seeds)]
    cams = [sim.Camera(env, cfg.camera, cfg.image_size) for env in envs] if encode else []
    n = len(seeds)
    success, decisions, hist = np.zeros(n, bool), np.zeros(n, np.int64), None
    try:
        for t in range(cfg.horizon):
            idx = np.flatnonzero(~success)
            if not len(idx):
                break
            x = None
            if encode:
                e = encode(np.stack([cams[i].render() for i in idx]))  # (B, D)
                if hist is None:  # the buffer starts as k copies of the first frame (CortexBench)
                    hist = torch.zeros(n, cfg.history, e.shape[1])
                    hist[idx] = e[:, None].expand(-1, cfg.history, -1)
                else:
                    hist[idx] = torch.cat([hist[idx, 1:], e[:, None]], 1)
                x = torch.cat([fuse(hist[idx]), torch.from_numpy(np.stack([sim.proprio(obs[i]) for i in idx]))], 1)
            actions = np.asarray(act(idx, x, [obs[i] for i in idx]))
            for j, i in enumerate(idx):
                obs[i], success[i] = step(envs[i], np.clip(actions[j], -1, 1), cfg.action_repeat)
                decisions[i] = t + 1
    finally:
        for cam in cams:
            cam.close()
    return success, decisions


def evaluate_task(vit: ViT, task: str, cfg: RobotConfig, cache_dir=None, log=None) -> dict:
    """Demos (cached), their embeddings (cached), cfg.seeds policies, cfg.episodes rollouts each -> {"success": [rate
    per policy seed], "decisions": mean decisions per episode, "demo_frames"}."""
    demos = cached_demos(task, cfg, cache_dir, log)
    emb = cached_embeddings(vit, demos, task, cfg, cache_dir, log)
    x = demo_inputs(emb, demos["episode"], demos["proprio"], cfg.history)
    policies = [train_policy(x, demos["actions"], cfg, seed) for seed in range(cfg.seeds)]
    owner = np.repeat(np.arange(cfg.seeds), cfg.episodes)  # episode slot -> its policy seed
    seeds = [cfg.eval_seed + e for _ in range(cfg.seeds) for e in range(cfg.episodes)]

    @torch.no_grad()
    def act(idx, x, _obs):
        out = torch.zeros(len(idx), demos["actions"].shape[1])
        for s, policy in enumerate(policies):
            rows = torch.from_numpy(np.flatnonzero(owner[idx] == s))
            if len(rows):
                out[rows] = policy(x[rows])
        return out.numpy()

    success, decisions = run_episodes(task, seeds, cfg, act, lambda images: embed(vit, images))
    return {"success": success.reshape(cfg.seeds, cfg.episodes).mean(1).tolist(),
            "decisions": float(decisions.mean()), "demo_frames": len(demos["actions"])}


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluate(vit: ViT, cfg: RobotConfig, cache_dir=None, log=print) -> dict:
    """Every task of cfg for one encoder -> {"robot": {task: mean success over policy seeds, "average": ...},
    "robot_sd": {the sample sd over policy seeds of the same}, "robot_runs": {task: {"success": [rate per
    seed], "decisions", "demo_frames"}}, "time_s": {task: seconds}}. The average's sd is that of each seed's
    five-task average."""
    sim.require()
    log = log or (lambda *_: None)
    per_task, times = {}, {}
    for task in cfg.tasks:
        t = time.time()
        per_task[task] = evaluate_task(vit, task, cfg, cache_dir, log)
        times[task] = round(time.time() - t, 1)
        rates = per_task[task]["success"]
        log(f"  robot {task}: success {np.mean(rates):.3f} ± {_sd(rates):.3f} over {cfg.seeds} policy seeds "
            f"({cfg.episodes} episodes each, {per_task[task]['decisions']:.0f} decisions per episode; {times[task]} s)")
    by_seed = np.array([per_task[t]["success"] for t in cfg.tasks])  # (tasks, seeds)
    mean = {t: float(np.mean(r)) for t, r in zip(cfg.tasks, by_seed)}
    sd = {t: _sd(r) for t, r in zip(cfg.tasks, by_seed)}
    mean["average"], sd["average"] = float(by_seed.mean()), _sd(by_seed.mean(0))
    return {"robot": mean, "robot_sd": sd, "robot_runs": {t: per_task[t] for t in cfg.tasks}, "time_s": times}
