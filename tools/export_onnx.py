"""
An encoder to ONNX, so that people who use DINOv2 features outside this repo can try a boosted one (issue 16).

    python tools/export_onnx.py /work/main/runs/b15-boost-s1/stage3/vision runs/boosted-s1.onnx
    python tools/export_onnx.py weights/dinov2-s14 runs/dinov2-s14.onnx --size 224 [--static --batch 1] [--no-check]

Input: any directory `model.load_vit` reads (an HF DINOv2 / DINOv2-with-registers / DINOv3 / SigLIP / SigLIP2 dir, or
our own export, a stage-3 dual-channel encoder included: σ(a)·Attn(x) + (1−σ(a))·Attn+(x) runs inside the graph).
The graph, in HF's (and optimum's) names:

    pixel_values       float32 (batch, 3, H, W), normalized as model.preprocess does (DINO: ImageNet mean/std)
    last_hidden_state  float32 (batch, T, D), every token after the final norm, as ViT.forward returns them:
                       DINO [CLS, registers..., patches in row-major order], SigLIP [patches]
    pooler_output      float32 (batch, D), as ViT.pool: the normed CLS (DINO), the attention-pool head (SigLIP)

batch, H and W are dynamic (the position table is resized in the graph, as DINOv2 interpolates it; DINOv3's RoPE is
computed in the graph); H and W must be multiples of the patch size, which the graph does not check. --static fixes
(batch, 3, size, size). The model's config (patch size, mean/std, token layout) is in the file's metadata_props.

Feeding it (the repo's preprocessing; outside the repo: resize to size x size bicubic, /255, (x - mean) / std):

    import onnxruntime as ort
    from PIL import Image
    from model import ViTConfig, preprocess
    x = preprocess(Image.open("photo.jpg"), ViTConfig(), size=224).numpy()  # (1, 3, 224, 224)
    tokens, cls = ort.InferenceSession("runs/boosted-s1.onnx").run(None, {"pixel_values": x})
    patches = tokens[:, 1:].reshape(1, 16, 16, -1)  # DINOv2-S/14 at 224 px: 1 CLS + 16 x 16 patches

Exporter: torch.export + onnxscript (`torch.onnx.export(dynamo=True)`), opset 18. The TorchScript exporter
(dynamo=False) has no antialiased resize (DINOv2-with-registers and SigLIP2 resize their tables with one) and is
deprecated. The check compares the ONNX graph in onnxruntime with the PyTorch model on the same inputs (fp32).
"""

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import DualChannelAttention  # noqa: E402
from data import at_least  # noqa: E402
from model import ViT, load_vit, preprocess  # noqa: E402
from storage.atomic import write_file_atomically  # noqa: E402

OPSET = 18  # the dynamo exporter's own; onnxruntime 1.32 runs it
TOL = 1e-4  # max abs difference, fp32, ONNX Runtime vs PyTorch
INSTALL = "pip install -r requirements-onnx.txt"


def _need(module: str):
    """Import an optional package, or stop with the line that installs it."""
    try:
        return __import__(module)
    except ImportError as e:
        raise SystemExit(f"ONNX export needs {module!r}, which is not installed: {INSTALL}") from e


class OnnxEncoder(nn.Module):
    """What the graph computes: pixel_values (B, 3, H, W) -> (last_hidden_state (B, T, D), pooler_output (B, D))."""

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values):
        tokens = self.vit(pixel_values)  # (B, T, D)
        return tokens, self.vit.pool(tokens)


def example_input(vit: ViT, size: int, batch: int, static: bool):
    """The input the exporter traces. A dynamic graph is traced on a non-square image (one patch wider) and batch 2:
    a square trace would tie H to W, batch 1 would fix the batch, and a grid equal to the table's would skip its
    resize (ViT._positions)."""
    p = vit.cfg.patch_size
    if size % p:
        raise ValueError(f"--size {size} is not a multiple of the patch size {p}")
    return torch.randn(batch, 3, size, size) if static else torch.randn(2, 3, size, size + p)


