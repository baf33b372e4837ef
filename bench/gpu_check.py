"""
The GPU check: what one GPU does with the two real-size presets, measured in one run of ~15 minutes (inductor
compiles each row; --budget caps it) that needs no weight files and no network.

    python bench/gpu_check.py --out gpu_check        # one CUDA GPU -> gpu_check/gpu_check.json and gpu_check.md
    python bench/gpu_check.py --dry --out /tmp/gc    # CPU, tiny shapes, seconds: tests/test_speed_paths.py runs it

The models are random weights of the real shapes, built from their configs alone (small: DINOv2-S/14 +
SmolLM2-135M; base: DINOv2-B/14 + Qwen2.5-0.5B) and saved to a scratch dir, so that train.py loads them as it loads
real checkpoints. The data is generated on the spot (train.py's default kinds per stage, 224 px) and tokenized
byte-level: there are no tokenizer files on the GPU machine. Byte-level samples are ~2x as long as with the real BPE
(whole trailing turns are cut at the preset's --max-len), so steps carry more tokens than real ones; --tokenizer DIR
(a checkpoint dir with tokenizer.json) uses a real tokenizer instead.

Per preset and stage (stage 3 first: it matters most), with train.py's own step (forward_backward, clipping, AdamW):
  - eager vs compiled (per-block torch.compile, as train.py --compile on): the first step's loss on the same batch
    and the same weights, then step time, samples/s, tokens/s, MFU (training/flops.py) and peak memory of each;
  - which attention kernels ran (from the profiler), every step inside sdpa_kernel(flash, efficient, cuDNN): a fall
    to the math kernel (O(T^2) memory) is an error in the row, not a slow number;
  - the largest batch whose eager step fits in a 24 GB card (--cap-gib 22.5, the usable memory of an L4 or A10G, less
    the CUDA context, which the allocator's cap does not see); cuBLAS's failed allocations count as out-of-memory;
  - whether the data loader keeps up: collate seconds per batch over the preset's --workers vs seconds per step.
Once per run: --pack's mask-free attention (varlen flash on CUDA) against the dense mask on one SmolLM2-sized block.
Each measurement is guarded: an error is recorded in the JSON as its message and the next measurement runs. What no
longer fits in --budget seconds is skipped and recorded as skipped. The JSON and the table are rewritten after each
row, so a run killed half-way still leaves its rows.
"""

import argparse
import gc
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from bench.machine import cpu_model  # noqa: E402
from dataengine.writer import KINDS, write_dataset  # noqa: E402
from llm import LLM, LLMConfig, Tokenizer, save_llm  # noqa: E402
from model import ViT, ViTConfig, save_vit  # noqa: E402
from storage.atomic import write_text_atomically  # noqa: E402
from training.dataset import collate  # noqa: E402

GIB = 2**30
DINOV2 = dict(patch_size=14, pos_grid=37, image_size=224)  # DINOv2's 518 px position table, 14 px patches
# (ViTConfig fields, the LLM's Hugging Face config.json): the real checkpoints' shapes
SHAPES = {
    "small": (dict(DINOV2, dim=384, depth=12, heads=6, mlp_dim=1536),  # DINOv2-S/14
              dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                   intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                   max_position_embeddings=8192)),  # SmolLM2-135M
    "base": (dict(DINOV2, dim=768, depth=12, heads=12, mlp_dim=3072),  # DINOv2-B/14
             dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                  intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                  max_position_embeddings=32768)),  # Qwen2.5-0.5B
}
TINY = (dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, pos_grid=8, image_size=64),
        dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
MODE_FIELDS = ("first_loss", "first_step_s", "warmup_s", "step_s", "samples_per_s", "tokens_per_s", "mfu",
               "peak_mem_gib", "attention")
ROW_FIELDS = ("preset", "stage", "batch_size", "seq_len", "tokens_per_batch", "eager", "compiled", "compiled_speedup",
              "loss_rel_diff", "losses_agree", "max_batch_24gb", "first_oom_batch", "loader_s_per_batch",
              "loader_keeps_up", "errors")
