"""Robot control (evaluation/robot.py, evaluation/mujoco_sim.py) on MetaWorld with a tiny random ViT: the expert demos
succeed and replay, caches return the same features, a policy cloned from the expert reproduces it, the rollouts count
success as the environment reports it, and eval.py --robot reports it. Needs requirements-robot.txt; CI
(SPATIALBOOST_REQUIRE_WEIGHTS=1) fails instead of skipping when it is missing."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from model import ViT, ViTConfig, save_vit

TINY = dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)
TASK = "button-press-topdown"  # the expert's fastest of the five: 29-35 decisions


pytestmark = pytest.mark.usefixtures("mujoco", "one_thread")


def _cfg(**kw):
    from evaluation.robot import RobotConfig
    return dataclasses.replace(RobotConfig().quick(), image_size=32, **kw)


def test_quick_config_and_bad_config():
    from evaluation.robot import RobotConfig
    assert _cfg().tasks == (TASK,)
    with pytest.raises(ValueError, match="500 steps"):
        RobotConfig(horizon=300, action_repeat=2)
    with pytest.raises(ValueError, match="CortexBench"):
        RobotConfig(tasks=("reach",))


def test_expert_demos_succeed_and_replay():
    """Each recorded demo, its actions replayed from its seed's reset, reaches env success exactly at its last
    decision; the recorded proprioception is the observation the action was taken on."""
    from evaluation import mujoco_sim as sim
    from evaluation.robot import record_demos
    cfg = _cfg()
    demos = record_demos(TASK, cfg)
    assert len(demos["seeds"]) == cfg.demos and demos["images"].shape[1:] == (32, 32, 3)
    assert demos["images"].dtype == torch.uint8 and demos["images"].float().std() > 5  # a picture, not blank
    env = sim.make_env(TASK)
    for d, seed in enumerate(demos["seeds"].tolist()):
        rows = np.flatnonzero(demos["episode"].numpy() == d)
        obs, first = sim.reset(env, seed), None
        for k, r in enumerate(rows.tolist()):
            np.testing.assert_allclose(demos["proprio"][r].numpy(), obs[:4], atol=1e-6)
            for _ in range(cfg.action_repeat):
                obs, _, _, _, info = env.step(demos["actions"][r].numpy())
                if info["success"]:
                    first = k if first is None else first
                    break
        assert first == len(rows) - 1, f"demo {d}: success at decision {first}, recorded {len(rows)} decisions"


def test_caches_return_identical_features(tmp_path):
    from evaluation import robot
    cfg = _cfg()
    vit, other = ViT(ViTConfig(**TINY)), ViT(ViTConfig(**TINY))
    demos = robot.cached_demos(TASK, cfg, tmp_path)
    assert len(list(tmp_path.glob("demos-*.safetensors"))) == 1
    again = robot.cached_demos(TASK, cfg, tmp_path)
    for k in demos:
        assert torch.equal(demos[k], again[k]), k
    emb = robot.cached_embeddings(vit, demos, TASK, cfg, tmp_path)
    assert len(list(tmp_path.glob("embed-*.safetensors"))) == 1
    assert torch.equal(emb, robot.cached_embeddings(vit, demos, TASK, cfg, tmp_path))
    torch.testing.assert_close(emb, robot.embed(vit, demos["images"].numpy()))  # the cache holds what embed computes
    with torch.no_grad():  # and embed is the pooled (CLS) vector of the whole image
        x = torch.from_numpy(demos["images"][:3].numpy()).permute(0, 3, 1, 2)
        from model import preprocess
        torch.testing.assert_close(emb[:3], vit.features(preprocess(x, vit.cfg, size=32))["cls"])
    emb2 = robot.cached_embeddings(other, demos, TASK, cfg, tmp_path)  # another encoder: its own entry
    assert len(list(tmp_path.glob("embed-*.safetensors"))) == 2 and not torch.allclose(emb, emb2)
    assert len(list(tmp_path.glob("demos-*.safetensors"))) == 1


def test_demo_inputs_history():
    """The history restarts at each episode: frame t of an episode fuses frames max(t-2, 0), max(t-1, 0), t."""
    from evaluation.robot import demo_inputs
    emb = torch.arange(5.0)[:, None] * torch.tensor([[1.0, 10.0]])  # (5, 2)
    episode, proprio = torch.tensor([0, 0, 0, 1, 1]), torch.zeros(5, 4)
    x = demo_inputs(emb, episode, proprio, 3)
    assert x.shape == (5, 3 * 2 + 4)
    for t, hist in enumerate([(0, 0, 0), (0, 0, 1), (0, 1, 2), (3, 3, 3), (3, 3, 4)]):
        e = emb[list(hist)]
        np.testing.assert_allclose(x[t, :6].numpy(), torch.cat([e[1] - e[0], e[2] - e[1], e[2]]).numpy())


def test_policy_cloned_from_expert_reproduces_it():
    """Trained on the expert's own frames, the policy gives back its actions, and in closed loop from the demos'
    own placements (same frames, same proprioception) it presses the button as the expert did."""
    from evaluation import robot
    cfg = _cfg()
    vit = ViT(ViTConfig(**TINY))
    demos = robot.record_demos(TASK, cfg)
    x = robot.demo_inputs(robot.embed(vit, demos["images"].numpy()), demos["episode"], demos["proprio"], cfg.history)
    y = demos["actions"]
    policy = robot.train_policy(x, y, cfg, seed=0)
    with torch.no_grad():
        err = ((policy(x) - y) ** 2).mean().item()
    assert err < 0.01 * y.var(0).mean().item(), err
    untrained = robot.train_policy(x, y, dataclasses.replace(cfg, epochs=0), seed=0)
    with torch.no_grad():
        assert ((untrained(x) - y) ** 2).mean().item() > 10 * err  # the fit comes from training

    @torch.no_grad()
    def act(idx, feats, _obs):
        return policy(feats).numpy()

    success, decisions = robot.run_episodes(TASK, demos["seeds"].tolist(), cfg, act, lambda im: robot.embed(vit, im))
    assert success.all()
    lengths = torch.bincount(demos["episode"]).numpy()
    assert (decisions <= 1.25 * lengths + 2).all(), (decisions, lengths)  # small errors may cost a few decisions


def test_success_counting_matches_env():
    """run_episodes' success and decision counts against a plain loop over env.step and info["success"], on a
    horizon that cuts some of the expert's episodes short."""
    from evaluation import mujoco_sim as sim
    from evaluation import robot
    seeds, env, expert = [10_000, 10_001, 10_002, 10_003], sim.make_env(TASK), sim.expert(TASK)

    def first_success(seed, horizon):
        obs = sim.reset(env, seed)
        for t in range(horizon):
            action = np.clip(expert.get_action(obs), -1, 1).astype(np.float32)
            for _ in range(2):
                obs, _, _, _, info = env.step(action)
                if info["success"]:
                    return t + 1
        return None

    full = [first_success(s, 100) for s in seeds]
    assert all(full), full
    horizon = sorted(full)[1]  # the fastest two succeed, the slower ones are cut off (unless tied)
    cfg = _cfg(horizon=horizon)
    success, decisions = robot.run_episodes(TASK, seeds, cfg, lambda idx, x, obs: [expert.get_action(o) for o in obs])
    want = np.array([f is not None and f <= horizon for f in full])
    assert want.any() and (success == want).all(), (success, full, horizon)
    np.testing.assert_array_equal(decisions, [f if ok else horizon for f, ok in zip(full, want)])


