"""The CUDA training paths, guarded on the CPU: FSDP2 with fused AdamW (CPU has it) and its resharding, DDP with
trainable tensors off a micro-batch's path (torchrun, gloo, two processes), a bf16 checkpoint whose trainable weights
must move at stage 2's rate, and the parts of the GPU setup that do not need a GPU (bf16 support, NCCL's order)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import ROOT, args, run_cli

FUSED = """import runpy, sys, torch
class FusedAdamW(torch.optim.AdamW):  # what CUDA picks: fused AdamW refuses plain tensors mixed with DTensors
    def __init__(self, *a, **k):
        super().__init__(*a, **{**k, "fused": True})
torch.optim.AdamW = FusedAdamW
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torchrun(tmp, script, *argv, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), *argv]
    out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    return out.stdout


def test_fsdp_with_fused_adamw_matches_one_process(tmp_path):
    """--fsdp stages 2 and 3 under fused AdamW, as on CUDA: every trainable tensor is an FSDP2 shard (the root is
    wrapped too), so the fused step takes the groups; two processes equal one, the stage-3 export included."""
    (tmp_path / "fused.py").write_text(FUSED)
    for stage, port in ((2, 29541), (3, 29545)):
        flags = ["--stage", str(stage), "--max-steps", "2", "--dtype", "fp32"]
        run_cli(tmp_path, *flags, "--name", "one")
        torchrun(tmp_path, tmp_path / "fused.py", ROOT / "train.py",
                 *args(tmp_path, *flags, "--name", "two", "--fsdp"), port=port)
        files = ["model.safetensors"] + (["vision/model.safetensors"] if stage == 3 else [])
        for f in files:
            ref, got = (load_file(tmp_path / "runs" / n / f"stage{stage}" / f) for n in ("one", "two"))
            assert got.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


FSDP_MEMORY = """import json, sys, torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
import train
cfg = train.parse_config(sys.argv[3:])
rt = train.setup_runtime(cfg)
vlm, tok, _, _ = train.stage_model(cfg, rt, train.Path(sys.argv[2]))
model, opt, _ = train.prepare(vlm, cfg, rt, train.Path(sys.argv[2]))
T = 64
ids = torch.randint(3, 200, (2, T))
weights = torch.ones(2, T)
gathered = lambda: sum(p.numel() * p.element_size() for layer in vlm.lm.model.layers for p in layer.parameters()
                       if not isinstance(p, DTensor))  # bytes of the blocks held in full, not as shards
sharded = sum(p.to_local().numel() * p.element_size() for layer in vlm.lm.model.layers for p in layer.parameters()
              if isinstance(p, DTensor))
loss = model(ids, torch.zeros(0, 3, 32, 32), weights)
after_forward = gathered()
loss.backward()
if rt.rank == 0:
    print("RESULT", json.dumps({"after_forward": after_forward, "after_backward": gathered(), "sharded": sharded}))
dist.destroy_process_group()
"""


def test_fsdp_reshards_blocks_after_forward(tmp_path):
    """FSDP2's memory saving: after the forward each LLM block is back to its shard (1/world of its bytes), not held
    gathered until the backward, which a block that is its own FSDP root never gives back."""
    (tmp_path / "mem.py").write_text(FSDP_MEMORY)
    out = torchrun(tmp_path, tmp_path / "mem.py", ROOT, tmp_path / "out",
                   *args(tmp_path, "--stage", "2", "--fsdp", "--dtype", "fp32", "--data", str(text_only(tmp_path))),
                   port=29542)
    got = json.loads(out.split("RESULT", 1)[1].splitlines()[0])
    assert got["sharded"] > 0
    assert got["after_forward"] == 0, got  # every block resharded: nothing gathered waits for the backward
    assert got["after_backward"] == 0, got


def text_only(tmp: Path, n: int = 8) -> Path:
    """A stage-2 dataset of text-only conversations (LLaVA's mix665k has ~40K such samples)."""
    rows = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                              {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]}
            for i in range(n)]
    path = tmp / "text-only" / "data.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.parent


