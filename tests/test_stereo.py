"""A real photograph through the data engine and the correspondence probe: the Middlebury Motorcycle pair that
scikit-image ships (dataengine/middlebury.py) as an RGB-D frame folder, read back by load_rgbd, turned into spatial
conversations by `data.py spatial --rgbd` and verified by `data.py check`; and evaluation/stereo.py's matching and
PCK scoring against independent loops on feature maps whose answer is known, then on a tiny ViT and through eval.py.
scikit-image is a test requirement (requirements-dev.txt): nothing here skips without it."""

import json
import re
import sys

import numpy as np
import pytest
import torch
from skimage.data import stereo_motorcycle

import data
import eval as ev
from dataengine import middlebury
from dataengine.scenes import load_rgbd
from evaluation import probes, stereo
from model import ViT, ViTConfig, save_vit

TINY = dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    return middlebury.write_frame(tmp_path_factory.mktemp("m") / "motorcycle")


# ----------------------------------------------------------------------------------------------------------------
# The fixture: the photograph as an RGB-D frame.


def test_calibration_is_skimages_docstring():
    """The constants are the ones skimage documents for its downsampled copy (read from the docstring here)."""
    doc = stereo_motorcycle.__doc__
    num = lambda name: float(re.search(name + r":\s+([\d.]+)", doc)[1])
    assert middlebury.FOCAL_PX == num("Focal length") and middlebury.DOFFS_PX == num("Principal point dx")
    assert middlebury.BASELINE_M == pytest.approx(num("Baseline") / 1000)
    assert (middlebury.CX, middlebury.CY) == (num("Principal point x") + 0.125, num("Principal point y") + 0.125)


def test_disparity_says_left_col_is_right_col_minus_d():
    """The convention the probe scores against, from the images themselves (skimage's docstring example has the
    opposite sign): with right = left shifted by -d the colours agree, with +d they do not."""
    pair = middlebury.motorcycle()
    left, right, d = (pair[k].astype(float) for k in ("left", "right", "disparity"))
    rows, cols = np.nonzero(np.isfinite(d))
    diffs = []
    for sign in (-1, 1):
        c = np.round(cols + sign * d[rows, cols]).astype(int)
        ok = (c >= 0) & (c < d.shape[1])
        diffs.append(np.abs(left[rows[ok], cols[ok]] - right[rows[ok], c[ok]]).mean())
    assert diffs[0] < 12 < 3 * diffs[0] < diffs[1]


def test_frame_round_trip(frame):
    """load_rgbd reads the folder; depth is baseline * f / (d + doffs) in meters where the disparity is known and 0
    (load_rgbd's unknown) where it is not; the seeded regions carry their labels."""
    f = load_rgbd(frame)
    left, _, disp = stereo_motorcycle()
    assert np.array_equal(f["rgb"], left) and f["depth"].shape == disp.shape == (500, 741)
    known = np.isfinite(disp)
    assert 0.05 < (~known).mean() < 0.1 and np.all(f["depth"][~known] == 0)
    expected = 0.193001 * 994.978 / (disp[known].astype(np.float64) + 31.086)
    np.testing.assert_allclose(f["depth"][known], expected, rtol=1e-6)
    assert 2.0 < f["depth"][known].min() and f["depth"].max() < 5.1
    np.testing.assert_allclose(f["K"], [[994.978, 0, 311.318], [0, 994.978, 255.002], [0, 0, 1]])
    assert f["labels"] == {1: "floor", 2: "motorcycle", 3: "bench", 4: "shelving unit"}
    for i, name in f["labels"].items():
        for r, c in middlebury.SEEDS[name]:
            assert f["instance"][r, c] == i
    ids, depth = f["instance"], f["depth"]
    median = {f["labels"][i]: np.median(depth[(ids == i) & (depth > 0)]) for i in (2, 3, 4)}
    assert median["motorcycle"] + 1 < median["bench"] and median["motorcycle"] + 1 < median["shelving unit"]
    assert (ids[-20:] == 1).mean() > 0.5            # the bottom rows are mostly floor
    meta = json.loads((frame / "middlebury.json").read_text())
    assert meta["baseline_m"] == 0.193001 and "doffs_px" in meta["depth"]


