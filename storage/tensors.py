"""
Tensors on disk: safetensors files and Hugging Face-layout directories, read strictly and written atomically.
Safetensors and JSON only: no pickle anywhere a user might load someone else's file. A file that is not what it should
be (random bytes, cut short, an integer where a float weight belongs) is an error naming the file and the key.

    state = read_safetensors("weights/dinov2-s14")       # model.safetensors, a sharded index, or the one *.safetensors
    save_tensors(state, Path("runs/x/stage3/model.safetensors"))
    write_model_dir(Path("runs/x/stage3/vision"), state, {"config.json": config})
"""

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from storage.atomic import read_json, write_dir_atomically, write_file_atomically


def read_safetensors(folder: Path) -> dict:
    """All tensors of an HF-layout dir: model.safetensors, the shards model.safetensors.index.json names (checked
    against it: every listed tensor present, none in the wrong shard), or the one *.safetensors file there."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object {{tensor name: shard file}}")
        state = {}
        for name in sorted(set(weight_map.values())):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{index}: shard {name} is listed but absent")
            part = load_safetensors(folder / name)
            stray = [k for k in part if weight_map.get(k) != name]
            if stray:
                raise ValueError(f"{folder / name}: holds {stray[:8]}, which {index.name} does not map to this file")
            state.update(part)
        absent = sorted(weight_map.keys() - state.keys())
        if absent:
            raise ValueError(f"{index}: lists {absent[:8]} but their shards do not contain them")
        return state
    files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else sorted(
        p.name for p in folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected model.safetensors, model.safetensors.index.json with its shards, "
                                f"or exactly one *.safetensors file; found {files or 'none'}")
    return load_safetensors(folder / files[0])


def load_safetensors(file) -> dict:
    """One safetensors file's tensors. safetensors' own errors ("header too large") name neither the file nor the
    sizes at fault; ours do, with the library's error kept as __cause__."""
    file = Path(file)
    try:
        return load_file(file)
    except SafetensorError as e:
        raise ValueError(f"{file}: {_safetensors_problem(file) or f'not a valid safetensors file ({e})'}") from e


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a file safetensors refused, judged against the format: an 8-byte little-endian header
    length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then exactly the data they cover."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n) if 8 + n <= size else b""
    if size < 8:
        return f"not a safetensors file ({size} bytes; expected an 8-byte header length, a JSON header, the data)"
    if 8 + n > size:
        return f"not a safetensors file (header length {n} exceeds file size {size})"
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return f"not a safetensors file (its {n}-byte header is not JSON: {e})"
    try:
        ends = {k: int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None  # a JSON header of the wrong shape: the library's message says which
    data, last = size - 8 - n, max(ends, key=ends.get, default=None)
    covered = 0 if last is None else ends[last]
    if covered > data:
        return (f"truncated: tensor {last!r} ends at data byte {covered}, but the file holds {data} bytes of data "
                f"(file size {size}, expected {8 + n + covered})")
    if covered < data:
        return f"not a valid safetensors file (its tensors cover {covered} bytes of data, the file holds {data})"
    return None


def non_float(state: dict) -> list[str]:
    """'name (dtype)' of each tensor that is not floating point: weights are floats, and casting an integer
    tensor to one would load numbers no model was trained with."""
    return [f"{k} ({v.dtype})".replace("torch.", "") for k, v in sorted(state.items()) if not v.is_floating_point()]


def state_diff(expected: dict, state: dict) -> tuple[list, list, list]:
    """state against expected {name: shape}: (missing names, unexpected names, [(name, its shape, expected shape)]
    for the mis-shaped), each sorted. What the strict loaders report."""
    shape = lambda k: tuple(state[k].shape)
    bad = [(k, shape(k), tuple(expected[k])) for k in sorted(expected.keys() & state.keys())
           if shape(k) != tuple(expected[k])]
    return sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys()), bad


def listed(names: list, n: int = 8) -> str:
    return ", ".join(map(str, names[:n])) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _plain(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_tensors(state: dict, path: Path) -> None:
    state = _plain(state)
    write_file_atomically(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def write_model_dir(out: Path, state: dict, files: dict, more=None) -> Path:
    """out/model.safetensors holding `state`, out/<name> for each of `files` (JSON, indented), and whatever
    more(tmp_dir) adds, all written atomically (write_dir_atomically)."""
    def write(tmp):
        save_file(_plain(state), tmp / "model.safetensors", metadata={"format": "pt"})
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
        if more is not None:
            more(tmp)
    return write_dir_atomically(Path(out), write)