def test_ddp_stage2_with_text_only_micro_batches(tmp_path):
    """DDP, stage 2, micro-batches with no image: the projector is off their path, yet DDP's reducer waits for its
    gradient (today: "Expected to have finished reduction in the prior iteration" at step 2). It trains, and the
    projector, which no image reached, is exactly as it started."""
    out = torchrun(tmp_path, ROOT / "train.py", *args(tmp_path, "--stage", "2", "--max-steps", "2", "--dtype", "fp32",
                                                       "--data", str(text_only(tmp_path))), port=29543)
    assert "x2" in out
    state = load_file(tmp_path / "runs" / "tiny" / "stage2" / "model.safetensors")
    start = train.build_base(train.parse_config(args(tmp_path, "--stage", "2")),
                             {"vision": str(tmp_path / "runs/tiny/base/vision"),
                              "llm": str(tmp_path / "runs/tiny/base/llm")})[0]
    before = dict(start.named_parameters())
    assert all(torch.equal(state[k], before[k]) for k in state if k.startswith("projector."))
    assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith("lm."))


def test_ddp_stage3_reading_an_earlier_block(tmp_path):
    """DDP, stage 3, --feature-layer -2: the last block's Attn+ never runs (today: a crash at step 2). It is frozen,
    every tensor that trains is on the path, and the run finishes."""
    torchrun(tmp_path, ROOT / "train.py", *args(tmp_path, "--stage", "3", "--max-steps", "2", "--feature-layer", "-2"),
             port=29544)
    trained = load_file(tmp_path / "runs" / "tiny" / "stage3" / "model.safetensors")
    assert any(k.startswith("vit.blocks.0.attn.attn_plus.") for k in trained)
    assert not any(k.startswith("vit.blocks.1.") for k in trained)


def test_bf16_checkpoint_trains_fp32_masters(tmp_path):
    """A checkpoint shipped in bf16 (as Qwen2.5 is): at stage 2's rate (2e-5) a bf16 weight's update rounds away, so
    the trainable weights are fp32 masters whatever the checkpoint's dtype. After 3 steps every LLM block matrix
    has moved almost everywhere; frozen weights stay bf16 under bf16 autocast."""
    from llm import LLM, LLMConfig, Tokenizer, save_llm
    from model import ViT, ViTConfig, save_vit
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    save_llm(LLM(LLMConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=88, vocab_size=len(tok)))
             .to(torch.bfloat16), tok, tmp_path / "llm")
    save_vit(ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=128, patch_size=8, image_size=32, pos_grid=4))
             .to(torch.bfloat16), tmp_path / "vit")
    base = load_file(tmp_path / "llm" / "model.safetensors")
    assert base["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    flags = ["--stage", "2", "--max-steps", "3", "--dtype", "bf16", "--llm", str(tmp_path / "llm"), "--vision",
             str(tmp_path / "vit"), "--gen-samples", "8"]
    cfg = train.parse_config(args(tmp_path, *flags))
    assert cfg.lr == 2e-5  # stage 2's rate for a loaded LLM
    rt = train.setup_runtime(cfg)
    vlm = train.stage_model(cfg, rt, tmp_path / "probe")[0]
    assert all(p.dtype == torch.float32 for p in vlm.parameters() if p.requires_grad)
    frozen = [p for p in vlm.vit.parameters()]
    assert all(p.dtype == (torch.bfloat16 if p.dim() >= 2 else torch.float32) for p in frozen)  # matrices as shipped
    run_cli(tmp_path, *flags)
    trained = load_file(tmp_path / "runs" / "tiny" / "stage2" / "model.safetensors")
    for k in [k for k in base if k.startswith("model.layers.") and base[k].dim() == 2]:
        same = (trained["lm." + k].float() == base[k].float()).float().mean().item()
        assert same < 0.02, (k, same)  # bf16 weights without fp32 masters: ~70 % identical
    run_cli(tmp_path, *flags[:1], "3", *flags[2:])  # stage 3 on it: fp32 gates and Attn+ beside bf16 Attn