LOSS_RTOL = 1e-2  # bf16: eager and inductor round differently, but a loss averages thousands of tokens
FAST_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
# profiler op names -> kernel (the CPU's flash kernel counts as flash; varlen is flash-attention's packed kernel)
KERNEL_OPS = {"flash_attention": "flash", "efficient_attention": "efficient", "cudnn_attention": "cudnn",
              "attention_math": "math", "varlen_attn": "varlen"}


def fast_attention():
    """Every SDPA call inside may use flash, memory-efficient or cuDNN attention, never the math kernel: one that
    only math can run raises "No available kernel" instead of quietly costing O(T^2) memory."""
    return sdpa_kernel(FAST_KERNELS)


def attention_kernels(fn) -> list[str]:
    """fn() run under the profiler -> the attention kernels its ops went through, sorted (KERNEL_OPS' names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return sorted({kernel for op, kernel in KERNEL_OPS.items() if any(op in n for n in names)})


def is_oom(e: BaseException) -> bool:
    """An out-of-memory however it surfaces: the allocator's error, or cuBLAS failing to allocate its workspace."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(
        s in str(e) for s in ("CUBLAS_STATUS_ALLOC_FAILED", "CUDA out of memory"))


def allocator_fraction(cap_gib: float, total: int, free: int, reserved: int) -> float:
    """The share of the GPU's memory the allocator may use so that the process stays within cap_gib: what is in use
    but not the allocator's (the CUDA context, cuBLAS workspaces: ~0.3-0.6 GiB) comes off the cap first."""
    outside = total - free - reserved  # bytes
    return max(0.0, min(1.0, (cap_gib * GIB - outside) / total))


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0


def guarded(row: dict, name: str, budget: Budget, fn, need: float = 0.0):
    """fn() -> its result, or None with the error recorded in row["errors"][name]; skipped (and recorded so) when
    fewer than `need` seconds of the budget are left, so that a long measurement does not overrun it."""
    if budget.elapsed() + need > budget.seconds:
        row["errors"][name] = f"skipped: the {budget.seconds:.0f} s budget was spent"
        return None
    print(f"[{budget.elapsed():5.0f} s] {row['preset']} stage {row['stage']}: {name}", flush=True)
    try:
        return fn()
    except (Exception, SystemExit) as e:  # SystemExit: argparse's error for a bad flag
        traceback.print_exc()
        row["errors"][name] = f"{type(e).__name__}: {e}"[:800]
        return None


def random_sources(preset: str, work: Path, tok: Tokenizer, dry: bool) -> dict:
    """The preset's encoder and LLM with random weights of the real shapes, saved as train.py reads its sources."""
    vit_shape, llm_config = TINY if dry else SHAPES[preset]
    out = {"vision": work / "models" / preset / "vision", "llm": work / "models" / preset / "llm"}
    torch.manual_seed(0)
    if not (out["vision"] / "config.json").exists():
        save_vit(ViT(ViTConfig(family="dinov2", **vit_shape)), out["vision"])
    if not (out["llm"] / "config.json").exists():
        lc = LLMConfig.from_hf({**llm_config, "vocab_size": max(llm_config["vocab_size"], len(tok))})
        save_llm(LLM(lc), tok, out["llm"])
    return {k: str(v) for k, v in out.items()}


def stage_data(stage: int, work: Path, dry: bool) -> str:
    """--data for the stage: train.py's default kinds (STAGE_DATA), generated once for both presets."""
    dirs = []
    for kind in train.STAGE_DATA[stage]:
        path = work / "data" / kind
        if not (path / "data.jsonl").exists():
            write_dataset(kind, path, n=8 if dry else 64, seed=1000 * (KINDS.index(kind) + 1), size=64 if dry else 224,
                          workers=1 if dry else 8, progress=False)
        dirs.append(str(path))
    return ",".join(dirs)


