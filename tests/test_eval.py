"""eval.py and qa.py: the spatial-QA parser and scorer, the feature cache, the probe suite end to end on a tiny encoder, the
report files and the command line (--vision, --run, --qa)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
from evaluation import probes
from evaluation import qa
from evaluation import report, suite
from model import ViT, ViTConfig, save_vit
from evaluation.probes import ProbeConfig

TINY = dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# Parsing answers.


@pytest.mark.parametrize("text, meters", [
    ("2.35 m", 2.35), ("The depth at (0.241, 0.766) is 2.35 m.", 2.35), ("About 235 cm.", 2.35),
    ("2350 mm", 2.35), ("2.35 meters", 2.35), ("2.35 metres away", 2.35), ("2.35m", 2.35), ("2,35 m", 2.35),
    ("-1.5 m", -1.5), ("\u22120.42 m", -0.42), ("+0.3 m", 0.3), ("1,234.5 m", 1234.5), ("two meters", 2.0),
    ("It is about 10 feet away", 3.048), ("12 inches", 0.3048), ("2.35", 2.35), ("between 1 and 3", 3.0),
    ("The point (0.051, 0.467) is 3.55 m from the camera along the viewing axis.", 3.55),
    ("moving (-2.52, 0.12, 1.38) m (X right, Y up, Z forward), 2.87 m in all.", 2.87),
])
def test_parse_length(text, meters):
    assert qa.parse_length(text) == pytest.approx(meters)


def test_parse_length_none():
    assert qa.parse_length("I cannot tell.") is None
    assert qa.parse_length("The point (0.241, 0.766).") is None  # pixel coordinates are not lengths


@pytest.mark.parametrize("text, vec", [
    ("(0.074, 0.395) is at (-2.12, -1.35, 3.64) m.", (-2.12, -1.35, 3.64)),
    ("X = 1 m, Y = -2 m, Z = 300 cm", (1, -2, 3)), ("x: 1.0, y: 2.0, z: 3.0", (1, 2, 3)),
    ("at (100, 200, 300) cm", (1, 2, 3)), ("(1.2 m, 0.5 m, 3 m)", (1.2, 0.5, 3)),
    ("(\u22121.0, +2.0, 1,500.0) m", (-1, 2, 1500)),
])
def test_parse_vector(text, vec):
    np.testing.assert_allclose(qa.parse_vector(text), vec)


@pytest.mark.parametrize("text, value", [
    ("Yes.", 1), ("yes, it is", 1), ("Yeah", 1), ("Correct: the chair is left of it.", 1), ("True", 1),
    ("I think yes.", 1), ("No", 0), ("no.", 0), ("Nope, it is behind", 0), ("It is not.", 0), ("Not at all", 0),
    ("Incorrect.", 0), ("Not clearly: they are level", 2), ("Neither.", 2), ("Hard to say.", 2),
    ("They are about the same.", 2), ("The chair.", None),
])
def test_parse_yes_no(text, value):
    assert qa.parse_yes_no(text) == value


NAMES = ["red chair", "blue box"]


@pytest.mark.parametrize("text, kind, form, want, outcome", [
    ("The red chair.", "left_right", "which", 0, 0),  # "which is further left?" -> the chair: chair left of box
    ("The blue box is to the left of the red chair.", "left_right", "which", 0, 1),
    ("So the red chair is to the right of the blue box by 2.00 m.", "left_right", "which", 0, 1),
    ("Neither, they are roughly level.", "left_right", "which", 0, 2),
    ("The red one.", "left_right", "which", 1, 1),
    ("No, the red chair is behind the blue box.", "front_behind", "yesno", 0, 1),
    ("The red chair is behind the blue box.", "front_behind", "yesno", 0, 1),
    ("Yes.", "front_behind", "yesno", 1, 1),
    ("No.", "front_behind", "yesno", 1, 0),
    ("the red chair is above the blue box", "above_below", "yesno", 0, 1),
    ("The blue box sits higher than the red chair.", "above_below", "which", 1, 0),
    ("The chair is taller than the box.", "taller", "yesno", 1, 1),
    ("The red chair is larger than the blue box.", "bigger", "which", 0, 1),
    ("The red chair is narrower than the blue box.", "wider", "which", 1, 0),
    ("I am not sure what you mean.", "wider", "which", 1, None),
])
def test_parse_relation_objects(text, kind, form, want, outcome):
    assert qa.parse_relation(text, kind, NAMES, form, want) == outcome


@pytest.mark.parametrize("text, outcome", [
    ("(0.24, 0.77) is closer than (0.5, 0.5).", 0), ("(0.500, 0.500) is farther than (0.241, 0.766): depths", 0),
    ("(0.5, 0.5)", 1), ("They are at about the same depth.", 2), ("(0.241, 0.766) is nearer than (0.500, 0.500)", 0),
])
def test_parse_relation_points(text, outcome):
    assert qa.parse_relation(text, "closer", [(0.241, 0.766), (0.5, 0.5)], "which", 0) == outcome


# ----------------------------------------------------------------------------------------------------------------
# Scoring held-out conversations.


def _sample():
    """One conversation in data.py's format (turn records in meta.turns), answers as data.py phrases them."""
    turns = [("pixel", {"kind": "depth", "points": [0]}, "What is the depth at (0.250, 0.500)?",
           "The depth at (0.250, 0.500) is 2.00 m."),
          ("pixel", {"kind": "position", "points": [0]}, "Where is (0.250, 0.500) in 3D?",
           "The point (0.250, 0.500) is at (-1.00, 0.00, 2.00) m."),
          ("pixel", {"kind": "closer", "points": [0, 1], "form": "yesno", "want": 0},
           "Is (0.250, 0.500) closer to the camera than (0.750, 0.500)?",
           "Yes, (0.250, 0.500) is closer than (0.750, 0.500): depths 2.00 m and 4.00 m, a difference of 2.00 m."),
          ("pixel", {"kind": "displacement", "points": [0, 1]},
           "Give the vector from (0.250, 0.500) to (0.750, 0.500).",
           "From (0.250, 0.500) to (0.750, 0.500) the displacement is (3.00, 0.00, 2.00) m, a distance of 3.61 m."),
          ("object", {"kind": "left_right", "objects": [1, 2], "form": "which", "want": 0},
           "Which is further to the left, the red chair or the blue box?",
           "The red chair's centre is at X = -1.00 m and the blue box's at X = 2.00 m. "
           "So the red chair is to the left of the blue box by 3.00 m."),
          ("object", {"kind": "taller", "objects": [2, 1], "form": "yesno", "want": 1},
           "Is the blue box taller than the red chair?",
           "No. The blue box is 0.40 m tall and the red chair 0.90 m. So the blue box is shorter than the red chair "
           "by 0.50 m."),
          ("scene", {"kind": "distance", "objects": [1, 2]}, "How far apart are the red chair and the blue box?",
           "The red chair's centre is at (-1.00, 0.00, 2.00) m and the blue box's at (2.00, 0.00, 4.00) m: they are "
           "3.61 m apart centre to centre, and their closest surfaces are 2.50 m apart."),
          ("caption", {"kind": "caption_list"}, "Describe the image briefly.",
           "A room with a wooden floor, holding a red chair and a blue box.")]
    conv = []
    for k, (_, _, q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": "s0", "image": "images/0.png", "conversations": conv, "levels": [q[0] for q in turns],
            "meta": {"points": [{"px": [1, 2], "uv": [0.25, 0.5]}, {"px": [3, 2], "uv": [0.75, 0.5]}],
                     "objects": [{"id": 1, "name": "red chair"}, {"id": 2, "name": "blue box"}],
                     "turns": [q[1] for q in turns]}}


