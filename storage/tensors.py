"""
Tensors on disk: safetensors files and Hugging Face-layout directories, read strictly and written atomically.
Safetensors and JSON only: no pickle anywhere a user might load someone else's file.

    state = read_safetensors("weights/dinov2-s14")       # model.safetensors, a sharded index, or the one *.safetensors
    save_tensors(state, Path("runs/x/stage3/model.safetensors"))
"""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from storage.atomic import write_file_atomically


def read_safetensors(folder: Path) -> dict:
    """All tensors of an HF-layout dir: model.safetensors, the shards model.safetensors.index.json names (checked
    against it: every listed tensor present, none in the wrong shard), or the one *.safetensors file there."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for name in sorted(set(weight_map.values())):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{index}: shard {name} is listed but absent")
            part = load_file(folder / name)
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
    return load_file(folder / files[0])


def save_tensors(state: dict, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_file_atomically(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
