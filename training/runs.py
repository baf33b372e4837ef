"""
A training run on disk: train.py's stage directories and resumable checkpoints, safetensors and JSON only (no pickle).

    runs/<name>/base/                     random encoder / LLM of a preset that has no weights (tiny), made once
    runs/<name>/stage<k>/config.json      the resolved Config, `sources` (where the frozen parts come from), `init`
                                          (the stage dir this one started from), `base_vision` (the encoder before
                                          stage 3, for eval.py) -- written last: its presence marks a finished stage
    runs/<name>/stage<k>/model.safetensors   exactly the tensors this stage trained, named as in VLM.named_parameters
    runs/<name>/stage<k>/checkpoints/step_000100/   model.safetensors, optimizer.safetensors, state.json: everything
                                          an exact resume needs (weights, AdamW moments, step, RNG); the last k kept
    runs/<name>/stage3/vision/            the boosted encoder, which load_vit reads
    runs/<name>/stage<k>/metrics.jsonl    one JSON line per logged step
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from attention import DualChannelAttention, LoRALinear, add_dual_channel, add_lora
from storage.atomic import write_text_atomically
from storage.tensors import listed, save_tensors, state_diff, write_model_dir


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
        init = json.loads(cfg_file.read_text()).get("init")
        d = Path(init) if init else None
    return chain[::-1]


def load_stage_weights(vlm, stage_dir: Path) -> None:
    """Apply the tensors a finished stage trained; dual-channel (or LoRA) tensors wrap the encoder first."""
    state = load_file(Path(stage_dir) / "model.safetensors")
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


def save_stage(out_dir: Path, vlm, cfg, sources: dict, init: Path | None, master: bool = True) -> None:
    """Trained tensors, then config.json (last: it marks the stage done). All ranks gather shards; the master writes."""
    state = trained_state(vlm)
    if not master:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(state, out_dir / "model.safetensors")
    meta = {"stage": cfg.stage, "config": dataclasses.asdict(cfg), "sources": sources,
            "init": str(init) if init else None, "base_vision": sources["vision"]}
    write_text_atomically(out_dir / "config.json", json.dumps(meta, indent=2))


RESUME_KEYS = ("stage", "seed", "global_batch", "batch_size", "data", "data_size", "max_steps", "epochs", "lr",
               "gate_lr", "projector_lr", "warmup_frac", "shuffle_images", "vision_tune", "pack", "max_len")


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    return steps[-1] if steps else None


def save_checkpoint(out_dir: Path, step: int, vlm, opt, cfg, keep_last: int = 2, master: bool = True) -> Path:
    """Trainable weights, AdamW state by parameter name, step and RNG; older checkpoints beyond keep_last go.
    Every rank calls it (shards are gathered); the master writes."""
    path = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    params = trained_state(vlm)
    name_of = {id(p): n for n, p in vlm.named_parameters() if p.requires_grad}
    moments = {f"{name_of[id(p)]}::{key}": gathered(value.detach()).reshape(-1 if key == "step" else value.shape)
               for p, st in opt.state.items() for key, value in st.items()}  # step, exp_avg, exp_avg_sq
    if master:
        rng = {"rng::cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["rng::cuda"] = torch.cuda.get_rng_state()
        state = {"step": step, "config": {k: getattr(cfg, k) for k in RESUME_KEYS}}
        write_model_dir(path, params, {"state.json": state},
                        lambda tmp: save_tensors({**moments, **rng}, tmp / "optimizer.safetensors"))
        for old in sorted(path.parent.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(path: Path, vlm, opt, cfg) -> int:
    """Restore what save_checkpoint wrote; returns the step to continue from."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items() if getattr(cfg, k) != v}
    if changed:
        raise ValueError(f"{path}: cannot resume exactly with a different " + ", ".join(
            f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in changed.items()))
    weights = load_file(path / "model.safetensors")
    params = {n: p for n, p in vlm.named_parameters() if p.requires_grad}
    missing, unexpected, _ = state_diff({k: p.shape for k, p in params.items()}, weights)
    if missing or unexpected:
        raise KeyError(f"{path}/model.safetensors: trainable tensors differ from this run's: missing "
                       f"[{listed(missing)}], unexpected [{listed(unexpected)}]")
    extra = load_file(path / "optimizer.safetensors")
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
    return state["step"]