def test_evaluate_quick_and_eval_cli(tmp_path, monkeypatch):
    from evaluation import robot
    import eval as ev
    vit = ViT(ViTConfig(**TINY))
    cfg = _cfg()
    res = robot.evaluate(vit, cfg, tmp_path / "cache", log=None)
    runs = res["robot_runs"][TASK]["success"]
    assert len(runs) == cfg.seeds and all(r in (0, 0.5, 1) for r in runs)  # 2 episodes per seed
    assert res["robot"][TASK] == pytest.approx(np.mean(runs)) == pytest.approx(res["robot"]["average"])
    assert res["robot_sd"][TASK] == pytest.approx(np.std(runs, ddof=1))

    monkeypatch.chdir(tmp_path)
    save_vit(vit, tmp_path / "enc")
    ev.main(["--vision", "enc", "--probes", "p", "--n-images", "8", "--image-size", "32", "--crop-size", "16",
             "--quick", "--threads", "1", "--out", "r", "--robot", "--robot-cache", "rc"])
    report = json.loads((tmp_path / "r/report.json").read_text())
    got = report["encoders"][0]["results"]
    assert set(got["robot"]) == {TASK, "average"} and "robot" in got["time_s"]
    assert report["robot_config"]["tasks"] == [TASK] and report["robot_config"]["demos"] == 2
    md = (tmp_path / "r/report.md").read_text()
    assert f"| robot | {TASK} (higher better) |" in md and "| robot_sd | average (sd over seeds) |" in md


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    import sys
    import eval as ev
    monkeypatch.setitem(sys.modules, "metaworld", None)  # an import of metaworld now fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"pip install -r requirements-robot\.txt"):
        ev.main(["--vision", "enc", "--probes", "p", "--robot"])
    assert not (tmp_path / "p").exists()  # stopped before making the main probe set
