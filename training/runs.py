"""
A training run on disk: train.py's stage directories and resumable checkpoints, safetensors and JSON only (no pickle),
and what the loop does to them: claim a stage dir (claim_stage_dir), resume it exactly (resume), keep its metrics
rows (metric_rows, written by metrics_writer), and stop on a non-finite step (nonfinite_stop).

    runs/<name>/base/                     random encoder / LLM of a preset that has no weights (tiny), made once
    runs/<name>/stage<k>/config.json      the resolved Config, `sources` (where the frozen parts come from), `init`
                                          (the stage dir this one started from), `base_vision` (the encoder before
                                          stage 3, for eval.py) -- written last, after the export, and removed before
                                          the stage's files are rewritten: its presence marks a finished stage
    runs/<name>/stage<k>/model.safetensors   exactly the tensors this stage trained, named as in VLM.named_parameters
    runs/<name>/stage<k>/checkpoints/step_000100/   model.safetensors, optimizer.safetensors, state.json: everything
                                          an exact resume needs (weights, AdamW moments, step, RNG, the config); the
                                          last k by step number kept
    runs/<name>/stage<k>/checkpoints/nonfinite_step_000100/   a checkpoint whose weights gave a non-finite loss, set
                                          aside by the NaN guard (kept for inspection, never resumed from)
    runs/<name>/stage<k>/stopped.json     written by the NaN guard: where and why it stopped; until the stage
                                          finishes, --resume may change the learning rates (RECOVERY_KEYS)
    runs/<name>/stage3/vision/            the boosted encoder, which load_vit reads
    runs/<name>/stage<k>/metrics.jsonl    one JSON line per logged step
    runs/<name>/stage<k>/data.json        each data source's file, size and sha256 when the run began: a resume
                                          refuses data that changed since
    runs/<name>/stage<k>/.lock            held (flock) by the run writing the stage: a second one is refused; the
                                          holder's death releases it
"""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from attention import DualChannelAttention, LoRALinear, add_dual_channel, add_lora
from storage.atomic import Busy, hold_lock, named, read_json, remove_stale_temporaries, write_text_atomically
from storage.tensors import listed, load_safetensors, save_tensors, state_diff, write_model_dir


def stage_chain(stage_dir: Path) -> list[Path]:
    """The stage dirs a model is made of, oldest first: follow each config.json's `init` back to the first."""
    chain, seen, d = [], set(), Path(stage_dir)
    while d is not None:
        cfg_file = d / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{d}: not a finished stage (no config.json)")
        if d.resolve() in seen:
            raise ValueError(f"{d}: the chain of `init` links loops")
        seen.add(d.resolve())
        chain.append(d)
        init = read_json(cfg_file).get("init")
        d = Path(init) if init else None
    return chain[::-1]


def load_stage_weights(vlm, stage_dir: Path) -> None:
    """Apply the tensors a finished stage trained; dual-channel (or LoRA) tensors wrap the encoder first."""
    state = load_safetensors(Path(stage_dir) / "model.safetensors")
    if any(".attn_plus." in k for k in state) and not any(isinstance(m, DualChannelAttention) for m in vlm.modules()):
        add_dual_channel(vlm.vit)
    lora_a = [v for k, v in state.items() if k.endswith(".lora_a")]
    if lora_a and not any(isinstance(m, LoRALinear) for m in vlm.modules()):
        add_lora(vlm.vit, rank=lora_a[0].shape[0])
    own = dict(vlm.named_parameters())
    _, unknown, bad = state_diff({k: p.shape for k, p in own.items()}, state)  # a stage trains only some tensors
    if unknown or bad:
        raise KeyError(f"{stage_dir}/model.safetensors does not fit this model: unknown [{listed(unknown)}] "
                       f"mis-shaped [{listed([f'{k}: {a} vs {b}' for k, a, b in bad])}]")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 shards (DTensors) are gathered, which is a collective every rank must enter."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `param` is: sharded again when param is an FSDP2 shard."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def trained_state(vlm) -> dict:
    """The trainable tensors, gathered in full (call on every rank)."""
    return {n: gathered(p.detach()) for n, p in vlm.named_parameters() if p.requires_grad}


def save_stage(out_dir: Path, vlm, cfg, sources: dict, init: Path | None, master: bool = True, export=None) -> None:
    """Trained tensors, export(out_dir) (stage 3: the encoder), then config.json. config.json marks the stage done:
    the old one goes first and the new one comes strictly last, so that a crash anywhere in between leaves an
    unfinished stage, never a finished one whose files disagree. All ranks gather shards; the master writes."""
    state = trained_state(vlm)
    if not master:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)
    save_tensors(state, out_dir / "model.safetensors")
    if export is not None:
        export(out_dir)
    (out_dir / "stopped.json").unlink(missing_ok=True)
    meta = {"stage": cfg.stage, "config": dataclasses.asdict(cfg), "sources": sources,
            "init": str(init) if init else None, "base_vision": sources["vision"]}
    write_text_atomically(out_dir / "config.json", json.dumps(meta, indent=2))


