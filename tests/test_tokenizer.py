"""Tokenizer parity with the `tokenizers` library on tokenizer.json files built here, the .tiktoken cache, the
byte-level tokenizer, chat rendering (against transformers' own chat-template rendering) and bad input."""

import json
import random
import sysconfig
from pathlib import Path

import pytest
import tiktoken.load
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from language.tokenizer import LLAMA3_PATTERN, Tokenizer

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's chat template, as stored in its GGUF
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

STRINGS = [
    "", " ", "   ", "hello world", "Hello World!", "a  3", "a   3 b", "x=1;y=22;z=333", "12345 678,90 3.14159",
    "year 2024-11-24", "  leading", "trailing   ", "a    b", "\tindent\t\ttabs", "line1\n\n\nline2\r\nline3",
    "mixed \t \n whitespace", "I'll don't WE'RE you've", "héllo wörld", "e\u0301 vs \u00e9 (combining)",
    "日本語のテキストです。", "Привет, мир!", "مرحبا بالعالم", "हिन्दी पाठ", "한국어 텍스트", "🙂🎉👩‍👩‍👧 emoji",
    "\u00a0non-breaking\u2009thin", "Ⅻ ½ ² ٣٤ (other numerals)", "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more", "<|im_end|><|im_end|>", "a<|im_start|>b",
    "ǅ Σσς ß ﬁ", "\x00\x01\x7f control", "🏳️‍🌈" * 3, "$$$ ... !!! ???", "'s 's's",
]


def stdlib_texts(n_files: int, skip: int = 0, max_chars: int = 20000) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip : skip + n_files]
    return [f.read_text(encoding="utf-8", errors="replace")[:max_chars] for f in files]


TRAIN = stdlib_texts(40) + STRINGS * 20
HELD_OUT = stdlib_texts(30, skip=200)


def pre_tokenizer(style: str):
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("bytelevel", "digits"))
    if style == "bytelevel":
        return level
    if style == "digits":  # SmolLM2
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])
    pattern = QWEN2_PATTERN if style == "qwen2" else LLAMA3_PATTERN
    return pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"), level])


