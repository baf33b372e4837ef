"""Bad flags and bad data (issue 13): nonsense train.py flags are argparse errors; impossible RGB-D frames are refused
when read; `data.py check` names the file and line of every bad sample and never crashes; the training loader counts
samples whose roles are out of order and refuses images outside the dataset folder; --data takes files as they are."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import data
import train
from dataengine import check as datacheck
from dataengine import scenes
from llm import Tokenizer
from model import ViT, ViTConfig, save_vit
from training import dataset as training_data

# ---------------------------------------------------------------------------------------------------------------
# F4: train.py flags


@pytest.mark.parametrize("argv, message", [
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be > 0"),
    (["--grad-clip", "0"], "--grad-clip 0.0: must be > 0"),
    (["--max-steps", "-3"], "--max-steps -3: must be >= 0 (0: --epochs decides)"),
    (["--epochs", "0"], "--epochs 0.0: must be > 0"),
    (["--keep-last", "0"], "--keep-last 0: must be >= 1"),
    (["--feature-layer", "99"], "--feature-layer 99: the random ViT has --vit-depth 4 blocks; expected -4 .. 3"),
    (["--feature-layer", "-5"], "--feature-layer -5: the random ViT has --vit-depth 4 blocks"),
    (["--data-size", "-5"], "--data-size -5: must be >= 0 (0: all samples)"),
    (["--data", "d:abc"], "--data 'd:abc': the weight after ':' must be a number"),
    (["--image-size", "0"], "--image-size 0: must be >= 1"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--global-batch", "6", "--batch-size", "4"], "--global-batch 6: must be a multiple of --batch-size 4 x 1"),
])
def test_nonsense_flags_are_argparse_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and message in err, err
    assert "Traceback" not in err


def test_zero_keeps_its_documented_meaning_and_data_weights_are_checked(tmp_path, capsys):
    cfg = train.parse_config(["--max-steps", "0", "--data-size", "0", "--save-every", "0"])
    assert (cfg.max_steps, cfg.data_size, cfg.save_every) == (0, 0, 0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.jsonl").write_text("{}\n")
    for spec, message in ((f"{tmp_path / 'd'}:-1", "weight must be a finite number >= 0"),
                          (f"{tmp_path / 'd'},,{tmp_path / 'd'}", "an empty entry"),
                          (str(tmp_path / "nothing"), "no such dataset file or directory")):
        with pytest.raises(SystemExit):
            train.parse_config(["--data", spec])
        assert message in capsys.readouterr().err
    assert train.data_sources(f"{tmp_path / 'd'}:0.5,{tmp_path / 'd' / 'data.jsonl'}") == [
        (tmp_path / "d", 0.5), (tmp_path / "d" / "data.jsonl", 1.0)]


def test_feature_layer_beyond_a_loaded_encoder(tmp_path):
    save_vit(ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)),
             tmp_path / "vit")
    cfg = train.parse_config(["--vision", str(tmp_path / "vit"), "--image-size", "32", "--feature-layer", "5"])
    with pytest.raises(ValueError, match=r"--feature-layer 5: the encoder .*vit has 2 blocks; expected -2 \.\. 1"):
        train.build_base(cfg, {"vision": str(tmp_path / "vit"), "llm": str(tmp_path / "not-read")})


# ---------------------------------------------------------------------------------------------------------------
# F6: impossible RGB-D frames


def nan_fx(f):
    (f / "intrinsics.json").write_text(json.dumps({"fx": float("nan"), "fy": 60.0, "cx": 32, "cy": 24}))


def inf_cx(f):
    (f / "intrinsics.json").write_text(json.dumps({"fx": 60.0, "fy": 60.0, "cx": float("inf"), "cy": 24}))


def nan_pose(f):
    pose = np.eye(4)
    pose[0, 3] = np.nan
    (f / "pose.txt").write_text(" ".join(map(str, pose.ravel())))


def stretched_pose(f):
    (f / "pose.txt").write_text(" ".join(map(str, np.diag([2.0, 2.0, 2.0, 1.0]).ravel())))


def mirrored_pose(f):
    (f / "pose.txt").write_text(" ".join(map(str, np.diag([-1.0, 1.0, 1.0, 1.0]).ravel())))


def unreadable_pose(f):
    (f / "pose.txt").write_text("1 0 0 0 / 0 1 0 0 / 0 0 1 0 / 0 0 0 1")


def huge_depth(f):
    (f / "depth.png").unlink()
    np.save(f / "depth.npy", np.full((48, 64), 2e30, np.float32))


def millimetres_as_metres(f):
    (f / "depth.png").unlink()
    np.save(f / "depth.npy", np.full((48, 64), 2000.0, np.float32) + np.linspace(0, 1000, 64, dtype=np.float32))


@pytest.mark.parametrize("breaker, message", [
    (nan_fx, "not a pinhole matrix"), (inf_cx, "not a pinhole matrix"), (nan_pose, "of finite numbers"),
    (stretched_pose, "orthonormal rotation"), (mirrored_pose, "orthonormal rotation (det +1)"),
    (unreadable_pose, "pose.txt is not readable"), (huge_depth, "depths beyond 250 m"),
    (millimetres_as_metres, "saved in millimetres? pass --depth-scale 0.001")])
def test_impossible_rgbd_frames_are_refused(tmp_path, breaker, message):
    from test_scenes import write_frame

    write_frame(tmp_path / "f")
    breaker(tmp_path / "f")
    with pytest.raises(ValueError) as e:
        scenes.load_rgbd(tmp_path / "f")
    assert message in str(e.value) and str(tmp_path / "f") in str(e.value), str(e.value)


def test_millimetre_depth_needs_depth_scale(tmp_path, capsys):
    from test_data import write_frame

    rng = np.random.default_rng(10)
    scene = scenes.random_scene(rng, n_objects=5)
    write_frame(tmp_path / "frames" / "f0", scene, scenes.render(scene, scenes.random_camera(rng, scene), 96, 128),
                depth_scale=1000.0)
    cli = ["spatial", "--n", "1", "--rgbd", str(tmp_path / "frames"), "--shard-size", "1"]
    with pytest.raises(SystemExit) as e:
        data.main([*cli, "--out", str(tmp_path / "mm")])
    assert "saved in millimetres? pass --depth-scale 0.001" in str(e.value.code), e.value.code
    assert not (tmp_path / "mm" / "data.jsonl").exists()
    data.main([*cli, "--out", str(tmp_path / "m"), "--depth-scale", "0.001"])
    assert datacheck.check(tmp_path / "m")[0] == []
    rec = json.loads((tmp_path / "m" / "data.jsonl").read_text())
    metres = [float(x) for m in rec["conversations"][1::2] for x in re.findall(r"(-?\d+\.\d+) m\b", m["value"])]
    assert metres and max(map(abs, metres)) < 20, metres


# ---------------------------------------------------------------------------------------------------------------
# data.py check on bad datasets: every problem is "file:line N: ...", exit status 1, never a traceback


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    for kind in ("spatial", "grounding"):
        data.generate(kind, root / kind, 2, seed=3, size=64, progress=False)
    return root


def edit(fn):
    """A breaker that edits the record on line 2."""
    def breaker(out):
        lines = (out / "data.jsonl").read_text().splitlines()
        rec = json.loads(lines[1])
        fn(rec, out)
        lines[1] = json.dumps(rec)
        (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    return breaker


def raw(text: bytes):
    def breaker(out):
        lines = (out / "data.jsonl").read_bytes().splitlines()
        (out / "data.jsonl").write_bytes(b"\n".join([lines[0], text]) + b"\n")
    return breaker


def replace_in_line(old: str, new: str):
    def breaker(out):
        lines = (out / "data.jsonl").read_text().splitlines()
        assert old in lines[1]
        lines[1] = lines[1].replace(old, new, 1)
        (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    return breaker


def file_of(key, write):
    """A breaker that rewrites the sidecar file meta[key] (or the image) of the record on line 2."""
    def breaker(rec, out):
        path = out / (rec["image"] if key == "image" else rec["meta"][key])
        write(path, rec)
    return edit(breaker)


def swap_roles(rec, out):
    rec["conversations"][0]["from"], rec["conversations"][1]["from"] = "gpt", "human"


def nan_depth(rec, out):
    d = np.asarray(Image.open(out / rec["meta"]["depth"])).astype(np.float32) / 1000
    d[5, 5] = np.nan
    np.save(out / "gt" / "nan_depth.npy", d)
    rec["meta"]["depth"] = "gt/nan_depth.npy"


BAD = {
    "not JSON": raw(b'{"id": "spatial-000001", "conversations": ['),
    "not UTF-8": raw(b"\xff\xfe{}"),
    "a list": raw(b"[1, 2, 3]"),
    "no conversations": edit(lambda r, o: r.pop("conversations")),
    "conversations a string": edit(lambda r, o: r.update(conversations="hello")),
    "a value not a string": edit(lambda r, o: r["conversations"][1].update(value=3)),
    "gpt first": edit(swap_roles),
    "two humans in a row": edit(lambda r, o: r["conversations"][1].update({"from": "human"})),
    "no answers": edit(lambda r, o: r.update(conversations=r["conversations"][:1])),
    "id a number": edit(lambda r, o: r.update(id=7)),
    "no image field": edit(lambda r, o: r.pop("image")),
    "image missing": file_of("image", lambda p, r: p.unlink()),
    "image outside": edit(lambda r, o: r.update(image="../../x.png")),
    "image absolute": edit(lambda r, o: r.update(image=str(o / r["image"]))),
    "image corrupt": file_of("image", lambda p, r: p.write_bytes(b"not a png")),
    "an <image> mark missing": edit(lambda r, o: r["conversations"][0].update(value="Where?")),
    "no meta": edit(lambda r, o: r.pop("meta")),
    "unknown kind": edit(lambda r, o: r["meta"].update(kind="panorama")),
    "NaN in K": replace_in_line('"K": [[', '"K": [[NaN, '),
    "1e999 in K": replace_in_line('"K": [[', '"K": [[1e999, '),
    "K not 3x3": edit(lambda r, o: r["meta"].update(K=[[1.0, 0.0], [0.0, 1.0]])),
    "K a string": edit(lambda r, o: r["meta"].update(K="identity")),
    "depth sidecar missing": file_of("depth", lambda p, r: p.unlink()),
    "depth sidecar too small": file_of("depth", lambda p, r: Image.fromarray(np.full((8, 8), 2000, np.uint16)).save(p)),
    "depth sidecar NaN": edit(nan_depth),
    "instance sidecar corrupt": file_of("instance", lambda p, r: p.write_bytes(b"\x89PNG broken")),
    "meta turns one short": edit(lambda r, o: r["meta"].update(turns=r["meta"]["turns"][:-1])),
    "levels one short": edit(lambda r, o: r.update(levels=r["levels"][:-1])),
    "no levels": edit(lambda r, o: r.pop("levels")),
    "a point without px": edit(lambda r, o: r["meta"]["points"][0].pop("px")),
    "a point outside the image": edit(lambda r, o: r["meta"]["points"][0].update(px=[999, 999])),
    "meta size a string": edit(lambda r, o: r["meta"].update(size="64x64")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_names_the_line_of_every_bad_sample(good, tmp_path, case, capsys):
    out = tmp_path / "d"
    shutil.copytree(good / "spatial", out)
    BAD[case](out)
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(out)])
    printed = capsys.readouterr().out.splitlines()
    problems, summary = printed[:-1], printed[-1]
    assert e.value.code == 1 and problems and summary.startswith("checked 2 samples"), printed
    assert all(p.startswith(f"{out / 'data.jsonl'}:line 2: ") for p in problems), printed


@pytest.mark.parametrize("case", ["gpt first", "no answers", "meta turns one short", "image outside"])
def test_check_grounding_samples_too(good, tmp_path, case, capsys):
    out = tmp_path / "g"
    shutil.copytree(good / "grounding", out)
    BAD[case](out)
    problems = datacheck.check(out)[0]
    assert problems and all(p.startswith(f"{out / 'data.jsonl'}:line 2: grounding-000001: ") for p in problems)


def test_check_refuses_an_empty_or_missing_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.jsonl").write_text("\n")
    (tmp_path / "none").mkdir()
    for name, words in (("empty", "no samples (the file is empty)"), ("none", "not found")):
        with pytest.raises(SystemExit) as e:
            data.main(["check", str(tmp_path / name)])
        assert e.value.code == 1 and words in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# The training loader: roles out of order, images outside the dataset folder, --data files


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.byte_level()
    t.add_image_token()
    return t


def sample(image, *roles):
    conv = [{"from": r, "value": ("<image>\n" if image and k == 0 else "") + f"turn {k}"} for k, r in enumerate(roles)]
    return json.dumps({"image": image, "conversations": conv} if image else {"conversations": conv})


def loader(sources, tok, **kw):
    return training_data.ConversationDataset([(s, 1.0) for s in sources], tok, ViTConfig(), 32, 4, 4096, **kw)


def test_roles_out_of_order_are_counted_unusable(tmp_path, tok):
    lines = [sample(None, "human", "gpt"), sample(None, "gpt", "human"), sample(None, "human", "human", "gpt"),
             sample(None, "human"), sample(None, "system", "human", "gpt", "human", "gpt"),
             sample(None, "human", "gpt", "system", "gpt"), sample(None, "user", "assistant", "human")]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    ds = loader([tmp_path], tok)
    problems = [ds[i]["problem"] for i in range(len(ds))]
    assert [p is None for p in problems] == [True, False, False, False, True, False, False]
    assert all("roles" in p and "ending on an answer" in p for p in problems if p), problems
    report = training_data.LoaderReport()
    report.add(training_data.collate([ds[i] for i in range(len(ds))], tok.pad_id))
    assert "2 samples used" in report.summary() and "5 unusable" in report.summary()


def test_images_outside_the_dataset_folder_are_refused(tmp_path, tok):
    for p in (tmp_path / "ds" / "in.png", tmp_path / "out.png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    (tmp_path / "ds" / "sub").mkdir()
    paths = ["in.png", "../out.png", str(tmp_path / "out.png"), "sub/../in.png"]
    (tmp_path / "ds" / "data.jsonl").write_text("".join(sample(p, "human", "gpt") + "\n" for p in paths))
    problems = [it["problem"] for it in (loader([tmp_path / "ds"], tok)[i] for i in range(4))]
    assert [p is None for p in problems] == [True, False, False, True]
    assert all("outside the dataset folder" in p and "--images-outside-data" in p for p in problems if p)
    allowed = loader([tmp_path / "ds"], tok, outside_images=True)
    assert all(allowed[i]["problem"] is None for i in range(4))
    assert train.parse_config(["--images-outside-data"]).images_outside_data


def test_data_files_train_as_they_are(tmp_path, capsys):
    mine, llava = tmp_path / "mine", tmp_path / "llava"
    for k in range(4):
        for p in (mine / "img" / f"{k}.png", llava / "images" / "00" / f"{k}.png"):
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 60 * k, np.uint8)).save(p)
    (mine / "train.jsonl").write_text("".join(sample(f"img/{k}.png", "human", "gpt") + "\n" for k in range(4)))
    (llava / "blip.json").write_text("[" + ",".join(sample(f"00/{k}.png", "human", "gpt") for k in range(4)) + "]")
    tiny = ["--image-size", "32", "--vit-patch", "8", "--vit-dim", "32", "--vit-depth", "2", "--vit-heads", "2",
            "--llm-dim", "32", "--llm-layers", "2", "--llm-heads", "2", "--batch-size", "2", "--global-batch", "4",
            "--max-len", "256", "--no-probe", "--runs-dir", str(tmp_path / "runs")]
    cfg = train.parse_config([*tiny, "--stage", "1", "--max-steps", "1",
                              "--data", f"{mine / 'train.jsonl'},{llava / 'blip.json'}:0.5"])
    assert train.train(cfg) == tmp_path / "runs" / "tiny" / "stage1"
    log = capsys.readouterr().out
    assert "data: 6 samples from" in log and "4 samples used" in log and "0 unusable" in log, log
