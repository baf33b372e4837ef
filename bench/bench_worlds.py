"""
The evaluations in worlds we did not build, alone: eval.py's --robot and --mujoco (evaluation/robot.py,
evaluation/mujoco_probes.py) for each encoder without the main probe suite, with the wall time of each, written to a
JSON file after every encoder (a long run keeps what it finished).

    python bench/bench_worlds.py --vision weights/dinov2-s14 --vision runs/random-dinov2-s14 --threads 1
    python bench/bench_worlds.py --vision A --out runs/worlds.json -- --robot-episodes 6   # eval.py flags after --

Flags after `--` go to eval.py's parser (--robot-tasks, --robot-seeds, --robot-episodes, --robot-cache,
--mujoco-probes, --image-size, --no-cache...). Times include the first-time costs (making the MuJoCo probe set,
rendering and caching the demos) for the first encoder only; later encoders read those from disk, as eval.py does.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval as ev  # noqa: E402
from evaluation.probes import ProbeConfig  # noqa: E402
from model import load_vit  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--vision", action="append", required=True, help="encoder directory (load_vit), repeatable")
    ap.add_argument("--out", default="runs/worlds.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-robot", action="store_true")
    ap.add_argument("--no-mujoco", action="store_true")
    args = ap.parse_args(ours)
    torch.set_num_threads(args.threads)
    flags = (["--vision", "x"] + ([] if args.no_robot else ["--robot"]) + ([] if args.no_mujoco else ["--mujoco"])
             + rest)
    _, eargs = ev.parse_args(flags)
    cfg, report = ProbeConfig(seed=eargs.seed), {"argv": argv, "threads": args.threads, "encoders": []}
    t = time.time()
    worlds = ev.world_evaluations(eargs, cfg, report)
    report["setup_s"] = round(time.time() - t, 1)
    for path in args.vision:
        print(f"{path}:")
        vit = load_vit(path)
        t = time.time()
        results, times = worlds(vit)
        times["total"] = round(time.time() - t, 1)
        report["encoders"].append({"name": ev.encoder_name(Path(path)), "path": path, "results": results,
                                   "time_s": times})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))
        line = [f"{k} {v} s" for k, v in times.items()]
        if "robot" in results:
            line.append(f"robot average {results['robot']['average']:.3f} ± {results['robot_sd']['average']:.3f}")
        if "mujoco_depth_lin1" in results:
            line.append(f"mujoco depth lin.1 RMSE {results['mujoco_depth_lin1']['rmse']:.3f} m, seg mIoU "
                        f"{results['mujoco_segmentation']['miou']:.3f}")
        print("  " + "; ".join(line))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
