"""train.py on the tiny preset: the three stages, what each stage may change, DDP, bad configs (a run's faults and
exact resume after kill -9: test_run_faults.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from training.runs import latest_checkpoint
from model import load_vit

ROOT = Path(__file__).resolve().parent.parent
# small enough for seconds per stage on 2 CPU cores
TINY = ["--image-size", "32", "--vit-patch", "8", "--vit-dim", "32", "--vit-depth", "2", "--vit-heads", "2",
        "--llm-dim", "32", "--llm-layers", "2", "--llm-heads", "2", "--gen-samples", "24", "--batch-size", "2",
        "--global-batch", "4", "--max-len", "768", "--no-probe"]


def args(tmp, *extra):
    return ["--runs-dir", str(tmp / "runs"), "--data-root", str(tmp / "data"), *TINY, *extra]


def run_cli(tmp, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "train.py"), *args(tmp, *extra)]
    out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def rebuild(stage_dir):
    """The model a finished stage describes, as eval and later stages see it."""
    return train.load_stage(stage_dir)[0]


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    logs = [run_cli(tmp, "--stage", str(k), "--max-steps", "3") for k in (1, 2, 3)]
    return tmp, logs


def test_three_stages_in_a_row(three_stages):
    tmp, logs = three_stages
    run = tmp / "runs" / "tiny"
    trained = {k: set(load_file(run / f"stage{k}" / "model.safetensors")) for k in (1, 2, 3)}
    assert all(n.startswith("projector.") for n in trained[1])
    assert any(n.startswith("lm.") for n in trained[2]) and any(n.startswith("projector.") for n in trained[2])
    assert all(n.startswith("projector.") or ".attn_plus." in n or n.endswith(".attn.gate") for n in trained[3])
    assert any(".attn_plus." in n for n in trained[3]) and any(n.endswith(".gate") for n in trained[3])
    for k, log in enumerate(logs, 1):
        assert f"s{k}     3/3" in log and "loss" in log and "tok/s" in log and "eta" in log, log
        assert (run / f"stage{k}" / "metrics.jsonl").read_text().count("\n") == 3
    assert "boosted encoder saved to" in logs[2]
    cfg3 = json.loads((run / "stage3" / "config.json").read_text())
    assert cfg3["init"].endswith("stage2") and Path(cfg3["base_vision"]).name == "vision"
    assert "frozen" in logs[2] and "partly trainable" in logs[2]  # the per-module summary


def test_stage3_changes_only_allowed_tensors(three_stages):
    tmp, _ = three_stages
    run = tmp / "runs" / "tiny"
    before = {k: v.clone() for k, v in rebuild(run / "stage2").state_dict().items()}
    after = rebuild(run / "stage3").state_dict()
    allowed = lambda n: n.startswith("projector.") or ".attn_plus." in n or n.endswith(".attn.gate")
    changed = set()
    for name, value in after.items():
        old = before.get(name.replace(".attn.attn.", ".attn."))  # the frozen channel is the original attention
        if old is None:
            assert ".attn_plus." in name or name.endswith(".gate"), name
            continue
        if not torch.equal(old, value):
            changed.add(name)
    assert changed and all(allowed(n) for n in changed), sorted(n for n in changed if not allowed(n))
    # the exported encoder is that stage-3 encoder, and its frozen channel is the baseline, bitwise
    export = load_vit(run / "stage3" / "vision")
    vit = rebuild(run / "stage3").vit
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(export(x), vit(x))


@pytest.mark.parametrize("mode", ["full", "lora", "frozen", "dual-qk"])
def test_vision_tune_ablations(three_stages, mode):
    """The paper's ablations of stage 3, and dual-qk: each trains what it says, and each export is an encoder eval.py
    reads (LoRA merged, plain; dual-qk's Attn+ with v/o still equal to Attn's)."""
    tmp, _ = three_stages
    run = tmp / "runs" / "tiny"
    run_cli(tmp, "--stage", "3", "--max-steps", "2", "--name", f"ab-{mode}", "--init", str(run / "stage2"),
            "--vision-tune", mode)
    stage = tmp / "runs" / f"ab-{mode}" / "stage3"
    trained = set(load_file(stage / "model.safetensors"))
    vision = {n for n in trained if not n.startswith("projector.")}
    assert any(n.startswith("projector.") for n in trained)
    if mode == "full":
        assert any(".mlp." in n for n in vision) and not any(".attn_plus." in n or "lora" in n for n in vision)
    elif mode == "lora":
        assert vision and all(n.endswith((".lora_a", ".lora_b")) for n in vision)
    elif mode == "dual-qk":
        assert {n.rsplit(".", 2)[-2] for n in vision if ".attn_plus." in n} == {"q_proj", "k_proj"}
        assert any(n.endswith(".gate") for n in vision)
    else:
        assert not vision
    export = load_vit(stage / "vision")
    if mode == "dual-qk":
        sd = export.state_dict()
        for n in sd:
            if ".attn_plus." in n:
                same = torch.equal(sd[n], sd[n.replace(".attn_plus.", ".attn.")])
                assert same == (".v_proj." in n or ".o_proj." in n), n
    else:
        assert not any("lora" in n or "attn_plus" in n for n, _ in export.named_parameters())  # LoRA merged
    x = torch.randn(1, 3, 32, 32)
    base = load_vit(json.loads((stage / "config.json").read_text())["base_vision"])
    with torch.no_grad():
        same = torch.equal(export(x), base(x))
    assert same == (mode == "frozen")


@pytest.mark.parametrize("stage,fsdp", [(1, False), (2, True)])
def test_two_processes_match_one(tmp_path, stage, fsdp):
    """DDP (stage 1), and FSDP2 sharding the LLM while it trains (stage 2), equal one process with the same global
    batch."""
    single = tmp_path / "single"
    single.mkdir()
    flags = ["--stage", str(stage), "--max-steps", "2", "--dtype", "fp32"]  # exact numerics to compare
    run_cli(single, *flags)
    ref = load_file(single / "runs" / "tiny" / f"stage{stage}" / "model.safetensors")
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "data").symlink_to(single / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29533 + stage),
           str(ROOT / "train.py"), *args(multi, *flags, *(["--fsdp"] if fsdp else []))]
    out = subprocess.run(cmd, cwd=multi, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "x2" in out.stdout
    got = load_file(multi / "runs" / "tiny" / f"stage{stage}" / "model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def test_bad_configs_are_clear_errors(tmp_path, capsys):
    for bad, msg in [(["--stage", "4"], "--stage 4: must be 1, 2 or 3"),
                     (["--vision-tune", "partial"], "--vision-tune 'partial'"),
                     (["--preset", "huge"], "--preset 'huge'"),
                     (["--max-steps", "two"], "invalid int value"),
                     (["--global-batch", "6", "--batch-size", "4"], "--global-batch 6: must be a multiple of "
                                                                    "--batch-size 4"),
                     (["--data", str(tmp_path / "nothing")], "no such dataset file or directory")]:
        with pytest.raises(SystemExit):
            train.parse_config(bad)
        assert msg in capsys.readouterr().err
    cfg = train.parse_config([*args(tmp_path), "--vision", str(tmp_path / "no-weights")])
    with pytest.raises(FileNotFoundError, match="no-weights"):
        train.train(cfg)
    cfg = train.parse_config([*args(tmp_path), "--init", str(tmp_path / "no-stage")])
    with pytest.raises(FileNotFoundError, match="--init"):
        train.train(cfg)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from model import VLM

    calls = {"n": 0}
    forward = VLM.forward

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss = forward(self, *a, **k)
        return loss * float("nan") if calls["n"] > 6 else loss  # steps 1-3 fine (2 micro-steps each), then NaN

    monkeypatch.setattr(VLM, "forward", poisoned)
    cfg = train.parse_config(["--stage", "1", "--max-steps", "5", "--save-every", "2", *args(tmp_path)])
    with pytest.raises(FloatingPointError, match="in step 4, .* last good checkpoint is .*step_000002"):
        train.train(cfg)
    out = tmp_path / "runs" / "tiny" / "stage1"
    assert latest_checkpoint(out).name == "step_000002"
    assert not (out / "model.safetensors").exists()


def test_eval_reads_the_run_quick_probes_and_vlm_qa(three_stages, monkeypatch):
    """eval.py on a finished run: the quick probe summary train.py prints, and the VLMs answering held-out QA."""
    import argparse

    import data
    import eval as evaluate
    from evaluation.qa import load_conversations
    from evaluation.suite import quick_summary

    tmp, _ = three_stages
    monkeypatch.chdir(tmp)  # eval reads runs/NAME relative to the working directory
    rows = quick_summary(tmp / "runs" / "tiny" / "stage3", log=lambda *a: None)
    for name in ("baseline", "boosted"):
        assert 0 < rows[name]["depth_lin1"]["rmse"] < 10 and 0 <= rows[name]["segmentation"]["miou"] <= 1
    data.generate("spatial", tmp / "heldout", n=2, seed=777, size=32, progress=False)
    samples = load_conversations(tmp / "heldout")
    args = argparse.Namespace(qa=str(tmp / "heldout"), qa_max_new=6, qa_context="none", out=str(tmp / "qa-out"),
                              runs_dir="runs")
    qa = evaluate.run_qa("tiny", samples, args)
    assert set(qa) == {"stage 2 (before)", "stage 3 (boosted)"}
    assert "overall" in qa["stage 3 (boosted)"] and (tmp / "qa-out" / "answers-stage3.jsonl").exists()


def test_stage3_optimizer_groups_and_warmup():
    """Stage 3 trains the gates at gate_lr, the projector at projector_lr and Attn+ at lr, with >= 10 % warmup; the
    metrics log how far each dual-channel layer moved, step by step."""
    cfg = train.parse_config(["--stage", "3", *TINY[:-1]])
    assert (cfg.gate_lr, cfg.projector_lr, cfg.warmup_frac) == (100 * cfg.lr, cfg.lr / 10, 0.1)
    assert train.parse_config(["--stage", "2", *TINY[:-1]]).warmup_frac == 0.03
    assert train.lr_at(0, 15, cfg) == pytest.approx(cfg.lr / 2)      # ceil(10 % of 15) = 2 warmup steps
    assert train.lr_at(0, 40, cfg) == pytest.approx(cfg.lr / 4) and train.lr_at(3, 40, cfg) == pytest.approx(cfg.lr)


def test_stage3_rates_and_per_layer_metrics(three_stages):
    tmp, _ = three_stages
    run = tmp / "runs" / "tiny" / "stage3"
    vlm, _, cfg = train.load_stage(run)        # its encoder already has the dual channel: mark what stage 3 trains
    for n, p in vlm.named_parameters():
        p.requires_grad_(n.startswith("projector.") or ".attn_plus." in n or n.endswith(".gate"))
    groups = {g["name"]: g for g in train.param_groups(vlm, cfg)}
    assert set(groups) == {"gate", "projector", "other"}
    names = {id(p): n for n, p in vlm.named_parameters()}
    assert all(names[id(p)].endswith(".gate") for p in groups["gate"]["params"])
    assert groups["gate"]["lr_scale"] == 100 and groups["projector"]["lr_scale"] == pytest.approx(0.1)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["gate"]) == len(r["rel_change"]) == 2 for r in rows)                 # 2 ViT blocks
    assert rows[-1]["rel_change"][0] > rows[0]["rel_change"][0] > 0


def test_shuffled_image_control(tmp_path):
    """--shuffle-images: the same conversations and steps, each with another sample's image (never its own)."""
    run_cli(tmp_path, "--stage", "3", "--max-steps", "1", "--name", "real")
    out = run_cli(tmp_path, "--stage", "3", "--max-steps", "1", "--name", "control", "--shuffle-images")
    assert "s3     1/1" in out
    from training.dataset import ConversationDataset

    vlm, tok, _ = train.load_stage(tmp_path / "runs" / "control" / "stage3")
    src = [(tmp_path / "data" / "tiny" / "spatial", 1.0)]
    real = ConversationDataset(src, tok, vlm.vit.cfg, 32, 16, 768)
    shuffled = ConversationDataset(src, tok, vlm.vit.cfg, 32, 16, 768, shuffle_images=1)
    same_text = all(torch.equal(real[i]["ids"], shuffled[i]["ids"]) for i in range(len(real)))
    moved = [not torch.equal(real[i]["pixels"], shuffled[i]["pixels"]) for i in range(len(real))]
    assert same_text and all(moved)
    with pytest.raises(SystemExit):
        train.parse_config(["--stage", "2", "--shuffle-images"])


