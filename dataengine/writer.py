"""
The writer every kind of data goes through: one sample per index, seeded from (seed, index), so content never
depends on --workers; shards of samples are written atomically and data.jsonl is assembled from them, so a re-run
continues where one stopped. Each builder (BUILDERS) has prepare(spec, embed) -> source, what every sample needs
(RGB-D frame folders, label vocabularies, view pairs; embed: images -> patch features), and
make_sample(spec, index, out, source) -> one JSON line.

    write_dataset("spatial", "data/spatial", n=1000, seed=0, size=448, workers=2)     # -> data/spatial/data.jsonl

A directory holds one kind: <kind>.json records the DatasetSpec, and a resumed run must match it. The writer writes only
into a new or empty folder or one with its manifest, never over a data.jsonl its shards do not account for (edited by
hand: kept, refused), and nothing at all when the dataset is complete; a second writer in the same folder waits for
the first (.lock).
"""

import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dataengine import grounding, instruct, multiview, scenes, spatial
from storage.atomic import hold_lock, write_file_atomically, write_text_atomically

BUILDERS = {"spatial": spatial, "captions": instruct, "instruct": instruct, "grounding": grounding,
            "multiview": multiview, "spatial-multiview": multiview}      # kind -> the module that builds its samples
KINDS = tuple(BUILDERS)
ORDERED = ("spatial", "spatial-multiview")      # kinds whose turns go pixel -> object -> scene: --order applies
ORDERS = ("forward", "reversed", "shuffled")
SIZES = (32, 4096)      # synthetic image side: below 32 px rooms show too few objects to ask about
LOCK = ".lock"          # held while a writer works in a directory: a second one waits for it


@dataclass
class DatasetSpec:     # what fixes a dataset's content; saved in <kind>.json, a resumed run must match it
    seed: int = 0
    size: int = 448
    order: str | None = "forward"      # None for kinds without levels
    rgbd: str | None = None
    shard_size: int = 256
    kind: str = "spatial"
    band: list | None = None           # multi-view kinds: [lo, hi] of the co-visibility (or feature-distance) band
    encoder: str | None = None         # multi-view kinds on RGB-D frames without poses: the encoder of that band
    depth_scale: float = 1.0           # RGB-D frames: stored depth x depth_scale = meters (0.001: millimetres)
    points_per_turn: int = 1           # spatial: points each depth / 3D-position turn asks about


def fast_malloc():
    """Keep large numpy temporaries on the heap. A 448x448 float32 image (800 KB) is above glibc's mmap threshold,
    so every temporary is a fresh mmap whose pages fault in one by one: rendering is ~1.7x faster without that.
    glibc only (elsewhere a no-op); affects this process's allocator, so only data generation calls it."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)    # M_MMAP_THRESHOLD (32 MB is glibc's largest)
        libc.mallopt(-1, 64 << 20)    # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_worker = {}


def _init(spec, out, source):
    fast_malloc()
    _worker.update(spec=spec, out=Path(out), source=source)


def _job(index):
    return index, BUILDERS[_worker["spec"].kind].make_sample(_worker["spec"], index, _worker["out"], _worker["source"])


def dataset_spec(kind, seed, size, order, rgbd, shard_size, band, encoder, depth_scale=1.0,
                 points_per_turn=1) -> DatasetSpec:
    """The spec of a dataset, its options checked (a ValueError names the one that is wrong)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: data.py writes {', '.join(KINDS)}")
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: expected forward, reversed or shuffled")
    multi = "multiview" in kind
    if (band is not None or encoder) and not multi:
        raise ValueError(f"band / encoder select view pairs: they apply to the multi-view kinds, not {kind!r}")
    if encoder and not rgbd:
        raise ValueError("encoder: the feature-distance band pairs RGB-D frames without poses; give rgbd too")
    if depth_scale != 1 and not (rgbd and 0 < depth_scale < float("inf")):
        raise ValueError(f"depth_scale {depth_scale}: a finite number > 0 that converts RGB-D frames' depth (rgbd) "
                         "to meters")
    if points_per_turn != 1 and kind != "spatial":
        raise ValueError(f"points_per_turn {points_per_turn!r}: applies to the depth / 3D-position turns of spatial "
                         f"data, not to {kind!r}")
    if not (isinstance(size, int) and SIZES[0] <= size <= SIZES[1]):
        raise ValueError(f"size {size!r}: expected a whole number of pixels from {SIZES[0]} to {SIZES[1]}")
    if not (isinstance(shard_size, int) and shard_size >= 1):
        raise ValueError(f"shard_size {shard_size!r}: expected a whole number of samples >= 1")
    if points_per_turn not in range(1, 9):
        raise ValueError(f"points_per_turn {points_per_turn!r}: expected a whole number of points from 1 to 8")
    if multi:
        band = [float(b) for b in (band if band is not None else multiview.FEATURE_BAND if encoder else multiview.BAND)]
        if len(band) != 2 or not 0 <= band[0] < band[1] <= (2 if encoder else 1):
            raise ValueError(f"band {band}: expected [lo, hi] with 0 <= lo < hi <= {2 if encoder else 1}")
    return DatasetSpec(seed, size, order if kind in ORDERED else None, str(Path(rgbd).resolve()) if rgbd else None,
                       shard_size, kind, band, str(Path(encoder).resolve()) if encoder else None, float(depth_scale),
                       int(points_per_turn))


def plan_of(n: int, shard_size: int) -> list:
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def shard_path(out: Path, a: int, b: int) -> Path:
    return out / "shards" / f"{a:06d}-{b:06d}.jsonl"