def build(args, preset: str, stage: int, sources: dict, work: Path):
    """train.py's own stage model and data for the preset, one micro-batch per step (--global-batch = --batch-size,
    so that the few generated samples make a step)."""
    batch = 2 if args.dry else train.PRESETS[preset]["batch_size"]
    argv = ["--preset", preset, "--stage", str(stage), "--vision", sources["vision"], "--llm", sources["llm"],
            "--runs-dir", str(work / "runs"), "--data", stage_data(stage, work, args.dry), "--no-probe",
            "--compile", "off", "--batch-size", str(batch), "--global-batch", str(batch), "--device", args.device]
    if args.dry:
        argv += ["--image-size", "64", "--max-len", "512", "--workers", "0"]
    cfg = train.parse_config(argv)
    rt = train.setup_runtime(cfg)
    vlm, tok, _, _ = train.stage_model(cfg, rt, work / "runs" / preset / f"stage{stage}")
    ds = train.stage_data(cfg, rt, vlm, tok)[0]
    return cfg, rt, vlm, tok, ds


def batches_of(ds, tok, cfg, n: int, size: int) -> list[dict]:
    """n micro-batches of `size` samples drawn in a fixed shuffled order (the stage's kinds mixed)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    pick = lambda i: ds[order[i % len(order)]]
    return [collate([pick(k * size + j) for j in range(size)], pad_id=tok.pad_id, pack=cfg.pack) for k in range(n)]


def train_step(vlm, opt, batch: dict, cfg, rt) -> float:
    with fast_attention():
        loss, _ = train.forward_backward(vlm, vlm, [batch], rt)
    train.reduce_and_clip(vlm, cfg, rt.world)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def peak_memory_gib(device: str) -> float:
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak RSS (never reset)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_mode(vlm, cfg, rt, batches: list, start: dict, compile_backend: str | None, peak: float | None) -> dict:
    """From the starting weights: the first step on batches[0] (its loss; compilation happens here), two warm-up
    steps on other lengths (compiled blocks turn dynamic there), then the timed steps on batches[3:]."""
    with torch.no_grad():
        for n, p in train.trainable_state(vlm).items():
            p.copy_(start[n])
    if compile_backend:  # what train.prepare does for --compile on, with the backend made a choice
        torch._dynamo.reset()
        for block in list(vlm.vit.blocks) + list(vlm.lm.model.layers):
            block.compile(backend=compile_backend)
    opt = train.adamw(train.param_groups(vlm, cfg), cfg.lr, rt.device)
    if rt.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = lambda b: train_step(vlm, opt, b, cfg, rt)
    first_s, loss = timed(lambda: step(batches[0]), rt.device)
    warmup_s = sum(timed(lambda b=b: step(b), rt.device)[0] for b in batches[1:3])
    times = [timed(lambda b=b: step(b), rt.device)[0] for b in batches[3:]]
    dt = statistics.median(times)
    timed_batches = batches[3:]
    tokens = statistics.mean(b["n_tokens"] for b in timed_batches)
    flops = statistics.mean(train.batch_flops(vlm, cfg.image_size, [b]) for b in timed_batches)
    kernels = attention_kernels(lambda: step(batches[-1]))  # one more step, profiled
    return dict(first_loss=loss, first_step_s=first_s, warmup_s=warmup_s, step_s=dt,
                samples_per_s=cfg.batch_size / dt, tokens_per_s=tokens / dt, mfu=train.mfu(flops, dt, peak, 1),
                peak_mem_gib=peak_memory_gib(rt.device), attention=kernels)


def largest_batch(vlm, cfg, rt, ds, tok, cap_gib: float, sizes: list) -> tuple[int, int | None]:
    """Eager steps at growing batch sizes with the process capped at cap_gib (CUDA) -> (largest that fit, first that
    did not, or None)."""
    cuda = rt.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        torch.cuda.set_per_process_memory_fraction(allocator_fraction(cap_gib, total, free,
                                                                      torch.cuda.memory_reserved()))
    fit, oom = 0, None
    try:
        for size in sizes:
            batch = batches_of(ds, tok, cfg, 1, size)[0]
            opt = train.adamw(train.param_groups(vlm, cfg), 0.0, rt.device)
            try:
                train_step(vlm, opt, batch, cfg, rt)
                fit = size
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                oom = size
            finally:
                del opt, batch
                vlm.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache() if cuda else None
            if oom is not None:
                break
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return fit, oom


def loader_seconds(ds, tok, cfg, n: int) -> float:
    """Seconds per batch of the training DataLoader's work (read, decode, tokenize, collate), one process, spread
    over the preset's --workers: what the loader can deliver when the cores are free."""
    batches = [list(range(k * cfg.batch_size, (k + 1) * cfg.batch_size)) for k in range(n)]
    t0 = time.perf_counter()
    for idx in batches:
        collate([ds[i % len(ds)] for i in idx], pad_id=tok.pad_id, pack=cfg.pack)
    return (time.perf_counter() - t0) / n / max(1, cfg.workers)