def test_gpu_without_bf16_trains_fp32_or_refuses(monkeypatch):
    """Turing GPUs have no bf16: --dtype auto falls back to fp32, --dtype bf16 is refused with the reason."""
    from training import distributed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert distributed.gpu_amp_dtype("auto") is None and distributed.gpu_amp_dtype("fp32") is None
    with pytest.raises(ValueError, match="--dtype bf16: Tesla T4 has no bf16"):
        distributed.gpu_amp_dtype("bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert distributed.gpu_amp_dtype("auto") is torch.bfloat16


def test_nccl_starts_after_set_device_and_bound_to_it(monkeypatch):
    """Each rank selects its GPU before NCCL starts, and NCCL is bound to it (device_id): no context on GPU 0 from
    every rank, no lazy communicator on the first collective."""
    from training import distributed
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **k: calls.append((backend, k)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert distributed.init_process_group("cuda") == (1, 2)
    assert calls == [("set_device", 1), ("nccl", {"device_id": torch.device("cuda", 1)})]


def tiny_vlm(stage: int, **cfg):
    """ViT D=8, 2 blocks, 2 heads, 16 px images of 8 px patches (4 patches + CLS); LLM D=8, 1 block, 2 heads / 1 KV
    head, FFN 16, vocabulary 260 (tied); projector merging 2 x 2 patches."""
    from llm import LLM, LLMConfig
    from model import VLM, Projector, ViT, ViTConfig
    vit = ViT(ViTConfig(dim=8, depth=2, heads=2, mlp_dim=16, patch_size=8, image_size=16, pos_grid=2))
    lm = LLM(LLMConfig(vocab_size=260, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16))
    vlm = VLM(vit, Projector(8, 8, 2), lm, image_token_id=259, feature_layer=cfg.pop("feature_layer", -1))
    train.set_trainable(vlm, train.Config(stage=stage, **cfg))
    return vlm


@pytest.mark.parametrize("stage,feature_layer,hand", [
    # ViT blocks 2 x 512 weights x 5 tokens, forward only: 10240; its attention 2 x 4*8*25: 1600; patch conv 1536 x 4
    # patches x 2: 12288; projector 320 x 1 token x 4 (forward 2 + weight gradient 2; no gradient into the frozen
    # encoder): 1280; LLM block 576 x 10 tokens x 4: 23040, its causal attention 4*8*100/2 x 3: 4800; head 2080 x 3 supervised
    # tokens x 4: 24960
    (1, -1, 10240 + 1600 + 12288 + 1280 + 23040 + 4800 + 24960),
    # the LLM and its tied head train: x6 instead of x4
    (2, -1, 10240 + 1600 + 12288 + 1280 + 6 * 576 * 10 + 4800 + 6 * 2080 * 3),
    # dual channel: the gradient crosses the encoder; per block 512 frozen x4 + 256 Attn+ x6, two attentions x3;
    # the projector sees the gradient into the encoder too (x6); the LLM frozen (x4)
    (3, -1, 2 * 5 * (4 * 512 + 6 * 256) + 4 * 800 * 3 + 12288 + 6 * 320 + 23040 + 4800 + 24960),
    (3, -2, 1 * 5 * (4 * 512 + 6 * 256) + 2 * 800 * 3 + 12288 + 6 * 320 + 23040 + 4800 + 24960),  # block 1 never runs
])
def test_step_flops_against_a_hand_count(stage, feature_layer, hand):
    """The MFU formula of BENCHMARKS.md on a tiny VLM: one 16 px image, one sequence of 10 text tokens, 3 of them
    supervised. The embedding is a lookup (no FLOPs); the head runs on the supervised tokens only."""
    from training.flops import step_flops
    vlm = tiny_vlm(stage, feature_layer=feature_layer)
    assert step_flops(vlm, 16, tokens=10, tokens_sq=100, supervised=3, images=1) == hand


def test_peak_table_matches_names_exactly_and_mfu_divides_by_every_gpu():
    from training.flops import mfu, peak_flops
    assert peak_flops("NVIDIA L4") == 121e12 and peak_flops("NVIDIA L40S") == 362e12  # no prefix match
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA Some Future GPU") is None and peak_flops("NVIDIA L4", 100.0) == 100e12
    assert mfu(4e12, 2.0, 1e12, world=2) == 1.0 and mfu(1.0, 1.0, None, 1) is None


def test_packed_attention_keeps_samples_apart_as_the_dense_mask_does():
    """--pack's mask-free path (Packed: varlen flash attention on CUDA, here one SDPA per sample over the same cuts)
    against the dense block-diagonal mask: the same hidden states and gradients, GQA included."""
    from llm import LLM, LLMConfig, block_causal, packed_cuts
    lm = LLM(LLMConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32))
    segments = torch.tensor([[1] * 5 + [2] * 7 + [3] * 3 + [0] * 2, [1] * 11 + [2] * 6])  # 0: padding
    positions, mask = block_causal(segments)
    packed = packed_cuts(segments)
    assert packed.cu_seqlens.tolist() == [0, 5, 12, 15, 17, 28, 34] and packed.max_len == 17
    ids = torch.randint(0, 50, (2, 17))
    outs = []
    for m in (mask, packed):
        lm.zero_grad()
        h = lm.hidden(ids, positions=positions, mask=m)
        h.pow(2).sum().backward()
        outs.append((h, lm.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (h_dense, g_dense), (h_packed, g_packed) = outs
    torch.testing.assert_close(h_packed, h_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_packed, g_dense, atol=1e-5, rtol=1e-4)


def test_gpu_recipe_help_and_dry_run(tmp_path):
    """experiments/gpu.sh --help prints its usage and variables and starts nothing; --dry runs the whole recipe (data,
    stages 1-3, boost and control over seeds, probes on several probe sets, the report) on the CPU with the tiny
    preset, everything under the current directory."""
    script = str(ROOT / "experiments" / "gpu.sh")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "Variables" in out.stdout and "N1 [50000]" in out.stdout
    assert not list(tmp_path.iterdir())  # nothing made
    bad = subprocess.run(["bash", script, "--fast"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr
    out = subprocess.run(["bash", script, "--dry"], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert report and (tmp_path / "results" / "gpu.md").read_text().count("boost − control") >= 2  # per probe set
    for run in ("gpu/stage1", "gpu/stage2", "gpu-boost-s1/stage3", "gpu-control-s2/stage3"):
        assert (tmp_path / "runs" / run / "config.json").exists(), run


def test_gpu_recipe_runs_the_critic_experiment_dry(tmp_path):
    """The critic experiment (issue 29) through the same recipe: spatial conversations in stage 2's mix, the gates
    after stage 2 (a failed gate stops the run unless FORCE=1), stage 3 with --loss-on image, the depth-points teacher
    per seed and the efficiency in the report."""
    script = str(ROOT / "experiments" / "gpu.sh")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "S2_SPATIAL": "4", "K": "2", "LOSS_ON": "image", "GATES": "1",
           "TEACHER": "1", "SEEDS": "1"}
    out = subprocess.run(["bash", script, "--dry"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0 and "a gate failed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    gates = (tmp_path / "results" / "gpu-gates.md").read_text()  # tiny random models: every gate fails
    assert gates.count("| NO |") == 3 and "image share" in gates and not (tmp_path / "runs" / "gpu-boost-s1").exists()
    mix = json.loads((tmp_path / "runs" / "gpu" / "stage2" / "config.json").read_text())["config"]["data"]
    assert "spatial-stage2" in mix
    out = subprocess.run(["bash", script, "--dry"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**env, "FORCE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    boost = json.loads((tmp_path / "runs" / "gpu-boost-s1" / "stage3" / "config.json").read_text())["config"]
    assert boost["loss_on"] == "image"
    assert (tmp_path / "runs" / "gpu-points-s1" / "stage3" / "vision").is_dir()
    report = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert set(report["efficiency"]) >= {"depth_lin1_rmse", "seg"}