# Config fields that change where or how fast a run goes, not what it computes: a resume may change them. Every other
# field is recorded in each checkpoint and must match on --resume.
NOT_COMPARED = ("name", "runs_dir", "resume", "workers", "device", "compile", "grad_ckpt", "fsdp", "save_every",
                "keep_last", "log_every", "wandb", "bench", "probe", "peak_tflops")
# after the NaN guard stopped a run (stopped.json), --resume may also change these: the way out it suggests
RECOVERY_KEYS = ("lr", "gate_lr", "projector_lr", "min_lr_frac", "warmup_frac", "grad_clip", "dtype")


def run_files(out_dir: Path) -> list[str]:
    """What of a run a stage dir already holds: a new run there would mix with it or overwrite it."""
    out_dir = Path(out_dir)
    names = [n for n in ("config.json", "model.safetensors", "metrics.jsonl", "stopped.json", "vision")
             if (out_dir / n).exists()]
    ckpts = checkpoints(out_dir)
    return names + ([f"checkpoints/ ({len(ckpts)}: steps {ckpts[0][0]}..{ckpts[-1][0]})"] if ckpts else [])


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """[(step, dir)] of the stage's resumable checkpoints, by step number (not by name: names outgrow their digits)."""
    found = [(re.fullmatch(r"step_(\d+)", p.name), p) for p in (Path(out_dir) / "checkpoints").glob("step_*")]
    return sorted((int(m[1]), p) for m, p in found if m and p.is_dir())


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def set_aside(ckpt: Path) -> Path:
    """A checkpoint whose weights gave a non-finite loss: renamed out of reach of --resume, kept for inspection."""
    to = ckpt.with_name("nonfinite_" + ckpt.name)
    shutil.rmtree(to, ignore_errors=True)
    os.replace(ckpt, to)
    return to


def stopped(out_dir: Path) -> dict | None:
    """What the NaN guard wrote when it stopped this stage (stopped.json), or None."""
    path = Path(out_dir) / "stopped.json"
    return read_json(path) if path.exists() else None


def mark_stopped(out_dir: Path, info: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(out_dir) / "stopped.json", json.dumps(info, indent=2))


def save_checkpoint(out_dir: Path, step: int, vlm, opt, cfg, keep_last: int = 2, master: bool = True) -> Path:
    """Trainable weights, AdamW state by parameter name, step, RNG and the config; then the oldest checkpoints go, by
    step number, so that keep_last remain (<= 0: all stay). Every rank calls it (shards are gathered); the master
    writes."""
    path = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    params = trained_state(vlm)
    name_of = {id(p): n for n, p in vlm.named_parameters() if p.requires_grad}
    moments = {f"{name_of[id(p)]}::{key}": gathered(value.detach()).reshape(-1 if key == "step" else value.shape)
               for p, st in opt.state.items() for key, value in st.items()}  # step, exp_avg, exp_avg_sq
    if master:
        rng = {"rng::cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["rng::cuda"] = torch.cuda.get_rng_state()
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_COMPARED}
        write_model_dir(path, params, {"state.json": {"step": step, "config": config}},
                        lambda tmp: save_tensors({**moments, **rng}, tmp / "optimizer.safetensors"))
        older = [p for s, p in checkpoints(out_dir) if s < step]  # never the one just written, nor a later one
        for old in older[:max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
            shutil.rmtree(old)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return path


def config_changes(path: Path, cfg, may_change=()) -> dict:
    """{key: (checkpoint's value, cfg's)} of the keys in `may_change` that differ from what the checkpoint at `path`
    recorded; any other difference in a compared field is a ValueError naming each key with both values."""
    recorded = read_json(Path(path) / "state.json")["config"]
    now = dataclasses.asdict(cfg)
    changed = {k: (v, now[k]) for k, v in recorded.items() if k in now and k not in NOT_COMPARED and now[k] != v}
    refused = {k: ab for k, ab in changed.items() if k not in may_change}
    if refused:
        raise ValueError(f"{path}: --resume continues a run exactly, but these settings differ from the checkpoint's: "
                         + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in refused.items())
                         + ". Resume with the checkpoint's values, or start a new run under another --name.")
    return changed


