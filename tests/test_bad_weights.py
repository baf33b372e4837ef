"""Broken weight, config and tokenizer files: each load fails with a ValueError (KeyError for the ViT's strict key
check) naming the file, the key where one is at fault, and what was expected; a library's own error stays the
__cause__. The tiny models are built here, so every case runs in well under a second."""

import json
import re
import struct

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from language.tokenizer import Tokenizer
from llm import LLM, LLMConfig, gguf_number, gguf_to_hf, load_llm
from model import ViT, ViTConfig, load_vit, save_vit


def raises(exc, path, what):
    """pytest.raises for an error whose message names `path` and then says `what`."""
    return pytest.raises(exc, match=re.escape(str(path)) + ".*" + what)


@pytest.fixture
def vit_dir(tmp_path):
    save_vit(ViT(ViTConfig(dim=32, depth=1, heads=2, mlp_dim=48, pos_grid=4)), tmp_path / "vit")
    return tmp_path / "vit"


@pytest.fixture
def llm_dir(tmp_path):
    """A tiny HF-layout LLM dir: config.json, model.safetensors (tied head left out), the tokenizer cache."""
    tok, folder = Tokenizer.byte_level(), tmp_path / "llm"
    lm = LLM(LLMConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(lm.cfg.to_hf()))
    save_file({k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}, folder / "model.safetensors")
    tok.save(folder / "tokenizer.tiktoken")
    return folder


# --- safetensors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, what", [
    (lambda b: np.random.default_rng(0).bytes(4000),
     r"not a safetensors file \(header length \d+ exceeds file size 4000\)"),
    (lambda b: b[: len(b) // 2], r"truncated: tensor '.+' ends at data byte \d+, but the file holds \d+ bytes of data"),
    (lambda b: b"", r"not a safetensors file \(0 bytes; expected an 8-byte header length"),
    (lambda b: b[:-10], r"truncated: tensor '.+' ends at data byte (\d+), but the file holds \d+ bytes of data "
                        r"\(file size \d+, expected \d+\)"),
    (lambda b: struct.pack("<Q", 6) + b"{nope}", r"not a safetensors file \(its 6-byte header is not JSON"),
], ids=["random", "half", "empty", "data-cut", "header-not-json"])
def test_broken_safetensors(vit_dir, llm_dir, damage, what):
    for folder, load in ((vit_dir, load_vit), (llm_dir, load_llm)):
        file = folder / "model.safetensors"
        file.write_bytes(damage(file.read_bytes()))
        with raises(ValueError, file, what) as e:
            load(folder)
        assert isinstance(e.value.__cause__, SafetensorError)


def test_broken_shard_index(llm_dir):
    index = llm_dir / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"model.norm.weight": "model.safetensors"')
    with raises(ValueError, index, r":1:\d+: not valid JSON"):
        load_llm(llm_dir)
    index.write_text(json.dumps({"metadata": {}}))
    with raises(ValueError, index, "expected a 'weight_map' object"):
        load_llm(llm_dir)


def test_integer_weights_are_refused_not_cast(vit_dir, llm_dir):
    file = llm_dir / "model.safetensors"
    save_file({**load_file(file), "model.norm.weight": torch.ones(32, dtype=torch.int64)}, file)
    with raises(ValueError, llm_dir, r"not floating point where a float weight is expected: model\.norm\.weight "
                                     r"\(int64\)"):
        load_llm(llm_dir)  # was: silently cast to float
    file = vit_dir / "model.safetensors"
    save_file({**load_file(file), "blocks.0.ls1": torch.ones(32, dtype=torch.int32)}, file)
    with raises(KeyError, vit_dir, r"not floating point where a float weight is expected: blocks\.0\.ls1 \(int32\)"):
        load_vit(vit_dir)


# --- config.json ----------------------------------------------------------------------------------------------


def test_broken_config_json(vit_dir, llm_dir):
    for folder, load in ((vit_dir, load_vit), (llm_dir, load_llm)):
        config = folder / "config.json"
        good = config.read_text()
        config.write_text(good[: len(good) // 2])
        with raises(ValueError, config, r":\d+:\d+: not valid JSON") as e:
            load(folder)
        assert isinstance(e.value.__cause__, json.JSONDecodeError)
        config.write_text("[]")
        with raises(ValueError, config, r"expected a JSON object \(\{\.\.\.\}\), found a list"):
            load(folder)
    config = vit_dir / "config.json"
    config.write_text(json.dumps({"model_type": "spatialboost_vit"}))
    with raises(ValueError, config, "missing 'vit', which a spatialboost_vit config needs"):
        load_vit(vit_dir)
    config.write_text(json.dumps({"model_type": "dinov2", "num_hidden_layers": 1}))
    with raises(ValueError, config, "missing 'hidden_size', which a dinov2 config needs"):
        load_vit(vit_dir)


# --- tokenizer files ------------------------------------------------------------------------------------------


def tokenizer_dir(tmp_path):
    """tokenizer.json (256 byte tokens, one merge, three specials) and tokenizer_config.json."""
    from language.tokenizer import byte_chars

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars(), "he"]
    tj = {"added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens[:3])],
          "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": ["h e"]}}
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert Tokenizer.load(folder).eos_id == 2
    return folder, tj


