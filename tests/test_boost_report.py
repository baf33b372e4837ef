"""Per-image probe results and the experiment's table (experiments/boost_report.py): the per-image numbers add up to
the reported ones, and the paired bootstrap finds a planted difference and no difference where there is none."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import probes, suite
from model import ViT, ViTConfig
from test_eval import SMALL, TINY

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import boost_report  # noqa: E402


def test_per_image_results_add_up(tmp_path):
    ps = probes.load_probe_set(probes.make_probe_sets(tmp_path / "p", n_images=16, seed=5, size=64, min_pixels=12,
                                                      test_every=2, log=None), crop_size=16)
    torch.manual_seed(0)
    res, _ = suite.run_probes(ViT(ViTConfig(**TINY)), ps, SMALL, 32, 16, cache=False, log=None, per_image=True)
    each, n_test = res["per_image"], int((~ps.train).sum())
    assert len(each["depth_lin1_rmse"]) == len(each["seg_confusion"]) == n_test == 8
    assert np.nanmean(each["depth_lin1_rmse"]) == pytest.approx(res["depth_lin1"]["rmse"], rel=1e-6)
    everything = np.arange(n_test)
    assert boost_report.score(each, "seg", everything) == pytest.approx(res["segmentation"]["miou"], rel=1e-6)
    assert boost_report.score(each, "knn_correct", everything) == pytest.approx(res["classification"]["knn_acc"])
    assert boost_report.score(each, "linear_correct", everything) == pytest.approx(
        res["classification"]["linear_acc"])


def fake_encoder(rng, n, offset):
    """Per-image results of an encoder whose depth RMSE is the shared image difficulty plus `offset` and noise."""
    difficulty = np.linspace(0.4, 1.0, n)
    conf = [np.diag([5, 5]).tolist() for _ in range(n)]
    return {"depth_lin1_rmse": (difficulty + offset + 0.01 * rng.standard_normal(n)).tolist(),
            "depth_lin4_rmse": difficulty.tolist(), "seg_confusion": conf, "linear_correct": [1] * n,
            "knn_correct": [1] * n, "object_image": list(range(n))}


def test_boost_report_finds_a_planted_difference(tmp_path):
    rng, n = np.random.default_rng(0), 60
    encoders = [("base", 0.0)] + [(f"boost-s{s}", -0.05) for s in (1, 2, 3)] + [(f"control-s{s}", 0.0) for s in (1, 2, 3)]
    report = {"encoders": [{"name": name, "results": {"per_image": fake_encoder(rng, n, off)}}
                           for name, off in encoders]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    boost_report.main([str(tmp_path / "report.json"), "--arm", "baseline=base", "--arm",
                       "boost=boost-s1,boost-s2,boost-s3", "--arm", "control=control-s1,control-s2,control-s3",
                       "--n-boot", "200", "--out", str(tmp_path / "table")])
    rows = json.loads((tmp_path / "table.json").read_text())["metrics"]
    planted = rows["depth_lin1_rmse"]["differences"]["boost-control"]
    assert planted["diff"] == pytest.approx(-0.05, abs=0.01) and planted["ci95"][1] < 0
    none = rows["depth_lin1_rmse"]["differences"]["control-baseline"]
    assert none["ci95"][0] < 0 < none["ci95"][1]
    assert "boost − control" in (tmp_path / "table.md").read_text()


def test_reports_of_one_probe_set_merge_and_disagreements_are_refused(tmp_path):
    """Encoders probed in separate eval.py calls make one table; a shared encoder must agree exactly in each."""
    rng, n = np.random.default_rng(1), 40
    enc = {name: {"name": name, "results": {"per_image": fake_encoder(rng, n, off)}}
           for name, off in [("base", 0.0), ("boost-s1", -0.05), ("control-s1", 0.0), ("boost-s2", -0.05),
                             ("control-s2", 0.0)]}
    write = lambda name, encs, probe_set="p240": (tmp_path / name).write_text(  # noqa: E731
        json.dumps({"probe_set": probe_set, "encoders": encs}))
    write("a.json", [enc["base"], enc["boost-s1"], enc["control-s1"]])
    write("b.json", [enc["base"], enc["boost-s2"], enc["control-s2"]])
    arms = ["--arm", "baseline=base", "--arm", "boost=boost-s1,boost-s2", "--arm", "control=control-s1,control-s2"]
    boost_report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), *arms, "--n-boot", "100",
                       "--out", str(tmp_path / "merged")])
    assert json.loads((tmp_path / "merged.json").read_text())["arms"] == {"baseline": 1, "boost": 2, "control": 2}
    other = json.loads(json.dumps(enc["base"]))
    other["results"]["per_image"]["depth_lin1_rmse"][0] += 0.1      # the baseline probed differently
    write("c.json", [other, enc["boost-s2"], enc["control-s2"]])
    with pytest.raises(SystemExit, match="encoder base has other per-image results"):
        boost_report.main([str(tmp_path / "a.json"), str(tmp_path / "c.json"), *arms, "--out", str(tmp_path / "x")])
    write("d.json", [enc["boost-s2"], enc["control-s2"]], probe_set="another")
    with pytest.raises(SystemExit, match="another probe set"):
        boost_report.main([str(tmp_path / "a.json"), str(tmp_path / "d.json"), *arms, "--out", str(tmp_path / "x")])


def test_reports_of_several_probe_sets_pool_with_the_spread_over_sets(tmp_path):
    """--across-probe-sets: each difference is its mean over probe sets, its se adds the spread over seeds and over
    probe sets (checked by hand); a probe set lacking an arm's encoder is named in the error."""
    rng, n, paths = np.random.default_rng(2), 30, []
    values = {}  # (set, encoder) -> mean depth lin.1 RMSE over test images
    for p, set_shift in enumerate([-0.02, 0.0, 0.03]):
        encs = []
        for name, off in [("base", 0.0), ("boost-s1", -0.06), ("boost-s2", -0.05), ("boost-s3", -0.04)]:
            res = fake_encoder(rng, n, off + (set_shift if name != "base" else 0.0))
            values[p, name] = np.mean(res["depth_lin1_rmse"])
            encs.append({"name": name, "results": {"per_image": res}})
        paths.append(tmp_path / f"p{p}.json")
        paths[-1].write_text(json.dumps({"probe_set": {"path": f"p{p}"}, "encoders": encs}))
    arms = ["--arm", "baseline=base", "--arm", "boost=boost-s1,boost-s2,boost-s3"]
    with pytest.raises(SystemExit, match="another probe set"):
        boost_report.main([*map(str, paths), *arms, "--out", str(tmp_path / "x")])
    boost_report.main([*map(str, paths), *arms, "--across-probe-sets", "--n-boot", "50", "--out", str(tmp_path / "t")])
    got = json.loads((tmp_path / "t.json").read_text())
    d = np.array([np.mean([values[p, f"boost-s{s}"] for s in (1, 2, 3)]) - values[p, "base"] for p in range(3)])
    seeds = [np.mean([values[p, f"boost-s{s}"] for p in range(3)]) for s in (1, 2, 3)]
    se = np.sqrt(np.var(seeds, ddof=1) / 3 + np.var(d, ddof=1) / 3)
    row = got["pooled"]["depth_lin1_rmse"]["boost-baseline"]
    assert row["per_probe_set"] == pytest.approx(d.tolist()) and row["diff"] == pytest.approx(d.mean())
    assert row["se"] == pytest.approx(se) and len(got["probe_sets"]) == 3
    assert row["sd_probe_sets"] == pytest.approx(np.std(d, ddof=1))
    boost_report.main([*map(str, paths), "--arm", "baseline=base", "--arm", "boost=boost-s1,boost-s2",
                       "--arm", "ceiling=boost-s3", "--across-probe-sets", "--efficiency", "boost,ceiling",
                       "--n-boot", "20", "--out", str(tmp_path / "e")])
    e = json.loads((tmp_path / "e.json").read_text())
    ratio = e["efficiency"]["depth_lin1_rmse"]
    da, db = (e["pooled"]["depth_lin1_rmse"][k] for k in ("boost-baseline", "ceiling-baseline"))
    assert ratio["ratio"] == pytest.approx(da["diff"] / db["diff"])
    half = 1.96 * abs(ratio["ratio"]) * np.hypot(da["se"] / da["diff"], db["se"] / db["diff"])
    assert ratio["ci95"] == pytest.approx([ratio["ratio"] - half, ratio["ratio"] + half])
    assert "Efficiency: (boost − baseline) / (ceiling − baseline)" in (tmp_path / "e.md").read_text()
    assert row["sd_seeds"] == pytest.approx(np.std(seeds, ddof=1))  # the baseline arm has one seed: no spread
    assert "Over 3 probe sets" in (tmp_path / "t.md").read_text()
    short = json.loads(paths[2].read_text())
    short["encoders"] = short["encoders"][:3]  # boost-s3 missing from set p2
    paths[2].write_text(json.dumps(short))
    with pytest.raises(SystemExit, match=r"probe set .*p2.*boost-s3"):
        boost_report.main([*map(str, paths), *arms, "--across-probe-sets", "--out", str(tmp_path / "y")])


