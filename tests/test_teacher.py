"""The depth teachers of stage 3 (training/teacher.py, train.py --teacher): the LLM is never loaded, the head never
leaves the stage directory, the points are the ones the conversations ask about (read back from the answers' own
text), the loss reads the head's map where the probe would, and an interrupted teacher run resumes exactly."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import TINY_STAGE3, spatial_data
from dataengine.views import load_depth
from evaluation import probes
from evaluation.probes import ProbeConfig
from model import ViT, ViTConfig, load_vit
from training.teacher import DepthData, DepthTeacher, collate_depth

FAST = TINY_STAGE3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    return spatial_data(tmp_path_factory, n=8, seed=11)


def run(tmp, spatial, *extra):
    return train.train(train.parse_config(["--runs-dir", str(tmp / "runs"), "--data", str(spatial), *FAST, *extra]))


@pytest.mark.parametrize("mode", ["depth-points", "depth-dense"])
def test_depth_teacher_trains_the_dual_channel_without_the_llm(tmp_path, spatial, monkeypatch, mode):
    def no_llm(*a, **k):
        raise AssertionError("a depth teacher loaded the LLM")
    monkeypatch.setattr(train, "load_llm", no_llm)
    out = run(tmp_path, spatial, "--teacher", mode, "--max-steps", "2")
    trained = load_file(out / "model.safetensors")
    assert any(k.startswith("head.") for k in trained) and any(".attn_plus." in k for k in trained)
    assert not any(k.startswith(("projector.", "lm.")) for k in trained)
    boosted, base = load_vit(out / "vision"), load_vit(tmp_path / "runs" / "tiny" / "base" / "vision")
    exported = boosted.state_dict()
    assert not any("head" in k and "linear" in k for k in exported)  # the depth head stays with the teacher
    frozen = {k: v for k, v in base.state_dict().items()}
    for k, v in exported.items():  # the dual channel only: every frozen tensor as it was
        if ".attn_plus." not in k and not k.endswith(".gate"):
            assert torch.equal(v, frozen[k.replace(".attn.attn.", ".attn.")] if k not in frozen else frozen[k]), k
    assert max(exported[k].abs().max() for k in exported if k.endswith(".gate")) > 0  # the gates moved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_the_head_is_fitted_first_on_the_teacher_data(tmp_path, spatial, capsys):
    import data

    other = tmp_path / "other"
    data.generate("spatial", other, n=6, seed=12, size=32, progress=False)
    run(tmp_path, spatial, "--teacher", "depth-points", "--max-steps", "1", "--teacher-data", str(other))
    out = capsys.readouterr().out
    assert "features of 6 images" in out and "8 samples from" in out  # the head saw the other 6, stage 3 its own 8


def test_points_are_the_ones_the_answers_talk_about(spatial):
    """Each depth question's "(u, v)" and its answer "X.XX m." against DepthData's point and ground-truth depth."""
    vit = ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4))
    ds = DepthData([(spatial, 1.0)], vit, 32, "depth-points", ProbeConfig())
    asked = 0
    for i, line in enumerate((spatial / "data.jsonl").read_text().splitlines()):
        rec, item = json.loads(line), ds[i]
        assert item["problem"] is None
        depth = load_depth(spatial / rec["meta"]["depth"])
        conv = rec["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            pairs = re.findall(r"\(([\d.]+), ([\d.]+)\)", q["value"])
            one = re.fullmatch(r"([\d.]+) m\.", a["value"])                  # "2.12 m."
            two = re.search(r"([\d.]+) m vs ([\d.]+) m", a["value"])         # "... closer ...: 2.12 m vs 2.60 m."
            said = [one.group(1)] if one and len(pairs) == 1 else list(two.groups()) if two and len(pairs) == 2 \
                else []
            if a["value"].startswith("The second point"):  # the answer names its subject first
                said = said[::-1]
            for (u, v), value in zip(pairs, said):
                uv = torch.tensor([float(u), float(v)])
                k = int((item["uv"] - uv).abs().sum(1).argmin())
                assert (item["uv"][k] - uv).abs().max() <= 5e-4 + 1e-6      # the question's 3 decimals
                assert abs(item["depth"][k] - float(value)) <= 0.005 + 1e-6  # the answer's 2 decimals
                c, r = int(item["uv"][k, 0] * depth.shape[1]), int(item["uv"][k, 1] * depth.shape[0])
                assert item["depth"][k] == pytest.approx(depth[r, c], abs=1e-6)
                asked += 1
    assert asked >= 16


@torch.no_grad()
def test_teacher_losses_read_the_probe_map_at_the_points_and_everywhere(spatial):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4))
    cfg = ProbeConfig()
    items = [DepthData([(spatial, 1.0)], vit, 32, "depth-dense", cfg)[i] for i in range(2)]
    batch = collate_depth(items)
    dense, points = DepthTeacher(vit, "depth-dense", cfg), DepthTeacher(vit, "depth-points", cfg)
    patches, cls = dense.features(batch["pixels"])
    head = probes.LinearProbe(probes.feature_stats(patches), cfg.depth_bins, probes.feature_stats(cls))
    dense.head = points.head = head
    pred = dense.depth_map(patches, cls)  # (2, 16, 16): the probe's x4 map
    lo, hi = cfg.min_depth, cfg.max_depth
    want = sum(probes.sig_loss(pred[i], t, (t > lo) & (t < hi)) for i, t in enumerate(batch["target"]))
    got = dense.loss_from_features(patches, cls, batch["target"], batch["uv"], batch["depth"])
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # points at the centres of map pixels: the bilinear read is that pixel's value
    rc = [torch.tensor([[3, 5], [10, 2], [15, 15]]), torch.tensor([[0, 0], [7, 8]])]
    uv = [torch.stack([(p[:, 1] + 0.5) / 16, (p[:, 0] + 0.5) / 16], 1) for p in rc]
    depth = [torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.5, 2.5])]
    want = sum(probes.sig_loss(pred[i][p[:, 0], p[:, 1]], d, d > 0) for i, (p, d) in enumerate(zip(rc, depth)))
    got = points.loss_from_features(patches, cls, batch["target"], uv, depth)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_an_interrupted_teacher_run_resumes_exactly(tmp_path, spatial):
    whole = run(tmp_path / "a", spatial, "--teacher", "depth-dense", "--max-steps", "4", "--save-every", "2")
    part = tmp_path / "b" / "runs" / "tiny" / "stage3"
    shutil.copytree(whole.parent.parent, part.parent.parent)  # the run as it stood after step 2's checkpoint
    for f in ("config.json", "model.safetensors"):
        (part / f).unlink()
    shutil.rmtree(part / "vision")
    resumed = run(tmp_path / "b", spatial, "--teacher", "depth-dense", "--max-steps", "4", "--save-every", "2",
                  "--resume")
    x, y = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_teacher_flags_are_checked(tmp_path, capsys):
    for bad in (["--teacher", "depth", "--stage", "3"], ["--teacher", "depth-dense", "--stage", "2"],
                ["--teacher", "depth-dense", "--shuffle-images"], ["--teacher", "depth-points", "--vision-tune",
                                                                    "frozen"], ["--teacher-data", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train.parse_config(bad)
        assert "--teacher" in capsys.readouterr().err