def test_diagnostics_on_a_stage_directory(three_stages):
    """Image dependence and the localization gap run on any stage directory and held-out spatial data."""
    import data
    from evaluation.diagnostics import diagnose
    from evaluation.qa import load_conversations

    tmp, _ = three_stages
    data.generate("spatial", tmp / "diag", n=3, seed=778, size=32, progress=False)
    vlm, tok, cfg = train.load_stage(tmp / "runs" / "tiny" / "stage2")
    result = diagnose(vlm, tok, cfg.image_size, load_conversations(tmp / "diag"), tmp / "diag", log=None)
    for name in ("image_dependence", "localization_gap", "answer_image_dependence"):
        d = result[name]
        assert d["n"] > 0 and d["gap_ci95"][0] <= d["gap"] <= d["gap_ci95"][1]
        assert all(v == v for v in d.values() if isinstance(v, float))                    # no NaN
    # the whole-conversation loss with the true image is the training loss per answer token, as the loader makes it
    from training.dataset import ConversationDataset
    ds = ConversationDataset([(tmp / "diag", 1.0)], tok, vlm.vit.cfg, cfg.image_size,
                             vlm.n_image_tokens(cfg.image_size), max_len=100_000)
    with torch.no_grad():
        per_sample = [float(vlm(it["ids"][None], it["pixels"], it["weights"][None]) / it["weights"].sum())
                      for it in (ds[i] for i in range(len(ds)))]
    assert result["answer_image_dependence"]["true image"] == pytest.approx(np.mean(per_sample), abs=1e-4)