def train(style: str, vocab_size: int = 1200, alphabet=True, unk=None, texts=TRAIN) -> dict:
    """A byte-level BPE trained by `tokenizers` with the given pre-tokenizer style, as tokenizer.json content."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizer(style)
    tok.decoder = decoders.ByteLevel()
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + ([unk] if unk else []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tj = json.loads(tok.to_str())
    if style == "llama3":
        tj["model"]["ignore_merges"] = True  # as in Llama-3's tokenizer.json
    return tj


def pair(tj: dict, tmp_path: Path, config: dict | None = None):
    """(ours loaded from files, the `tokenizers` reference) for one tokenizer.json."""
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.load(tmp_path), tokenizers.Tokenizer.from_str(json.dumps(tj))


def assert_parity(ours: Tokenizer, ref, texts):
    expected = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    got = [ours.encode(t) for t in texts]
    bad = [(t[:80], g[:20], e[:20]) for t, g, e in zip(texts, got, expected) if g != e]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first: {bad[0]}"
    for ids in expected:
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("style", ["bytelevel", "digits", "qwen2", "llama3"])
@pytest.mark.parametrize("merges_as", ["pairs", "strings"])
def test_parity_with_tokenizers(style, merges_as, tmp_path):
    tj = train(style)
    if merges_as == "strings":  # the classic "a b" layout; tokenizers >= 0.20 writes [a, b]
        tj["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert isinstance(tj["model"]["merges"][0], str if merges_as == "strings" else list)
    ours, ref = pair(tj, tmp_path)
    assert ours.rank_to_id is None and ours.n_vocab == ref.get_vocab_size()
    assert_parity(ours, ref, STRINGS + HELD_OUT)
    assert ours.encode("<|im_end|>") == [2] and ours.encode("<|im_end|>", specials=False) != [2]


def test_ids_not_in_merge_order(tmp_path):
    """Token ids shuffled against the merge order: ranks are renumbered and mapped back to ids."""
    tj = train("digits")
    vocab = tj["model"]["vocab"]
    regular = sorted((t for t in vocab if t not in SPECIALS), key=vocab.get)
    ids = [vocab[t] for t in regular]
    random.Random(0).shuffle(ids)
    tj["model"]["vocab"] = {**{t: vocab[t] for t in SPECIALS}, **dict(zip(regular, ids))}
    ours, ref = pair(tj, tmp_path)
    assert ours.rank_to_id is not None
    assert_parity(ours, ref, STRINGS + HELD_OUT[:10])


@pytest.mark.parametrize("unk,fuse", [(None, False), ("<unk>", False), ("<unk>", True)])
def test_bytes_missing_from_vocabulary(unk, fuse, tmp_path):
    """A vocabulary trained on ASCII text only: HF drops the other bytes (or emits unk); tiktoken alone would panic."""
    ascii_texts = [t.encode("ascii", "ignore").decode().replace("\x01", "") for t in TRAIN]
    tj = train("bytelevel", vocab_size=600, alphabet=False, unk=unk, texts=ascii_texts)
    tj["model"]["fuse_unk"] = fuse
    ours, ref = pair(tj, tmp_path)
    assert len(ours.missing) > 128
    assert_parity(ours, ref, STRINGS + ["a\x01b", "x🙂y", "!é!", "<|im_end|>é<|im_end|>"])
    assert ours.encode("é\ud800") == ours.encode("é\ufffd")  # lone surrogate on the slow path


def test_tiktoken_cache_roundtrip(tmp_path):
    (tmp_path / "src").mkdir()
    ours, _ = pair(train("qwen2"), tmp_path / "src")
    ours.add_image_token()
    ours.save(tmp_path / "tok.tiktoken")
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tok.tiktoken")) == ours.ranks  # the standard format
    back = Tokenizer.load(tmp_path / "tok.tiktoken")
    texts = STRINGS + HELD_OUT[:10] + ["<image>\nhi"]
    assert [back.encode(t) for t in texts] == [ours.encode(t) for t in texts]
    assert (back.image_id, back.normalizer, back.n_vocab, back.pattern) == (ours.image_id, "NFC", ours.n_vocab,
                                                                            ours.pattern)
    with pytest.raises(FileNotFoundError, match="sidecar"):
        (tmp_path / "tok.tiktoken.json").unlink()
        Tokenizer.load(tmp_path / "tok.tiktoken")


def test_byte_level():
    tok = Tokenizer.byte_level()
    text = "héllo 🙂\n\t12"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a\ud800b") == list("a\ufffdb".encode())  # a lone surrogate becomes U+FFFD, no crash
    assert tok.n_vocab == 259 and tok.encode("<|im_end|>") == [258] and tok.stop_ids == [256, 258]
    assert tok.add_image_token() == 259 and tok.add_image_token() == 259 and tok.n_vocab == 260
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]
    ids, mask = tok.render(conv, n_image_tokens=3)
    assert tok.decode(ids) == "<|im_start|>user\n<image><image><image>\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert [i for i, m in zip(ids, mask) if m] == [*b"yo", 258]


# --- chat rendering -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    tj = train("digits")
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "chat_template": SMOLLM2_TEMPLATE}
    ours, ref = pair(tj, tmp_path_factory.mktemp("chatml"), config)
    return ours, ref


def hf_render(ref, template, messages, add_generation_prompt=False, bos=None):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=ref, bos_token=bos)
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)


CONV = [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "It is 4."},
        {"from": "human", "value": "And  3 × 3?\nExplain."}, {"from": "gpt", "value": "9, because 3 + 3 + 3 = 9."}]


def as_messages(conv):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in conv]


def answer_runs(ids, mask, tok):
    """The decoded runs of consecutive masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_render_chatml_matches_template(chatml, system):
    tok, ref = chatml
    conv = ([{"from": "system", "value": system}] if system else []) + CONV
    ids, mask = tok.render(conv)
    text = hf_render(ref, SMOLLM2_TEMPLATE, as_messages(conv))
    assert tok.decode(ids) == text
    assert ids == tok.encode(text)  # rendering piece by piece gives the ids of the whole string
    assert answer_runs(ids, mask, tok) == ["It is 4.<|im_end|>", "9, because 3 + 3 + 3 = 9.<|im_end|>"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert ("You are a helpful AI assistant named SmolLM" in text) == (system is None)
    gen, gen_mask = tok.render(conv[:1], add_generation_prompt=True)
    assert tok.decode(gen) == hf_render(ref, SMOLLM2_TEMPLATE, as_messages(conv[:1]), add_generation_prompt=True)
    assert not any(gen_mask)


def test_render_policies(chatml):
    tok, _ = chatml
    tok.system_prompt, default = None, tok.system_prompt
    try:
        ids, _ = tok.render(CONV[:2])
        assert tok.decode(ids).startswith("<|im_start|>user\n")
    finally:
        tok.system_prompt = default
    ids, mask = tok.render([{"from": "human", "value": "say <|im_end|>"}, {"from": "gpt", "value": "<|im_end|>"}])
    assert ids.count(tok.eot_id) == 3  # system, human, gpt: the literal text stays text
    assert answer_runs(ids, mask, tok) == ["<|im_end|><|im_end|>"]
    with pytest.raises(ValueError, match="add_image_token"):
        tok.render([{"from": "human", "value": "<image>\nWhat is this?"}])
    for bad, match in [([{"from": "robot", "value": "x"}], "needs 'from'"), ([{"from": "human", "value": 3}], "string"),
                       ([CONV[0], {"from": "system", "value": "x"}], "first"),
                       ([CONV[0], {"from": "gpt", "value": "<image>"}], "human turns")]:
        with pytest.raises(ValueError, match=match):
            tok.render(bad)


def test_render_image_tokens(tmp_path):
    tok, _ = pair(train("digits", vocab_size=500), tmp_path, {"chat_template": SMOLLM2_TEMPLATE})
    image = tok.add_image_token()
    assert image == tok.n_vocab - 1 and tok.encode("a<image>b")[1] == image
    conv = [{"from": "human", "value": "<image>\nLeft: <image> right?"}, {"from": "gpt", "value": "Yes."}]
    ids, mask = tok.render(conv, n_image_tokens=5)
    assert ids.count(image) == 10 and all(m == 0 for i, m in zip(ids, mask) if i == image)
    assert tok.decode(ids).count("<image>" * 5) == 2
    assert answer_runs(ids, mask, tok) == ["Yes.<|im_end|>"]


def test_render_llama3(tmp_path):
    tj = train("llama3", vocab_size=600)
    added = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    n = len(tj["model"]["vocab"])
    tj["added_tokens"] += [{"id": n + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for k, s in enumerate(added)]
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    tok, ref = pair(tj, tmp_path, config)
    assert tok.chat_style == "llama3" and tok.system_prompt is None and tok.eot_id == n + 3
    conv = [{"from": "system", "value": "Be brief. "}] + CONV
    ids, mask = tok.render(conv)
    text = hf_render(ref, LLAMA3_TEMPLATE, as_messages(conv), bos="<|begin_of_text|>")
    assert tok.decode(ids) == text and ids == tok.encode(text)
    assert answer_runs(ids, mask, tok) == ["It is 4.<|eot_id|>", "9, because 3 + 3 + 3 = 9.<|eot_id|>"]


# --- bad input ------------------------------------------------------------------------------------------------


def test_unsupported_tokenizer_json(tmp_path):
    tj = train("bytelevel", vocab_size=400)
    cases = [
        ({"model": {**tj["model"], "type": "WordPiece"}}, "model type 'WordPiece'"),
        ({"normalizer": {"type": "Lowercase"}}, "normalizer 'Lowercase'"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer"),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "add_prefix_space"),
        ({"decoder": {"type": "WordPiece"}}, "decoder 'WordPiece'"),
        ({"model": {**tj["model"], "merges": tj["model"]["merges"] + [["Ġzzq", "zzq"]]}}, "not in the vocabulary"),
        ({"added_tokens": [{**tj["added_tokens"][0], "lstrip": True}]}, "lstrip"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            Tokenizer.from_hf({**tj, **change})
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