def test_score_qa_hand_built():
    s = _sample()
    perfect = qa.score_qa([s], [[c["value"] for c in s["conversations"][1::2]]])
    assert perfect["overall"]["accuracy"] == 1.0 and perfect["unscorable_turns"] == 0
    answers = ["About 2.1 meters.",            # 5 % off: within 10 %
               "X = -1 m, Y = 0.5 m, Z = 2 m",  # 0.5 m off a 2.24 m vector: within 25 %
               "No.",                           # wrong
               "3 m",                           # 17 % off the distance
               "The blue box.",                 # wrong: the chair is further left
               "Nope, it is shorter.",          # right
               "Roughly 500 cm.",               # 39 % off
               "A red chair."]                  # recall 1/2
    r = qa.score_qa([s], [answers])
    t = r["by_type"]
    assert t["depth"]["accuracy"] == 1.0 and t["depth"]["within10"] == 1.0
    assert t["depth"]["rel_err"] == pytest.approx(0.05)
    assert t["position"]["accuracy"] == 1.0 and t["position"]["err_m"] == pytest.approx(0.5)
    assert t["closer"]["accuracy"] == 0.0 and t["left_right"]["accuracy"] == 0.0 and t["taller"]["accuracy"] == 1.0
    assert t["displacement"]["rel_err"] == pytest.approx(abs(3 - 3.61) / 3.61)
    assert t["distance"]["accuracy"] == 0.0 and t["distance"]["rel_err"] == pytest.approx(abs(5 - 3.61) / 3.61)
    assert t["caption_list"]["recall"] == 0.5
    assert r["by_level"]["pixel"]["accuracy"] == pytest.approx(3 / 4)
    assert r["by_level"]["object"]["accuracy"] == pytest.approx(1 / 2)
    assert r["overall"]["accuracy"] == pytest.approx(4 / 7)  # captions are not part of the overall accuracy
    garbage = qa.score_qa([s], [["?"] * 8])
    assert garbage["overall"]["accuracy"] == 0.0 and garbage["overall"]["parse_rate"] == 0.0