def packed_attention_check(device: str) -> dict:
    """--pack's mask-free path against the dense mask, on one small LLM block in the training dtype: packed rows of
    2-3 samples each, forward and the input gradient. On CUDA the varlen flash kernel must run (kernels), and agree."""
    from llm import LLM, block_causal, packed_cuts
    torch.manual_seed(0)
    lm = LLM(LLMConfig(vocab_size=64, dim=576, n_layers=1, n_heads=9, n_kv_heads=3, ffn_dim=1536)).to(device)
    segments = torch.tensor([[1] * 700 + [2] * 500 + [3] * 336, [1] * 1000 + [2] * 400 + [0] * 136])  # (2, 1536)
    positions, mask = (t.to(device) for t in block_causal(segments))
    cuts = packed_cuts(segments)
    packed = cuts._replace(cu_seqlens=cuts.cu_seqlens.to(device))
    x = torch.randn(2, 1536, 576, device=device)
    outs, kernels = [], {}
    for name, m in (("dense", mask), ("packed", packed)):
        xi = x.clone().requires_grad_(True)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                h = lm.hidden(embeds=xi, positions=positions, mask=m)
            h.float().pow(2).mean().backward()
            return h.detach().float()
        with fast_attention() if name == "packed" else nullcontext():  # the dense mask may need math: the reference
            kernels[name] = attention_kernels(lambda: outs.append((step(), xi.grad.float())))
    (h_d, g_d), (h_p, g_p) = outs
    rel = lambda a, b: float((a - b).norm() / b.norm())
    return {"kernels": kernels, "out_rel_diff": rel(h_p, h_d), "grad_rel_diff": rel(g_p, g_d)}


