"""
Evaluation: did SpatialBoost make the encoder better? Frozen-encoder probes (probes.py) for any number of encoders
on the same held-out probe set with the same seeds and budget, spatial-QA accuracy of a trained VLM, and a report.

    python eval.py --vision weights/dinov2-s14                 # one encoder (makes the probe set if missing)
    python eval.py --vision A --vision B                       # side by side, deltas against the first
    python eval.py --run NAME                                  # runs/NAME/stage3: base_vision vs the boosted export
    python eval.py --vision A --rgbd my_frames/                # + the depth probes on RGB-D frame folders
    python eval.py --vision A --vision B --stereo              # + correspondence on a real stereo photo (PCK)
    python eval.py --run NAME --robot --mujoco                 # + MetaWorld robot control, MuJoCo depth/seg probes
    python eval.py --qa data/heldout --answers answers.jsonl   # score a VLM's answers to held-out conversations
    python eval.py --qa data/heldout --vlm runs/NAME/stage2/checkpoints/step_000200 --diagnose  # a run mid-way

Writes report.json (every number), report.md (the table) and report.png (bar charts + a depth panel) to --out
(default runs/NAME/eval for --run, else runs/eval) and prints the table. Features are cached in the probe set's
cache/ directory (~0.8 MB per image for a ViT-S; evaluation/suite.py), so re-running a comparison only trains the
heads; spatial QA parses free-form answers and scores them per level and type (evaluation/qa.py).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dataengine.middlebury import motorcycle
from evaluation import mujoco_sim, probes
from evaluation.probes import ProbeConfig
from evaluation.diagnostics import diagnose
from evaluation.qa import evaluate_qa, load_conversations, read_answers, score_qa, vlm_answer_fn
from evaluation.report import write_report
from evaluation.stereo import stereo_probe
from evaluation.suite import dual_channel_stats, fingerprint, run_probes
from data import at_least
from model import load_vit
from storage.atomic import read_json, repo_path, writable_dir, write_text_atomically
from train import load_stage

DEFAULT_PROBES = "data/probes"


def encoder_name(path: Path) -> str:
    """A column name for --vision PATH: the run's name for a train.py export (runs/NAME/stage3/vision)."""
    if path.name == "vision" and path.parent.name.startswith("stage"):
        return path.parent.parent.name
    return path.name


def run_encoders(run: str, runs_dir: str = "runs") -> list:
    """[(name, path)] of --run NAME: the baseline (config.json's base_vision) and the boosted export."""
    stage = repo_path(runs_dir) / run / "stage3"
    cfg_path = stage / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: not found (is {run!r} a stage-3 run of train.py?)")
    cfg = json.loads(cfg_path.read_text())
    if "base_vision" not in cfg:
        raise KeyError(f"{cfg_path}: no key 'base_vision' (the path of the encoder stage 3 started from)")
    return [("baseline", repo_path(cfg["base_vision"])), (f"boosted ({run})", stage / "vision")]


def ask_vlm(stage_dir: Path, samples: list, args, label=None, diagnosing=False) -> tuple[dict, list, dict | None]:
    """A stage directory's VLM on the held-out samples -> (QA scores, its answers, the two diagnostics or None)."""
    vlm, tok, cfg = load_stage(stage_dir)
    print(f"qa: {label or stage_dir}: {len(samples)} held-out conversations, context {args.qa_context}")
    scores, answers = evaluate_qa(samples, vlm_answer_fn(vlm, tok, cfg.image_size, args.qa, args.qa_max_new,
                                                          args.qa_context))
    diagnosed = diagnose(vlm, tok, cfg.image_size, samples, args.qa) if diagnosing else None
    if diagnosed:
        for name, d in diagnosed.items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in d.items()))
    return scores, answers, diagnosed