def test_score_qa_reads_every_reference_data_py_writes(tmp_path):
    """The scorer parses data.py's own answers (every phrasing it draws) and grades them all correct."""
    import data

    data.main(["spatial", "--n", "12", "--out", str(tmp_path / "d"), "--seed", "11", "--size", "128"])
    samples = qa.load_conversations(tmp_path / "d")
    refs = [[c["value"] for c in s["conversations"][1::2]] for s in samples]
    r = qa.score_qa(samples, refs)
    assert r["unscorable_turns"] == 0
    assert r["overall"]["accuracy"] == 1.0 and r["overall"]["parse_rate"] == 1.0
    assert r["by_level"]["caption"]["recall"] == 1.0
    assert {"depth", "left_right", "front_behind", "above_below", "distance"} <= set(r["by_type"])


def test_evaluate_qa_batches_turns():
    s = _sample()
    calls = []

    def answer_fn(batch, t):
        calls.append((len(batch), t))
        return [b["conversations"][2 * t + 1]["value"] for b in batch]

    scores, answers = qa.evaluate_qa([s, s, s], answer_fn, batch_size=2, log=None)
    assert calls == [c for t in range(8) for c in [(2, t), (1, t)]]
    assert scores["overall"]["accuracy"] == 1.0 and len(answers) == 3 and len(answers[0]) == 8
    with pytest.raises(ValueError, match="answers for"):
        qa.evaluate_qa([s], lambda batch, t: [], log=None)


# ----------------------------------------------------------------------------------------------------------------
# Probes end to end on a tiny encoder.


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return probes.make_probe_sets(tmp_path_factory.mktemp("p") / "probes", n_images=16, seed=5, size=64,
                                  min_pixels=12, log=None)


SMALL = ProbeConfig(depth_steps=30, seg_steps=30, cls_steps=30, batch=4, depth_rows=4, seg_rows=4)


