"""
Train SpatialBoost's three stages.

    python train.py --stage 3                       # the tiny preset on built-in synthetic data, 2 CPU cores, minutes
    python train.py --stage 1 && python train.py --stage 2 && python train.py --stage 3     # the whole recipe
    python train.py --preset small --stage 3        # DINOv2-S/14 + SmolLM2-135M-Instruct from weights/
    torchrun --nproc_per_node 2 train.py --preset base --stage 2   # DDP (add --fsdp to shard the VLM: FSDP2)
    python train.py --stage 3 --bench 10            # samples/s, tokens/s, peak memory (and MFU on GPU)

Stage 1 trains the projector (ViT and LLM frozen), stage 2 the projector and the LLM, stage 3 the encoder's Attn+
clones, their gates and the projector with the LLM frozen (`--vision-tune` swaps the dual channel for the paper's
ablations: full fine-tuning, LoRA, or a frozen encoder; `dual-qk` trains only Attn+'s queries and keys). Each
stage writes runs/<name>/stage<k>/ and starts from the previous stage's directory. `python train.py --help` lists
every option; presets set defaults, flags override them.
"""

import argparse
import dataclasses
import functools
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from attention import Packed, merge_lora, tune_encoder
from evaluation.probes import ProbeConfig
from evaluation.suite import dual_channel_stats, quick_summary
from llm import LLM, LLMConfig, Tokenizer, load_llm, save_llm
from model import VLM, Projector, ViT, ViTConfig, load_vit, save_vit
from storage.atomic import read_json, repo_path
from training.dataset import ConversationDataset, LoaderReport, collate
from training.distributed import adamw, all_sum, clip, gpu_amp_dtype, init_process_group, wrap
from training.flag_help import flag_help
from training.flops import batch_flops, mfu, peak_flops
from training.preflight import (STAGE_DATA, check_init, data_sources, fingerprints, refusals,  # noqa: F401
                                stage_mix)
from training.runs import (claim_stage_dir, gathered, load_stage_weights, metrics_writer, nonfinite_stop,
                           release_stage_dir, resume, save_checkpoint, save_stage, stage_chain)
from training.teacher import MODES, DepthData, DepthTeacher, collate_depth


@dataclass
class Config:
    stage: int = 3  # 1: projector | 2: projector + LLM | 3: the boost (Attn+, gates, projector)
    preset: str = "tiny"  # tiny | small | base: defaults for everything below; flags override them
    name: str = ""  # run name: runs/<name>/stage<k>/ (default: the preset's name)
    runs_dir: str = "runs"  # where runs are written: <runs_dir>/<name>/stage<k>/
    init: str = ""  # the stage dir this stage starts from (default: runs/<name>/stage<k-1> when it exists)
    vision: str = ""  # encoder: HF-layout dir or our export; "" = a random ViT of the vit_* shape below
    llm: str = ""  # LLM: HF-layout dir or .gguf; "" = a random LLM of the llm_* shape with the byte-level tokenizer
    vit_dim: int = 64  # random ViT (no --vision): width
    vit_depth: int = 4  # random ViT: blocks
    vit_heads: int = 4  # random ViT: attention heads
    vit_patch: int = 8  # random ViT: patch size in pixels
    llm_dim: int = 128  # random LLM (no --llm): width
    llm_layers: int = 4  # random LLM: layers
    llm_heads: int = 4  # random LLM: attention heads
    image_size: int = 64  # images are resized (not cropped) to this square: normalized coordinates stay valid
    merge: int = 2  # projector merges merge x merge patches into one LLM token
    feature_layer: int = -1  # which ViT block the projector reads: 0 .. depth-1, or -depth .. -1 from the end
    projector_norm: bool = False  # RMS-normalize image tokens to the text embeddings' scale (model.Projector)
    point_tokens: bool = False  # follow each "(u, v)" in a question with a token of the image's features there
    #                             (model.VLM.embed); the stages of a run must agree (it adds a token to the vocabulary)
    vision_tune: str = "dual"  # stage 3's encoder training; dual-qk: only Attn+'s q/k (where tokens look, not what)
    lora_rank: int = 8  # rank of --vision-tune lora
    freeze_projector: bool = False  # stage 3: train only the encoder side
    shuffle_images: bool = False  # stage 3 control: each conversation is paired with another sample's image
    loss_on: str = "answers"  # which answer tokens carry the loss: every one (and the end of turn), or only those the
    #                           image decides (numbers not shown before, verdict and relation words, object names:
    #                           training/dataset.py's rule), so stage 3's gradient is not spent on the format
    teacher: str = "llm"  # stage 3's teacher: the frozen LLM (the method), or a linear depth head at the queried pixels
    #                       (depth-points) or at every pixel (depth-dense), no LLM loaded (training/teacher.py)
    teacher_data: str = ""  # a depth teacher's head is first fitted on these images, the encoder frozen (stage 2's
    #                         role: other images than stage 3's, or the head overfits them); "" = stage 3's --data
    system_prompt: str = "default"  # "default": the checkpoint's own; "none": no system turn; or the text
    data: str = ""  # dataset dirs or files (.jsonl, LLaVA .json), "dirA,b.json:0.5" (weights >= 0 mix them);
    #                 "" = data/<preset>/<stage kind>, made if absent
    images_outside_data: bool = False  # let --data records name images outside their file's folder (absolute, ../)
    data_size: int = 0  # use only the first N >= 0 samples (0: all): the dataset-size ablation
    order: str = "forward"  # turn order of generated spatial data (pixel -> object -> scene, or not)
    data_root: str = "data"  # where default data is generated: <data_root>/<preset>/<kind>
    gen_samples: int = 400  # samples to generate when the default data is absent
    max_len: int = 1024  # tokens per sample; whole trailing turns are dropped beyond it (and counted)
    pack: bool = False  # pack several samples per row (block-diagonal causal mask)
    workers: int = 0  # data-loader worker processes
    lr: float = 0.0  # 0: the stage's (1e-3, 2e-5, 1e-4; tiny random 3e-3, 1e-3, 1e-3); stage 3: Attn+ (or encoder/LoRA)
    gate_lr: float = 0.0  # stage 3: the gates' rate (0: 100 x lr): the gate's gradient is 0 at init, and Adam moves
    #                       it at most ~lr per step, so at the encoder's rate σ(a) stays at 1/2 in a short run
    projector_lr: float = 0.0  # stage 3: the projector's rate (0: lr / 10): format learning stays out of the encoder
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac, in [0, 1]
    warmup_frac: float = -1.0  # < 0: 3 % of the steps in stages 1-2 (LLaVA), 10 % in stage 3
    weight_decay: float = 0.0  # never on norms, biases, gates; >0 pulls Attn+ towards zero, not towards Attn
    grad_clip: float = 1.0  # > 0: the largest gradient norm (no clipping: a large value such as 1e6)
    batch_size: int = 4  # per micro-step and process
    global_batch: int = 8  # per optimizer step, over micro-steps and processes
    epochs: float = 1.0  # passes over the data, > 0
    max_steps: int = 0  # > 0 overrides epochs; 0: epochs decide
    seed: int = 1337  # training seed: initialisation, data order, the control's image pairing
    device: str = "auto"  # where to train; auto: CUDA when there is one
    dtype: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16 (avx512_bf16, AMX), else fp32
    compile: str = "auto"  # torch.compile; auto: on CUDA only; off: the fallback when compiling fails
    grad_ckpt: bool = False  # recompute activations of the ViT and the LLM in backward
    fsdp: bool = False  # shard the LLM with FSDP2 (with torchrun)
    save_every: int = 0  # steps between resumable checkpoints (0: only at the end)
    keep_last: int = 2  # >= 1 resumable checkpoints kept
    resume: bool = False  # continue from the stage's latest checkpoint
    log_every: int = 1  # steps between log lines, >= 1
    wandb: bool = False  # log to Weights & Biases when installed
    bench: int = 0  # >0: time this many steps and print throughput; nothing is written
    peak_tflops: float = 0.0  # the GPU's dense bf16 peak for MFU (0: training/flops.py's table by exact GPU name)
    probe: bool = True  # stage 3: end with a quick depth-probe summary, baseline vs boosted