def run_qa(run: str, samples: list, args) -> dict:
    """Spatial QA of a run's VLM before (stage 2) and after (stage 3) the boost, on the same held-out samples."""
    out = {}
    for stage, name in ((2, "stage 2 (before)"), (3, "stage 3 (boosted)")):
        stage_dir = repo_path(args.runs_dir) / run / f"stage{stage}"
        if not (stage_dir / "config.json").exists():
            print(f"qa: {stage_dir} not found, skipped")
            continue
        out[name], answers, _ = ask_vlm(stage_dir, samples, args, label=name)
        out_dir = Path(args.out or repo_path(args.runs_dir) / run / "eval")
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"id": s["id"], "answers": a}) + "\n" for s, a in zip(samples, answers)]
        write_text_atomically(out_dir / f"answers-stage{stage}.jsonl", "".join(lines))
    return out


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description="Frozen-encoder probes (depth lin.1/lin.4, segmentation, "
                                 "classification, retrieval) and spatial QA; baseline vs boosted.")
    add = ap.add_argument
    add("--vision", action="append", default=[], help="encoder directory (load_vit); repeat to compare, the "
        "first is the baseline")
    add("--run", help="runs/RUN/stage3: compare its base_vision (baseline) with its boosted export")
    add("--runs-dir", default="runs", help="where train.py's runs are (train.py --runs-dir)")
    add("--probes", default=DEFAULT_PROBES, help=f"probe set directory (default {DEFAULT_PROBES}; made if missing)")
    add("--n-images", type=at_least(1), default=480, help="views in a newly made probe set (2 per scene)")
    add("--probe-seed", type=int, default=0, help="seed of a newly made probe set")
    add("--test-every", type=at_least(1), default=4, help="in a newly made probe set, every k-th scene is a test scene")
    add("--object-views", type=at_least(1), default=None, help="in a newly made probe set, only the first N views give "
        "object crops (default: all; issue 27's protocol: 480 of 1920)")
    add("--depth-heads", type=at_least(1), default=1, help="average the depth maps of this many lin.1 / lin.4 heads "
        "(seeds --seed + 1000 k; issue 27's protocol: 3)")
    add("--per-image", action="store_true", help="keep each test image's results in report.json (for bootstrap "
        "intervals: experiments/boost_report.py)")
    add("--make-probes", action="store_true", help="only write the probe set (replacing it) and exit")
    add("--rgbd", help="also run the depth probes on RGB-D frame folders (scenes.load_rgbd format)")
    add("--depth-scale", type=float, default=1.0, help="multiplies --rgbd's stored depth (0.001: depth.npy in mm)")
    add("--stereo", action="store_true", help="also the correspondence probe on the Middlebury Motorcycle stereo "
        "pair (evaluation/stereo.py; needs `pip install scikit-image`): PCK of patch matches against the true "
        "disparity, the views --image-size px high")
    add("--qa", help="held-out spatial conversations (a data.py directory) to score --answers against")
    add("--answers", action="append", default=[], help="NAME=answers.jsonl ({'id', 'answers': [str per turn]} "
        "per line), repeatable: one QA column each; without it --run's VLMs answer (stage 2: before, 3: after boost)")
    add("--vlm", action="append", default=[], help="a finished stage directory (runs/NAME/stageK) or one of its "
        "checkpoints (runs/NAME/stageK/checkpoints/step_N, while it trains), repeatable: its VLM answers --qa, and with --diagnose its image dependence and localization gap are measured on --qa's data")
    add("--diagnose", action="store_true", help="with --vlm: the loss on answer digits with the true vs another "
        "image, and with the true vs swapped query point (evaluation/diagnostics.py)")
    add("--qa-samples", type=at_least(1), default=24, help="held-out conversations the VLMs answer")
    add("--qa-context", default="none", choices=["none", "gold"], help="ask each question alone (none) or after the "
        "conversation's own earlier turns (gold, as in training; slower)")
    add("--qa-max-new", type=at_least(1), default=160, help="tokens generated per answer at most")
    add("--out", help="report directory (default runs/RUN/eval with --run, else runs/eval)")
    add("--image-size", type=at_least(1), default=224, help="dense-probe input side (rounded to the patch size)")
    add("--crop-size", type=at_least(1), default=112, help="object-crop input side (rounded to the patch size)")
    add("--seed", type=int, default=0, help="seed of every probe head and batch order")
    add("--quick", action="store_true", help="a tenth of the training steps: a smoke test, not a result")
    add("--no-cache", action="store_true", help="do not read or write cached features")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where the encoders compute their features (auto: cuda when available); the probe heads train on CPU")
    # worlds we did not build (evaluation/robot.py, evaluation/mujoco_probes.py; pip install -r requirements-robot.txt)
    add("--robot", action="store_true", help="also robot control per encoder: CortexBench-style behaviour cloning on "
        "MetaWorld, success rate of an MLP policy on the frozen embedding (4-7 min per encoder on 2 shared CPU cores)")
    add("--robot-tasks", default=",".join(mujoco_sim.TASKS), help="comma-separated MetaWorld tasks for --robot")
    add("--robot-seeds", type=at_least(1), default=3, help="policy seeds per task (the spread is over them)")
    add("--robot-episodes", type=at_least(1), default=4, help="evaluation rollouts per task and policy seed")
    add("--robot-quick", action="store_true", help="one task, 2 demos, short rollouts (also with --quick): a smoke "
        "test")
    add("--robot-cache", default="data/robot-cache", help="where demos and their embeddings are cached")
    add("--mujoco", action="store_true", help="also the depth and segmentation probes on MetaWorld scenes rendered "
        "by MuJoCo (--mujoco-probes, made if missing), reported as mujoco_*")
    add("--mujoco-probes", default="data/mujoco-probes", help="the MuJoCo probe set directory")
    return ap, ap.parse_args(argv)