def export(vit: ViT, out, size: int | None = None, static: bool = False, batch: int = 1, opset: int = OPSET):
    """Write `vit` as an ONNX file at `out` (see the module docstring for inputs and outputs). Returns the path."""
    _need("onnxscript")
    from torch.export import Dim

    cfg, out = vit.cfg, Path(out)
    size = size or cfg.image_size
    x = example_input(vit, size, batch, static)
    dynamic = None
    if not static:  # H and W as patch counts times the patch size: the exporter then knows they divide
        hp, wp = Dim("h_patches", min=1, max=1024), Dim("w_patches", min=1, max=1024)
        dynamic = {"pixel_values": {0: Dim("batch", min=1, max=65536), 2: cfg.patch_size * hp,
                                    3: cfg.patch_size * wp}}
    if any(p.dtype != torch.float32 for p in vit.parameters()):
        raise ValueError("export an fp32 encoder (load_vit(path, dtype=torch.float32)): the check is fp32")
    model = OnnxEncoder(vit).eval()  # eval() reaches the ViT too
    # torch.onnx logs a warning per torchvision op it cannot register; none of them is in a ViT
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # inside torch.export
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                    input_names=["pixel_values"], output_names=["last_hidden_state", "pooler_output"],
                                    verbose=False)
    dual = any(isinstance(m, DualChannelAttention) for m in vit.modules())
    meta = {"family": cfg.family, "patch_size": cfg.patch_size, "image_size": size, "mean": list(cfg.mean),
            "std": list(cfg.std), "cls_token": cfg.cls_token, "n_registers": cfg.n_registers,
            "dual_channel": dual, "dynamic": not static}
    program.model.metadata_props.update({f"spatialboost.{k}": json.dumps(v) for k, v in meta.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(p.numel() * p.element_size() for p in vit.parameters())
    if nbytes > 1.5e9:  # protobuf's 2 GB limit: the weights go to a file beside it, named after it (no rename)
        program.save(out, external_data=True)
    else:
        write_file_atomically(out, lambda tmp: program.save(tmp, external_data=False))
    return out


def session(path, threads: int = 1):
    """An onnxruntime CPU session on `threads` threads."""
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_inputs(vit: ViT, size: int, batch: int, static: bool) -> list[torch.Tensor]:
    """Normalized pixels to compare on: random photos through model.preprocess at the export size, and for a dynamic
    graph also a non-square size with another grid, and the table's own grid (where the resize is an identity)."""
    g = torch.Generator().manual_seed(0)
    photos = torch.randint(0, 256, (batch, 3, size + 37, size - 11), dtype=torch.uint8, generator=g)
    inputs = [preprocess(photos, vit.cfg, size=size)]
    if not static:
        p, n = vit.cfg.patch_size, size // vit.cfg.patch_size
        inputs.append(torch.randn(batch + 1, 3, p * max(1, n - 3), p * (n + 2), generator=g))
        if vit.cfg.pos_grid:
            inputs.append(torch.randn(1, 3, p * vit.cfg.pos_grid, p * vit.cfg.pos_grid, generator=g))
    return inputs


def max_abs_diff(vit: ViT, sess, pixels: torch.Tensor) -> dict:
    """Max abs difference of each output, ONNX Runtime vs PyTorch, on the same pixels (B, 3, H, W)."""
    with torch.no_grad():
        ref = OnnxEncoder(vit)(pixels.float())
    got = sess.run(None, {"pixel_values": pixels.float().numpy()})
    names = [o.name for o in sess.get_outputs()]
    diffs = {}
    for name, a, b in zip(names, got, ref):
        if a.shape != tuple(b.shape):
            raise ValueError(f"{name}: ONNX gives shape {a.shape}, PyTorch {tuple(b.shape)}")
        diffs[name] = float(np.abs(a - b.numpy()).max())
    return diffs


def check(vit: ViT, path, size: int | None = None, batch: int = 1, static: bool = False, tol: float = TOL) -> float:
    """Run the ONNX file and the PyTorch model on check_inputs; print each difference, return the largest, and raise
    ValueError when it exceeds `tol`."""
    size, sess, worst = size or vit.cfg.image_size, session(path), 0.0
    for pixels in check_inputs(vit, size, batch, static):
        diffs = max_abs_diff(vit, sess, pixels)
        print(f"  {tuple(pixels.shape)}: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in diffs.items()))
        worst = max(worst, *diffs.values())
    if not worst <= tol:  # `not <=` also catches NaN
        raise ValueError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.2e} > {tol:.0e}")
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description="export an encoder (any dir load_vit reads) to ONNX and check it")
    ap.add_argument("encoder", help="encoder directory: HF DINOv2/DINOv3/SigLIP(2) or a save_vit / stage-3 export")
    ap.add_argument("out", help="output .onnx file")
    ap.add_argument("--size", type=at_least(1), default=None, help="image side to trace and check at (default: "
                    "config)")
    ap.add_argument("--static", action="store_true", help="fix (batch, 3, size, size) instead of dynamic shapes")
    ap.add_argument("--batch", type=at_least(1), default=1, help="batch of a --static graph, and of the check")
    ap.add_argument("--opset", type=at_least(1), default=OPSET)
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime comparison")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir() and out.parent.exists():
        ap.error(f"out {out}: {'a directory' if out.is_dir() else f'{out.parent} is not a directory'}; expected "
                 "a .onnx file path")
    try:
        vit = load_vit(args.encoder, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"export_onnx: encoder {args.encoder}: {e}") from e
    size = args.size or vit.cfg.image_size
    t0 = time.perf_counter()
    # exported and checked beside `out`, moved over it only once it passed: a failure leaves the old file as it was
    big = sum(p.numel() * p.element_size() for p in vit.parameters()) > 1.5e9  # its weights' file is named after it
    tmp = out if big else out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        export(vit, tmp, size, args.static, args.batch, args.opset)
        mb = sum(f.stat().st_size for f in tmp.parent.glob(tmp.name + "*")) / 2**20
        shape = f"static {(args.batch, 3, size, size)}" if args.static else "dynamic batch, H, W"
        print(f"{args.encoder} -> {out}: {mb:.1f} MiB in {time.perf_counter() - t0:.1f} s ({shape}, opset "
              f"{args.opset})")
        if args.check:
            worst = check(vit, tmp, size, args.batch, args.static)
            print(f"parity: max abs diff {worst:.2e} <= {TOL:.0e}")
        os.replace(tmp, out)
    finally:
        if tmp != out:
            tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