STAGE_LR = {1: 1e-3, 2: 2e-5, 3: 1e-4}  # LLaVA-1.5 for stages 1 and 2

PRESETS = {
    "tiny": dict(max_len=3584, gen_samples=200),  # byte-level tokens: a 12-turn spatial sample is ~3.1K of them
    "small": dict(vision="weights/dinov2-s14", llm="weights/smollm2-135m-instruct", image_size=224, merge=2,
                  batch_size=4, global_batch=32, max_len=1536, gen_samples=2000, workers=2),
    "base": dict(vision="weights/dinov2-base", llm="weights/qwen2.5-0.5b-instruct", image_size=224, merge=2,
                 batch_size=16, global_batch=128, max_len=2048, gen_samples=50000, workers=8, grad_ckpt=True),
}
TINY_STAGE_LR = {1: 3e-3, 2: 1e-3, 3: 1e-3}  # random tiny models learn at larger rates
CHOICES = {"vision_tune": ("dual", "dual-qk", "full", "lora", "frozen"), "teacher": ("llm", *MODES),
           "order": ("forward", "reversed", "shuffled"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("auto", "fp32", "bf16"), "compile": ("auto", "on", "off"), "loss_on": ("answers", "image")}


def parse_config(argv=None) -> Config:
    """Defaults < preset < command line. Every field is a typed flag; booleans are --x / --no-x."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = flag_help(Config, CHOICES, PRESETS)  # from the comments beside Config's fields
    for f in dataclasses.fields(Config):
        flag, h = "--" + f.name.replace("_", "-"), helps[f.name]
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            ap.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=h)
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", Config.preset)
    if preset not in PRESETS:
        ap.error(f"--preset {preset!r}: choose from {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **args})
    cfg.name = cfg.name or cfg.preset
    if not cfg.lr:
        cfg.lr = (TINY_STAGE_LR if cfg.preset == "tiny" and not cfg.llm else STAGE_LR).get(cfg.stage, 1e-4)
    cfg.gate_lr = cfg.gate_lr or 100 * cfg.lr
    cfg.projector_lr = cfg.projector_lr or cfg.lr / 10
    if cfg.warmup_frac < 0:
        cfg.warmup_frac = 0.1 if cfg.stage == 3 else 0.03
    problems = validate(cfg)
    if problems:
        ap.error("; ".join(problems))
    return cfg


LEAST = {"vit_dim": 1, "vit_depth": 1, "vit_heads": 1, "vit_patch": 1, "llm_dim": 1, "llm_layers": 1, "llm_heads": 1,
         "image_size": 1, "merge": 1, "lora_rank": 1, "batch_size": 1, "global_batch": 1, "gen_samples": 1,
         "max_len": 16, "keep_last": 1, "log_every": 1, "data_size": 0, "max_steps": 0, "save_every": 0, "workers": 0,
         "bench": 0}  # int flags: the least value allowed
ZERO = {"data_size": "all samples", "max_steps": "--epochs decides", "save_every": "only at the end",
        "bench": "no benchmark, train"}  # what 0 means where it is allowed


def validate(cfg: Config) -> list[str]:
    """Every bad value as "--flag value: what is allowed" (parse_config makes them an argparse error). A loaded
    encoder's depth bounds --feature-layer only once it is loaded: build_base checks that."""
    flag = lambda k: f"--{k.replace('_', '-')} {getattr(cfg, k)!r}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    checks = [(cfg.stage in (1, 2, 3), f"--stage {cfg.stage}: must be 1, 2 or 3")]
    checks += [(getattr(cfg, k) in ok, f"{flag(k)}: {'|'.join(ok)}") for k, ok in CHOICES.items()]
    checks += [(getattr(cfg, k) >= least, f"{flag(k)}: must be >= {least}" + (f" (0: {ZERO[k]})" if k in ZERO else ""))
               for k, least in LEAST.items()]
    floats = [f.name for f in dataclasses.fields(Config) if f.type in (float, "float")]
    checks += [(math.isfinite(getattr(cfg, k)), f"{flag(k)}: must be a finite number") for k in floats]
    checks += [(min(cfg.lr, cfg.gate_lr, cfg.projector_lr) > 0,
                f"--lr {cfg.lr}, --gate-lr {cfg.gate_lr}, --projector-lr {cfg.projector_lr}: must be positive"),
               (cfg.grad_clip > 0, f"{flag('grad_clip')}: must be > 0, the largest gradient norm (no clipping: a "
                                   "large value such as 1e6)"),
               (cfg.epochs > 0, f"{flag('epochs')}: must be > 0"),
               (0 <= cfg.warmup_frac < 1, f"--warmup-frac {cfg.warmup_frac}: must be in [0, 1)"),
               (0 <= cfg.min_lr_frac <= 1, f"{flag('min_lr_frac')}: must be in [0, 1]"),
               (cfg.weight_decay >= 0, f"{flag('weight_decay')}: must be >= 0"),
               (cfg.peak_tflops >= 0, f"{flag('peak_tflops')}: must be >= 0 (0: the table's peak for the GPU)"),
               (not cfg.shuffle_images or cfg.stage == 3, "--shuffle-images is the stage-3 control"),
               (cfg.teacher == "llm" or (cfg.stage == 3 and not cfg.shuffle_images and cfg.vision_tune != "frozen"),
                f"--teacher {cfg.teacher}: a stage-3 teacher of a trainable encoder, without --shuffle-images (the "
                "llm teacher's control)"),
               (cfg.teacher != "llm" or not cfg.teacher_data, "--teacher-data: the depth head's data (--teacher "
                "depth-points or depth-dense)"),
               (cfg.teacher == "llm" or cfg.loss_on == "answers", "--loss-on image: the llm teacher's answers"),
               (cfg.vit_patch < 1 or cfg.image_size % cfg.vit_patch == 0 or bool(cfg.vision),
                f"--image-size {cfg.image_size} is not a multiple of --vit-patch {cfg.vit_patch}"),
               (cfg.batch_size < 1 or cfg.global_batch % (cfg.batch_size * world) == 0,
                f"--global-batch {cfg.global_batch}: must be a multiple of --batch-size {cfg.batch_size} x {world} "
                "process(es)"),
               (bool(cfg.vision) or -cfg.vit_depth <= cfg.feature_layer < cfg.vit_depth,
                f"--feature-layer {cfg.feature_layer}: the random ViT has --vit-depth {cfg.vit_depth} blocks; "
                f"expected {-cfg.vit_depth} .. {cfg.vit_depth - 1} (-1: the last)")]
    checks += [(bool(given) or dim % heads == 0, f"--{kind}-dim {dim} is not a multiple of --{kind}-heads {heads}")
               for kind, given, dim, heads in (("vit", cfg.vision, cfg.vit_dim, cfg.vit_heads),
                                               ("llm", cfg.llm, cfg.llm_dim, cfg.llm_heads)) if heads > 0]
    try:
        data_sources(cfg.data), data_sources(cfg.teacher_data)
    except (ValueError, FileNotFoundError) as e:
        checks.append((False, str(e)))
    return [msg for ok, msg in checks if not ok]


@dataclass
class Runtime:
    """Where this process trains: the device, its rank among `world` processes, the autocast dtype, compilation."""
    device: str
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    compile: bool
    master = property(lambda self: self.rank == 0)
    log = property(lambda self: print if self.rank == 0 else (lambda *a, **k: None))


def setup_device(cfg: Config) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def setup_runtime(cfg: Config) -> Runtime:
    device = setup_device(cfg)
    rank, world = init_process_group(device)
    if cfg.global_batch % (cfg.batch_size * world):
        raise ValueError(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} "
                         f"x {world} processes")
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node N")
    if device == "cuda":
        amp_dtype = gpu_amp_dtype(cfg.dtype)
    else:
        amp_dtype = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and cpu_has_bf16())) else None
    return Runtime(device, rank, world, amp_dtype, cfg.compile == "on" or (cfg.compile == "auto" and device == "cuda"))


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (avx512_bf16, AMX): bf16 autocast is ~1.6x faster there than fp32; emulated elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def base_sources(cfg: Config, run_dir: Path, log, write: bool = True) -> dict:
    """Where the encoder and LLM come from: their paths, or for a random model (the tiny preset) a copy saved in
    runs/<name>/base/ on first use, so that every stage and every process starts from the same weights."""
    sources = {k: given or str(run_dir / "base" / k) for k, given in (("vision", cfg.vision), ("llm", cfg.llm))}
    vit_dir, llm_dir = Path(sources["vision"]), Path(sources["llm"])
    if write and not cfg.vision and not (vit_dir / "config.json").exists():
        torch.manual_seed(cfg.seed)
        save_vit(ViT(ViTConfig(dim=cfg.vit_dim, depth=cfg.vit_depth, heads=cfg.vit_heads, mlp_dim=4 * cfg.vit_dim,
                               patch_size=cfg.vit_patch, image_size=cfg.image_size,
                               pos_grid=cfg.image_size // cfg.vit_patch)), vit_dir)
        log(f"random tiny ViT saved to {vit_dir}")
    if write and not cfg.llm and not (llm_dir / "config.json").exists():
        torch.manual_seed(cfg.seed)
        lc = LLMConfig(dim=cfg.llm_dim, n_layers=cfg.llm_layers, n_heads=cfg.llm_heads, vocab_size=len(
            Tokenizer.byte_level()), n_kv_heads=max(1, cfg.llm_heads // 2), ffn_dim=int(2.75 * cfg.llm_dim))
        save_llm(LLM(lc), Tokenizer.byte_level(), llm_dir)
        log(f"random tiny LLM (byte-level tokenizer) saved to {llm_dir}")
    return sources


def build_base(cfg: Config, sources: dict) -> tuple[VLM, Tokenizer]:
    """The VLM before any stage: sources loaded, <image> added, a fresh projector seeded alike everywhere."""
    vit = load_vit(repo_path(sources["vision"]))
    depth = len(vit.blocks)
    if not -depth <= cfg.feature_layer < depth:
        raise ValueError(f"--feature-layer {cfg.feature_layer}: the encoder {sources['vision']} has {depth} blocks; "
                         f"expected {-depth} .. {depth - 1} (-1: the last)")
    lm, tok = load_llm(repo_path(sources["llm"]))
    if cfg.system_prompt != "default":
        tok.system_prompt = None if cfg.system_prompt == "none" else cfg.system_prompt
    image_id = tok.add_image_token()
    point_id = tok.add_point_token() if cfg.point_tokens else None
    lm.resize_vocab(max(len(tok), lm.cfg.vocab_size))
    torch.manual_seed(cfg.seed)
    out_rms = lm.model.embed_tokens.weight.detach().float().pow(2).mean().sqrt().item() if cfg.projector_norm else None
    projector = Projector(vit.cfg.dim, lm.cfg.dim, cfg.merge, out_rms)
    return VLM(vit, projector, lm, image_id, cfg.feature_layer, point_id), tok


def earlier_stage(cfg: Config, run_dir: Path) -> Path | None:
    """The stage a stage starts from: --init, else runs/<name>/stage<k-1>; None for stage 1."""
    return repo_path(cfg.init) if cfg.init else (run_dir / f"stage{cfg.stage - 1}" if cfg.stage > 1 else None)


def load_stage(stage_dir) -> tuple[VLM, Tokenizer, Config]:
    """The VLM a finished stage describes: its sources plus every stage's trained tensors, oldest first (eval).
    A checkpoint directory (runs/NAME/stageK/checkpoints/step_N) works too: the stages it started from, then its own
    tensors, so that a long run can be asked questions while it trains."""
    stage_dir = Path(stage_dir)
    checkpoint = not (stage_dir / "config.json").exists() and (stage_dir / "state.json").exists()
    meta = read_json(stage_dir / ("state.json" if checkpoint else "config.json"))
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in meta["config"].items() if k in names})
    if checkpoint:
        run_dir = stage_dir.parent.parent.parent  # runs/NAME
        init = earlier_stage(cfg, run_dir)
        chain = stage_chain(init) if init is not None and (init / "config.json").exists() else []
        sources = read_json(chain[0] / "config.json")["sources"] if chain else base_sources(cfg, run_dir, print, False)
        chain.append(stage_dir)
    else:
        chain = stage_chain(stage_dir)
        sources = read_json(chain[0] / "config.json")["sources"]
    vlm, tok = build_base(cfg, sources)
    for d in chain:
        load_stage_weights(vlm, d)
    return vlm.eval(), tok, cfg


def set_trainable(vlm: VLM, cfg: Config):
    """What each stage trains; everything else is frozen (and the frozen LLM in eval mode)."""
    vlm.requires_grad_(False)
    if cfg.stage == 3:
        tune_encoder(vlm.vit, cfg.vision_tune, cfg.lora_rank)
        for block in vlm.vit.blocks[vlm.feature_layer % len(vlm.vit.blocks) + 1:]:
            block.requires_grad_(False)  # the projector reads an earlier block: no gradient reaches these
    vlm.projector.requires_grad_(not (cfg.stage == 3 and cfg.freeze_projector))
    vlm.lm.requires_grad_(cfg.stage == 2)
    vlm.train()
    if cfg.stage != 2:
        vlm.lm.eval()
    if cfg.stage != 3 or cfg.vision_tune == "frozen":
        vlm.vit.eval()


def master_weights(vlm: VLM, amp_dtype: torch.dtype | None):
    """Trainable weights in fp32 whatever dtype the checkpoint ships in (a bf16 weight barely moves at stage 2's
    rate: most updates round away), frozen matrices in the compute dtype: kept as shipped under bf16 autocast, fp32
    without autocast. Frozen vectors (norms, biases) go to fp32 too: a bf16 LayerNorm weight refuses the fp32
    activations that an fp32 gate or projector puts on the residual stream, and vectors weigh nothing."""
    for p in vlm.parameters():
        if p.is_floating_point() and (p.requires_grad or amp_dtype is None or p.dim() < 2):
            p.data = p.data.float()


def trainable_state(vlm: VLM) -> dict:
    return {n: p for n, p in vlm.named_parameters() if p.requires_grad}


def stage_model(cfg: Config, rt: Runtime, out_dir: Path) -> tuple[VLM, Tokenizer, dict, Path | None]:
    """-> (vlm, tok, sources, init): the sources plus every earlier stage's tensors (runs/<name>/stage<k-1> and the
    stages it started from, or --init), made trainable as the stage says, on the device."""
    log, run_dir = rt.log, repo_path(cfg.runs_dir) / cfg.name
    if cfg.teacher != "llm":
        return teacher_model(cfg, rt, run_dir)
    init = earlier_stage(cfg, run_dir)
    if init is not None and not (init / "config.json").exists():
        if cfg.init:
            raise FileNotFoundError(f"--init {cfg.init}: {init / 'config.json'} not found")
        log(f"WARNING: no stage-{cfg.stage - 1} run at {init}: stage {cfg.stage} starts from fresh weights (an "
            f"untrained projector{' and LLM' if cfg.stage == 3 else ''}). Run the earlier stages first for a "
            f"meaningful result.")
        init = None
    chain = stage_chain(init) if init is not None else []
    if chain:
        sources = read_json(chain[0] / "config.json")["sources"]
        for d in chain:  # an LLM trained with or without the point token can only go on that way
            earlier = read_json(d / "config.json")["config"]
            if earlier["stage"] >= 2 and earlier.get("point_tokens", False) != cfg.point_tokens:
                raise ValueError(f"{d} trained its LLM with point_tokens={earlier.get('point_tokens', False)}: "
                                 f"stage {cfg.stage} must match it ({'add' if earlier.get('point_tokens') else 'drop'}"
                                 f" --point-tokens)")
    else:
        sources = base_sources(cfg, run_dir, log, write=rt.master)
        if rt.world > 1:
            dist.barrier()  # rank 0 has written the random base models
    vlm, tok = build_base(cfg, sources)
    for stage_dir in chain:  # the tensors each earlier stage trained, oldest first
        load_stage_weights(vlm, stage_dir)
    set_trainable(vlm, cfg)
    master_weights(vlm, rt.amp_dtype)
    vlm.to(rt.device)
    log(f"stage {cfg.stage} | preset {cfg.preset} | run {out_dir} | device {rt.device} x{rt.world} | "
        f"{'bf16 autocast' if rt.amp_dtype else 'fp32'}{' | compiled' if rt.compile else ''}")
    log(f"  starts from: {', '.join(str(c) for c in chain) or 'the sources'} (sources: {sources})")
    for name, mod in (("vision", vlm.vit), ("projector", vlm.projector), ("llm", vlm.lm)):
        params = {id(p): p for p in mod.parameters()}.values()  # tied weights counted once
        n_train, n_all = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        state = "trainable" if n_train == n_all else "frozen" if n_train == 0 else "partly trainable"
        log(f"  {name:<10} {state:<17} {n_train / 1e6:9.3f}M of {n_all / 1e6:9.3f}M parameters train")
    vlm.vit.grad_checkpointing = vlm.lm.grad_checkpointing = cfg.grad_ckpt
    return vlm, tok, sources, init


def teacher_model(cfg: Config, rt: Runtime, run_dir: Path) -> tuple[DepthTeacher, None, dict, None]:
    """--teacher depth-*: the run's encoder (stages 1-2 never train it) tuned as --vision-tune says, and a depth head
    (fitted in train() once the data is known); no LLM, no projector, no earlier stage."""
    sources = base_sources(cfg, run_dir, rt.log, write=rt.master)
    if rt.world > 1:
        dist.barrier()  # rank 0 has written the random base models
    vit = load_vit(repo_path(sources["vision"])).requires_grad_(False)
    tune_encoder(vit, cfg.vision_tune, cfg.lora_rank)
    n_train = sum(p.numel() for p in vit.parameters() if p.requires_grad) / 1e6
    rt.log(f"stage 3 | teacher {cfg.teacher} (no LLM loaded) | encoder {sources['vision']}: {n_train:.3f}M "
           f"parameters train ({cfg.vision_tune}) | device {rt.device} x{rt.world}")
    teacher = DepthTeacher(vit, cfg.teacher, ProbeConfig(seed=cfg.seed))
    master_weights(teacher, rt.amp_dtype)  # fp32 masters here too, whatever the checkpoint's dtype
    return teacher.to(rt.device).train(), None, sources, None


def stage_data(cfg: Config, rt: Runtime, vlm: VLM, tok: Tokenizer, mixed=None) -> tuple[ConversationDataset, int,
                                                                                         int, int]:
    """-> (dataset, micro-steps per step, steps per epoch, total steps) over `mixed` (sources, Mix) from
    training/preflight.stage_mix: --data, or data/<preset>/<kind> for each of the stage's kinds."""
    out, mix = mixed or stage_mix(cfg, rt.log)
    if cfg.teacher != "llm":
        n_img_tokens = math.prod(vlm.vit.grid(cfg.image_size, cfg.image_size))
        ds = DepthData(mix, vlm.vit, cfg.image_size, cfg.teacher, vlm.cfg, outside_images=cfg.images_outside_data)
    else:
        n_img_tokens = vlm.n_image_tokens(cfg.image_size)
        ds = ConversationDataset(mix, tok, vlm.vit.cfg, image_size=cfg.image_size, n_image_tokens=n_img_tokens,
                                 max_len=cfg.max_len, shuffle_images=cfg.seed if cfg.shuffle_images else None,
                                 outside_images=cfg.images_outside_data, loss_on=cfg.loss_on)
    accum, steps_per_epoch, _ = batch_plan(cfg, len(ds), rt.world, rt.rank, 0, 0)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    rt.log(f"  data: {len(ds)} samples from {', '.join(str(p) for p, _ in out)} | {n_img_tokens} tokens per image "
           f"| global batch {cfg.global_batch} = {cfg.batch_size} x {accum} micro-steps x {rt.world} | {total} steps")
    return ds, accum, steps_per_epoch, total


def batch_plan(cfg: Config, n: int, world: int, rank: int, start: int, end: int) -> tuple[int, int, list]:
    """-> (micro-steps per step, steps per epoch, plan): a permutation per epoch seeded by (seed, epoch), each step
    the next global batch of it, rank r reading its micro-batches r, r + world, ... Steps start..end-1 of this rank
    as one flat list of micro-batches (the DataLoader's batch_sampler): resuming is exact whatever the workers."""
    accum = cfg.global_batch // (cfg.batch_size * world)
    steps_per_epoch = n // cfg.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {n} samples, fewer than one global batch of {cfg.global_batch}")
    plan, perm, perm_epoch = [], None, None
    for step in range(start, end):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
            perm_epoch = epoch
        chunk = perm[k * cfg.global_batch:(k + 1) * cfg.global_batch]
        micro = [chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
        plan.extend(micro[rank::world])
    return accum, steps_per_epoch, plan


def prepare(vlm: VLM, cfg: Config, rt: Runtime, out_dir: Path) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """-> (the module the loop calls, AdamW, the step to start at): the VLM sharded (FSDP2: the LLM blocks and the
    root) before the optimizer sees it, the latest checkpoint restored (--resume), else DDP around it, blocks
    compiled."""
    model = wrap(vlm, cfg.fsdp, rt.device, rt.world) if cfg.fsdp else vlm
    opt = adamw(param_groups(vlm, cfg), cfg.lr, rt.device)
    step = resume(vlm, opt, cfg, rt, out_dir) if cfg.resume and not cfg.bench else 0
    if not cfg.fsdp:
        model = wrap(vlm, False, rt.device, rt.world)  # DDP after resume: its broadcast keeps the restored weights
    llm_blocks = list(vlm.lm.model.layers) if isinstance(vlm, VLM) else []
    for block in list(vlm.vit.blocks) + llm_blocks if rt.compile else []:
        block.compile()  # block by block: shapes vary with sequence length, and eval/saving keep the plain module
    return model, opt, step


def param_groups(vlm: VLM, cfg: Config) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases, gates, layerscales) never. In stage 3 the gates, the
    projector and the rest (Attn+) each get their own rate, as `lr_scale` x the scheduled --lr."""
    scale = {"gate": cfg.gate_lr / cfg.lr, "projector": cfg.projector_lr / cfg.lr, "other": 1.0}
    kind = lambda n: "other" if cfg.stage != 3 else "gate" if n.endswith(".gate") else \
        "projector" if n.startswith(("projector.", "head.")) else "other"  # a depth teacher's head: projector's rate
    groups = {}
    for n, p in trainable_state(vlm).items():
        key = (kind(n), p.dim() >= 2)
        groups.setdefault(key, {"params": [], "lr_scale": scale[key[0]], "name": key[0],
                                "weight_decay": cfg.weight_decay if key[1] else 0.0})["params"].append(p)
    return list(groups.values())


def lr_at(step: int, total: int, cfg: Config) -> float:
    warmup = math.ceil(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def reduce_and_clip(vlm: VLM, cfg: Config, world: int) -> torch.Tensor:
    """The gradient norm, clipped to --grad-clip (DDP and FSDP2 have averaged the gradients): a tensor, no sync."""
    return clip(list(trainable_state(vlm).values()), cfg.grad_clip)


def gpu_peak(cfg: Config, device: str) -> float | None:
    return peak_flops(torch.cuda.get_device_name() if device == "cuda" else "", cfg.peak_tflops)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def forward_backward(model: nn.Module, vlm: VLM, batches: list[dict], rt: Runtime,
                     backward: bool = True) -> tuple[torch.Tensor, int]:
    """One step's micro-batches forward (autocast) and backward -> (the loss per supervised token over all ranks, a
    tensor on the device: reading it is the caller's one host sync; how many micro-batches had nothing to train).
    The gradients are normalized by the global count of supervised tokens; DDP syncs on the last micro-batch.

    DDP's all-reduce waits for a gradient of every trainable tensor, so every one must be on the graph: a
    micro-batch with nothing to train (every sample unusable, or text only with the LLM frozen) backpropagates a zero
    through all of them, and a text-only micro-batch of stage 2 a zero through the vision side (projector, and the
    encoder's trainable tensors), which no image reached. A zero term costs one small sum per tensor, only on such
    micro-batches; find_unused_parameters would walk the graph on every step. Tensors that no micro-batch can reach
    (blocks after --feature-layer, SigLIP's pooling head) are frozen by set_trainable."""
    n_sup = float(sum(b["n_supervised"] for b in batches))
    if rt.world > 1:  # the one collective before the step's work
        n_sup = all_sum(torch.tensor([n_sup], device=rt.device), rt.world).item()
    n_sup = max(n_sup, 1.0)
    loss_sum, skipped = torch.zeros((), device=rt.device), 0
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    vision_side = [p for m in (vlm.vit, vlm.projector) for p in m.parameters() if p.requires_grad] \
        if isinstance(vlm, VLM) else []
    for i, b in enumerate(batches):
        mask = b.get("mask")
        if rt.device == "cuda" and "cu_seqlens" in b and rt.amp_dtype is not None:  # varlen flash: no (T, T) mask
            mask = Packed(b["cu_seqlens"], b["ids"].shape[1])
        move = lambda v: v.to(rt.device, non_blocking=True) if torch.is_tensor(v) else v
        with model.no_sync() if ddp and i < len(batches) - 1 else nullcontext():
            with torch.autocast(rt.device, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
                if "target" in b:  # a depth teacher (training/teacher.py)
                    loss = model(move(b["pixels"]), move(b["target"]), b["uv"], b["depth"])
                else:
                    loss = model(*(move(b.get(k)) for k in ("ids", "pixels", "weights", "positions")),
                                 Packed(*map(move, mask)) if isinstance(mask, Packed) else move(mask),
                                 move(b.get("points")), b["n_supervised"])
            if backward and not loss.requires_grad:
                skipped += 1
                loss = loss + zero_term(trainable_state(vlm).values())
            elif backward and b["pixels"].shape[0] == 0 and vision_side:
                loss = loss + zero_term(vision_side)
            if backward:
                (loss * rt.world / n_sup).backward()  # DDP averages over ranks, hence * world
        loss_sum += loss.detach().float()
    return all_sum(loss_sum, rt.world) / n_sup, skipped


def zero_term(params) -> torch.Tensor:
    return sum(p.sum() for p in params) * 0.0  # a zero gradient for each: on the graph, nothing changes


def train(cfg: Config) -> Path | None:
    rt = setup_runtime(cfg)
    log, device = rt.log, rt.device
    out_dir = repo_path(cfg.runs_dir) / cfg.name / f"stage{cfg.stage}"
    with refusals():  # bad data, --init or run dir stop the run before any model is built
        if rt.world > 1 and not rt.master:
            dist.barrier()  # rank 0 makes any default data first: two ranks writing one folder refuse each other
        mixed = stage_mix(cfg, rt.log)
        if rt.world > 1 and rt.master:
            dist.barrier()
        check_init(cfg, earlier_stage(cfg, out_dir.parent))
        claim_stage_dir(cfg, rt, out_dir, fingerprints(mixed[0]))
    vlm, tok, sources, init = stage_model(cfg, rt, out_dir)
    ds, accum, steps_per_epoch, total = stage_data(cfg, rt, vlm, tok, mixed)
    if isinstance(vlm, DepthTeacher):  # before the optimizer sees the head; a resume then overwrites it
        vlm.warm_start(ds.other(data_sources(cfg.teacher_data)) if cfg.teacher_data else ds, cfg.seed, log)
    model, opt, step = prepare(vlm, cfg, rt, out_dir)
    end = cfg.bench + 2 if cfg.bench else total  # a benchmark times `bench` steps after two warm-up steps
    loader = iter(torch.utils.data.DataLoader(
        ds, batch_sampler=batch_plan(cfg, len(ds), rt.world, rt.rank, step, end)[2], num_workers=cfg.workers,
        pin_memory=device == "cuda", collate_fn=collate_depth if isinstance(vlm, DepthTeacher) else
        functools.partial(collate, pad_id=tok.pad_id, pack=cfg.pack)))
    peak = gpu_peak(cfg, device)
    metrics, report = metrics_writer(cfg, rt, out_dir, step), LoaderReport()  # report: said at each epoch's end
    timings, t_start, skipped, batches, since = [], time.time(), 0, [], []
    first = step  # a resumed run's ETA counts only the steps this process has timed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    while step < end:
        batches = [next(loader) for _ in range(accum)]  # this rank's micro-batches of the step
        for b in batches:
            report.add(b)
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss, n_skipped = forward_backward(model, vlm, batches, rt)
        skipped += n_skipped
        grad_norm = reduce_and_clip(vlm, cfg, rt.world)
        loss_value, norm_value = torch.stack([loss, grad_norm.to(loss)]).tolist()  # the step's one host sync
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            opt.zero_grad(set_to_none=True)
            nonfinite_stop(cfg, rt, out_dir, step, loss_value, norm_value)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        since.append(batches)
        if cfg.bench or step % cfg.log_every == 0 or step == total:
            if device == "cuda":
                torch.cuda.synchronize()  # the queued work done: the time since the last log is the steps' own
            dt, t0 = (time.time() - t0) / len(since), time.time()
            n_tok = sum(int(b["n_tokens"]) for bs in since for b in bs) / len(since) * rt.world
            flops = sum(batch_flops(vlm, cfg.image_size, bs) for bs in since) / len(since)  # this rank's, per step
            flops = all_sum(torch.tensor(flops, device=device), rt.world).item()  # all ranks': at logs only
            timings.append((dt, cfg.global_batch, n_tok, flops))
            since = []
            if not cfg.bench:
                log_step(cfg, rt, vlm, metrics, step, total, (t_start, first), loss_value, norm_value, lr, dt,
                         n_tok, mfu(flops, dt, peak, rt.world))
        if cfg.bench:
            continue
        if step % steps_per_epoch == 0 or step == total:
            log(f"  epoch {math.ceil(step / steps_per_epoch)} {report.summary()}" + skipped_note(skipped, rt))
            report, skipped = LoaderReport(), 0
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(out_dir, step, vlm, opt, cfg, keep_last=cfg.keep_last, master=rt.master)
    if cfg.bench:
        return report_bench(cfg, timings, device, peak, rt.world, log)
    if batches:  # the last update's weights have met no forward yet: they go out only if they give a finite loss
        # (on the plain module, with grad mode as in training: DDP expects no lone forward, compiled blocks no change)
        loss_value = forward_backward(vlm, vlm, batches, rt, backward=False)[0].item()
        if not math.isfinite(loss_value):
            nonfinite_stop(cfg, rt, out_dir, step, loss_value, None)
    return finish_stage(cfg, rt, vlm, out_dir, sources, init, t_start)


def log_step(cfg, rt, vlm, metrics, step, total, started, loss, grad_norm, lr, dt, n_tok, util):
    """The progress line, a metrics row and, in stage 3, how far the boost has moved each layer. started: (time, step)
    this process started training at (a resumed run starts past 0)."""
    eta = (time.time() - started[0]) / (step - started[1]) * (total - step)
    rt.log(f"s{cfg.stage} {step:>5}/{total} [{'#' * int(20 * step / total):<20}] | loss {loss:.4f} | lr {lr:.2e} | "
           f"dt {dt * 1000:.0f}ms | {cfg.global_batch / dt:.1f} samples/s | {n_tok / dt:.0f} tok/s"
           f"{f' | mfu {100 * util:.1f}%' if util else ''} | eta {fmt_time(eta)}", flush=True)
    row = {"step": step, "loss": loss, "lr": lr, "dt": dt, "grad_norm": grad_norm,
           "samples_per_s": cfg.global_batch / dt, "tokens_per_s": n_tok / dt}
    dual = dual_channel_stats(vlm.vit) if cfg.stage == 3 else []  # every rank: no straggler, no lone collective
    if dual:
        row.update(gate=[d["gate_mean"] for d in dual], rel_change=[d["rel_change"] for d in dual])
        rt.log(f"      σ(a) {min(row['gate']):.4f}..{max(row['gate']):.4f} | ‖W+ − W‖/‖W‖ "
               f"{min(row['rel_change']):.2e}..{max(row['rel_change']):.2e}")
    metrics(row)


def skipped_note(skipped: int, rt: Runtime) -> str:
    n = int(all_sum(torch.tensor(float(skipped), device=rt.device), rt.world).item())  # every rank's
    return (f"\n  {n} micro-batch{'es' if n > 1 else ''}{' (all ranks)' if rt.world > 1 else ''} with nothing to "
            f"train (every sample unusable, or text only with the LLM frozen) skipped: a zero gradient instead"
            ) if n else ""


def finish_stage(cfg: Config, rt: Runtime, vlm: VLM, out_dir: Path, sources: dict, init, t_start: float) -> Path:
    """The stage dir: tensors, the stage-3 encoder export, config.json strictly last (every rank gathers, rank 0
    writes); every rank waits for it. main() closes the process group once train() has returned."""
    # FSDP2's root holds the encoder as shards: every rank gathers it, rank 0 writes it
    full = {k: gathered(v) for k, v in vlm.vit.state_dict().items()} if cfg.fsdp and cfg.stage == 3 else None

    def export(stage_dir: Path):
        if cfg.vision_tune == "lora":
            merge_lora(vlm.vit)
        save_vit(vlm.vit, stage_dir / "vision", **({} if full is None else {"state": full}))
        rt.log(f"boosted encoder saved to {stage_dir / 'vision'} (load_vit reads it; baseline: {sources['vision']})")
    save_stage(out_dir, vlm, cfg, sources, init, master=rt.master, export=export if cfg.stage == 3 else None)
    release_stage_dir(out_dir)
    rt.log(f"stage {cfg.stage} done in {fmt_time(time.time() - t_start)}: {out_dir}")
    if rt.world > 1:
        dist.barrier()
    return out_dir


def report_bench(cfg, timings, device, peak, world, log) -> None:
    timed = timings[2:]  # the first two steps warm up (allocation, compilation)
    dt = sum(t[0] for t in timed) / len(timed)
    samples, tokens, flops = (sum(t[i] for t in timed) / len(timed) for i in (1, 2, 3))
    mem = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    line = (f"bench stage {cfg.stage} preset {cfg.preset}: {dt * 1000:.0f} ms/step | {samples / dt:.2f} samples/s | "
            f"{tokens / dt:.0f} tokens/s | peak memory {mem:.2f} GiB ({'allocated' if device == 'cuda' else 'RSS'})")
    if peak:
        line += f" | mfu {100 * mfu(flops, dt, peak, world):.1f}%"
    log(line)


def main(argv=None):
    cfg = parse_config(argv)
    try:
        out = train(cfg)
    except Exception as e:
        if getattr(e, "refusal", False):
            raise SystemExit(f"train.py: {e}") from None
        raise
    if dist.is_initialized():  # after train() has returned, so that no DDP / FSDP module still holds the group
        dist.destroy_process_group()
    if out is not None and cfg.stage == 3 and cfg.probe and int(os.environ.get("RANK", "0")) == 0:
        quick_summary(out, device=setup_device(cfg))


if __name__ == "__main__":
    main()
