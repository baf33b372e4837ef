"""
Spatial data generation speed (issue target: >= 40 samples/s at 448x448 with --workers 2), where the time goes,
disk use per sample, and how well lifting recovers the exact synthetic geometry.

    python bench/bench_data.py                          # 600 samples, 448 px, 2 workers, then a profile
    python bench/bench_data.py --n 2000 --workers 2 --size 448 --lifting 100

1. Throughput: `data.generate` end to end (process start-up, rendering, conversations, PNG encoding, shard writes)
   into a temporary directory: wall samples/s, CPU ms per sample (workers + main), bytes per sample on disk. The
   machine's load average is printed too: CPUs shared with other jobs make wall-clock rates lower than the CPU time
   says. The same command as a CLI: `python data.py spatial --n 600 --out /tmp/s --workers 2`.
2. Profile: one process making --profile samples under cProfile, the time split into stages.
3. Lifting (--lifting K frames): each synthetic frame treated as real RGB-D data (no gravity given): the floor
   RANSAC's gravity error, and the lifted (visible-surface) cubes against the exact cubes of fully visible objects.
"""

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from dataengine import scenes, spatial, views, writer  # noqa: E402

STAGES = {   # profile function name -> stage
    "render": "render (ray casting, shading, shadows)", "random_scene": "scene + camera sampling",
    "random_camera": "scene + camera sampling", "interior": "mask interiors (point sampling, visibility)",
    "candidates": "mask interiors (point sampling, visibility)", "conversation": "conversation (12 turns)",
    "png_bytes": "PNG encoding", "dumps": "JSON", "write_bytes": "file writes", "replace": "file writes",
    "cube": "exact cubes",
}


def throughput(n, size, workers):
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        data.generate("spatial", tmp, n, seed=0, size=size, workers=workers, progress=False)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
        by_kind = {}
        for p in Path(tmp).rglob("*"):
            if p.is_file() and p.parent.name != "shards":
                kind = {"gt": "gt/" + p.stem.split("_")[-1], "images": "images"}.get(p.parent.name, "data.jsonl etc.")
                by_kind[kind] = by_kind.get(kind, 0) + p.stat().st_size
        total = sum(by_kind.values())
    print(f"throughput: {n} samples, {size}x{size}, --workers {workers}: {wall:.1f} s wall = {n / wall:.1f} samples/s; "
          f"CPU {1000 * cpu / n:.1f} ms/sample (all processes) -> {workers * n / cpu:.1f} samples/s "
          f"if {workers} cores were free")
    parts = ", ".join(f"{k} {v / n / 1024:.1f}" for k, v in sorted(by_kind.items()))
    print(f"disk: {total / n / 1024:.1f} KiB/sample ({parts})")


def profile(n, size):
    writer.fast_malloc()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for sub in ("images", "gt"):
            (out / sub).mkdir()
        spec = writer.DatasetSpec(seed=1, size=size)
        spatial.make_sample(spec, 10 ** 6, out, [])              # warm-up
        prof = cProfile.Profile()
        t0 = time.process_time()
        prof.enable()
        for i in range(n):
            spatial.make_sample(spec, i, out, [])
        prof.disable()
        cpu = time.process_time() - t0
    stats = pstats.Stats(prof).stats                            # {(file, line, name): (cc, nc, tt, ct, callers)}
    stages = {}
    for (_, _, name), (_, _, _, cumulative, callers) in stats.items():
        stage = STAGES.get(name)
        # count a function once, at its outermost call (not where a staged function calls another staged one)
        if stage and not any(STAGES.get(c[2]) for c in callers):
            stages[stage] = stages.get(stage, 0.0) + cumulative
    total = sum(v[3] for k, v in stats.items() if k[2] == "make_sample")
    print(f"profile: {n} samples in one process, {1000 * cpu / n:.1f} ms CPU/sample "
          f"({1000 * total / n:.1f} ms under the profiler)")
    for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<45s} {1000 * seconds / n:6.1f} ms  {100 * seconds / total:5.1f} %")
    other = total - sum(stages.values())
    print(f"  {'other (bookkeeping, views, meta)':<45s} {1000 * other / n:6.1f} ms  {100 * other / total:5.1f} %")


def lifting(k, size):
    gravity_err, cube_err, height_err, used = [], [], [], 0
    for i in range(k):
        rng = np.random.default_rng([7, i])
        scene = scenes.random_scene(rng)
        camera = scenes.random_camera(rng, scene)
        v = scenes.render(scene, camera, size, size)
        lifted = views.lift(v["depth"].astype(np.float64), v["K"], v["instance"], np.random.default_rng(i))
        R_cw, origin = v["cam_to_world"][:3, :3], v["cam_to_world"][:3, 3]
        if lifted["gravity"] != "floor":
            continue
        used += 1
        gravity_err.append(np.degrees(np.arccos(np.clip(lifted["R"][1] @ R_cw[2], -1, 1))))
        height_err.append(abs(lifted["camera_height"] - origin[2]))
        # exact cubes in the frame lifting found, for objects fully in view and unoccluded
        R = lifted["R"] @ R_cw.T
        for j, obj in enumerate(scene.objects, 1):
            alone = scenes.render(scenes.Scene(scene.room, [obj]), camera, size, size, shadows=False)
            seen, full = (v["instance"] == j).sum(), (alone["instance"] == 1).sum()
            border = np.concatenate([alone["instance"][[0, -1]].ravel(), alone["instance"][:, [0, -1]].ravel()])
            if j in lifted["cubes"] and full > 200 and seen == full and not border.any():
                cube_err.append(np.abs(lifted["cubes"][j] - obj.cube(R, origin)))
    cube_err = np.array(cube_err)                                  # (n, 2, 3)
    print(f"lifting: {used}/{k} frames found a floor; gravity error median {np.median(gravity_err):.2f} deg "
          f"(max {np.max(gravity_err):.2f}); camera height error median {100 * np.median(height_err):.1f} cm")
    names = ["min X", "min Y", "min Z", "max X", "max Y", "max Z"]
    errs = cube_err.reshape(len(cube_err), 6)
    cells = [f"{n} {100 * np.median(e):.1f} | {100 * np.percentile(e, 90):.1f}" for n, e in zip(names, errs.T)]
    print(f"  lifted vs exact cube, {len(cube_err)} fully visible objects, median | 90th percentile error (cm): "
          + ", ".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile", type=int, default=100, help="samples to profile in one process (0 = skip)")
    ap.add_argument("--lifting", type=int, default=0, help="synthetic frames for the lifting-accuracy check")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    if args.n:
        throughput(args.n, args.size, args.workers)
    if args.profile:
        profile(args.profile, args.size)
    if args.lifting:
        lifting(args.lifting, args.size)


if __name__ == "__main__":
    main()
