"""The language model on tiny random weights: parity with transformers (Llama tied, Llama-3 rope scaling, Qwen2,
Qwen3), the chunked loss, packing, checkpointing, KV-cache generation, loading (sharded, dtypes, GGUF, bad input)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import llm
from llm import LLM, LLMConfig, block_causal, gguf_to_hf, load_llm
from language.tokenizer import Tokenizer, byte_chars

V = 262  # = the tiny GGUF tokenizer below: 3 specials + 256 bytes + 3 merges
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(tie_word_embeddings=False, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32)),
}


def hf_model(family: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**SMALL, **extra)).eval()
    with torch.no_grad():  # larger than the 0.02 init, so that logits are far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def save_hf(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    write_tokenizer_json(folder)
    return folder


def write_tokenizer_json(folder: Path):
    """A minimal tokenizer.json (the tiny GGUF vocabulary) so that load_llm finds a tokenizer."""
    tokens, merges = gguf_vocab()
    tj = {"added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens[:3])],
          "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(tj))


def gguf_vocab():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars(), "Ġt", "he", "Ġthe"]
    return tokens, ["Ġ t", "h e", "Ġt he"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    ref = hf_model(request.param)
    folder = save_hf(ref, tmp_path_factory.mktemp(request.param))
    lm, tok = load_llm(folder)
    return request.param, ref, lm, folder


def test_logits_and_loss_match_transformers(family):
    name, ref, lm, _ = family
    idx = torch.randint(0, V, (3, 37))
    labels = idx.clone()
    labels[:, :9] = -100
    labels[1, 20:] = -100
    with torch.no_grad():
        out = ref(idx, labels=labels)
        logits = lm(idx)
        loss = lm.loss(lm.hidden(idx), idx, labels != -100, reduction="mean")
    assert (logits - out.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    assert lm.cfg.tie_embeddings == (name == "llama-tied")
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == lm.cfg.tie_embeddings
    assert lm.cfg.qk_norm == (name == "qwen3") and lm.cfg.qkv_bias == (name == "qwen2")
    assert (lm.cfg.rope_scaling is not None) == (name == "llama3-rope")


def test_config_roundtrip(family):
    _, ref, lm, folder = family
    cfg = json.loads((folder / "config.json").read_text())
    assert LLMConfig.from_hf(lm.cfg.to_hf()) == lm.cfg == LLMConfig.from_hf(cfg)
    old_layout = {k: v for k, v in cfg.items() if k != "rope_parameters"}  # transformers 4.x keys
    old_layout["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    if cfg["rope_parameters"]["rope_type"] != "default":
        old_layout["rope_scaling"] = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    assert LLMConfig.from_hf(old_layout) == lm.cfg


def test_loss_gradients_match_full_logits(monkeypatch):
    monkeypatch.setattr(llm, "LOSS_CHUNK", 5 * V)  # 5 rows per chunk: several chunks
    lm = LLM(LLMConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, tie_embeddings=False))
    h = torch.randn(2, 11, 32, requires_grad=True)
    ids = torch.randint(0, V, (2, 11))
    weights = torch.rand(2, 11) * (torch.rand(2, 11) > 0.4)
    loss = lm.loss(h, ids, weights)
    loss.backward()
    got = h.grad.clone(), lm.lm_head.weight.grad.clone()
    h.grad = lm.lm_head.weight.grad = None
    ce = F.cross_entropy(lm.lm_head(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    ref = (ce * weights[:, 1:].flatten()).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], lm.lm_head.weight.grad)
    # frozen head (stage 3): no weight gradient, same input gradient
    lm.lm_head.weight.requires_grad_(False)
    lm.lm_head.weight.grad = None
    h2 = h.detach().requires_grad_(True)
    (2 * lm.loss(h2, ids, weights)).backward()
    torch.testing.assert_close(h2.grad, 2 * got[0])
    assert lm.lm_head.weight.grad is None
    # bf16 activations and weights: fp32 softmax, weight gradient accumulated in fp32
    lm.lm_head.weight.requires_grad_(True)
    lm.to(torch.bfloat16)
    h3 = h.detach().bfloat16().requires_grad_(True)
    loss16 = lm.loss(h3, ids, weights)
    loss16.backward()
    torch.testing.assert_close(loss16, ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(h3.grad.float(), got[0], rtol=0.05, atol=2e-3)
    torch.testing.assert_close(lm.lm_head.weight.grad.float(), got[1], rtol=0.05, atol=2e-3)
    lm.float()
    # bf16 autocast over fp32 weights (the trainer's GPU mode): bf16 matmuls, fp32 gradients
    h.grad = lm.lm_head.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_amp = lm.loss(h, ids, weights)
    loss_amp.backward()
    assert h.grad.dtype == lm.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss_amp, ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(h.grad, got[0], rtol=0.05, atol=2e-3)
    torch.testing.assert_close(lm.lm_head.weight.grad, got[1], rtol=0.05, atol=2e-3)
    # nothing supervised: zero, and still differentiable
    zero = lm.loss(h, ids, torch.zeros_like(weights), reduction="mean")
    zero.backward()
    assert zero.item() == 0


def random_llm(**kw):
    torch.manual_seed(0)
    lm = LLM(LLMConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, **kw)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return lm


def test_packed_row_equals_separate_rows():
    lm = random_llm()
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 6))
    wa, wb = (torch.arange(9) >= 4).float()[None], (torch.arange(6) >= 2).float()[None]
    row, weights = torch.cat([a, b], 1), torch.cat([wa, wb], 1)
    positions, mask = block_causal(torch.tensor([[0] * 9 + [1] * 6]))
    assert positions.tolist() == [list(range(9)) + list(range(6))]
    with torch.no_grad():
        h = lm.hidden(row, positions=positions, mask=mask)
        torch.testing.assert_close(h, torch.cat([lm.hidden(a), lm.hidden(b)], 1), atol=1e-5, rtol=1e-5)
        only_a, only_b = weights.clone(), weights.clone()
        only_a[:, 9:], only_b[:, :9] = 0, 0
        torch.testing.assert_close(lm.loss(h, row, only_a), lm.loss(lm.hidden(a), a, wa))
        torch.testing.assert_close(lm.loss(h, row, only_b), lm.loss(lm.hidden(b), b, wb))


def test_grad_checkpointing_same_gradients():
    lm = random_llm().train()
    lm.requires_grad_(False)  # the frozen LLM of stage 3: gradients must still reach the input embeddings
    ids = torch.randint(0, V, (2, 10))
    grads, losses = [], []
    for ckpt in (False, True):
        lm.grad_checkpointing = ckpt
        x = lm.embed(ids).detach().requires_grad_(True)
        loss = lm.loss(lm.hidden(embeds=x), ids, torch.ones(2, 10), reduction="mean")
        loss.backward()
        grads.append(x.grad)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def left_pad(prompts):
    T = max(len(p) for p in prompts)
    batch = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pad_mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    return batch, pad_mask


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_generation_cache_batching_embeds(kind):
    lm = random_llm(qk_norm=kind == "qwen3")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 11, 7)]
    singles = [lm.generate(torch.tensor([p]), max_new_tokens=12)[0] for p in prompts]
    for p, new in zip(prompts, singles):  # the KV cache equals recomputing everything each step
        seq = torch.tensor([p])
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert new == seq[0, len(p):].tolist()
    batch, pad_mask = left_pad(prompts)
    assert lm.generate(batch, pad_mask=pad_mask, max_new_tokens=12) == singles
    with torch.no_grad():
        embeds = lm.embed(batch)
    assert lm.generate(embeds=embeds, pad_mask=pad_mask, max_new_tokens=12) == singles
    stop = singles[1][4]
    cut = lm.generate(batch, pad_mask=pad_mask, max_new_tokens=12, stop_ids=[stop])
    for full, got in zip(singles, cut):
        assert got == full[: full.index(stop)] if stop in full else got == full


def test_sampling_options():
    lm = random_llm()
    batch, pad_mask = left_pad([[5, 6, 7], [9, 10, 11, 12, 13]])
    greedy = lm.generate(batch, pad_mask=pad_mask, max_new_tokens=8)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert lm.generate(batch, pad_mask=pad_mask, max_new_tokens=8, temperature=1.0, **kw) == greedy
    runs = [lm.generate(batch, pad_mask=pad_mask, max_new_tokens=8, temperature=2.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    logits = torch.randn(4, V)
    draws = torch.stack([llm.sample_next(logits, 1.0, top_k=5) for _ in range(50)], 1)  # (4, 50)
    assert all(set(d.tolist()) <= set(logits[i].topk(5).indices.tolist()) for i, d in enumerate(draws))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab(tied):
    lm = random_llm(tie_embeddings=tied)
    idx = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        before = lm(idx)
    lm.resize_vocab(V + 3)
    with torch.no_grad():
        after = lm(idx)
    assert after.shape[-1] == V + 3 and lm.cfg.vocab_size == V + 3
    torch.testing.assert_close(after[..., :V], before)
    emb = lm.model.embed_tokens.weight
    torch.testing.assert_close(emb[V:], emb[:V].mean(0).expand(3, -1))
    assert (lm.lm_head.weight is emb) == tied


# --- loading --------------------------------------------------------------------------------------------------


def test_tiny_preset_dir_roundtrip(tmp_path):
    """The tiny preset's path: random LLM + byte-level tokenizer saved as config.json, model.safetensors and the
    tokenizer.tiktoken cache (no tokenizer.json), read back by load_llm; <image> added and the vocabulary grown."""
    tok = Tokenizer.byte_level()
    lm = LLM(LLMConfig(vocab_size=len(tok)))
    tok.add_image_token()
    lm.resize_vocab(len(tok))
    (tmp_path / "config.json").write_text(json.dumps(lm.cfg.to_hf()))
    save_file({k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    tok.save(tmp_path / "tokenizer.tiktoken")
    lm2, tok2 = load_llm(tmp_path)
    assert lm2.cfg == lm.cfg and (len(tok2), tok2.image_id, tok2.stop_ids) == (260, 259, [256, 258])
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), lm2.state_dict().values()))
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]
    assert tok2.render(conv, n_image_tokens=4) == tok.render(conv, n_image_tokens=4)


def test_sharded_and_dtypes(tmp_path):
    ref = hf_model("qwen2")
    single, _ = load_llm(save_hf(ref, tmp_path / "single"))
    sharded, _ = load_llm(save_hf(ref, tmp_path / "sharded", max_shard_size="100KB"))
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), sharded.state_dict().values()))
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    bf16, _ = load_llm(save_hf(ref16, tmp_path / "bf16"))
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    up, _ = load_llm(tmp_path / "bf16", dtype=torch.float32)
    assert up.lm_head.weight.dtype == torch.float32
    idx = torch.randint(0, V, (2, 30))
    with torch.no_grad():  # bf16 rounds differently in each implementation: as close to fp32 as transformers is
        exact = ref(idx).logits
        ours_err = (bf16(idx).float() - exact).abs().max()
        hf_err = (ref16(idx).logits.float() - exact).abs().max()
    assert ours_err <= 1.25 * hf_err


def test_bad_checkpoints(tmp_path):
    folder = save_hf(hf_model("llama-tied"), tmp_path / "m")
    weights = folder / "model.safetensors"
    sd = load_file(weights)

    def expect(match, sd=None, config=None):
        if sd is not None:
            save_file(sd, weights)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            load_llm(folder)

    good = json.loads((folder / "config.json").read_text())
    expect(r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight",
           {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    expect(r"unexpected keys: model\.layers\.0\.self_attn\.q_proj\.bias", {
        **sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    expect(r"mis-shaped keys: model\.norm\.weight: \(63,\) in the checkpoint, \(64,\) expected",
           {**sd, "model.norm.weight": torch.ones(63)})
    expect("lm_head.weight differs", {**sd, "lm_head.weight": torch.zeros(V, 64)})
    save_file(sd, weights)
    expect("model_type 'gpt2' is not supported", config={**good, "model_type": "gpt2"})
    expect("architecture 'MistralForCausalLM' is not supported", config={**good, "architectures": ["MistralForCausalLM"]})
    expect("rope type 'yarn' is not supported", config={**good, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    expect("missing 'hidden_size'", config={k: v for k, v in good.items() if k != "hidden_size"})
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llm(folder)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_llm(tmp_path / "nothing.gguf")


# --- GGUF -----------------------------------------------------------------------------------------------------


def write_gguf(path: Path, model, arch: str = "llama"):
    """A tiny GGUF written the way llama.cpp's converter does: F32 tensors, ggml names, q/k rows permuted."""
    import gguf

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(512)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges = gguf_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{{ '<|im_start|>system\nHello<|im_end|>\n' }}")

    def permute(t, n):  # HF -> llama.cpp
        return t.reshape(n, 2, t.shape[0] // n // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)

    names = {v: k for k, v in llm.GGUF_BLOCK_NAMES.items()}
    for key, t in model.state_dict().items():
        t = t.numpy()
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            _, _, i, *rest = key.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            t = permute(t, heads) if module == "self_attn.q_proj" else permute(t, kv) if module == "self_attn.k_proj" else t
            key = f"blk.{i}.{names[module]}.{suffix}"
        else:
            key = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}[key]
        w.add_tensor(key, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_loads_and_converts(tmp_path):
    from transformers import LlamaForCausalLM

    ref = hf_model("llama-tied")
    path = write_gguf(tmp_path / "tiny.gguf", ref)
    lm, tok = load_llm(path)
    idx = torch.randint(0, V, (2, 21))
    with torch.no_grad():
        expected = ref(idx).logits
        assert (lm(idx) - expected).abs().max().item() <= 1e-4
    assert tok.encode(" the<|im_end|>") == [261, 2] and tok.system_prompt == "Hello"
    out = gguf_to_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"]
    again, tok2 = load_llm(out)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))
    assert tok2.encode(" the the 12") == tok.encode(" the the 12") and tok2.system_prompt == "Hello"
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(idx).logits - expected).abs().max().item() <= 1e-4
    gguf_to_hf(path, out)  # replacing an existing directory
    assert not list(tmp_path.glob(".hf*"))


def test_gguf_bad_architecture(tmp_path):
    path = write_gguf(tmp_path / "other.gguf", hf_model("llama-tied"), arch="qwen2")
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2' is not supported"):
        load_llm(path)
