"""tools/critic_reading.py (issue 29's first gate): the critic's point-depth AbsRel against the truth at the asked
pixels, beside the lin.1 probe's at the same pixels. Answers that copy the reference read at its rounding error,
answers at twice the depth read at AbsRel 1, unanswered points count as unread; the probe is read at the same points."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import spatial_data
from evaluation import probes
from model import ViT, ViTConfig, save_vit
from tools import critic_reading

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    import data
    out = tmp_path_factory.mktemp("critic") / "heldout"
    data.generate("spatial", out, n=6, seed=21, size=32, points_per_turn=2, progress=False)
    return out


def answers_file(path, samples, scale=None):
    """The reference answers, with every depth turn's lengths multiplied by scale (None: unanswered)."""
    with open(path, "w") as f:
        for s in samples:
            got = []
            for t, turn in enumerate(s["meta"]["turns"]):
                ref = s["conversations"][2 * t + 1]["value"]
                if turn["kind"] == "depth":
                    ref = "I cannot tell." if scale is None else " and ".join(
                        f"{v * scale:.2f} m" for v, _ in critic_reading.qa.parse_numbers(ref))
                got.append(ref)
            f.write(json.dumps({"id": s["id"], "answers": got}) + "\n")
    return path


def test_the_critic_and_the_probe_at_the_same_points(heldout, tmp_path):
    samples = critic_reading.qa.load_conversations(heldout)
    points = critic_reading.depth_points(samples, heldout)
    assert len(points) == 2 * sum(t["kind"] == "depth" for s in samples for t in s["meta"]["turns"]) > 0
    probes.make_probe_sets(tmp_path / "probes", n_images=8, seed=3, size=32, test_every=2)
    save_vit(ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32)), tmp_path / "enc")
    files = {name: answers_file(tmp_path / f"{name}.jsonl", samples, scale)
             for name, scale in (("exact", 1.0), ("double", 2.0), ("silent", None))}
    critic_reading.main(["--qa", str(heldout), "--probes", str(tmp_path / "probes"), "--vision", str(tmp_path / "enc"),
                         "--prior-data", str(heldout),
                         "--image-size", "32", "--quick", "--depth-heads", "2", "--out", str(tmp_path / "r.json"),
                         *(f"--answers={n}={f}" for n, f in files.items())])
    r = json.loads((tmp_path / "r.json").read_text())["critics"]
    truth = np.array([p[-1] for p in points])
    assert r["exact"]["read"] == 1 and r["exact"]["critic_absrel"] < 0.006 / truth.min() + 1e-9
    assert r["exact"]["critic_within10"] == 1
    assert r["double"]["critic_absrel"] == pytest.approx(1.0, abs=0.01) and r["double"]["critic_within10"] == 0
    assert r["silent"]["read"] == 0 and r["silent"]["ratio"] is None
    assert r["silent"]["probe_absrel_all"] == r["exact"]["probe_absrel_all"] == r["exact"]["probe_absrel"] > 0
    probe = r["exact"]["probe_absrel"]
    assert probe > 0 and r["double"]["probe_absrel"] == probe  # the same points, the same probe
    assert r["double"]["prior_absrel"] == r["exact"]["prior_absrel"] >= 0 and "prior_absrel" not in r["silent"]
    assert r["double"]["ratio"] == pytest.approx(r["double"]["critic_absrel"] / probe)
    lo, hi = r["double"]["ratio_ci95"]
    assert lo <= r["double"]["ratio"] <= hi


def test_a_stage_directory_answers(heldout, tmp_path, capsys):
    import train
    from conftest import TINY_STAGE3
    stage = train.train(train.parse_config(["--runs-dir", str(tmp_path / "runs"), "--data", str(heldout),
                                            *TINY_STAGE3, "--max-steps", "1"]))
    probes.make_probe_sets(tmp_path / "probes", n_images=8, seed=3, size=32, test_every=2)
    critic_reading.main(["--qa", str(heldout), "--vlm", str(stage), "--probes", str(tmp_path / "probes"),
                         "--vision", str(stage / "vision"), "--image-size", "32", "--quick", "--depth-heads", "1",
                         "--limit", "2", "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())["critics"][str(stage)]
    assert r["conversations"] == 2 and 0 <= r["read"] <= 1 and r["probe_absrel_all"] > 0
    assert f"{stage}: 4 points of 2 conversations" in capsys.readouterr().out


def test_the_blind_prior_is_the_cells_absrel_optimal_depth(heldout, tmp_path):
    """Training points in two cells of a 2 x 2 grid: a point in either reads the 1/d-weighted median of its cell's
    depths (the AbsRel-optimal constant), a point in an empty cell that of all of them."""
    train = [(0, 0, 0, 1, 1, 1.0), (0, 0, 1, 2, 3, 2.0), (0, 0, 2, 3, 2, 4.0),  # cell (0, 0): 1, 2, 4 m
             (1, 0, 0, 9, 9, 5.0)]                                             # cell (1, 1): 5 m
    points = [(0, 0, 0, 0, 0, 3.0), (0, 0, 1, 8, 8, 3.0), (0, 0, 2, 0, 8, 3.0)]
    prior = critic_reading.position_prior(points, train, (10, 10), grid=2)
    # weights 1/d: 1, 0.5, 0.25 (cell 00) -> half the total weight is reached at 1 m; all: 1, .5, .25, .2 -> 1 m
    assert prior.tolist() == [1.0, 5.0, 1.0]
    depth = np.array([1.0, 2.0, 4.0])
    best = min(np.linspace(0.5, 5, 451), key=lambda c: np.sum(np.abs(c - depth) / depth))
    assert best == pytest.approx(1.0, abs=0.01)  # the weighted median is the minimiser, checked by brute force
    samples = critic_reading.qa.load_conversations(heldout)
    r = critic_reading.compare(critic_reading.depth_points(samples, heldout)[:3], np.array([1.0, 2.0, 3.0]),
                               np.array([1.0, 1.0, 1.0]), prior=np.array([2.0, 2.0, 2.0]))
    assert r["prior_absrel"] > 0 and len(r["prior_absrel_ci95"]) == 2


def test_the_gate_table_shows_the_prior_beside_gate_1(tmp_path):
    """A critic that passes gate 1 (1.2 x the probe) while reading worse than the blind prior: the table says both,
    and the three gates decide the exit code alone."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import critic_gates
    critic = {"critics": {"c": {"points": 10, "read": 1.0, "ratio": 1.2, "ratio_ci95": [1.1, 1.3],
                                "critic_absrel": 0.3, "probe_absrel": 0.25, "prior_absrel": 0.24,
                                "prior_absrel_ci95": [0.2, 0.28], "critic_over_prior_ci95": [1.1, 1.4]}}}
    stat = lambda v, lo, hi: {"value": v, "ci95": [lo, hi]}  # noqa: E731
    gradient = {"groups": {"attn+ all": {"image_share": stat(0.7, 0.2, 0.9), "cos_boost_control": stat(0.3, 0.1, 0.5)}}}
    (tmp_path / "c.json").write_text(json.dumps(critic))
    (tmp_path / "g.json").write_text(json.dumps(gradient))
    with pytest.raises(SystemExit) as stop:
        critic_gates.main(["--critic", str(tmp_path / "c.json"), "--gradient", str(tmp_path / "g.json"),
                           "--out", str(tmp_path / "gates.md")])
    table = (tmp_path / "gates.md").read_text()
    assert stop.value.code == 0 and table.count("| yes |") == 3
    assert "prior reads the same points at AbsRel 0.240 [0.2, 0.28]; critic / prior 1.25 [1.1, 1.4]" in table