def test_boosted_encoder_packs_to_attn_plus_and_gates(three_stages, tmp_path):
    """tools/boosted_encoder.py: a stage-3 export -> its gates and Attn+'s change from Attn in bf16 -> back onto the
    baseline, within bf16's rounding of the change (not of the weights); a file of Attn+'s own weights still unpacks."""
    sys.path.insert(0, str(ROOT / "tools"))
    import boosted_encoder
    from storage.tensors import save_tensors

    tmp, _ = three_stages
    export, base = tmp / "runs" / "tiny" / "stage3" / "vision", tmp / "runs" / "tiny" / "base" / "vision"
    packed = load_file(boosted_encoder.pack(export, tmp_path / "enc.safetensors"))
    assert packed and all(boosted_encoder.is_boost(k) and v.dtype == torch.bfloat16 for k, v in packed.items())
    assert any(".attn_plus_delta." in k for k in packed) and not any(".attn_plus." in k for k in packed)
    a, b = load_vit(export), load_vit(boosted_encoder.unpack(base, tmp_path / "enc.safetensors", tmp_path / "enc"))
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        change = (v - sa[boosted_encoder.frozen_of(k)]).abs().max() if ".attn_plus." in k else v.abs().max()
        assert (sb[k] - v).abs().max() <= 2 ** -8 * change + 1e-7, k  # bf16: 8 bits of the change
    x = torch.randn(2, 3, 32, 32)
    assert (a(x) - b(x)).abs().max() < 1e-3 * a(x).abs().max()
    older = {k: v.to(torch.bfloat16) for k, v in sa.items() if ".attn_plus." in k or k.endswith(".attn.gate")}
    save_tensors(older, tmp_path / "older.safetensors")
    c = load_vit(boosted_encoder.unpack(base, tmp_path / "older.safetensors", tmp_path / "older"))
    assert all(torch.equal(c.state_dict()[k], v.float()) for k, v in older.items())
    with pytest.raises(ValueError, match="no dual-channel tensors"):
        boosted_encoder.pack(base, tmp_path / "none.safetensors")


