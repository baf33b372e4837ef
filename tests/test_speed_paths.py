"""The fast paths against the plain one: a bf16 autocast step against fp32, a compiled step against eager (CPU
inductor), which dtype each device gets by default, and bench/gpu_check.py end to end in its CPU dry mode."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op). Measured on this batch: the loss within 3e-5, each
# gradient within 1e-2 of its norm; the bounds are ~7x and 3x that. A log-softmax in bf16 instead of fp32 moves the
# loss by 4e-4 and fails. A gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift shared by a
# whole row) is rounding noise in both dtypes, hence the floor of 1e-3 of the total gradient norm.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 2e-4, 3e-2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_stage(tmp_path, stage: int, *flags):
    """The tiny preset's VLM for `stage` (made trainable as train.py makes it) and one batch of 2 x 300 tokens."""
    cfg = train.parse_config(["--runs-dir", str(tmp_path / "runs"), "--stage", str(stage), *flags])
    rt = train.Runtime("cpu", 0, 1, None, False)
    vlm = train.stage_model(cfg, rt, tmp_path / "out")[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 300), generator=g)
    n_img = vlm.n_image_tokens(cfg.image_size)
    ids[:, 4:4 + n_img] = vlm.image_token_id
    weights = torch.zeros(2, 300)
    weights[:, 150:] = 1.0  # the answers: the second half
    batch = dict(ids=ids, pixels=torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g), weights=weights,
                 n_supervised=int((weights[:, 1:] > 0).sum()))
    return cfg, vlm, batch


def grads(vlm) -> dict:
    return {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_step_matches_fp32(tmp_path, stage):
    """train.py's step (forward_backward) under bf16 autocast against fp32 on the same weights and batch."""
    _, vlm, batch = tiny_stage(tmp_path, stage)
    twin = copy.deepcopy(vlm)
    loss32 = float(train.forward_backward(vlm, vlm, [batch], train.Runtime("cpu", 0, 1, None, False))[0])
    loss16 = float(train.forward_backward(twin, twin, [batch], train.Runtime("cpu", 0, 1, torch.bfloat16, False))[0])
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32), (loss16, loss32)
    g32, g16 = grads(vlm), grads(twin)
    assert g32.keys() == g16.keys() and g32
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in g32.values()]))
    for name, g in g32.items():
        err = (g16[name].float() - g).norm()
        assert err <= BF16_GRAD_RTOL * (g.norm() + 1e-3 * total), (name, float(err), float(g.norm()))


def test_compiled_step_matches_eager(tmp_path):
    """train.prepare with --compile on compiles every ViT and LLM block (CPU inductor here); one step of the compiled
    model gives the eager loss and gradients (fp32: only the kernels' summation order differs)."""
    cfg, vlm, batch = tiny_stage(tmp_path, 3, "--compile", "on")
    eager = copy.deepcopy(vlm)
    rt = train.Runtime("cpu", 0, 1, None, True)
    model, _, _ = train.prepare(vlm, cfg, rt, tmp_path / "out")
    assert all(b._compiled_call_impl is not None for b in list(vlm.vit.blocks) + list(vlm.lm.model.layers))
    loss = float(train.forward_backward(model, vlm, [batch], rt)[0])
    ref = float(train.forward_backward(eager, eager, [batch], rt)[0])
    assert loss == pytest.approx(ref, rel=1e-5)
    g, g_ref = grads(vlm), grads(eager)
    assert g.keys() == g_ref.keys() and g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_is_bf16_where_the_cpu_has_it(monkeypatch, native):
    """No flag: the tiny stage 3 and the small preset train in bf16 autocast on a CPU with native bf16, fp32 else."""
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: native)
    for argv in (["--stage", "3"], ["--preset", "small", "--stage", "3"]):
        rt = train.setup_runtime(train.parse_config(argv + ["--device", "cpu"]))
        assert rt.amp_dtype == (torch.bfloat16 if native else None)
        assert not rt.compile  # compilation is opt-in on CPU
    rt = train.setup_runtime(train.parse_config(["--stage", "3", "--device", "cpu", "--dtype", "fp32"]))
    assert rt.amp_dtype is None