def world_evaluations(args, cfg: ProbeConfig, report: dict):
    """--robot and --mujoco as one function of an encoder -> (its result entries: robot, robot_sd, robot_runs,
    mujoco_depth_lin1, ...; their times), or None when neither is asked. Makes the MuJoCo probe set if missing."""
    if not (args.robot or args.mujoco):
        return None
    try:
        mujoco_sim.require()
    except ImportError as e:
        raise SystemExit(f"eval.py --robot/--mujoco: {e}") from e
    from evaluation import mujoco_probes, robot
    scenes, rcfg = None, None
    if args.mujoco:
        if not (Path(args.mujoco_probes) / "index.json").exists():
            print(f"no MuJoCo probe set at {args.mujoco_probes}: making it (240 views of MetaWorld scenes)")
            mujoco_probes.make_mujoco_probe_set(args.mujoco_probes, overwrite=True)
        scenes = probes.load_probe_set(args.mujoco_probes)
        report["mujoco_probe_set"] = {"path": str(scenes.root), "fingerprint": scenes.fingerprint,
                                      "images": len(scenes.images), "train_images": int(scenes.train.sum())}
    if args.robot:
        rcfg = robot.RobotConfig(tasks=tuple(args.robot_tasks.split(",")), seeds=args.robot_seeds,
                                 episodes=args.robot_episodes)
        rcfg = rcfg.quick() if args.robot_quick or args.quick else rcfg
        report["robot_config"] = asdict(rcfg)

    def run(vit):
        out, times = {}, {}
        if scenes is not None:
            t = time.time()
            res, _ = run_probes(vit, scenes, cfg, args.image_size, args.crop_size, not args.no_cache)
            out.update({f"mujoco_{k}": v for k, v in res.items() if k != "time_s"})
            times["mujoco"] = round(time.time() - t, 1)
        if rcfg is not None:
            t = time.time()
            res = robot.evaluate(vit, rcfg, None if args.no_cache else args.robot_cache)
            out.update({k: v for k, v in res.items() if k != "time_s"})
            times["robot"] = round(time.time() - t, 1)
        return out, times
    return run


def probe_encoders(encoders: list, args, cfg: ProbeConfig, report: dict) -> tuple[list, list, list]:
    """Every probe on every encoder (the probe set made first if missing), each encoder's entry added to report.
    Returns (names, results, examples)."""
    worlds = world_evaluations(args, cfg, report)  # first: a missing package stops us before any long work
    if not (Path(args.probes) / "index.json").exists():
        print(f"no probe set at {args.probes}: making the default one ({args.n_images} held-out views, "
              f"seed {args.probe_seed}); later runs reuse it")
        probes.make_probe_sets(args.probes, args.n_images, args.probe_seed, test_every=args.test_every,
                               overwrite=True, object_views=args.object_views)
    try:
        ps = probes.load_probe_set(args.probes, args.crop_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py --probes: {e}") from e
    try:  # a bad frame is bad input, not a bug: its message names the folder and the file
        rgbd = probes.load_rgbd_set(args.rgbd, args.image_size, depth_scale=args.depth_scale) if args.rgbd else None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py --rgbd: {e}") from e
    try:
        pair = motorcycle() if args.stereo else None
    except ImportError as e:
        raise SystemExit(f"eval.py --stereo: {e}") from e
    report["probe_set"] = {"path": str(ps.root), "fingerprint": ps.fingerprint, "images": len(ps.images),
                           "train_images": int(ps.train.sum()),
                           "objects": 0 if ps.crops is None else len(ps.crops)}  # None: a MuJoCo set
    names, results, examples = [], [], []
    for name, path in encoders:
        print(f"{name}: {path}")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        vit, t = load_vit(path).to(device), time.time()
        res, ex = run_probes(vit, ps, cfg, args.image_size, args.crop_size, not args.no_cache,
                             per_image=args.per_image)
        if rgbd is not None:
            more, _ = run_probes(vit, rgbd, cfg, args.image_size, args.crop_size, not args.no_cache)
            res.update({f"rgbd_{k}": v for k, v in more.items() if k != "time_s"})
        if pair is not None:
            t_stereo = time.time()
            res["stereo"] = stereo_probe(vit, pair, args.image_size)
            res["time_s"]["stereo"] = round(time.time() - t_stereo, 1)
        if worlds is not None:
            more, times = worlds(vit)
            res.update(more)
            res["time_s"].update(times)
        res["time_s"]["total"] = round(time.time() - t, 1)
        dual = dual_channel_stats(vit)
        if dual:
            res["dual_channel"] = dual
            print("  dual channel, per layer: σ(a) mean " + " ".join(f"{d['gate_mean']:.3f}" for d in dual)
                  + " | ‖W+ − W‖/‖W‖ " + " ".join(f"{d['rel_change']:.4f}" for d in dual))
        names.append(name)
        results.append(res)
        examples.append(ex)
        report["encoders"].append({"name": name, "path": str(path), "fingerprint": fingerprint(vit), "results": res})
        del vit
    return names, results, examples


def check_inputs(args, encoders: list, out: Path) -> None:
    """The optional packages asked for, every encoder, VLM and the report directory checked before any probe runs: a
    bad one stops eval naming it, not after the work before it."""
    try:
        mujoco_sim.require() if args.robot or args.mujoco else None
    except ImportError as e:
        raise SystemExit(f"eval.py --robot/--mujoco: {e}") from e
    try:
        writable_dir(out)
    except OSError as e:
        raise SystemExit(f"eval.py --out: {e}") from e
    for name, path in encoders:
        try:
            load_vit(path)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"eval.py --vision {path}: {e}") from e
    for stage_dir in map(Path, args.vlm):
        meta = stage_dir / ("state.json" if (stage_dir / "state.json").is_file() else "config.json")
        try:
            if "config" not in read_json(meta):
                raise ValueError(f"{meta} has no 'config': not a train.py stage directory or checkpoint (an LLM or "
                                 "encoder folder?)")
        except (OSError, ValueError) as e:
            raise SystemExit(f"eval.py --vlm {stage_dir}: {e}") from e