def test_a_checkpoint_loads_as_the_model_of_its_step(three_stages):
    """eval.py --vlm runs/NAME/stage2/checkpoints/step_N: the stages it started from, then exactly its own tensors."""
    tmp, _ = three_stages
    run_cli(tmp, "--stage", "2", "--name", "mid", "--init", str(tmp / "runs" / "tiny" / "stage1"),
            "--max-steps", "3", "--save-every", "1")
    ckpt = latest_checkpoint(tmp / "runs" / "mid" / "stage2")
    assert ckpt.name == "step_000002"
    vlm, _, cfg = train.load_stage(ckpt)
    own = load_file(ckpt / "model.safetensors")
    params = dict(vlm.named_parameters())
    assert own and all(torch.equal(params[k], v) for k, v in own.items())
    stage1 = rebuild(tmp / "runs" / "tiny" / "stage1")
    vit_before = dict(stage1.vit.named_parameters())
    assert all(torch.equal(p, vit_before[k]) for k, p in vlm.vit.named_parameters())  # stage 2 leaves the ViT
    final = dict(rebuild(tmp / "runs" / "mid" / "stage2").named_parameters())
    assert any(not torch.equal(final[k], v) for k, v in own.items())  # step 2 is not the finished step 3
    assert cfg.stage == 2


