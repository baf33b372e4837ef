"""A run's faults (issue 13): a new run over an old one, resume with other settings, checkpoint rotation, a failed
export, unusable micro-batches, the NaN guard, a torn metrics line, a killed writer's leftovers, and kill -9 at
seeded-random points (mid-step, mid-checkpoint, mid-export, mid-swap) resuming bitwise."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import TINY_STAGE3, spatial_data
from storage.atomic import remove_stale_temporaries
from training.runs import checkpoints, latest_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# tiny enough for well under a second per step on 2 busy CPU cores
FAST = TINY_STAGE3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    return spatial_data(tmp_path_factory, n=16, seed=5)


def flags(tmp, spatial, *extra):
    return ["--runs-dir", str(tmp / "runs"), "--data", str(spatial), *FAST, *extra]


def run(tmp, spatial, *extra):
    return train.train(train.parse_config(flags(tmp, spatial, *extra)))


def stage(tmp, name="tiny"):
    return tmp / "runs" / name / "stage3"


def same_tensors(a: Path, b: Path):
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{a} vs {b}: {k}"


# F2: a new run under the name of an earlier one, resume with other settings, rotation by step number

def test_new_run_refuses_a_stage_dir_that_holds_a_run(tmp_path, spatial):
    run(tmp_path, spatial, "--max-steps", "2", "--save-every", "1")
    out = stage(tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=f"{out} already holds a run .*checkpoints/ .*Pass --resume .*--name"):
        run(tmp_path, spatial, "--max-steps", "4", "--save-every", "1", "--seed", "2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing adopted, nothing deleted


def test_resume_refuses_every_setting_that_changes_the_result(tmp_path, spatial):
    run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1")
    with pytest.raises(ValueError, match=r"min_lr_frac \(checkpoint 0.1, now 0.5\), grad_clip \(checkpoint 1.0, "
                                         r"now 0.5\)"):
        run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1", "--resume", "--grad-clip", "0.5",
            "--min-lr-frac", "0.5")
    # where and how fast it runs may change
    run(tmp_path, spatial, "--max-steps", "3", "--save-every", "2", "--keep-last", "3", "--log-every", "2", "--resume")
    assert (stage(tmp_path) / "config.json").exists()


def test_checkpoints_rotate_by_step_number(tmp_path):
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    ckpts = tmp_path / "checkpoints"
    for old in ("step_000058", "step_000059"):  # another run's, later than this one's steps
        (ckpts / old).mkdir(parents=True)
    cfg = train.Config()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, lin, opt, cfg, keep_last=2)
    assert [s for s, _ in checkpoints(tmp_path)] == [2, 3, 58, 59]  # the one just written stays; the others too
    (ckpts / "step_999999").mkdir()
    (ckpts / "step_1000000").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_1000000"


# F5: the export fails

def test_failed_export_leaves_the_stage_unfinished(tmp_path, spatial, monkeypatch):
    import eval as evaluate

    real = train.save_vit

    def full_disk(vit, path):  # the export fails (the random base encoder, saved first, does not)
        if Path(path).parent.name == "stage3":
            raise OSError(27, "File too large", str(path))
        real(vit, path)

    monkeypatch.setattr(train, "save_vit", full_disk)
    with pytest.raises(OSError, match="File too large"):
        run(tmp_path, spatial, "--max-steps", "2", "--save-every", "1")
    out = stage(tmp_path)
    assert not (out / "config.json").exists() and not (out / "vision").exists()
    for unfinished in (lambda: train.load_stage(out), lambda: evaluate.run_encoders("tiny", str(tmp_path / "runs"))):
        with pytest.raises(FileNotFoundError):
            unfinished()
    monkeypatch.setattr(train, "save_vit", real)
    run(tmp_path, spatial, "--max-steps", "2", "--save-every", "1", "--resume")
    vit = train.load_stage(out)[0].vit
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(train.load_vit(out / "vision")(x), vit(x))
    monkeypatch.setattr(train, "save_vit", full_disk)  # a rerun of the finished stage fails the same way
    with pytest.raises(OSError):
        run(tmp_path, spatial, "--max-steps", "2", "--save-every", "1", "--resume")
    assert not (out / "config.json").exists()  # not marked finished over a stale export


# F1: micro-batches with nothing to train

def test_unusable_micro_batches_are_skipped_and_counted(tmp_path, spatial, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    shutil.copytree(spatial / "images", data / "images")
    lines = (spatial / "data.jsonl").read_text().splitlines()[:3]
    text_only = {"conversations": [{"from": "human", "value": "How far is the wall?"},
                                   {"from": "gpt", "value": "3.2 m."}]}
    (data / "data.jsonl").write_text("\n".join([lines[0], '{"conversations": [', *lines[1:], json.dumps(text_only)])
                                     + "\n")
    run(tmp_path, data, "--batch-size", "1", "--global-batch", "1", "--max-steps", "5")
    log = capsys.readouterr().out
    assert "data: 4 samples used; " in log and "1 unusable" in log and "mixed/data.jsonl" in log
    assert "2 micro-batches with nothing to train" in log
    assert (stage(tmp_path) / "config.json").exists()


# F3: the NaN guard

def test_nan_guard_names_no_ruined_checkpoint_and_its_advice_works(tmp_path, spatial):
    """A huge --lr: step 1's weights (~1e12) give NaN in step 2. They are not "the last good checkpoint"; the advice
    (the same command with --resume and a lower --lr) is accepted and ends with finite, sane weights."""
    with pytest.raises(FloatingPointError, match="in step 2, .*set aside as .*nonfinite_step_000001. No good "
                                                 "checkpoint was written.*--resume and a lower --lr"):
        run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1", "--lr", "1e12")
    out = stage(tmp_path)
    assert latest_checkpoint(out) is None and json.loads((out / "stopped.json").read_text())["updates"] == 1
    run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1", "--lr", "1e-3", "--resume")
    assert not (out / "stopped.json").exists()
    vision = load_file(out / "vision" / "model.safetensors")
    assert all(v.isfinite().all() and v.abs().max() < 1e3 for v in vision.values())


def test_after_a_nan_stop_resume_may_change_the_rates_only(tmp_path, spatial, monkeypatch, capsys):
    from model import VLM

    calls, forward = {"n": 0}, VLM.forward

    def poisoned(self, *a, **k):  # steps 1-2 fine (2 micro-steps each), then NaN
        calls["n"] += 1
        return forward(self, *a, **k) * (float("nan") if calls["n"] > 4 else 1.0)

    monkeypatch.setattr(VLM, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="in step 3, .*nonfinite_step_000002. The last good checkpoint is "
                                                 ".*step_000001"):
        run(tmp_path, spatial, "--max-steps", "4", "--save-every", "1")
    monkeypatch.setattr(VLM, "forward", forward)
    with pytest.raises(ValueError, match=r"differ from the checkpoint's: seed \(checkpoint 1337, now 7\)\. "):
        run(tmp_path, spatial, "--max-steps", "4", "--save-every", "1", "--resume", "--lr", "5e-4", "--seed", "7")
    run(tmp_path, spatial, "--max-steps", "4", "--save-every", "1", "--resume", "--lr", "5e-4")
    log = capsys.readouterr().out
    assert "step_000001 at step 1, after the non-finite stop (the weights after 2 updates), with lr 0.001 -> " in log
    assert (stage(tmp_path) / "config.json").exists() and not (stage(tmp_path) / "stopped.json").exists()


def test_nan_guard_checks_the_last_update_before_the_export(tmp_path, spatial):
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) in the final check, with the weights "
                                                 "after 1 updates"):
        run(tmp_path, spatial, "--max-steps", "1", "--lr", "1e12")
    assert not (stage(tmp_path) / "vision").exists() and not (stage(tmp_path) / "config.json").exists()


# metrics.jsonl, a killed writer's leftovers

def test_torn_metrics_line(tmp_path, spatial, capsys):
    run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1")
    metrics = stage(tmp_path) / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows) + '\n{"step": 4, "loss": 5.5')  # killed mid-row
    run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1", "--resume")
    assert f"{metrics}:4: a torn last line" in capsys.readouterr().out
    assert [json.loads(r)["step"] for r in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text("\n".join([rows[0], rows[1][:20], rows[2]]) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}:2: not a metrics row"):
        run(tmp_path, spatial, "--max-steps", "3", "--save-every", "1", "--resume")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path, spatial):
    run(tmp_path, spatial, "--max-steps", "2", "--save-every", "1")
    out, dead = stage(tmp_path), dead_pid()
    stale = [out / "checkpoints" / f".step_000002.tmp-{dead}", out / f".model.safetensors.tmp-{dead}"]
    stale[0].mkdir()
    stale[1].write_bytes(b"half")
    live = out / f".other.tmp-{os.getpid()}"  # a writer still running: never touched
    live.write_text("")
    outside = tmp_path / "runs" / "tiny" / f".x.tmp-{dead}"  # not this stage's dir
    outside.write_text("")
    run(tmp_path, spatial, "--max-steps", "2", "--save-every", "1", "--resume")
    assert not any(p.exists() for p in stale) and live.exists() and outside.exists()
    # killed between write_dir_atomically's two renames: the old copy comes back
    old = out / f".vision.old-{dead}"
    (out / "vision").rename(old)
    assert remove_stale_temporaries(out) == [old] and (out / "vision" / "config.json").exists()


# kill -9 at seeded-random points, then --resume: bitwise what one uninterrupted run gives

KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import train
where, _, what = os.environ["KILL_AT"].partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "step":  # as step `what` begins (after `what` updates)
    lr_at = train.lr_at
    train.lr_at = lambda step, *a: die() if step == int(what) else lr_at(step, *a)
else:  # just before the rename that puts `what` (a checkpoint, vision) in place
    replace = os.replace
    os.replace = lambda src, dst: die() if Path(dst).name == what else replace(src, dst)
train.main(sys.argv[1:])
"""