def test_a_bad_seed_is_a_clear_error():
    pair = middlebury.motorcycle()
    depth = middlebury.disparity_to_depth(pair["disparity"])
    with pytest.raises(ValueError, match="seed 'bench' at .row 0, col 0. lies in no region"):
        middlebury.segment(depth, pair["K"], seeds={"floor": [(480, 400)], "bench": [(0, 0)]})
    with pytest.raises(ValueError, match="already labelled 'motorcycle'"):
        middlebury.segment(depth, pair["K"], seeds={"motorcycle": [(236, 306)], "seat": [(236, 306)]})


def test_the_whole_data_engine_on_the_photograph(frame, tmp_path):
    """data.py spatial --rgbd on the real frame, then data.py check: every answer recomputed from the stored depth
    and masks, with no problem."""
    out = tmp_path / "spatial"
    data.main(["spatial", "--rgbd", str(frame), "--n", "6", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        data.main(["check", str(out)])
    assert done.value.code == 0
    records = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert r["meta"]["source"] == "rgbd" and r["meta"]["gravity"] == "floor"
        assert {o["name"] for o in r["meta"]["objects"]} == {"motorcycle", "bench", "shelving unit"}
        assert 1.0 < r["meta"]["camera_height"] < 1.2
    text = " ".join(c["value"] for r in records for c in r["conversations"])
    assert "motorcycle" in text and "bench" in text
    # the check can fail: a wrong depth answer in one record is caught
    lines = (out / "data.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    t = next(k for k, turn in enumerate(bad["meta"]["turns"]) if turn["kind"] == "depth")
    bad["conversations"][2 * t + 1]["value"] = "9.99 m."
    (out / "data.jsonl").write_text("\n".join([json.dumps(bad)] + lines[1:]) + "\n")
    with pytest.raises(SystemExit) as done:
        data.main(["check", str(out)])
    assert done.value.code == 1


# ----------------------------------------------------------------------------------------------------------------
# The probe: matching and PCK against independent loops.


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def loop_row_sims(left, right, W):
    """What match_along_rows maximizes, written out: (h * w, W) the cosine similarity of each left patch with the
    right feature interpolated at every original pixel column of its row, one by one."""
    h, w, _ = right.shape
    L, R = left.double().numpy(), right.double().numpy()
    sims = np.full((h * w, W), -2.0)
    for i in range(h):
        for j in range(w):
            for c in range(W):
                p = (c + 0.5) * w / W - 0.5
                if not 0 <= p <= w - 1:                 # outside the outer patch centres: not a candidate
                    continue
                a = int(np.floor(p))
                b = min(a + 1, w - 1)
                f = R[i, a] * (1 - (p - a)) + R[i, b] * (p - a)
                sims[i * w + j, c] = L[i, j] @ f / np.linalg.norm(f)
    return sims


def assert_row_argmax(left, right, H, W, matched):
    """matched (x, y) is a best column of the loops' similarities (ties and float32 rounding allowed) on the query's
    own pixel row."""
    h, w, _ = right.shape
    sims = loop_row_sims(left, right, W)
    col = (matched[:, 0] - 0.5).astype(int)
    assert np.all(sims[np.arange(h * w), col] >= sims.max(1) - 1e-5)
    np.testing.assert_array_equal(matched[:, 1], np.repeat(np.floor((np.arange(h) + 0.5) * H / h) + 0.5, w))


def loop_pck(query, matched, disparity, t):
    hits = total = 0
    for (r, c), (x, y) in zip(query, matched):
        d = disparity[r, c]
        if not np.isfinite(d) or not 0 <= c + 0.5 - d < disparity.shape[1]:
            continue
        total += 1
        hits += ((x - (c + 0.5 - d)) ** 2 + (y - (r + 0.5)) ** 2) ** 0.5 <= t
    return hits / total, total


def test_known_shift_gives_pck_one_and_random_features_do_not():
    """Right = left moved k patches to the left (disparity k patches everywhere): every kept query is matched
    within a pixel, both searches. Unrelated right features: PCK near chance. Both against the loops above."""
    h, w, D, H, W, k = 3, 6, 16, 48, 96, 2                # 16-pixel patches
    left = unit(h, w, D)
    right = torch.cat([left[:, k:], unit(h, k, D, seed=1)], 1)           # right[:, j] = left[:, j + k]
    disparity = np.full((H, W), k * W / w, np.float32)
    disparity[:, 52:60] = np.nan                                          # unknown: the query at column 56 drops
    q = stereo.queries(h, w, H, W)
    row = stereo.match_along_rows(left, right, H, W)
    assert_row_argmax(left, right, H, W, row)
    res = stereo.score(q, row, disparity)
    assert res["n"] == h * (w - k - 1) and res["pck4"] == 1.0 and res["err_px_median"] <= 1
    assert (res["pck4"], res["n"]) == loop_pck(q, row, disparity, 4)
    whole = stereo.score(q, stereo.match_whole_image(left, right, H, W), disparity, (16,))
    assert whole["pck16"] == 1.0 and whole["err_px_median"] == pytest.approx(0.5 ** 0.5)   # patch vs pixel centre
    assert res["reference"]["zero_disparity"]["pck16"] == 0.0            # disparity 32 px > 16
    other = unit(h, w, D, seed=2)
    row = stereo.match_along_rows(left, other, H, W)
    assert_row_argmax(left, other, H, W, row)
    res = stereo.score(q, row, disparity)
    for t in (4, 8, 16):
        assert (res[f"pck{t}"], res["n"]) == loop_pck(q, row, disparity, t)
    assert res["pck4"] < 0.5


def test_score_against_loops_on_random_matches():
    rng = np.random.default_rng(0)
    H, W = 40, 60
    disparity = rng.uniform(0, 30, (H, W)).astype(np.float32)
    disparity[rng.random((H, W)) < 0.2] = np.nan
    q = np.stack([rng.integers(0, H, 200), rng.integers(0, W, 200)], -1)
    matched = np.stack([rng.uniform(0, W, 200), rng.uniform(0, H, 200)], -1)
    res = stereo.score(q, matched, disparity, (2, 5, 20))
    for t in (2, 5, 20):
        assert (res[f"pck{t}"], res["n"]) == pytest.approx(loop_pck(q, matched, disparity, t))


def test_input_size_keeps_the_aspect_on_the_patch_grid():
    assert stereo.input_size(500, 741, 224, 14) == (224, 336)
    assert stereo.input_size(500, 741, 448, 14) == (448, 658)
    assert stereo.input_size(10, 1000, 1, 8) == (8, 800)


def test_stereo_probe_on_a_tiny_vit_and_through_eval_py(tmp_path, monkeypatch):
    """A tiny random ViT on the real pair: finite numbers on the documented grid; then eval.py --stereo puts them
    in report.json and report.md."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(**TINY)).eval()
    res = stereo.stereo_probe(vit, middlebury.motorcycle(), height=32)
    assert res["input"] == [32, 48] and res["grid"] == [4, 6] and 0 < res["n"] <= 24
    assert all(0 <= res[k] <= 1 for k in ("pck4", "pck8", "pck16", "image_pck16", "image_pck32"))
    monkeypatch.chdir(tmp_path)
    save_vit(vit, tmp_path / "enc")
    ps = probes.make_probe_sets(tmp_path / "probes", n_images=8, seed=5, size=64, min_pixels=12, log=None)
    ev.main(["--vision", "enc", "--probes", str(ps), "--image-size", "32", "--crop-size", "16", "--quick",
             "--no-cache", "--threads", "1", "--stereo", "--out", "r"])
    got = json.loads((tmp_path / "r/report.json").read_text())["encoders"][0]["results"]["stereo"]
    assert {k: got[k] for k in ("pck4", "pck8", "pck16", "n")} == {k: res[k] for k in ("pck4", "pck8", "pck16", "n")}
    md = (tmp_path / "r/report.md").read_text()
    assert "| stereo | pck8 (higher better) |" in md and "| stereo | err_px_median (lower better) |" in md
    monkeypatch.setitem(sys.modules, "skimage.data", None)          # as if scikit-image were not installed
    with pytest.raises(SystemExit, match="eval.py --stereo: .*pip install scikit-image"):
        ev.main(["--vision", "enc", "--probes", str(ps), "--image-size", "32", "--stereo", "--out", "r2"])


def test_without_scikit_image_the_error_says_what_to_install(monkeypatch, tmp_path):
    from tools import motorcycle as cli

    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        middlebury.motorcycle()
    with pytest.raises(SystemExit, match="pip install scikit-image"):
        cli.main([str(tmp_path / "m")])
