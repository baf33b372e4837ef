"""Point tokens (train.py --point-tokens): each "(u, v)" of a single-image question is followed by a token made of the
encoder's features at that point. Checked against a numpy bilinear sample and against the image token it must equal
at a token's centre; through the tokenizer, the dataset, collate, the VLM and the three stages of the tiny preset."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from language.tokenizer import Tokenizer, query_points
from model import Projector
from training.dataset import ConversationDataset, collate

from test_train import ROOT, args


def conv(question, answer="Two.", images=1):
    return [{"from": "human", "value": "<image>\n" * images + question}, {"from": "gpt", "value": answer}]


def test_query_points_reads_coordinates_of_single_image_questions_only():
    c = conv("Is (0.241, 0.766) closer than (1.000, 0.5)? Not [0.1, 0.2] nor (2.0, 0.1).", "At (0.300, 0.300).")
    assert query_points(c) == [(0.241, 0.766), (1.0, 0.5)]  # answers and out-of-range pairs are not query points
    assert query_points(conv("What is at (0.241, 0.766)?", images=2)) == []
    assert query_points(conv("What is at (0.241, 0.766)?", images=0)) == []


def test_render_follows_each_query_point_with_the_point_token():
    tok = Tokenizer.byte_level()
    tok.add_image_token()
    c = conv("Which is nearer, (0.25, 0.75) or (0.500, 0.125)?")
    plain, _ = tok.render(c, n_image_tokens=3)
    point_id = tok.add_point_token()
    ids, mask = tok.render(c, n_image_tokens=3)
    assert plain.count(point_id) == 0 and ids.count(point_id) == 2 and len(ids) == len(plain) + 2
    assert [i for i in ids if i != point_id] == plain  # nothing else moves (byte-level: no merges across the split)
    text = tok.decode(ids[:ids.index(point_id)])
    assert text.endswith("(0.25, 0.75)")  # the token comes right after its point's text
    assert mask[ids.index(point_id)] == 0  # never a target
    assert tok.render(conv("At (0.25, 0.75)?", images=2), n_image_tokens=3)[0].count(point_id) == 0


def bilinear(grid, x, y):
    """numpy reference: grid (h, w, D) sampled at continuous patch coordinates (centres at k + 0.5), edges clamped."""
    h, w, _ = grid.shape
    x, y = min(max(x - 0.5, 0), w - 1), min(max(y - 0.5, 0), h - 1)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fy) * ((1 - fx) * grid[y0, x0] + fx * grid[y0, x1]) + fy * ((1 - fx) * grid[y1, x0] + fx * grid[y1, x1]))


def test_point_token_is_the_projected_block_around_the_point():
    torch.manual_seed(0)
    proj = Projector(vision_dim=6, llm_dim=5, merge=2)
    grid = torch.randn(2, 6, 8, 6)  # (N, h, w, D)
    points = torch.tensor([[1, 0.3, 0.7], [0, 0.01, 0.99], [1, 0.55, 0.1]])
    got = proj.at_points(grid, points)
    for (i, u, v), out in zip(points.tolist(), got):
        g, x, y = grid[int(i)].numpy(), u * 8, v * 6
        block = [bilinear(g, x + dx, y + dy) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)]  # row-major, as the merge
        want = proj.project(torch.tensor(np.concatenate(block), dtype=torch.float32))
        assert torch.allclose(out, want, atol=1e-5)
    # on a token's centre the point token is that image token
    tokens = proj(grid)  # (N, 12, 5): a 3 x 4 grid of merged tokens
    r, c = 1, 2
    centre = torch.tensor([[1, (2 * c + 1) / 8, (2 * r + 1) / 6]])
    assert torch.allclose(proj.at_points(grid, centre)[0], tokens[1, r * 4 + c], atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("points")
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args(tmp, "--stage", "1", "--max-steps", "1")],
                   cwd=tmp, check=True, capture_output=True)
    cfg = train.Config(**{**train.PRESETS["tiny"], "point_tokens": True})
    sources = json.loads((tmp / "runs" / "tiny" / "stage1" / "config.json").read_text())["sources"]
    return tmp, train.build_base(cfg, sources)


def test_vlm_puts_point_features_at_point_tokens(tiny):
    _, (vlm, tok) = tiny
    vlm.eval()
    ids = torch.tensor([tok.render(conv("What is at (0.300, 0.600)?"), vlm.n_image_tokens(32))[0]])
    pixels = torch.randn(1, 3, 32, 32)
    points = torch.tensor([[0, 0.3, 0.6]])
    x = vlm.embed(ids, pixels, points)
    want = vlm.projector.at_points(vlm.vit.patch_grid(pixels), points)
    assert torch.allclose(x[ids == tok.point_id], want, atol=1e-6)
    with pytest.raises(ValueError, match="1 point tokens but 0 points"):
        vlm.embed(ids, pixels)


def sample(tmp, name, questions, size=32):
    (tmp / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp / name / "a.png")
    turns = []
    for k, q in enumerate(questions):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": "Yes."}]
    (tmp / name / "data.jsonl").write_text(json.dumps({"conversations": turns, "image": "a.png"}) + "\n")
    return tmp / name


def test_dataset_and_collate_carry_the_kept_points(tiny):
    tmp, (vlm, tok) = tiny
    first = sample(tmp, "d1", ["At (0.100, 0.200)?", "And (0.300, 0.400) or (0.500, 0.600)?"])
    second = sample(tmp, "d2", ["At (0.700, 0.800)?"])
    ds = ConversationDataset([(first, 1.0), (second, 1.0)], tok, vlm.vit.cfg, image_size=32, n_image_tokens=4,
                             max_len=1024)
    items = [ds[0], ds[1]]
    assert items[0]["points"].flatten().tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert items[1]["points"].flatten().tolist() == pytest.approx([0.7, 0.8])
    for pack in (False, True):
        batch = collate(items, tok.pad_id, pack=pack)
        assert batch["points"].flatten().tolist() == pytest.approx([0, 0.1, 0.2, 0, 0.3, 0.4, 0, 0.5, 0.6, 1, 0.7, 0.8])
        assert int((batch["ids"] == tok.point_id).sum()) == 4
        vlm(batch["ids"], batch["pixels"], batch["weights"], batch.get("positions"), batch.get("mask"),
            batch["points"])  # the counts agree
    # a turn cut by max_len takes its points with it
    short = ConversationDataset([(first, 1.0)], tok, vlm.vit.cfg, image_size=32, n_image_tokens=4,
                                max_len=len(ds[0]["ids"]) - 5)[0]
    assert short["dropped_turns"] == 1 and short["points"].flatten().tolist() == pytest.approx([0.1, 0.2])


def test_point_tokens_through_three_stages_and_a_mismatch_refused(tmp_path):
    run = lambda *extra: subprocess.run([sys.executable, str(ROOT / "train.py"), *args(tmp_path, *extra)],
                                        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    for k in (1, 2, 3):
        out = run("--stage", str(k), "--max-steps", "2", "--point-tokens")
        assert out.returncode == 0, out.stdout + out.stderr
    vlm, tok, cfg = train.load_stage(tmp_path / "runs" / "tiny" / "stage3")
    assert cfg.point_tokens and vlm.point_token_id == tok.point_id is not None
    out = run("--stage", "3", "--max-steps", "2", "--name", "other", "--init", str(tmp_path / "runs/tiny/stage2"))
    assert out.returncode != 0 and "trained its LLM with point_tokens=True" in out.stdout + out.stderr


def test_diagnostics_read_point_tokens_as_training_does(tmp_path):
    """The localization gap works on grounding answers (no digits), and with point tokens the diagnostics' loss of a
    whole conversation is the training loss the loader's points give."""
    import data
    from evaluation.diagnostics import diagnose
    from evaluation.qa import load_conversations

    for k in (1, 2):
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(tmp_path, "--stage", str(k), "--max-steps",
                                                                          "1", "--point-tokens")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    vlm, tok, cfg = train.load_stage(tmp_path / "runs" / "tiny" / "stage2")
    data.generate("grounding", tmp_path / "g", n=3, seed=778, size=32, progress=False)
    samples = load_conversations(tmp_path / "g")
    result = diagnose(vlm, tok, cfg.image_size, samples, tmp_path / "g", log=None)
    gap = result["localization_gap"]
    assert gap["n"] > 0 and gap["gap"] != 0  # another point: other text and other features
    ds = ConversationDataset([(tmp_path / "g", 1.0)], tok, vlm.vit.cfg, cfg.image_size,
                             vlm.n_image_tokens(cfg.image_size), max_len=100_000)
    with torch.no_grad():
        per_sample = [float(vlm(it["ids"][None], it["pixels"], it["weights"][None],
                                points=torch.cat([torch.zeros(len(it["points"]), 1), it["points"]], 1))
                            / it["weights"].sum()) for it in (ds[i] for i in range(len(ds)))]
    assert all(len(ds[i]["points"]) > 0 for i in range(len(ds)))
    assert result["answer_image_dependence"]["true image"] == pytest.approx(np.mean(per_sample), abs=1e-4)
