"""
Atomic writes and repo-relative paths: the one place that knows how to put a file or a directory on disk so that a
reader, or a crash, never sees it half-written (a failed write, a full disk included, is an OSError naming the file);
locks that a killed holder never leaves stuck; and `read_json`, whose errors name the file. Plain Python (no torch,
no numpy): the data engine uses it too.

    write_file_atomically(path, lambda tmp: tmp.write_text(text))      # tmp is a sibling; renamed over path
    write_dir_atomically(out, lambda tmp: save_file(state, tmp / "model.safetensors"))
    repo_path("weights/dinov2-s14")                                     # as given if it exists, else under the repo
    remove_stale_temporaries(out.parent)                                # what a killed writer left there
    with hold_lock(out / ".lock", "data.py spatial"): ...                # one writer at a time; death releases it
"""

import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def named(path, e: Exception) -> Exception | None:
    """A failed write of `path` (a full disk, a read-only folder) as an OSError that names it: the OSError often
    names only a temporary, and safetensors' says "No space left on device" with no file at all. None: not a write's."""
    if isinstance(e, OSError):
        return OSError(e.errno, f"writing {path}: {e.strerror or e}")
    return OSError(f"writing {path}: SafetensorError: {e}") if type(e).__name__ == "SafetensorError" else None


def write_file_atomically(path, write) -> Path:
    """write(tmp_path), then rename over `path`. The temporary name is hidden and carries the pid, so concurrent
    writers never share one. A failed write is an OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if named(path, e) is None:
            raise
        raise named(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_dir_atomically(out, write) -> Path:
    """Call write(tmp_dir) to fill a sibling temporary directory, then swap it in for `out`. The old directory is
    moved aside before the new one takes its name, so at every instant `out` is either the old or the new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and named(out, e) is not None:
            raise named(out, e) from e
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def writable_dir(path) -> Path:
    """`path` as a directory this process can write into (made if missing), or an OSError naming it: checked before
    work whose results would go there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / f".write-test-{os.getpid()}").touch()
        (path / f".write-test-{os.getpid()}").unlink()
    except OSError as e:
        raise OSError(e.errno, f"{path}: not a directory this process can write ({e.strerror or e})") from e
    return path


class Busy(RuntimeError):
    """Another live process holds the lock."""


def hold_lock(path, what: str, wait: bool = False):
    """An exclusive lock on the file `path` (created; it says who holds it) -> an open file: closing it, or the
    holder's death (kill -9 included), releases the lock, so a killed process never leaves it stuck. Held already:
    wait for it, or raise Busy naming the holder."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        time.sleep(0.2)                     # the holder may not have written its name yet
        f.seek(0)
        holder = f.read().strip() or "another process"
        if not wait:
            f.close()
            raise Busy(f"{Path(path).parent} is in use by {holder}") from None
        print(f"{Path(path).parent} is in use by {holder}: waiting for it", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.truncate(0)
    f.write(f"pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    return f


def lock_holder(path) -> str | None:
    """Who holds the lock at `path` (hold_lock), or None when no live process does."""
    try:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                holder = f.read().strip() or "another process"
                return None if holder.startswith(f"pid {os.getpid()} ") else holder    # this process: not busy
    except OSError:             # no such file (or folder): nobody holds it
        return None


def remove_stale_temporaries(folder) -> list:
    """Clean up after writers that were killed mid-write: their hidden .NAME.tmp-PID (a partial file or directory) is
    removed; a .NAME.old-PID (killed between write_dir_atomically's two renames) goes back to NAME when NAME is
    missing, else is removed. Only entries whose process is gone: a live writer's are never touched. -> [what went]"""
    done = []
    for p in sorted(Path(folder).glob(".*")) if Path(folder).is_dir() else []:
        m = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", p.name)
        if not m or _alive(int(m[3])):
            continue
        if m[2] == "old" and not (p.parent / m[1]).exists():
            os.replace(p, p.parent / m[1])  # the last complete version: as if the interrupted swap never began
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        done.append(p)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def repo_path(path) -> Path:
    """A path as given when it is absolute or exists from here; otherwise relative to the repository root, so that
    the presets' `weights/...` and `data/...` work from any working directory."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def read_json(path) -> dict:
    """A JSON file that must hold an object ({...}); else a ValueError naming the file (and line:column)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a JSON file (byte {e.start} is not UTF-8 text)") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}), found a {type(obj).__name__}")
    return obj
