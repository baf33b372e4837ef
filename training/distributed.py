"""
Processes and devices for train.py: the process group, DDP or FSDP2 around the VLM, AdamW, gradient clipping over
replicated and sharded tensors, and the compute dtype a GPU supports.

    rank, world = init_process_group("cuda")       # under torchrun: set_device first, then NCCL bound to it
    model = wrap(vlm, True, "cuda", world)          # FSDP2: every LLM block, then the whole VLM as the root
    opt = adamw(param_groups, lr, device="cuda")    # fused where the device has it and the groups allow it

FSDP2 shards each LLM block and then the VLM itself: the root holds the embedding, the final norm, the projector
and the encoder, so every parameter is a DTensor shard (fused AdamW refuses a group that mixes plain tensors and
DTensors), the blocks are resharded after their forward and prefetched in backward (a block that is its own root is
never resharded: all of them would stay gathered).
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def init_process_group(device: str) -> tuple[int, int]:
    """-> (rank, world) under torchrun, (0, 1) otherwise. CUDA: the process's GPU is set before NCCL starts and
    NCCL is bound to it (device_id), so no rank opens a context on GPU 0 and collectives start eagerly."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if device == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def gpu_amp_dtype(requested: str) -> torch.dtype | None:
    """The autocast dtype on this GPU: bf16 where it has bf16 (Ampere and later). Without it (Turing, e.g. a 24 GB
    Titan RTX), --dtype auto trains in fp32 and --dtype bf16 is refused: fp16 would need loss scaling and the LLM
    checkpoints' bf16 range, so it is not offered."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return None if requested == "fp32" else torch.bfloat16
    if requested == "bf16":
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name()} has no bf16 support (compute capability < "
                         f"8.0); use --dtype fp32 (or auto, which falls back to fp32 here)")
    if requested == "auto":
        print(f"WARNING: {torch.cuda.get_device_name()} has no bf16: training in fp32 (slower, twice the memory)")
    return None


def wrap(vlm: nn.Module, fsdp: bool, device: str, world: int) -> nn.Module:
    """The module the loop calls: the VLM sharded by FSDP2 (blocks, then the root), or in DDP, or itself."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in vlm.lm.model.layers:
            fully_shard(layer)  # resharded after its forward, gathered again (prefetched) in backward
        fully_shard(vlm)  # the root: embedding, norm, projector, encoder; it drives the blocks' prefetching
        return vlm
    if world > 1:
        return nn.parallel.DistributedDataParallel(
            vlm, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    return vlm


def adamw(groups: list[dict], lr: float, device: str) -> torch.optim.Optimizer:
    """Fused on CUDA: one kernel for all tensors (tests/test_gpu_paths.py forces it on the CPU, which has it too)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device == "cuda")


def clip(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the trainable tensors (all plain, or all FSDP2 shards) -> the total norm, a plain
    tensor on the device (no host sync here)."""
    norm = nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x