def test_broken_tokenizer_json(tmp_path):
    folder, tj = tokenizer_dir(tmp_path)
    file = folder / "tokenizer.json"
    file.write_text(json.dumps(tj)[:500])
    with raises(ValueError, file, r":1:\d+: not valid JSON"):
        Tokenizer.load(folder)
    model = tj["model"]
    for broken, what in [
        ({**tj, "model": None}, "expected a 'model' object"),
        ({**tj, "model": {k: v for k, v in model.items() if k != "vocab"}}, r"model\.vocab should be an object"),
        ({**tj, "model": {**model, "merges": ["h e", "hello"]}}, r"model\.merges\[1\] is hello; expected"),
        ({**tj, "added_tokens": [{"id": 0, "special": True}]}, r"added_tokens\[0\] is .*; expected \{'id': int"),
        ({**tj, "model": {**model, "unk_token": "<unk>"}}, "model.unk_token '<unk>' is not in the vocabulary"),
    ]:
        file.write_text(json.dumps(broken))
        with raises(ValueError, file, what):
            Tokenizer.load(folder)


def test_broken_tokenizer_config(tmp_path):
    folder, _ = tokenizer_dir(tmp_path)
    config = folder / "tokenizer_config.json"
    for text, what in [
        ('{"eos_token": "<|im_end|>"', r":1:\d+: not valid JSON"),
        ('{"eos_token": "<|nope|>"}', "eos_token '<|nope|>' is not in the vocabulary"),  # was: eos_id None, silently
        ('{"eos_token": 2}', "eos_token should be a token string or an AddedToken object, got 2"),
        ('{"chat_template": 3}', "chat_template should be a string or a list"),
    ]:
        config.write_text(text)
        with raises(ValueError, config, what):
            Tokenizer.load(folder)


def test_broken_tokenizer_cache(tmp_path):
    file = tmp_path / "tok.tiktoken"
    Tokenizer.byte_level().save(file)
    meta_file, lines = tmp_path / "tok.tiktoken.json", file.read_text().splitlines()
    meta = json.loads(meta_file.read_text())
    file.write_text("\n".join(lines[:3] + ["not-base64!! 3"] + lines[4:]))
    with raises(ValueError, file, r":4: expected '<base64 token> <rank>', got b'not-base64!! 3'"):
        Tokenizer.load(file)
    file.write_text("\n".join(lines))
    meta_file.write_text(json.dumps(meta)[:40])
    with raises(ValueError, meta_file, r":1:\d+: not valid JSON"):
        Tokenizer.load(file)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "eos_id"}))
    with raises(ValueError, meta_file, r"missing keys \['eos_id'\] \(Tokenizer\.save writes"):
        Tokenizer.load(file)


# --- GGUF -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    from test_llm import hf_model, write_gguf

    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf_model("llama-tied")).read_bytes()


def with_tensor_type(data: bytes, name: bytes, ggml_type: int) -> bytes:
    """The GGUF bytes with tensor `name`'s type field set: it follows the name, n_dims (u32) and the dims (u64)."""
    at = data.index(name) + len(name)
    at += 4 + 8 * struct.unpack_from("<I", data, at)[0]
    return data[:at] + struct.pack("<I", ggml_type) + data[at + 4:]


@pytest.mark.parametrize("damage, what", [
    (lambda b: b"GGML" + b[4:], r"not a GGUF file \(\d+ bytes, starting b'GGML'; expected the magic b'GGUF'\)"),
    (lambda b: b"", r"not a GGUF file \(0 bytes; expected the magic b'GGUF'\)"),
    (lambda b: np.random.default_rng(0).bytes(3000), r"not a GGUF file \(3000 bytes, starting"),
    (lambda b: b[:4] + struct.pack("<I", 99) + b[8:], r"GGUF version 99 is not supported \(supported: 2, 3\)"),
    (lambda b: b[: len(b) // 2],
     r"truncated: tensor '.+' \(F32, \[\d+, \d+\]\) needs bytes \d+\.\.\d+, but the file has"),
    (lambda b: b[:2000], r"truncated: metadata 'tokenizer\.ggml\.tokens' runs past the end of the file \(2000 bytes\)"),
    (lambda b: with_tensor_type(b, b"token_embd.weight", 77),
     r"tensor 'token_embd\.weight' has ggml type 77, not one of the \d+ types this gguf library knows"),
    (lambda b: with_tensor_type(b, b"output_norm.weight", 26),  # I32: the same size as F32, so the layout holds
     r"tensor 'output_norm\.weight' has type I32 where a float \(or quantized\) weight is expected"),
], ids=["magic", "empty", "random", "version", "half", "header-cut", "unknown-type", "integer-type"])
def test_broken_gguf(tmp_path, gguf_bytes, damage, what):
    path = tmp_path / "broken.gguf"
    path.write_bytes(damage(gguf_bytes))
    with raises(ValueError, path, what):
        load_llm(path)
    with raises(ValueError, path, what):
        gguf_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gguf_without_tokenizer_lists(tmp_path):
    import gguf

    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(["a", "b"])
    w.add_eos_token_id(7)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with raises(ValueError, path, r"needs the lists .*; missing \['tokenizer\.ggml\.token_type', "
                                  r"'tokenizer\.ggml\.merges'\]"):
        Tokenizer.load(path)


@pytest.mark.parametrize("value, what", [("4", "expected a number"), ([4], "expected a number"),
                                         (True, "expected a number"), (4.5, "expected an integer")])
def test_gguf_metadata_of_the_wrong_type(value, what):
    field = {"llama.block_count": value}.get  # what gguf_field returns: the decoded value, or the default
    with raises(ValueError, "tiny.gguf", rf"GGUF metadata 'llama\.block_count' is .*; {what}"):
        gguf_number(field, "tiny.gguf", "llama.block_count")
    assert gguf_number({"llama.block_count": np.uint32(4)}.get, "tiny.gguf", "llama.block_count") == 4