def written_n(out: Path, spec: DatasetSpec) -> int:
    """How many samples out/data.jsonl holds, when it is exactly what this writer assembled from its shards (0: no
    data.jsonl). A file the shards do not account for (edited by hand, or not ours) is refused, never rebuilt away."""
    data = out / "data.jsonl"
    if not data.exists():
        return 0
    with open(data, "rb") as f:
        n = sum(1 for _ in f)
    shards = [shard_path(out, a, b) for a, b in plan_of(n, spec.shard_size)]
    if all(p.is_file() for p in shards) and data.stat().st_size == sum(p.stat().st_size for p in shards):
        with open(data, "rb") as f:
            if all(f.read(p.stat().st_size) == p.read_bytes() for p in shards):
                return n
    raise ValueError(f"{data} is not the file data.py assembled from {out / 'shards'} (edited by hand?): it is kept; "
                     "move it away to rebuild it, or write to another --out")


def check_out(out: Path, spec: DatasetSpec) -> None:
    """Refuse an --out that data.py may not write into: a file, another kind's directory, one written with other
    options, or a folder it did not write (no <kind>.json manifest, yet files in it). Writes nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: not a directory")
    others = [k for k in KINDS if k != spec.kind and (out / f"{k}.json").exists()]
    if others:
        raise SystemExit(f"{out} holds {others[0]} data ({others[0]}.json): write {spec.kind} data to another --out")
    manifest = out / f"{spec.kind}.json"
    if manifest.exists():
        old = {**asdict(DatasetSpec()), **json.loads(manifest.read_text())["config"]}   # fields added since: defaults
        if old != asdict(spec):
            raise SystemExit(f"{out} was written with {old}, not {asdict(spec)}: use the same options or a new --out")
    elif out.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in out.rglob("*")):  # .lock, .DS_Store
        raise ValueError(f"--out {out}: a folder data.py did not write (no {manifest.name} manifest): it is left as "
                         "it is; choose a new or empty --out")


def open_dataset(out: Path, spec: DatasetSpec):
    """Create out for spec (check_out has passed): the manifest first, so that a folder never holds our files
    without it."""
    manifest = out / f"{spec.kind}.json"
    if not manifest.exists():
        info = dict(kind=spec.kind, config=asdict(spec), categories=list(scenes.CATEGORIES),
                    frame="answers: X right, Y up (gravity), Z forward (horizontal), meters; pixels (u/W, v/H)")
        write_text_atomically(manifest, json.dumps(info, indent=1))
    for sub in ("images", "gt", "shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def write_dataset(kind: str, out, n: int, seed: int = 0, size: int = 448, order: str = "forward", workers: int = 1,
                  rgbd=None, shard_size: int = 256, progress: bool = True, band=None, encoder=None,
                  embed=None, depth_scale: float = 1.0, points_per_turn: int = 1) -> Path:
    """Write (or finish writing) n samples of `kind` to out -> its data.jsonl. rgbd: RGB-D frame folders instead of
    the synthetic rooms (multi-view kinds: scene folders of frames), their depth x depth_scale in meters. band: the
    co-visibility band, or the feature band when `encoder` (its path) pairs frames without poses; embed computes those
    features. points_per_turn: points each depth / 3D-position turn of spatial data asks about."""
    spec = dataset_spec(kind, seed, size, order, rgbd, shard_size, band, encoder, depth_scale, points_per_turn)
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n {n!r}: expected a whole number of samples >= 1")
    out = Path(out)
    check_out(out, spec)
    if out.is_dir() and written_n(out, spec) == n:
        return out / "data.jsonl"          # complete: nothing to write (a read-only dataset stays as it is)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = hold_lock(out / LOCK, f"data.py {kind}", wait=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    with lock:
        check_out(out, spec)               # again, now that no other writer is busy here
        if written_n(out, spec) == n:
            return out / "data.jsonl"
        return _write(kind, out, n, spec, workers, progress, embed)


def _write(kind: str, out: Path, n: int, spec: DatasetSpec, workers: int, progress: bool, embed) -> Path:
    open_dataset(out, spec)
    source = BUILDERS[kind].prepare(spec, embed)
    fast_malloc()
    plan = plan_of(n, spec.shard_size)
    shard = lambda a, b: shard_path(out, a, b)
    todo = [(a, b) for a, b in plan if not shard(a, b).exists()]
    indices = [i for a, b in todo for i in range(a, b)]
    lines, t0, shown, pool = {}, time.time(), 0.0, None
    if workers > 1 and len(indices) > 1:
        pool = mp.get_context("spawn").Pool(workers, _init, (spec, str(out), source))
        results = pool.imap(_job, indices, chunksize=4)
    else:
        results = ((i, BUILDERS[kind].make_sample(spec, i, out, source)) for i in indices)
    try:
        for done, (i, line) in enumerate(results, 1):
            lines[i] = line
            while todo and all(k in lines for k in range(*todo[0])):
                a, b = todo.pop(0)
                write_text_atomically(shard(a, b), "".join(lines.pop(k) + "\n" for k in range(a, b)))
            if progress and (time.time() - shown > 0.5 or done == len(indices)):
                shown, rate = time.time(), done / max(time.time() - t0, 1e-9)
                eta = (len(indices) - done) / max(rate, 1e-9)
                print(f"\r{kind} {n - len(indices) + done}/{n}  {rate:.1f} samples/s  eta {eta:.0f}s ",
                      end="", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if progress and indices:
        print(file=sys.stderr)

    def assemble(tmp):
        with open(tmp, "w") as f:
            for a, b in plan:
                f.write(shard(a, b).read_text())
    return write_file_atomically(out / "data.jsonl", assemble)