def check_stage(args, preset: str, stage: int, sources: dict, work: Path, budget: Budget, peak) -> dict:
    row = {f: None for f in ROW_FIELDS} | {"preset": preset, "stage": stage, "errors": {}}
    built = guarded(row, "build", budget, lambda: build(args, preset, stage, sources, work))
    if built is None:
        return row
    cfg, rt, vlm, tok, ds = built
    batches = batches_of(ds, tok, cfg, 3 + args.steps, cfg.batch_size)
    row.update(batch_size=cfg.batch_size, seq_len=statistics.mean(b["ids"].shape[1] for b in batches),
               tokens_per_batch=statistics.mean(b["n_tokens"] for b in batches))
    start = {n: p.detach().clone() for n, p in train.trainable_state(vlm).items()}
    row["eager"] = guarded(row, "eager", budget, lambda: measure_mode(vlm, cfg, rt, batches, start, None, peak))
    sizes = [1, 2] if args.dry else [2, 4, 8, 16, 32, 64]
    fit = guarded(row, "max_batch", budget, lambda: largest_batch(vlm, cfg, rt, ds, tok, args.cap_gib, sizes))
    row["max_batch_24gb"], row["first_oom_batch"] = fit or (None, None)
    row["loader_s_per_batch"] = guarded(row, "loader", budget, lambda: loader_seconds(ds, tok, cfg, 4))
    backend = "eager" if args.dry else "inductor"  # dry: dynamo tracing only; inductor on CPU is tested elsewhere
    run_compiled = lambda: measure_mode(vlm, cfg, rt, batches, start, backend, peak)
    row["compiled"] = guarded(row, "compiled", budget, run_compiled, need=0 if args.dry else 150)  # room to compile
    eager, compiled = row["eager"], row["compiled"]
    if eager and compiled:
        row["compiled_speedup"] = eager["step_s"] / compiled["step_s"]
        row["loss_rel_diff"] = abs(compiled["first_loss"] - eager["first_loss"]) / abs(eager["first_loss"])
        row["losses_agree"] = row["loss_rel_diff"] <= LOSS_RTOL
    fastest = min((m["step_s"] for m in (eager, compiled) if m), default=None)
    if fastest is not None and row["loader_s_per_batch"] is not None:
        row["loader_keeps_up"] = row["loader_s_per_batch"] < fastest
    return row


def targets(rows: list) -> dict:
    """The targets set for the GPU, read off the rows: {target: {"value": ..., "met": bool or None (not measured)}}."""
    row = lambda preset: next((r for r in rows if r["preset"] == preset and r["stage"] == 3), {})
    base, small = row("base"), row("small")
    mfus = [m["mfu"] for m in (base.get("eager"), base.get("compiled")) if m and m["mfu"] is not None]
    values = {"base stage 3: MFU >= 40 %": (max(mfus, default=None), 0.40),
              "base stage 3: compiled >= 1.3x eager": (base.get("compiled_speedup"), 1.3),
              "small stage 3: batch >= 8 in 24 GB": (small.get("max_batch_24gb"), 8)}
    return {k: {"value": v, "met": None if v is None else v >= bound} for k, (v, bound) in values.items()}


def environment(args, device: str, peak) -> dict:
    env = {"torch": torch.__version__, "device": device, "cpu": cpu_model(), "dry": args.dry, "budget_s": args.budget,
           "cap_gib": args.cap_gib, "peak_tflops": peak and peak / 1e12, "tokenizer": args.tokenizer or "byte-level",
           "compile": "per-block torch.compile, " + ("backend eager (dry)" if args.dry else "inductor")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, capability=f"{props.major}.{props.minor}")
    return env


def fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# GPU check ({'dry run, tiny shapes, CPU' if env['dry'] else env.get('gpu', env['device'])})", "",
             ", ".join(f"{k} {v}" for k, v in env.items()) + f"; {result['elapsed_s']:.0f} s"
             + ("" if result["complete"] else " (incomplete)"), "",
             f"--pack's varlen path against the dense mask: {result.get('packed_attention')}", "",
             "| preset | stage | batch | tokens/batch | eager s/step | compiled s/step | speed-up | tokens/s eager / "
             "compiled | MFU eager / compiled | peak GiB eager / compiled | attention eager / compiled | loss rel. "
             f"diff | max batch in {env['cap_gib']:g} GiB | loader s/batch | loader keeps up | errors |",
             "|" + "---|" * 16]
    verdict = lambda met: "not measured" if met is None else "met" if met else "NOT met"
    tail = ["", "Targets: " + "; ".join(f"{k}: {fmt(t['value'])} ({verdict(t['met'])})"
                                        for k, t in result["targets"].items())]
    for r in result["rows"]:
        e, c = r["eager"] or {}, r["compiled"] or {}
        pair = lambda key, spec: f"{fmt(e.get(key), spec)} / {fmt(c.get(key), spec)}"
        errors = "; ".join(f"{k}: {v[:120]}" for k, v in r["errors"].items()) or "none"
        lines.append(f"| {r['preset']} | {r['stage']} | {fmt(r['batch_size'])} | {fmt(r['tokens_per_batch'], '.0f')} "
                     f"| {fmt(e.get('step_s'))} | {fmt(c.get('step_s'))} | {fmt(r['compiled_speedup'], '.2f')} | "
                     f"{pair('tokens_per_s', '.0f')} | {pair('mfu', '.1%')} | {pair('peak_mem_gib', '.1f')} | "
                 f"{'+'.join(e.get('attention') or ['–'])} / {'+'.join(c.get('attention') or ['–'])} | "
                     f"{fmt(r['loss_rel_diff'], '.1e')} | {fmt(r['max_batch_24gb'])} (OOM at "
                     f"{fmt(r['first_oom_batch'])}) | {fmt(r['loader_s_per_batch'])} | {fmt(r['loader_keeps_up'])} "
                     f"| {errors} |")
    return "\n".join(lines + tail) + "\n"