def test_gpu_check_dry_run_end_to_end(tmp_path):
    """The prepared GPU check, as a command, on CPU with tiny shapes: both files, every field of every row, no error."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--steps", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "small stage 3: eager" in out.stdout  # progress lines
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["complete"] and result["env"]["dry"]
    assert [(r["preset"], r["stage"]) for r in result["rows"]] == [(p, s) for s in (3, 1, 2) for p in ("small", "base")]
    for row in result["rows"]:
        assert row["errors"] == {}, row["errors"]
        assert set(row) == set(gpu_check.ROW_FIELDS)
        assert all(row[f] is not None for f in gpu_check.ROW_FIELDS if f != "first_oom_batch"), row
        for mode in ("eager", "compiled"):
            assert set(row[mode]) == set(gpu_check.MODE_FIELDS)
            assert all(row[mode][f] is not None for f in gpu_check.MODE_FIELDS), row[mode]
            assert row[mode]["attention"] == ["flash"]  # the CPU's flash kernel, inside the restricted context
        assert row["losses_agree"] and row["max_batch_24gb"] == 2 and row["first_oom_batch"] is None  # no cap on CPU
    packed = result["packed_attention"]  # --pack's path against the dense mask (bf16: rounding only)
    assert packed["kernels"]["packed"] == ["flash"] and packed["out_rel_diff"] < 1e-3 and packed["grad_rel_diff"] < 3e-2
    assert len(result["targets"]) == 3 and all(t["value"] is not None for t in result["targets"].values())
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| small |") == 3 and table.count("\n| base |") == 3 and "Targets: " in table


def test_gpu_check_records_errors_and_skips_instead_of_stopping(tmp_path, monkeypatch, capsys):
    """A measurement that raises is recorded as its message and the others still run; past the time budget the
    remaining measurements are recorded as skipped, and both files are written either way."""
    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(gpu_check, "largest_batch", boom)
    result = gpu_check.main(["--dry", "--presets", "small", "--stages", "3", "--steps", "1", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["errors"] == {"max_batch": "RuntimeError: boom"}
    assert row["eager"] and row["compiled"] and row["loader_keeps_up"] is not None
    assert "boom" in (tmp_path / "gpu_check.md").read_text()

    result = gpu_check.main(["--dry", "--presets", "small", "--stages", "3", "--budget", "0", "--out", str(tmp_path)])
    assert result["rows"][0]["errors"] == {"models": "skipped: the 0 s budget was spent"}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["complete"]


def test_gpu_check_refuses_the_math_kernel_and_names_the_kernel_that_ran():
    """gpu_check's steps run inside fast_attention(): an SDPA call only the math kernel can run (dropout, here on the
    CPU; a masked GQA call on CUDA) raises instead of running in O(T^2) memory. attention_kernels reads which kernel
    a step used off the profiler."""
    import torch.nn.functional as F
    q = torch.randn(1, 2, 8, 4)
    F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # unrestricted: the math kernel takes it
    with pytest.raises(RuntimeError, match="No available kernel"), gpu_check.fast_attention():
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    with gpu_check.fast_attention():
        assert gpu_check.attention_kernels(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)) == ["flash"]
    assert gpu_check.attention_kernels(lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)) == ["math"]


def test_gpu_check_memory_cap_and_oom():
    """The batch search's cap is the card's usable memory (22.5 GiB on a 24 GB L4) with what the allocator does not
    see (the CUDA context) taken off first; cuBLAS's failed workspace allocation is an out-of-memory too."""
    gib = gpu_check.GIB
    total, context = int(23.6 * gib), int(0.5 * gib)
    frac = gpu_check.allocator_fraction(22.5, total, free=total - context - gib, reserved=gib)
    assert frac * total == pytest.approx(22.0 * gib)
    assert gpu_check.allocator_fraction(80.0, total, total, 0) == 1.0
    assert gpu_check.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert gpu_check.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not gpu_check.is_oom(RuntimeError("shape mismatch"))


def test_documented_train_commands_parse(capsys):
    """Every `python train.py ...` line in README.md, BENCHMARKS.md, docs/**/*.md and train.py's docstring is a valid
    command (a stale flag such as --compile default once sat in BENCHMARKS.md). A --data path that is not on this
    machine is the one refusal allowed: the command names data the reader makes first. The other scripts' commands:
    tests/test_docs.py."""
    import re
    import shlex

    commands = []
    docs = ["README.md", "BENCHMARKS.md", "train.py", *(p.relative_to(ROOT) for p in sorted(ROOT.glob("docs/**/*.md")))]
    for doc in docs:
        text = (ROOT / doc).read_text().replace("\\\n", " ")  # a command continued with `\` on the next line
        for m in re.finditer(r"(?<![\w/])train\.py((?: +--?[\w-]+(?: +(?!--)[\w./:,-]+)?)*)", text):
            if "--help" not in m.group(1):
                commands.append((doc, m.group(1)))
    assert len(commands) >= 8, commands
    for doc, flags in commands:
        try:
            train.parse_config(shlex.split(flags))
        except SystemExit:
            if "no such dataset file or directory" not in capsys.readouterr().err:
                pytest.fail(f"{doc}: `train.py{flags}` does not parse")