def test_gradient_noise_statistics_match_their_definitions():
    """tools/gradient_noise.stats from a Gram matrix against the same numbers from the vectors themselves."""
    from tools.gradient_noise import stats
    rng = np.random.default_rng(0)
    n, P = 40, 30
    G, Dm = rng.normal(size=P), rng.normal(size=P) * 0.5
    h = G + rng.normal(size=(n, P)) * 2.0                           # the control's gradients
    g = h + Dm + rng.normal(size=(n, P)) * 0.3                      # the boost's: the image adds Dm
    X = np.concatenate([g, h])
    s = stats(X @ X.T, n)
    def unbiased(x):                                                # |E x|^2 and tr(Σ) from the vectors
        tr = x.var(0, ddof=1).sum()
        return (x.mean(0) ** 2).sum() - tr / n, tr
    sig_g, tr_g = unbiased(g)
    sig_d, tr_d = unbiased(g - h)
    assert s["B"] == pytest.approx(tr_g / sig_g, rel=1e-9)
    assert s["image_share"] == pytest.approx(sig_d / sig_g, rel=1e-9)
    assert s["B_img"] == pytest.approx(tr_d / sig_d, rel=1e-9)
    off = [g[i] @ h[j] for i in range(n) for j in range(n) if i != j]
    cos = np.mean(off) / np.sqrt(sig_g * unbiased(h)[0])
    assert s["cos_boost_control"] == pytest.approx(cos, rel=1e-9)
    assert 0.5 < s["cos_boost_control"] < 1 and s["image_share"] < 0.5  # and they land near the truth
    x = rng.normal(size=(n // 2, P))
    noise = np.concatenate([x, -x, x, -x])                          # g's and h's whose mean is exactly zero
    assert stats(noise @ noise.T, n)["B"] == float("inf")           # no signal resolved: B is unbounded


def test_gradient_noise_runs_on_a_stage_2_model(three_stages):
    from tools.gradient_noise import main
    tmp, _ = three_stages
    out = tmp / "gradnoise.json"
    main(["--init", str(tmp / "runs" / "tiny" / "stage2"), "--data", str(tmp / "data" / "tiny" / "spatial"),
          "--n", "4", "--out", str(out), "--preset", "tiny", "--runs-dir", str(tmp / "runs"), *TINY])
    result = json.loads(out.read_text())
    gram = {k: np.array(K) for k, K in result["gram"].items()}
    assert {"attn+ 00", "attn+ 01", "attn+ all", "projector"} <= set(gram) == set(result["groups"])
    K = gram["attn+ all"]
    assert K.shape == (8, 8) and np.allclose(K, K.T) and (np.diag(K) > 0).all()
    assert np.allclose(K, gram["attn+ 00"] + gram["attn+ 01"])
    assert not np.allclose(K[:4, :4], K[4:, 4:])  # another image changes the gradient
    main(["--again", str(out), "--out", str(tmp / "again.json")])  # the numbers from the saved matrices alone
    assert json.loads((tmp / "again.json").read_text())["groups"] == result["groups"]


def test_gradient_step_moves_each_attn_plus_tensor_along_its_mean_gradient(three_stages):
    """tools/gradient_step: each encoder's Attn+ is its frozen Attn (where stage 3 starts) moved by rel of its norm
    against the saved mean gradient of its direction; gates stay at 0; --again rebuilds from the saved means."""
    from tools.gradient_step import main
    from storage.tensors import load_safetensors
    tmp, _ = three_stages
    out = tmp / "gradstep"
    common = ["--init", str(tmp / "runs" / "tiny" / "stage2"), "--data", str(tmp / "data" / "tiny" / "spatial"),
              "--n", "4", "--rel", "0.1", "--out", str(out), "--preset", "tiny", "--runs-dir", str(tmp / "runs"), *TINY]
    main(common)
    mean = load_safetensors(out / "mean.safetensors")
    names = sorted(k.removeprefix("own.") for k in mean if k.startswith("own."))
    assert names and all(".attn_plus." in k for k in names) and len(mean) == 2 * len(names)
    assert any(not torch.allclose(mean[f"own.{k}"], mean[f"other.{k}"]) for k in names)  # the image matters
    for which in ("boost", "control", "image", "random"):
        sd = load_vit(out / f"{which}-0.1").state_dict()
        for k in names:
            own = k.removeprefix("vit.")
            w, w0 = sd[own], sd[own.replace(".attn_plus.", ".attn.")]
            g, h = mean[f"own.{k}"], mean[f"other.{k}"]
            if which != "random":
                d = {"boost": g, "control": h, "image": g - h}[which]
                assert torch.allclose(w, w0 - 0.1 * w0.norm() / d.norm() * d, atol=1e-6), (which, k)
            elif g.numel() >= 256:  # a direction unrelated to the gradients
                assert abs(float(torch.nn.functional.cosine_similarity((w0 - w).flatten(), g.flatten(), 0))) < 0.5
            if w0.norm() > 0:  # a zero tensor (the tiny ViT's biases) has no relative step: it stays
                assert float((w - w0).norm() / w0.norm()) == pytest.approx(0.1, rel=1e-4)
            else:
                assert torch.equal(w, w0)
        assert all(v.abs().max() == 0 for n, v in sd.items() if n.endswith(".gate"))  # σ(a) = ½, as at the start
    first = load_vit(out / "image-0.1").state_dict()
    main([*common, "--again", "--directions", "image"])  # from the saved means alone: the same encoder
    again = load_vit(out / "image-0.1").state_dict()
    assert all(torch.equal(v, again[n]) for n, v in first.items())


def test_gradient_step_preconditioned_by_input_moments_and_restricted_to_some_tensors(three_stages):
    """--precondition: the step D solves D (Σ + λI) ∝ G per Linear, [weight, bias] jointly, Σ the second moment of
    [its input, 1] (checked against block 0's norm1 output computed by hand); --only moves the named tensors alone."""
    from tools.gradient_noise import stage3_start
    from tools.gradient_step import attn_plus, input_moments, main
    from storage.tensors import load_safetensors
    tmp, _ = three_stages
    out = tmp / "gradstep-pre"
    common = ["--init", str(tmp / "runs" / "tiny" / "stage2"), "--data", str(tmp / "data" / "tiny" / "spatial"),
              "--n", "4", "--rel", "0.1", "--out", str(out), "--preset", "tiny", "--runs-dir", str(tmp / "runs"), *TINY]
    main([*common, "--directions", "image", "--precondition", "0.5", "--moment-samples", "3", "--only", "q_proj",
          "--tag", "q", "--dtype", "fp32"])
    mean = load_safetensors(out / "mean.safetensors")
    vlm, _, _, own, _ = stage3_start(str(tmp / "runs" / "tiny" / "stage2"), str(tmp / "data" / "tiny" / "spatial"), 0,
                                     "fp32", ("--preset", "tiny", "--runs-dir", str(tmp / "runs"), *TINY))
    items = [own[i] for i in range(3)]
    moments = input_moments(vlm, items)
    with torch.no_grad():  # independently: block 0's attention reads norm1 of the embedded tokens
        x = torch.cat([vlm.vit.blocks[0].norm1(vlm.vit.embed(it["pixels"])).flatten(0, 1) for it in items]).float()
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    assert torch.allclose(moments["vit.blocks.0.attn.attn_plus.q_proj"], x.T @ x / len(x), atol=1e-5)
    sd = load_vit(out / "image-pre0.5-q-0.1").state_dict()
    moved = {k for k in attn_plus(vlm) if not torch.equal(sd[k.removeprefix("vit.")],
                                                         sd[k.removeprefix("vit.").replace(".attn_plus.", ".attn.")])}
    assert moved and all(".q_proj." in k for k in moved)
    lin = "blocks.1.attn.attn_plus.q_proj"
    w, b = sd[lin + ".weight"], sd[lin + ".bias"]
    w0, b0 = sd[lin.replace(".attn_plus.", ".attn.") + ".weight"], sd[lin.replace(".attn_plus.", ".attn.") + ".bias"]
    G = torch.cat([mean[f"own.vit.{lin}.weight"] - mean[f"other.vit.{lin}.weight"],
                   (mean[f"own.vit.{lin}.bias"] - mean[f"other.vit.{lin}.bias"])[:, None]], 1)  # E[g - h]
    S = moments["vit." + lin]
    dw = (w0 - w).float()  # the weight part is rescaled on its own, so compare directions on the weight block
    want = torch.linalg.solve(S + 0.5 * S.trace() / len(S) * torch.eye(len(S)), G.T).T[:, :-1]
    assert float(torch.nn.functional.cosine_similarity(dw.flatten(), want.flatten(), 0)) > 0.999
    assert float(dw.norm() / w0.norm()) == pytest.approx(0.1, rel=1e-4)
    assert torch.equal(b, b0) or float((b0 - b).norm() / b0.norm()) == pytest.approx(0.1, rel=1e-4)


def test_projector_norm_puts_image_tokens_at_the_text_scale(tmp_path):
    """--projector-norm: image tokens RMS-normalized, the gain starting at the text embeddings' RMS; saved, reloaded."""
    cfg = train.parse_config(args(tmp_path, "--stage", "1", "--projector-norm"))
    vlm, _ = train.build_base(cfg, train.base_sources(cfg, tmp_path / "runs" / "tiny", print))
    text_rms = vlm.lm.model.embed_tokens.weight.detach().pow(2).mean().sqrt()
    assert torch.allclose(vlm.projector.out_gain, text_rms.expand_as(vlm.projector.out_gain))
    run_cli(tmp_path, "--stage", "1", "--max-steps", "2", "--projector-norm")
    stage = tmp_path / "runs" / "tiny" / "stage1"
    assert "projector.out_gain" in load_file(stage / "model.safetensors")
    vlm, _, cfg = train.load_stage(stage)
    p = vlm.projector
    patches = torch.randn(2, 4, 4, vlm.vit.cfg.dim)                              # (B, h, w, D)
    merged = patches.reshape(2, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, -1)  # 2x2 blocks, row-major
    y = p.fc2(torch.nn.functional.gelu(p.fc1(merged)))
    want = p.out_gain * y / (y.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert cfg.projector_norm and torch.allclose(p(patches), want, atol=1e-5)


def test_a_resumed_runs_eta_counts_only_the_steps_it_timed():
    """Resumed at step 40 of 119, 10 s after starting, one step done: 78 steps at 10 s each remain (13m00s); the
    whole-run count (10 s over 41 steps) said 19 s."""
    import time
    lines, rows = [], []
    rt = type("Rt", (), {"log": lambda self, line, flush=False: lines.append(line)})()
    train.log_step(train.Config(stage=2), rt, None, rows.append, 41, 119, (time.time() - 10.0, 40), 1.0, 1.0, 1e-4,
                   10.0, 100, None)
    assert lines[0].endswith("eta 13m00s") or lines[0].endswith("eta 12m59s"), lines[0]
    assert rows[0]["step"] == 41
