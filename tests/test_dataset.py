"""training/dataset.py (ConversationDataset, collate, LoaderReport): LLaVA-format sources, masks, truncation,
packing (the packed loss equals the sum of per-sample losses), weighted mixes, and bad input counted or raised."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from training import dataset as training_data
from llm import LLM, LLMConfig, Tokenizer
from model import ViTConfig

S = 32                      # image size in these tests
N_IMG = 4                   # image tokens per image


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.byte_level()
    t.add_image_token()
    return t


def dataset(sources, tok, max_len=4096, **kw):
    sources = [(s, 1.0) if isinstance(s, (str, Path)) else s for s in sources]
    return training_data.ConversationDataset(sources, tok, ViTConfig(), S, N_IMG, max_len, **kw)


def save_image(path: Path, colour, size=(40, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path, format=fmt)


def llava_fixtures(root: Path) -> dict:
    """The layouts of the public LLaVA files: LLaVA-Pretrain (one JSON array, images under images/, "<image>" after
    the prompt), LLaVA-Instruct mix (a JSON array with multi-turn samples and text-only ShareGPT samples) and a JSONL
    of multi-image samples."""
    pre = root / "pretrain"
    save_image(pre / "images" / "00453" / "004539375.jpg", (200, 30, 30), (64, 48), "JPEG")
    save_image(pre / "images" / "00223" / "002239345.jpg", (30, 200, 30), (48, 64), "JPEG")
    (pre / "blip_laion_cc_sbu_558k.json").write_text(json.dumps([
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "002239345", "image": "00223/002239345.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
            {"from": "gpt", "value": "a grey watch with an army style strap"}]}]))
    mix = root / "instruct"
    save_image(mix / "coco" / "train2017" / "000000033471.jpg", (10, 10, 200), (80, 60), "JPEG")
    (mix / "llava_v1_5_mix665k.json").write_text(json.dumps([
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "How to tell if a customer segment is well segmented? In 3 bullet points."},
            {"from": "gpt", "value": "1. Homogeneity\n2. Distinctiveness\n3. Stability"}]}]))
    multi = root / "multi"
    save_image(multi / "a.png", (255, 255, 0))
    save_image(multi / "b.png", (0, 255, 255))
    (multi / "data.jsonl").write_text(json.dumps(
        {"id": "mv-0", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich objects can be seen in both views?"},
            {"from": "gpt", "value": "Both views show a red chair."}]}) + "\n\n")      # a blank line is not a sample
    return dict(pretrain=pre, instruct=mix, multi=multi)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return llava_fixtures(tmp_path_factory.mktemp("llava"))


def answers_of(conv):
    return [m["value"] for m in conv if m["from"] == "gpt"]


def supervised_text(tok, ids, weights):
    return tok.decode(ids[weights > 0])


def test_llava_fixtures_load_as_they_are(fixtures, tok):
    ds = dataset([fixtures["pretrain"], fixtures["instruct"], fixtures["multi"]], tok)
    assert len(ds) == 5
    items = [ds[i] for i in range(len(ds))]
    assert [it["problem"] for it in items] == [None] * 5
    by_images = sorted(it["pixels"].shape[0] for it in items)
    assert by_images == [0, 1, 1, 1, 2]                              # one text-only, one two-view sample
    for it in items:
        assert it["pixels"].shape[1:] == (3, S, S) and it["ids"].dtype == torch.long
        assert int((it["ids"] == tok.image_id).sum()) == N_IMG * it["pixels"].shape[0]
    # images are squashed, not cropped: a solid colour stays that colour, normalized with the family's mean/std
    cfg = ViTConfig()
    red = torch.tensor([200, 30, 30]) / 255.0
    expect = (red - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    pre = training_data.ConversationDataset([(fixtures["pretrain"], 1.0)], tok, cfg, S, N_IMG, 4096)[0]["pixels"][0]
    assert torch.allclose(pre.mean((1, 2)), expect, atol=0.05)


def check_batch(batch, items, tok, convs):
    """The supervised tokens of every sample in the batch are exactly its kept answers, each with <|im_end|>, and
    padding is never supervised."""
    ids, w = batch["ids"], batch["weights"]
    good = [(it, c) for it, c in zip(items, convs) if it["problem"] is None]
    assert batch["n_supervised"] == int((w[:, 1:] > 0).sum())
    assert batch["n_tokens"] == sum(len(it["ids"]) for it, _ in good)
    texts = []
    if "positions" in batch:       # packed: a sample starts where positions restart (padding is one more run)
        for r in range(ids.shape[0]):
            starts = torch.nonzero(batch["positions"][r] == 0).flatten().tolist() + [ids.shape[1]]
            texts += [supervised_text(tok, ids[r, a:b], w[r, a:b]) for a, b in zip(starts, starts[1:])]
        texts = [t for t in texts if t]
    else:
        for r, (it, _) in enumerate(good):
            assert (w[r, len(it["ids"]):] == 0).all()
        texts = [supervised_text(tok, ids[r], w[r]) for r in range(ids.shape[0])]
    expected = ["".join(a + "<|im_end|>" for a in answers_of(c)[:len(answers_of(c)) - it["dropped_turns"]])
                for it, c in good]
    assert texts == expected


def spatial_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    for kind in ("spatial", "spatial-multiview", "instruct"):
        data.generate(kind, root / kind, 5, size=S, progress=False)
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return spatial_data(tmp_path_factory)


def conversations(ds):
    out = []
    for s, k in ds.index:
        raw, _ = ds.records[s].get(k)
        out.append(json.loads(raw)["conversations"])
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_masks_line_up_with_the_answers(generated, fixtures, tok, pack):
    ds = dataset([generated / "spatial", generated / "spatial-multiview", generated / "instruct",
                  fixtures["instruct"], fixtures["multi"]], tok, max_len=1400)
    convs = conversations(ds)
    items = [ds[i] for i in range(len(ds))]
    assert any(it["dropped_turns"] for it in items)                        # byte-level spatial samples are long
    for a in range(0, len(items), 6):
        batch = training_data.collate(items[a:a + 6], tok.pad_id, pack=pack)
        check_batch(batch, items[a:a + 6], tok, convs[a:a + 6])
        assert batch["pixels"].shape[0] == sum(it["pixels"].shape[0] for it in items[a:a + 6])


def test_truncation_drops_whole_trailing_turns(tmp_path, tok):
    save_image(tmp_path / "x.png", (9, 9, 9))
    conv = [{"from": "human", "value": "<image>\nFirst question?"}, {"from": "gpt", "value": "First answer."},
            {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "Second answer."},
            {"from": "human", "value": "Third, with another view: <image>"}, {"from": "gpt", "value": "Third answer."}]
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": ["x.png", "x.png"], "conversations": conv}) + "\n")
    full, _ = tok.render(conv, N_IMG)
    two, _ = tok.render(conv[:4], N_IMG)
    one, _ = tok.render(conv[:2], N_IMG)
    for max_len, kept in ((len(full), 3), (len(full) - 1, 2), (len(two), 2), (len(two) - 1, 1), (len(one), 1)):
        it = dataset([tmp_path], tok, max_len=max_len)[0]
        assert it["problem"] is None and it["dropped_turns"] == 3 - kept
        assert it["ids"].tolist() == tok.render(conv[:2 * kept], N_IMG)[0]
        assert it["pixels"].shape[0] == (2 if kept == 3 else 1)      # the dropped turn's image is not loaded
        assert supervised_text(tok, it["ids"], it["weights"]).endswith("answer.<|im_end|>")
    it = dataset([tmp_path], tok, max_len=len(one) - 1)[0]
    assert "first turn alone is" in it["problem"] and len(it["ids"]) == 0
    batch = training_data.collate([it], tok.pad_id)
    assert batch["n_samples"] == 0 and batch["problems"] == [it["problem"]] and batch["ids"].shape[0] == 0


def test_packed_loss_equals_the_sum_of_unpacked_losses(generated, fixtures, tok):
    torch.manual_seed(0)
    lm = LLM(LLMConfig()).eval()            # 260 = 256 bytes + 3 specials + <image>
    ds = dataset([generated / "instruct", fixtures["instruct"], fixtures["pretrain"], fixtures["multi"]], tok,
                 max_len=600)
    items = [ds[i] for i in range(len(ds))]
    padded = training_data.collate(items, tok.pad_id)
    packed = training_data.collate(items, tok.pad_id, pack=True)
    assert packed["ids"].shape[0] < len(items) and packed["mask"].shape[1:] == (1, *packed["ids"].shape[1:] * 2)
    with torch.no_grad():
        single = sum(lm.loss(lm.hidden(it["ids"][None]), it["ids"][None], it["weights"][None].float()) for it in items)
        loss_padded = lm.loss(lm.hidden(padded["ids"]), padded["ids"], padded["weights"])
        loss_packed = lm.loss(lm.hidden(packed["ids"], positions=packed["positions"], mask=packed["mask"]),
                              packed["ids"], packed["weights"])
        leaky = lm.loss(lm.hidden(packed["ids"]), packed["ids"], packed["weights"])     # plain causal: samples see
    assert padded["n_supervised"] == packed["n_supervised"] == sum(int((it["weights"][1:] > 0).sum()) for it in items)
    assert float(loss_padded) == pytest.approx(float(single), rel=1e-5)
    assert float(loss_packed) == pytest.approx(float(single), rel=1e-5)
    assert abs(float(leaky) - float(single)) > 1e-4 * float(single)       # ... each other: 10x the tolerance above
    # positions restart in each sample; the mask is causal within a sample, nothing across (all pairs compared)
    rows, T = packed["segments"].tolist(), packed["segments"].shape[1]
    assert packed["positions"].tolist() == [[t - row.index(s) for t, s in enumerate(row)] for row in rows]
    same = packed["segments"][:, :, None] == packed["segments"][:, None, :]
    assert torch.equal(packed["mask"], (same & torch.ones(T, T, dtype=torch.bool).tril())[:, None])
    # rows stay within max_len, samples keep their order, and so do their images
    assert packed["ids"].shape[1] <= 600
    assert torch.equal(packed["pixels"], padded["pixels"])


def test_images_follow_the_order_of_the_samples_in_packed_rows(tmp_path, tok):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    lines = []
    for k, c in enumerate(colours):
        save_image(tmp_path / f"{k}.png", c)
    for k in range(4):          # samples with one image, and one with two
        paths = [f"{k}.png"] + ([f"{k + 1}.png"] if k == 2 else [])
        q = "<image>\n" * len(paths) + f"Question {k}?"
        lines.append(json.dumps({"image": paths, "conversations": [{"from": "human", "value": q},
                                                                   {"from": "gpt", "value": f"Answer {k}."}]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    ds = dataset([tmp_path], tok, max_len=150)
    batch = training_data.collate([ds[i] for i in range(4)], tok.pad_id, pack=True)
    assert batch["ids"].shape[0] >= 2                                     # several rows, several samples per row
    order = [0, 1, 2, 3, 3]                                               # colour index of each image, reading order
    means = batch["pixels"].mean((2, 3))
    cfg = ViTConfig()
    for m, k in zip(means, order):
        want = (torch.tensor(colours[k]) / 255.0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
        assert torch.allclose(m, want, atol=0.05)
    runs = int(((batch["ids"][:, 1:] == tok.image_id) & (batch["ids"][:, :-1] != tok.image_id)).sum())
    assert runs == 5 and int((batch["ids"] == tok.image_id).sum()) == 5 * N_IMG


def test_mix_weights_and_prefix_stable_limit(generated, fixtures, tok):
    a, b = generated / "instruct", fixtures["pretrain"]          # 5 and 2 records
    ds = dataset([(a, 1.0), (b, 2.0)], tok)
    assert ds.counts == [5, 4] and len(ds) == 9
    assert sorted(ds.index[ds.index[:, 0] == 1, 1].tolist()) == [0, 0, 1, 1]      # weight 2: two whole copies
    half = dataset([(a, 0.6), (b, 1.0)], tok)
    assert half.counts == [3, 2] and half.index[half.index[:, 0] == 0, 1].tolist() == [0, 1, 3]   # evenly spaced
    for limit in range(1, 10):
        small = dataset([(a, 1.0), (b, 2.0)], tok, limit=limit)
        assert small.index.tolist() == ds.index[:limit].tolist()
        share = (small.index[:, 0] == 1).mean()
        assert abs(share - 4 / 9) <= 1 / limit + 1e-9          # every prefix keeps the mixing ratio
    with pytest.raises(ValueError, match="weight"):
        dataset([(a, -1.0)], tok)
    with pytest.raises(ValueError, match="empty"):
        dataset([(a, 0.0)], tok)


def bad_source(root: Path) -> Path:
    save_image(root / "ok.png", (1, 2, 3))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    save_image(root / "cut.png", (7, 7, 7), (64, 64))
    (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:60])
    good = lambda img, q="<image>\nQ?": json.dumps({"image": img, "conversations": [
        {"from": "human", "value": q}, {"from": "gpt", "value": "A."}]})
    lines = [good("ok.png"),                                             # line 1: fine
             '{"image": "ok.png", "conversations": [',                   # line 2: malformed JSON
             json.dumps({"image": "ok.png"}),                            # line 3: no conversations
             good("missing.png"),                                        # line 4: missing image
             good("corrupt.png"),                                        # line 5: not an image
             good("cut.png"),                                            # line 6: truncated image
             good("ok.png", "No image mark here?"),                      # line 7: image without <image>
             json.dumps({"conversations": [{"from": "robot", "value": "hi"}]}),   # line 8: unknown role
             good("ok.png")]                                             # line 9: fine
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bad_lines_and_images_are_counted_and_reported(tmp_path, tok):
    root = bad_source(tmp_path)
    ds = dataset([root], tok)
    items = [ds[i] for i in range(len(ds))]
    problems = [it["problem"] for it in items]
    assert problems[0] is None and problems[-1] is None
    for line, words in ((2, "Expecting"), (3, "conversations"), (4, "missing.png"), (5, "corrupt.png"),
                        (6, "cut.png"), (7, "0 '<image>' marks"), (8, "robot")):
        p = problems[line - 1]
        assert p is not None and p.startswith(f"{root / 'data.jsonl'}:line {line}:") and words in p, (line, p)
    report = training_data.LoaderReport()
    for a in range(0, len(items), 4):
        report.add(training_data.collate(items[a:a + 4], tok.pad_id, pack=a == 0))
    assert report.samples == 2 and len(report.problems) == 7
    text = report.summary()
    assert "2 samples used" in text and "7 unusable" in text and "line 2" in text and "and 2 more" in text


def test_strict_raises_at_once(tmp_path, tok):
    ds = dataset([bad_source(tmp_path)], tok, strict=True)
    ds[0]
    with pytest.raises(ValueError, match=r"data.jsonl:line 2: Expecting"):
        ds[1]
    with pytest.raises(ValueError, match="missing.png"):
        ds[3]


def test_dataloader_workers_give_the_same_batches(generated, fixtures, tok, tmp_path):
    ds = dataset([generated / "spatial-multiview", fixtures["instruct"], bad_source(tmp_path)], tok, max_len=2000)
    plan = [[0, 3, 5], [1, 2], [4, 6, 7, 8, 9]]
    collate = functools.partial(training_data.collate, pad_id=tok.pad_id, pack=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=plan, num_workers=2, collate_fn=collate)
    for got, idx in zip(loader, plan):
        want = collate([ds[i] for i in idx])
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k]
    strict = dataset([bad_source(tmp_path)], tok, strict=True)
    loader = torch.utils.data.DataLoader(strict, batch_sampler=[[0], [1]], num_workers=2, collate_fn=collate)
    with pytest.raises(ValueError, match="line 2"):
        list(loader)


def test_sources_name_their_file(tmp_path, tok, fixtures):
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="exactly one"):
        dataset([tmp_path], tok)
    with pytest.raises(ValueError, match="empty"):
        dataset([tmp_path / "a.json"], tok)
    (tmp_path / "c.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="JSON array"):
        dataset([tmp_path / "c.json"], tok)
    plain = Tokenizer.byte_level()
    with pytest.raises(ValueError, match="add_image_token"):
        dataset([fixtures["multi"]], plain)
