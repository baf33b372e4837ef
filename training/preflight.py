"""
What a run checks before it builds a model or writes in runs/: its data read and mixed (training/dataset.Mix), the
default data made with this run's flags, --init, and each source's fingerprint (training/runs.claim_stage_dir).

    sources, mix = stage_mix(cfg, log)        # --data, else data/<preset>/<kind> (made with cfg's flags if absent)
    check_init(cfg, init)                     # a vision export, or stage 3 on a stage-3 dir: refused, named
    prints = fingerprints(sources)            # [{"path", "file", "size", "sha256"}]: data.jsonl, not the images
"""

import hashlib
import math
import os
from contextlib import contextmanager
from pathlib import Path

from dataengine.writer import KINDS, dataset_spec, write_dataset, written_n
from storage.atomic import lock_holder, read_json, repo_path
from training.dataset import Mix, dataset_file
from training.runs import stage_chain

STAGE_DATA = {1: ["captions"], 2: ["instruct", "grounding", "multiview"], 3: ["spatial", "spatial-multiview"]}


def data_sources(spec: str) -> list[tuple[Path, float]]:
    """--data "dirA,b.json:0.5" -> [(path, weight)]: each a dataset dir or file (training/dataset.py reads both),
    weight 1 unless given after the last ':'. A path that itself ends in ':<number>' is read whole when nothing
    else fits, and refused as ambiguous when 'path:weight' fits too. Errors name the entry."""
    out = []
    for item in spec.split(",") if spec else []:
        path, sep, weight = item.rpartition(":")
        path, weight = (path, weight) if sep else (item, "")
        whole = sep and os.path.exists(repo_path(item))          # a folder or file named "d/ver:2"
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            if not whole:
                raise ValueError(f"--data {item!r}: the weight after ':' must be a number, e.g. {path}:0.5") from None
            path, w = item, 1.0
        if whole and path != item:
            if os.path.exists(repo_path(path)):
                raise ValueError(f"--data {item!r} is ambiguous: {repo_path(item)} exists, and so does "
                                 f"{repo_path(path)} (read with weight {weight}): rename one, or write "
                                 f"{item}:1 for the first")
            path, w = item, 1.0
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"--data {item!r}: the weight must be a finite number >= 0")
        if not path:
            raise ValueError(f"--data {spec!r}: an empty entry; expected a dataset dir or file, comma-separated")
        try:
            dataset_file(repo_path(path))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--data {item!r}: {e}") from None
        out.append((repo_path(path), w))
    return out


def default_sources(cfg, log) -> list[tuple[Path, float]]:
    """data/<preset>/<kind> for each of the stage's kinds (mixed 1:1), each kind from its own seed so that no two
    stages train on the same images; made on first use, and made again to hold --gen-samples samples. Data there
    that another --seed or --image-size made is refused, the flags named: never silently trained on."""
    out = []
    for kind in STAGE_DATA[cfg.stage] if cfg.teacher == "llm" else ["spatial"]:  # a depth teacher reads one view
        ordered = kind.startswith("spatial") and cfg.order != "forward"
        path = repo_path(cfg.data_root) / cfg.preset / (kind + (f"-{cfg.order}" if ordered else ""))
        seed = cfg.seed + 1000 * (KINDS.index(kind) + 1)
        manifest = path / f"{kind}.json"
        if manifest.is_file():
            made = read_json(manifest).get("config", {})
            if (made.get("seed"), made.get("size")) != (seed, cfg.image_size):
                raise ValueError(
                    f"{path} holds {kind} data made with --seed {made.get('seed', 0) - (seed - cfg.seed)} "
                    f"--image-size {made.get('size')} ({manifest}), not this run's --seed {cfg.seed} --image-size "
                    f"{cfg.image_size}: pass --data {path} to train on it anyway, or --data-root DIR to make data "
                    f"with these flags there (or delete {path})")
        have = written_n(path, dataset_spec(kind, seed, cfg.image_size, cfg.order, None, 256, None, None)) \
            if path.is_dir() else 0
        if have != cfg.gen_samples:
            log(f"{kind} data at {path}: {have} samples, --gen-samples {cfg.gen_samples}: generating ...")
        write_dataset(kind, path, n=cfg.gen_samples, seed=seed, size=cfg.image_size, order=cfg.order,
                      workers=max(cfg.workers, min(4, os.cpu_count() or 1)), progress=have != cfg.gen_samples)
        out.append((path, 1.0))
    return out


def stage_mix(cfg, log) -> tuple[list, Mix]:
    """-> (sources, their mix): read, mixed and checked against one global batch, before any model is built."""
    sources = data_sources(cfg.data) if cfg.data else default_sources(cfg, log)
    mix = Mix(sources, limit=cfg.data_size or None)
    if len(mix) < cfg.global_batch:
        counts = ", ".join(f"{p}: {c}" for (p, _), c in zip(sources, mix.counts))
        raise ValueError(f"the data has {len(mix)} samples ({counts}{', --data-size' if cfg.data_size else ''}), "
                         f"fewer than one global batch of {cfg.global_batch} (--global-batch): add data or lower it")
    return sources, mix


def check_init(cfg, init: Path | None) -> None:
    """The stage this one starts from must be a finished train.py stage, not one still training (its lock held),
    and its chain of config.json files must have 'stage', 'config' and 'sources'; stage 3 with a dual channel or LoRA
    cannot start from a stage 3, which has one."""
    holder = lock_holder(init / ".lock") if init is not None else None
    if holder:
        raise ValueError(f"{init}, the stage this one starts from, is still being trained (by {holder}): wait for it "
                         "to finish")
    if init is None or not (init / "config.json").is_file():
        return                                  # stage_model says what is missing
    chain = stage_chain(init)
    for d in chain:
        meta = read_json(d / "config.json")
        if not {"stage", "config", "sources"} <= meta.keys():
            raise ValueError(f"--init {init}: {d / 'config.json'} is not a train.py stage's (it has no 'stage', "
                             "'config' and 'sources'; an encoder or model folder?): --init takes runs/NAME/stageK")
    if cfg.stage == 3 and cfg.vision_tune in ("dual", "dual-qk", "lora") and \
            any(read_json(d / "config.json")["stage"] == 3 for d in chain):
        raise ValueError(f"--init {init}: starts from a stage-3 run, whose encoder already has its {cfg.vision_tune} "
                         "channel: stage 3 starts from a stage 1 or 2 (to go on training a stage 3, --resume it)")


def fingerprints(sources) -> list[dict]:
    """What each source's data file is now: its path, size and sha256 (the images it names are not read)."""
    out = []
    for path, weight in sources:
        f = dataset_file(path)
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        out.append({"path": str(path), "weight": weight, "file": str(f), "size": f.stat().st_size,
                    "sha256": h.hexdigest()})
    return out


@contextmanager
def refusals():
    """What goes wrong inside is bad input found before any work (data, --init, the run dir): marked, so that
    train.py's main says it in one line instead of a traceback; train() callers still get the exception itself."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:      # FileNotFoundError, FileExistsError and Busy among them
        e.refusal = True
        raise