def write(out: Path, result: dict):
    result["targets"] = targets(result["rows"])
    write_text_atomically(out / "gpu_check.json", json.dumps(result, indent=2))
    write_text_atomically(out / "gpu_check.md", markdown(result))


def arguments(argv=None):
    """-> (args, presets, stages, tokenizer); a bad flag is an argparse error before anything runs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes: the harness end to end in seconds")
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--stages", default="3,1,2", help="in this order")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after 3 warm-up steps)")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds; what starts later is skipped")
    ap.add_argument("--cap-gib", type=float, default=22.5,
                    help="the memory of the GPU the batch search stands for (22.5: a 24 GB L4 / A10G's usable GiB)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 TFLOPS for MFU where training/flops.py's table lacks the GPU's exact name")
    ap.add_argument("--tokenizer", default="", help="a checkpoint dir with tokenizer.json (default: byte-level)")
    ap.add_argument("--work", default="", help="scratch dir for models, data and runs (default: a temporary one)")
    args = ap.parse_args(argv)
    presets, stages = args.presets.split(","), args.stages.split(",")
    if not set(presets) <= set(SHAPES) or not set(stages) <= {"1", "2", "3"}:
        ap.error(f"--presets {args.presets!r} --stages {args.stages!r}: presets from {', '.join(SHAPES)}, stages 1-3")
    try:
        tok = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer.byte_level()
    except (OSError, ValueError) as e:
        ap.error(f"--tokenizer {args.tokenizer}: {e}")
    args.device = "cpu" if args.dry or not torch.cuda.is_available() else "cuda"
    return args, presets, [int(s) for s in stages], tok


def main(argv=None) -> dict:
    args, presets, stages, tok = arguments(argv)
    budget = Budget(args.budget)
    if args.dry:  # tiny ops: a second thread only waits for the first, and for a core when the machine is busy
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else ""
    peak = train.peak_flops(name, args.peak_tflops) or (1e12 if args.dry else None)  # dry: nominal
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    result = {"env": environment(args, args.device, peak), "rows": [], "complete": False, "elapsed_s": 0.0}
    try:
        check = {"preset": "-", "stage": "-", "errors": {}}
        result["packed_attention"] = guarded(check, "packed attention", budget,
                                             lambda: packed_attention_check(args.device)) or check["errors"]
        for stage in stages:
            for preset in presets:
                row = {f: None for f in ROW_FIELDS} | {"preset": preset, "stage": stage, "errors": {}}
                sources = guarded(row, "models", budget, lambda: random_sources(preset, work, tok, args.dry))
                row = check_stage(args, preset, stage, sources, work, budget, peak) if sources else row
                result["rows"].append(row)
                result["elapsed_s"] = budget.elapsed()
                write(out, result)
                gc.collect()
                torch.cuda.empty_cache() if args.device == "cuda" else None
        result["complete"] = True
    finally:  # an interrupted run still leaves its rows
        result["elapsed_s"] = budget.elapsed()
        write(out, result)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