def test_run_probes_and_cache(probe_dir):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(**TINY))
    ps = probes.load_probe_set(probe_dir, crop_size=16)
    logs = []
    res, ex = suite.run_probes(vit, ps, SMALL, image_size=32, crop_size=16, log=logs.append)
    for probe, keys in [("depth_lin1", ["rmse", "absrel", "d1", "si_rmse", "rmse_aligned"]), ("depth_lin4", ["rmse"]),
                        ("segmentation", ["miou"]), ("classification", ["linear_acc", "knn_acc"]),
                        ("retrieval", ["map"])]:
        assert all(np.isfinite(res[probe][k]) for k in keys), (probe, res[probe])
    assert ex["depth_lin1"].shape == (64, 64) and ex["segmentation"].shape == (64, 64)
    cached = list((probe_dir / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    again, _ = suite.run_probes(vit, ps, SMALL, image_size=32, crop_size=16, log=logs.append)
    assert any("cached" in line for line in logs)
    assert {k: v for k, v in again.items() if k != "time_s"} == {k: v for k, v in res.items() if k != "time_s"}
    fresh = suite.encode(vit, ps, 32, 16)
    from safetensors.torch import load_file

    stored = load_file(cached[0])
    assert all(torch.equal(fresh[k], stored[k]) for k in fresh)
    assert fresh["patches"].shape == (16, 4, 4, 2 * 32) and fresh["cls"].shape == (16, 2 * 32)
    other = ViT(ViTConfig(**TINY))  # different weights -> a different cache entry
    assert suite.fingerprint(other) != suite.fingerprint(vit)


def test_a_cache_that_cannot_be_written_costs_the_speed_up_not_the_features(probe_dir, monkeypatch):
    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(suite, "save_file", full_disk)
    torch.manual_seed(7)  # weights no other test caches
    vit = ViT(ViTConfig(**TINY))
    ps = probes.load_probe_set(probe_dir, crop_size=16)
    before = sorted((probe_dir / "cache").glob("*"))  # the fixture is shared: other tests' entries may be there
    logs = []
    feats = suite.cached_features(vit, ps, 32, 16, log=logs.append)
    fresh = suite.encode(vit, ps, 32, 16)
    assert all(torch.equal(fresh[k], feats[k]) for k in fresh)
    note = [line for line in logs if "not cached" in line]
    assert note and "No space left" in note[0] and "cache" in note[0], logs
    assert sorted((probe_dir / "cache").glob("*")) == before, "no cache file, and no temporary left behind"


def test_cli_rgbd_depth_probes(tmp_path, probe_dir, monkeypatch):
    from test_probes import write_rgbd_frames

    monkeypatch.chdir(tmp_path)
    save_vit(ViT(ViTConfig(**TINY)), tmp_path / "enc")
    write_rgbd_frames(tmp_path / "frames")
    ev.main(["--vision", "enc", "--probes", str(probe_dir), "--rgbd", "frames", "--image-size", "32",
             "--crop-size", "16", "--quick", "--threads", "1", "--out", "r"])
    res = json.loads((tmp_path / "r/report.json").read_text())["encoders"][0]["results"]
    assert np.isfinite(res["rgbd_depth_lin1"]["rmse"]) and "rgbd_segmentation" not in res


def test_cli_rgbd_millimetres_is_a_clear_error_until_scaled(tmp_path, probe_dir, monkeypatch):
    from test_probes import write_rgbd_frames

    monkeypatch.chdir(tmp_path)
    save_vit(ViT(ViTConfig(**TINY)), tmp_path / "enc")
    for f in write_rgbd_frames(tmp_path / "frames").iterdir():  # depth.npy holds millimetres, as if saved unscaled
        np.save(f / "depth.npy", np.asarray(Image.open(f / "depth.png"), np.float32))
        (f / "depth.png").unlink()
    argv = ["--vision", "enc", "--probes", str(probe_dir), "--rgbd", "frames", "--image-size", "32", "--crop-size",
            "16", "--quick", "--threads", "1", "--out", "r"]
    with pytest.raises(SystemExit, match=r"eval.py --rgbd: .*frame00.*millimetres\? pass --depth-scale 0.001"):
        ev.main(argv)
    ev.main(argv + ["--depth-scale", "0.001"])
    res = json.loads((tmp_path / "r/report.json").read_text())["encoders"][0]["results"]
    assert np.isfinite(res["rgbd_depth_lin1"]["rmse"])


def test_encoder_without_cls_uses_mean_token(probe_dir):
    vit = ViT(ViTConfig(**TINY, family="siglip", cls_token=False, layerscale=False, pool_head=True))
    ps = probes.load_probe_set(probe_dir, crop_size=16)
    f = suite.encode(vit, ps, 32, 16)
    torch.testing.assert_close(f["cls"][:, -32:].float(), f["patches"][..., -32:].float().mean((1, 2)),
                               atol=2e-3, rtol=0)


def test_table_and_report_files(tmp_path):
    results = [{"depth_lin1": {"rmse": 0.5, "d1": 0.8}, "retrieval": {"map": 0.3, "queries": 10}, "time_s": {}},
               {"depth_lin1": {"rmse": 0.4, "d1": 0.85}, "retrieval": {"map": 0.35, "queries": 10}, "time_s": {}}]
    rows = report.table_rows(results)
    assert rows == [("depth_lin1", "rmse", [0.5, 0.4]), ("depth_lin1", "d1", [0.8, 0.85]),
                    ("retrieval", "map", [0.3, 0.35])]
    text = report.format_table(["base", "boosted"], rows)
    assert "0.400 (-0.100)" in text and "lower better" in text and "0.350 (+0.050)" in text
    md = report.format_table(["base", "boosted"], rows, markdown=True)
    assert md.splitlines()[0].startswith("| probe | metric | base | boosted (delta) |")
    ex = {"rgb": np.zeros((8, 8, 3), np.uint8), "depth": np.ones((8, 8), np.float32),
          "depth_lin1": np.ones((8, 8)), "labels": np.zeros((8, 8), int), "segmentation": np.zeros((8, 8), int)}
    report.write_report(tmp_path, {"summary": "test"}, ["base", "boosted"], results, [ex, ex])
    assert json.loads((tmp_path / "report.json").read_text())["summary"] == "test"
    assert "| depth_lin1 | rmse (lower better) | 0.500 | 0.400 (-0.100) |" in (tmp_path / "report.md").read_text()
    from PIL import Image

    assert Image.open(tmp_path / "report.png").size[0] > 500


def test_cli_vision_and_run(tmp_path, probe_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(**TINY)), tmp_path / "base")
    stage = tmp_path / "runs" / "exp" / "stage3"
    save_vit(ViT(ViTConfig(**TINY)), stage / "vision")
    (stage / "config.json").write_text(json.dumps({"base_vision": "base"}))
    common = ["--probes", str(probe_dir), "--image-size", "32", "--crop-size", "16", "--quick", "--threads", "1"]
    ev.main(["--run", "exp"] + common)
    out = capsys.readouterr().out
    assert "boosted (exp) (delta)" in out and "depth_lin1" in out
    report = json.loads((tmp_path / "runs/exp/eval/report.json").read_text())
    assert [e["name"] for e in report["encoders"]] == ["baseline", "boosted (exp)"]
    assert (tmp_path / "runs/exp/eval/report.png").exists()
    ev.main(["--vision", "base", "--out", "one"] + common)
    assert len(json.loads((tmp_path / "one/report.json").read_text())["encoders"]) == 1
    (stage / "config.json").write_text("{}")
    with pytest.raises(KeyError, match="base_vision"):
        ev.main(["--run", "exp"] + common)


def test_cli_makes_missing_probe_set_and_scores_answer_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_vit(ViT(ViTConfig(**TINY)), tmp_path / "enc")
    ev.main(["--vision", "enc", "--probes", "fresh", "--n-images", "8", "--image-size", "32", "--crop-size", "16",
             "--quick", "--no-cache", "--threads", "1"])
    assert "no probe set at fresh: making the default one" in capsys.readouterr().out
    assert (tmp_path / "fresh/index.json").exists() and not (tmp_path / "fresh/cache").exists()
    s = _sample()
    (tmp_path / "qa").mkdir()
    (tmp_path / "qa/data.jsonl").write_text(json.dumps(s) + "\n")
    refs = [c["value"] for c in s["conversations"][1::2]]
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "s0", "answers": refs}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "s0", "answers": ["?"] * 8}) + "\n")
    ev.main(["--qa", "qa", "--answers", "good=a.jsonl", "--answers", "bad=b.jsonl", "--out", "qa_out"])
    report = json.loads((tmp_path / "qa_out/report.json").read_text())
    assert report["qa"]["good"]["overall"]["accuracy"] == 1.0 and report["qa"]["bad"]["overall"]["accuracy"] == 0.0
    assert "overall accuracy" in (tmp_path / "qa_out/report.md").read_text()


def test_dual_channel_stats():
    vit = ViT(ViTConfig(**TINY))
    assert suite.dual_channel_stats(vit) == []
    from attention import add_dual_channel

    add_dual_channel(vit)
    stats = suite.dual_channel_stats(vit)
    assert len(stats) == TINY["depth"]
    assert all(s["gate_mean"] == 0.5 and s["rel_change"] == 0.0 for s in stats)  # at init: Attn+ == Attn, σ(0)
    first = vit.get_submodule(stats[0]["layer"])
    with torch.no_grad():
        first.gate[0] = 4.0
        first.attn_plus.q_proj.weight.mul_(1.1)
    s = suite.dual_channel_stats(vit)[0]
    assert s["gate_max"] > 0.98 and s["gate_mean"] > 0.5 and s["rel_change"] > 0.0
    rows = report.table_rows([{"dual_channel": stats, "retrieval": {"map": 0.3}}])  # the list is no metric
    assert rows == [("retrieval", "map", [0.3])]


def test_encoder_name():
    assert ev.encoder_name(Path("runs/mini-full/stage3/vision")) == "mini-full"
    assert ev.encoder_name(Path("weights/dinov2-s14")) == "dinov2-s14"