def load_checkpoint(path: Path, vlm, opt, cfg, may_change=()) -> tuple[int, dict]:
    """Restore what save_checkpoint wrote -> (the step to continue from, the allowed config changes made)."""
    path = Path(path)
    changed = config_changes(path, cfg, may_change)
    state = read_json(path / "state.json")
    weights = load_safetensors(path / "model.safetensors")
    params = {n: p for n, p in vlm.named_parameters() if p.requires_grad}
    missing, unexpected, _ = state_diff({k: p.shape for k, p in params.items()}, weights)
    if missing or unexpected:
        raise KeyError(f"{path}/model.safetensors: trainable tensors differ from this run's: missing "
                       f"[{listed(missing)}], unexpected [{listed(unexpected)}]")
    extra = load_safetensors(path / "optimizer.safetensors")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(sharded_like(weights[n].to(p.device), p))
    # rebuild AdamW's own state_dict (indexed by position in its param groups), so that load_state_dict puts each
    # tensor on the device and in the dtype the optimizer expects (e.g. `step` stays on the CPU unless fused)
    sd = opt.state_dict()
    name_of = {id(p): n for n, p in params.items()}
    order = [p for group in opt.param_groups for p in group["params"]]
    sd["state"] = {i: {k: extra[f"{name_of[id(p)]}::{k}"].reshape(()) if k == "step"
                       else sharded_like(extra[f"{name_of[id(p)]}::{k}"].to(p.device), p)
                       for k in ("step", "exp_avg", "exp_avg_sq")}
                   for i, p in enumerate(order) if f"{name_of[id(p)]}::exp_avg" in extra}
    opt.load_state_dict(sd)
    torch.set_rng_state(extra["rng::cpu"])
    if "rng::cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng::cuda"])
    return state["step"], changed


_LOCKS = {}  # stage dir -> the lock file this process holds (a second claim by the same process takes it over)


def lock_stage_dir(out_dir: Path) -> None:
    """Hold out_dir/.lock until release_stage_dir or this process's end (kill -9 included): a second run into the
    same stage dir is refused, naming the first."""
    release_stage_dir(out_dir)
    try:
        _LOCKS[str(Path(out_dir).resolve())] = hold_lock(Path(out_dir) / ".lock", "train.py")
    except Busy as e:
        raise Busy(f"{e}: two runs in one stage dir would mix their metrics, checkpoints and weights. Wait for it to "
                   "finish, or choose another --name") from None


def release_stage_dir(out_dir: Path) -> None:
    lock = _LOCKS.pop(str(Path(out_dir).resolve()), None)
    lock.close() if lock is not None else None


def resume_point(out_dir: Path, log=lambda *a: None) -> Path | None:
    """--resume: the latest checkpoint holding every file a resume reads (later ones missing one are passed over,
    said through log), or None for an unfinished stage without one (killed before its first, or none good before a
    non-finite stop: it starts over). Nothing to resume is a FileNotFoundError."""
    for _, ckpt in reversed(checkpoints(out_dir)):
        missing = [n for n in ("state.json", "model.safetensors", "optimizer.safetensors") if not (ckpt / n).is_file()]
        if not missing:
            return ckpt
        log(f"  WARNING: --resume: {ckpt} has no {', '.join(missing)}: falling back to the checkpoint before it")
    if (out_dir / "config.json").exists() or not ((out_dir / "metrics.jsonl").exists() or stopped(out_dir)):
        done = " (a finished stage saved without --save-every)" if (out_dir / "config.json").exists() else ""
        raise FileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}{done}: nothing to resume")
    return None


def claim_stage_dir(cfg, rt, out_dir: Path, prints: list | None = None) -> None:
    """Before the model is built: the stage dir locked (rank 0), what killed writers left there removed, a new run
    refused where another run is (it would silently mix with it or overwrite it), --resume refused when there is
    nothing to resume or the data (`prints`, preflight.fingerprints) is not what data.json says the run began on."""
    if cfg.bench:
        return

    def refuse(log):
        found = run_files(out_dir)
        if found and not cfg.resume:
            raise FileExistsError(f"{out_dir} already holds a run ({', '.join(found)}): a new run would mix with it "
                                  f"or overwrite it. Pass --resume to continue it, choose another --name, or delete "
                                  f"{out_dir} to start over.")
        return resume_point(out_dir, log) if cfg.resume else None
    refuse(lambda *a: None)  # before anything is written; again below, under the lock
    if rt.master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock_stage_dir(out_dir)
        except (FileExistsError, NotADirectoryError, PermissionError) as e:
            raise OSError(e.errno, f"--runs-dir {cfg.runs_dir}: cannot write the stage dir {out_dir} "
                                   f"({e.strerror})") from e
        for folder in (out_dir, out_dir / "checkpoints"):
            for p in remove_stale_temporaries(folder):
                rt.log(f"  removed {p}: left by a killed write")
    resuming, record = refuse(rt.log) is not None, out_dir / "data.json"
    if prints is None:
        return
    if resuming and record.exists():
        old, new = ({p["file"]: p["sha256"] for p in ps} for ps in (read_json(record)["sources"], prints))
        changed = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
        if changed:
            raise ValueError(f"--resume: the data is not what {out_dir} was trained on ({record}): {', '.join(changed)}"
                             " changed, came or went since the run began. Resuming would not continue the run: "
                             "restore the data, or start a new run under another --name.")
    elif resuming:
        rt.log(f"  WARNING: --resume: no {record} (a run from before it): the data cannot be checked")
    if rt.master and not (resuming and record.exists()):
        write_text_atomically(record, json.dumps({"sources": prints}, indent=1))