def test_one_seed_per_probe_set(tmp_path):
    """--some-seeds-per-set (seed k probed on set k only): each set's difference is that seed's against the baseline,
    se = sd over sets / sqrt(sets), no seed term (the spread over sets holds it)."""
    rng, n, paths, d = np.random.default_rng(4), 30, [], []
    for p, off in enumerate([-0.06, -0.02, -0.05]):
        base, boost = fake_encoder(rng, n, 0.0), fake_encoder(rng, n, off)
        d.append(np.mean(boost["depth_lin1_rmse"]) - np.mean(base["depth_lin1_rmse"]))
        encs = [{"name": "base", "results": {"per_image": base}},
                {"name": f"boost-s{p + 1}", "results": {"per_image": boost}}]
        paths.append(tmp_path / f"p{p}.json")
        paths[-1].write_text(json.dumps({"probe_set": {"path": f"p{p}"}, "encoders": encs}))
    arms = ["--arm", "baseline=base", "--arm", "boost=boost-s1,boost-s2,boost-s3", "--across-probe-sets"]
    with pytest.raises(SystemExit, match="boost-s2"):  # without the flag a set must hold every seed
        boost_report.main([*map(str, paths), *arms, "--out", str(tmp_path / "x")])
    boost_report.main([*map(str, paths), *arms, "--some-seeds-per-set", "--n-boot", "20", "--out", str(tmp_path / "t")])
    row = json.loads((tmp_path / "t.json").read_text())["pooled"]["depth_lin1_rmse"]["boost-baseline"]
    assert row["per_probe_set"] == pytest.approx(d) and row["diff"] == pytest.approx(np.mean(d))
    assert row["se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(3)) and row["sd_seeds"] is None


def test_a_probe_set_without_objects(tmp_path):
    """A MuJoCo probe set has no object crops: the table has the depth and segmentation rows and no classification."""
    rng, n = np.random.default_rng(5), 20
    strip = lambda r: {k: v for k, v in r.items() if k not in ("linear_correct", "knn_correct", "object_image")}
    report = {"encoders": [{"name": name, "results": {"per_image": strip(fake_encoder(rng, n, off))}}
                           for name, off in (("base", 0.0), ("boost-s1", -0.05), ("boost-s2", -0.04))]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    boost_report.main([str(tmp_path / "report.json"), "--arm", "baseline=base", "--arm", "boost=boost-s1,boost-s2",
                       "--n-boot", "20", "--out", str(tmp_path / "t")])
    got = json.loads((tmp_path / "t.json").read_text())["metrics"]
    assert set(got) == {"depth_lin1_rmse", "depth_lin4_rmse", "seg"}
    assert got["depth_lin1_rmse"]["differences"]["boost-baseline"]["diff"] < -0.03