def main(argv=None):
    ap, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    if args.make_probes:
        print(probes.make_probe_sets(args.probes, args.n_images, args.probe_seed, test_every=args.test_every,
                                     overwrite=True, object_views=args.object_views))
        return
    encoders = [(encoder_name(Path(v)), Path(v)) for v in args.vision]
    if args.run:
        encoders = run_encoders(args.run, args.runs_dir) + encoders
    if not encoders and not args.qa:
        ap.error("nothing to evaluate: give --vision, --run or --qa")
    if (args.vlm or args.diagnose) and not args.qa:
        ap.error("--vlm and --diagnose need --qa: the held-out data they answer or are diagnosed on")
    cfg = ProbeConfig(seed=args.seed, depth_heads=args.depth_heads)
    if args.quick:
        cfg = cfg.shortened(0.1)
    runs = repo_path(args.runs_dir)
    out = Path(args.out or (runs / args.run / "eval" if args.run else runs / "eval"))
    report = {"config": asdict(cfg), "encoders": [], "argv": sys.argv[1:]}
    check_inputs(args, encoders, out)
    qa = None
    if args.qa:  # the held-out data and answer files read first: a bad one stops eval before the probes
        if not args.answers and not args.vlm and not args.run:
            ap.error("--qa needs --answers NAME=FILE, --vlm STAGE_DIR, or --run NAME whose stage-2 and stage-3 VLMs "
                     "answer")
        try:
            samples = load_conversations(args.qa, limit=args.qa_samples)
            answers = {name or Path(file).stem: read_answers(file, samples)
                       for name, _, file in (item.rpartition("=") for item in args.answers)}
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"eval.py --qa/--answers: {e}") from e
    names, results, examples = probe_encoders(encoders, args, cfg, report) if encoders else ([], [], [])
    if args.qa:
        qa = {name: score_qa(samples, a) for name, a in answers.items()}
        if not args.answers and not args.vlm:
            qa.update(run_qa(args.run, samples, args))
        for stage_dir in args.vlm:
            qa[stage_dir], _, diagnosed = ask_vlm(Path(stage_dir), samples, args, diagnosing=args.diagnose)
            report.setdefault("diagnostics", {})[stage_dir] = diagnosed
        report["qa"] = qa
    report["wall_time_s"] = round(time.time() - t_start, 1)
    report["summary"] = (f"{len(names)} encoder(s) on {report.get('probe_set', {}).get('images', 0)} probe images; "
                         f"deltas against {names[0] if names else '-'}; wall time {report['wall_time_s']} s.")
    print(write_report(out, report, names, results, examples, qa))
    print(f"\nwrote {out}/report.json, report.md" + (", report.png" if names else "")
          + f" ({report['wall_time_s']} s)")


if __name__ == "__main__":
    main()