def resume(vlm, opt, cfg, rt, out_dir: Path) -> int:
    """--resume: the latest intact checkpoint restored -> its step. After the NaN guard stopped the run
    (stopped.json) the learning rates may change; an unfinished stage without a checkpoint (killed before its first)
    starts over."""
    stop, ckpt = stopped(out_dir), resume_point(out_dir)
    if ckpt is None:
        why = "none was good before the non-finite stop" if stop else "the run was killed before its first"
        rt.log(f"  --resume: {out_dir} has no checkpoint ({why}): starting over at step 0")
        return 0
    step, changed = load_checkpoint(ckpt, vlm, opt, cfg, may_change=RECOVERY_KEYS if stop else ())
    said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    rt.log(f"  resumed from {ckpt} at step {step}" + (f", after the non-finite stop (the weights after "
                                                      f"{stop['updates']} updates), with {said}" if changed else ""))
    return step


def metric_rows(path: Path, step: int, log) -> list[str]:
    """The lines of metrics.jsonl up to `step`. A torn last line (the run was killed while writing it) is dropped
    with a warning; anything else that is not a row is an error naming file:line."""
    lines, kept = path.read_text().splitlines(), []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError("expected a JSON object with an integer 'step'")
        except ValueError as e:  # JSONDecodeError is one
            if i == len(lines) and isinstance(e, json.JSONDecodeError):
                log(f"  WARNING: {path}:{i}: a torn last line (the run was killed while writing it), dropped")
                continue
            raise ValueError(f"{path}:{i}: not a metrics row ({e}): {line[:80]!r}") from e
        if row["step"] <= step:
            kept.append(line)
    return kept


def metrics_writer(cfg, rt, out_dir: Path, step: int):
    """-> write(row): a JSON line in metrics.jsonl (a resumed run keeps the rows up to its checkpoint, a new run
    none) and, with --wandb, a Weights & Biases row. Rank 0 only; nothing for --bench."""
    if not rt.master or cfg.bench:
        return lambda row: None
    path, wandb = out_dir / "metrics.jsonl", None
    kept = metric_rows(path, step, rt.log) if step and path.exists() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(r + "\n" for r in kept))
    if cfg.wandb:
        try:
            import wandb
            wandb.init(project="spatialboost", name=f"{cfg.name}-stage{cfg.stage}", config=dataclasses.asdict(cfg))
        except ImportError:
            rt.log("  --wandb: wandb is not installed; logging to metrics.jsonl only")

    def write(row: dict):
        try:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: name the file
            raise named(path, e) from e
        if wandb:
            wandb.log(row, step=row["step"])
    return write


def nonfinite_stop(cfg, rt, out_dir: Path, step: int, loss: float, grad_norm: float | None):
    """The NaN guard: the weights after `step` updates gave a non-finite loss or gradient. Their checkpoint, if one
    was written, is set aside; every checkpoint left was followed by a finite step, so the latest is good.
    stopped.json lets --resume change the learning rates. Raises on every rank."""
    bad, note = out_dir / "checkpoints" / f"step_{step:06d}", ""
    if rt.master and not cfg.bench:
        if bad.is_dir():
            note = f" The checkpoint holding those weights is set aside as {set_aside(bad)}."
        good = latest_checkpoint(out_dir)
        mark_stopped(out_dir, {"updates": step, "loss": loss, "grad_norm": grad_norm,
                               "resume_from": str(good) if good else None})
    if rt.world > 1:
        dist.barrier()
    good = latest_checkpoint(out_dir) if not cfg.bench else None
    where = (f"The last good checkpoint is {good} (the step after it was finite): --resume continues from it"
             if good else "No good checkpoint was written: --resume starts over at step 0")
    what = f" or gradient norm ({grad_norm}) in step {step + 1}" if grad_norm is not None else " in the final check"
    raise FloatingPointError(
        f"non-finite loss ({loss}){what}, with the weights after {step} updates; stopped without saving the "
        f"stage.{note} {where}. To go on with a lower rate, rerun the same command with --resume and a lower --lr "
        f"(after this stop --resume accepts new {', '.join('--' + k.replace('_', '-') for k in RECOVERY_KEYS)}; "
        f"each other setting must stay), or with --resume --dtype fp32.")
