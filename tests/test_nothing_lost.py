"""Nothing lost, nothing silently wrong (issue 26), one test per class of cause: flags and data validated before any
model or file; one image reader for the loader and `data.py check`; a lock and a data fingerprint per run; the
writer owns its folders; every output checked before the work (and a failed export keeps the old file); a full disk
names the file; eval checks its inputs first."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import TINY_STAGE3, spatial_data
from dataengine import check as datacheck
from llm import Tokenizer
from model import ViT, ViTConfig, save_vit
from storage import atomic
from training import dataset as training_data

ROOT = Path(__file__).resolve().parent.parent
FAST = TINY_STAGE3
TINY_VIT = dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    return spatial_data(tmp_path_factory, n=8, seed=5)


def run(tmp, *extra):
    return train.train(train.parse_config(["--runs-dir", str(tmp / "runs"), *FAST, *extra]))


# ---------------------------------------------------------------------------------------------------------------
# one place validates flags and data: before any model is built or any file written under --runs-dir


def test_bad_data_stops_the_run_before_anything_is_written(tmp_path, spatial):
    (tmp_path / "dict.json").write_text('{"conversations": []}')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("[]")
    cases = [("dict.json", "must hold one JSON array of samples, not a dict"),
             ("empty.jsonl", "empty.jsonl: no samples \\(the file is empty\\)"),
             ("empty.json", "empty.json: no samples \\(the file is empty\\)"),
             (f"{spatial}:0", "weight 0 x 8 records gives it no samples"),
             (f"{spatial}:0.01", "weight 0.01 x 8 records gives it no samples"),
             (f"{spatial}:1e9", "asks for 8,000,000,000 samples"),
             (f"{spatial}:0.25", "the data has 2 samples .*, fewer than one global batch of 4 \\(--global-batch\\)")]
    for spec, message in cases:
        spec = spec if ":" in spec or "/" in spec else str(tmp_path / spec)
        with pytest.raises(ValueError, match=message):
            run(tmp_path, "--data", spec)
        assert not (tmp_path / "runs").exists(), spec  # no runs/NAME/base, no stage dir
    with pytest.raises(SystemExit, match="^train.py: source .*empty.jsonl: no samples"):   # one line, no traceback
        train.main(["--runs-dir", str(tmp_path / "runs"), *FAST, "--data", str(tmp_path / "empty.jsonl")])


def test_resume_with_nothing_to_resume_writes_nothing(tmp_path, spatial):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(tmp_path, "--data", str(spatial), "--resume")
    assert not (tmp_path / "runs").exists()


def test_init_must_be_an_earlier_stage(tmp_path, spatial):
    save_vit(ViT(ViTConfig(**TINY_VIT)), tmp_path / "vision")
    with pytest.raises(ValueError, match="is not a train.py stage's .*--init takes runs/NAME/stageK"):
        run(tmp_path, "--data", str(spatial), "--init", str(tmp_path / "vision"), "--name", "v")
    assert not (tmp_path / "runs" / "v" / "base").exists()
    run(tmp_path, "--data", str(spatial), "--max-steps", "1", "--name", "s3")
    with pytest.raises(ValueError, match="starts from a stage-3 run, .*: stage 3 starts from a stage 1 or 2"):
        run(tmp_path, "--data", str(spatial), "--init", str(tmp_path / "runs" / "s3" / "stage3"), "--name", "again")


def test_a_weight_suffix_and_a_folder_name_are_never_confused(tmp_path, spatial, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(spatial, tmp_path / "d" / "ver:2")
    assert train.data_sources("d/ver:2") == [(Path("d/ver:2"), 1.0)]  # only the folder fits: read whole
    shutil.copytree(spatial, tmp_path / "d" / "ver")
    with pytest.raises(ValueError, match="ambiguous: .*d/ver:2 exists, and so does .*d/ver"):
        train.data_sources("d/ver:2")
    assert train.data_sources("d/ver:2:1") == [(Path("d/ver:2"), 1.0)]


def test_default_data_made_with_other_flags_is_never_silently_reused(tmp_path, capsys):
    base = ["--data-root", str(tmp_path / "data"), "--max-steps", "1"]
    run(tmp_path, *base, "--gen-samples", "8", "--name", "a")
    run(tmp_path, *base, "--gen-samples", "4", "--name", "b")       # made again for --gen-samples, not ignored
    assert "data: 8 samples from" in capsys.readouterr().out          # spatial + spatial-multiview, 4 each
    for flag, value, words in (("--seed", "7", "--seed 1337 --image-size 32 .*not this run's --seed 7"),
                               ("--image-size", "64", "--image-size 32 .*not this run's --seed 1337 --image-size 64")):
        with pytest.raises(ValueError, match=words):
            run(tmp_path, *base, "--gen-samples", "4", flag, value, "--name", "c")


# ---------------------------------------------------------------------------------------------------------------
# one image reader: the loader skips (and check flags) exactly the same images, and neither misreads one


def sixteen_bit(p):
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(p)         # mid grey in 16 bits


def float_tiff(p):
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(p.with_suffix(".tif"))
    p.with_suffix(".tif").rename(p)


def truncated(p):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:300])


def bomb(p):
    Image.new("1", (8200, 8200)).save(p)                     # 67M pixels: GiBs as RGB, a few KB on disk


def palette_transparent(p):
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0] * 256)
    im.info["transparency"] = 0
    im.save(p, transparency=0)


SKIPPED = {"float TIFF": (float_tiff, "mode F (32-bit float) has no fixed range"),
           "truncated": (truncated, "truncated"),
           "decompression bomb": (bomb, "8200 x 8200 = 67240000 pixels, more than")}
CONVERTED = {"16-bit grey": (sixteen_bit, 128), "palette, transparent": (palette_transparent, 255)}


@pytest.mark.parametrize("case", [*SKIPPED, *CONVERTED])
def test_loader_and_check_agree_on_every_image(spatial, tmp_path, case, capsys):
    out = tmp_path / "d"
    shutil.copytree(spatial, out)
    rec = json.loads((out / "data.jsonl").read_text().splitlines()[1])
    image = out / rec["image"]
    (SKIPPED.get(case) or CONVERTED[case])[0](image)
    tok = Tokenizer.byte_level()
    tok.add_image_token()
    ds = training_data.ConversationDataset([(out, 1.0)], tok, ViTConfig(), 32, 4, 4096)
    problem = ds[1]["problem"]
    problems = datacheck.check(out)[0]
    if case in SKIPPED:
        message = SKIPPED[case][1]
        assert problem and message in problem and str(image) in problem, problem
        assert any(message in p and p.startswith(f"{out / 'data.jsonl'}:line 2: ") for p in problems), problems
    else:  # read by its real range: 16-bit 32768 is mid grey, not white; transparency over white
        assert problem is None and problems == [], (problem, problems)
        cfg, pixels = ViTConfig(), ds[1]["pixels"][0]                    # (3, S, S), normalized
        rgb = (pixels * torch.tensor(cfg.std)[:, None, None] + torch.tensor(cfg.mean)[:, None, None]) * 255
        assert abs(float(rgb.mean()) - CONVERTED[case][1]) <= 2, float(rgb.mean())


# ---------------------------------------------------------------------------------------------------------------
# a run holds its stage dir, and a resume refuses data that changed


def hold(path: Path):
    code = (f"import fcntl, os, time; f = open({str(path)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(f'pid {os.getpid()} (test holder)'); f.flush(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_stage_dir_is_held_by_one_run_and_a_killed_run_frees_it(tmp_path, spatial):
    out = tmp_path / "runs" / "tiny" / "stage3"
    out.mkdir(parents=True)
    holder = hold(out / ".lock")
    try:
        with pytest.raises(Exception, match=f"{out} is in use by pid {holder.pid} .*choose another --name"):
            run(tmp_path, "--data", str(spatial), "--max-steps", "1")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run(tmp_path, "--data", str(spatial), "--max-steps", "1")         # kill -9 released it
    assert (out / "config.json").exists()


def test_resume_refuses_changed_data_and_falls_back_past_a_broken_checkpoint(tmp_path, spatial, capsys):
    mine = tmp_path / "mine"
    shutil.copytree(spatial, mine)
    run(tmp_path, "--data", str(mine), "--max-steps", "4", "--save-every", "1", "--keep-last", "3")
    out = tmp_path / "runs" / "tiny" / "stage3"
    (out / "config.json").unlink()                                 # as if killed after step 3's checkpoint
    lines = (mine / "data.jsonl").read_text().splitlines()
    (mine / "data.jsonl").write_text("\n".join(lines[::-1]) + "\n")  # reordered: same size, other data
    with pytest.raises(ValueError, match=f"the data is not what .*: {mine / 'data.jsonl'} changed, came or went"):
        run(tmp_path, "--data", str(mine), "--max-steps", "4", "--save-every", "1", "--keep-last", "3", "--resume")
    (mine / "data.jsonl").write_text("\n".join(lines) + "\n")
    (out / "checkpoints" / "step_000003" / "optimizer.safetensors").unlink()
    capsys.readouterr()
    run(tmp_path, "--data", str(mine), "--max-steps", "4", "--save-every", "1", "--keep-last", "3", "--resume")
    log = capsys.readouterr().out
    assert "step_000003 has no optimizer.safetensors: falling back" in log and "step_000002 at step 2" in log, log


# ---------------------------------------------------------------------------------------------------------------
# the writer owns its folders


def test_the_writer_refuses_folders_it_did_not_write_and_keeps_edits(tmp_path, capsys):
    mine = tmp_path / "MYDATA"
    (mine / "images").mkdir(parents=True)
    (mine / "data.jsonl").write_text('{"mine": 1}\n')
    (mine / "images" / "000000.png").write_bytes(b"my photo")
    with pytest.raises(SystemExit, match="a folder data.py did not write"):
        data.main(["spatial", "--n", "2", "--size", "32", "--out", str(mine)])
    assert (mine / "data.jsonl").read_text() == '{"mine": 1}\n' and (mine / "images" / "000000.png").read_bytes() == \
        b"my photo"
    out = tmp_path / "d"
    cli = ["spatial", "--n", "3", "--size", "32", "--shard-size", "2", "--out", str(out)]
    data.main(cli)
    edited = (out / "data.jsonl").read_text().replace("spatial-000001", "my-own-id")
    (out / "data.jsonl").write_text(edited)
    with pytest.raises(SystemExit, match="not the file data.py assembled .*edited by hand.*it is kept"):
        data.main(cli)
    assert (out / "data.jsonl").read_text() == edited


@pytest.mark.parametrize("argv", [["--n", "0"], ["--n", "-1"], ["--size", "0"], ["--size", "-64"], ["--size", "7"],
                                  ["--shard-size", "0"]])
def test_impossible_writer_flags_write_nothing(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["spatial", "--n", "2", "--out", str(tmp_path / "d"), *argv])
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    data.main(["spatial", "--n", "2", "--size", "32", "--out", str(tmp_path / "d")])   # the corrected rerun works


def test_a_complete_dataset_is_not_rewritten(tmp_path):
    out = tmp_path / "d"
    data.main(["spatial", "--n", "2", "--size", "32", "--out", str(out)])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(0.01)
    data.main(["spatial", "--n", "2", "--size", "32", "--out", str(out)])          # nothing to do: nothing written
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        data.main(["spatial", "--n", "2", "--size", "32", "--out", str(tmp_path / "file")])


def test_check_limit_zero_is_refused_not_called_empty(spatial, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(spatial), "--limit", "0"])
    assert e.value.code == 2 and "--limit: 0: must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# every output checked before the work; a failed write names its file


def test_a_runs_dir_that_is_a_file_stops_before_any_model(tmp_path, spatial):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="--runs-dir .*file: cannot write the stage dir"):
        train.train(train.parse_config(["--runs-dir", str(tmp_path / "file"), "--data", str(spatial), *FAST]))


def test_a_full_disk_names_the_file(tmp_path):
    def full(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=f"writing {tmp_path / 'x.json'}: No space left on device"):
        atomic.write_file_atomically(tmp_path / "x.json", full)
    from safetensors import SafetensorError

    def full_safetensors(tmp):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    with pytest.raises(OSError, match=f"writing {tmp_path / 'm'}: SafetensorError: .*No space left"):
        atomic.write_dir_atomically(tmp_path / "m", full_safetensors)


def test_export_onnx_keeps_the_old_file_until_the_new_one_passes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    sys.path.insert(0, str(ROOT / "tools"))
    import export_onnx

    save_vit(ViT(ViTConfig(**TINY_VIT)), tmp_path / "enc")
    good = tmp_path / "good.onnx"
    good.write_bytes(b"the user's good export")
    for argv in (["--static", "--batch", "0"], ["--size", "0"], ["--size", "-8"]):
        with pytest.raises(SystemExit):
            export_onnx.main([str(tmp_path / "enc"), str(good), *argv])
    for bad, words in ((tmp_path / "nothing", "no config.json"), (ROOT / "weights" / "smollm2-135m-instruct", "")):
        if bad.exists() or not words:
            continue
        with pytest.raises(SystemExit, match=words):
            export_onnx.main([str(bad), str(good)])
    with pytest.raises(SystemExit):
        export_onnx.main([str(tmp_path / "enc"), str(tmp_path)])                # out a directory

    def fails(*a, **k):
        raise ValueError("ONNX Runtime differs from PyTorch")
    monkeypatch.setattr(export_onnx, "check", fails)
    with pytest.raises(ValueError, match="differs"):
        export_onnx.main([str(tmp_path / "enc"), str(good), "--static"])
    assert good.read_bytes() == b"the user's good export" and sorted(os.listdir(tmp_path)) == ["enc", "good.onnx"]


def test_eval_checks_its_inputs_and_outputs_before_any_probe(tmp_path, monkeypatch, capsys):
    import eval as ev

    monkeypatch.chdir(tmp_path)
    save_vit(ViT(ViTConfig(**TINY_VIT)), tmp_path / "enc")
    (tmp_path / "file").write_text("x")
    probe = ["--probes", "p", "--n-images", "8", "--image-size", "32", "--crop-size", "16", "--quick", "--no-cache"]
    for argv in (["--n-images", "0"], ["--n-images", "-1"], ["--test-every", "0"]):
        with pytest.raises(SystemExit) as e:
            ev.main(["--vision", "enc", *probe, *argv])
        assert e.value.code == 2
    for argv, words in ((["--out", "file"], "eval.py --out: .*file: not a directory this process can write"),
                        (["--vision", "missing"], "--vision missing"),
                        (["--qa", "enc", "--vlm", "enc"], "--vlm enc: .*has no 'config'")):
        with pytest.raises(SystemExit, match=words):
            ev.main(["--vision", "enc", *probe, *argv])
    assert not (tmp_path / "p").exists()                               # no probe set made, no work done
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "index.json").write_text(json.dumps({"format": 1, "images": []}))
    from evaluation import probes
    (tmp_path / "p" / "index.json").write_text(json.dumps({"format": probes.FORMAT, "images": []}))
    with pytest.raises(SystemExit, match="a probe set without images"):
        ev.main(["--vision", "enc", *probe])
    (tmp_path / "qa").mkdir()
    from test_eval import _sample
    (tmp_path / "qa" / "data.jsonl").write_text(json.dumps(_sample()) + "\n")
    (tmp_path / "a.jsonl").write_text('{"id": "s0", "answers": [1, 2]\n')
    with pytest.raises(SystemExit, match="a.jsonl:1: expected a JSON object"):
        ev.main(["--qa", "qa", "--answers", "a.jsonl"])