def test_killed_runs_resume_bitwise(tmp_path, spatial):
    cmd = [sys.executable, "-c", KILLER.format(root=str(ROOT)), *flags(tmp_path, spatial, "--max-steps", "6",
                                                                       "--save-every", "1", "--keep-last", "2")]

    def go(name, kill=None, resume=True):
        env = {**os.environ, "KILL_AT": kill or "none:", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([*cmd, "--name", name, *(["--resume"] if resume else [])], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == (-9 if kill else 0), out.stdout + out.stderr
        return out.stdout

    go("ref", resume=False)
    ref = stage(tmp_path, "ref")
    rng = random.Random(13)
    k1 = rng.randint(2, 3)
    k2 = rng.randint(k1 + 1, 5)
    out = stage(tmp_path)
    go("tiny", f"step:{k1}", resume=False)                       # mid-step
    assert latest_checkpoint(out).name == f"step_{k1:06d}"
    go("tiny", f"write:step_{k2:06d}")                           # mid-checkpoint: its temporary dir is left behind
    assert any(p.name.startswith(f".step_{k2:06d}.tmp-") for p in (out / "checkpoints").iterdir())
    go("tiny", "write:vision")                                   # mid-export: the stage is not marked finished
    assert not (out / "config.json").exists() and (out / "model.safetensors").exists()
    log = go("tiny")
    assert "removed" in log and "resumed from" in log
    assert [s for s, _ in checkpoints(out)] == [4, 5]            # rotated by keep_last
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    for f in ("model.safetensors", "vision/model.safetensors"):
        same_tensors(out / f, ref / f)
    go("tiny", "write:vision")                                   # the finished stage rerun, killed mid-swap
    assert not (out / "vision").exists() and not (out / "config.json").exists()
    go("tiny")
    for f in ("model.safetensors", "vision/model.safetensors"):
        same_tensors(out / f, ref / f)
