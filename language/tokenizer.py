"""
The tokenizer: a checkpoint's own byte-level BPE vocabulary run by tiktoken, and chat rendering with the loss mask.

Every source becomes the same object. tokenizer.json (HF) is read directly; a GGUF file's tokenizer metadata is
first turned into the equivalent tokenizer.json (`gguf_tokenizer_files`), so `llm.gguf_to_hf` writes exactly what
we run; a cached `.tiktoken` file (plus a `.json` sidecar) skips all parsing; `Tokenizer.byte_level()` is 256 bytes
plus specials for the tiny preset.

How a HF byte-level BPE maps onto tiktoken:
- HF merges the adjacent pair with the lowest merge index; tiktoken merges the adjacent pair whose concatenation has
  the lowest rank. Ranking every token by the index of the merge that creates it makes the two agree on vocabularies
  trained by BPE. When token ids grow with the merge index (every family we load) the rank is the id; otherwise
  ranks are renumbered and mapped back to ids.
- HF's pre-tokenizer becomes tiktoken's one split regex: ByteLevel -> GPT-2's regex; Split(regex) + ByteLevel ->
  that regex (Qwen2, Llama-3); Digits + ByteLevel (SmolLM2) -> GPT-2's regex with digits split off first and the
  whitespace look-ahead widened so that a run of spaces before a digit stays whole, as it does in HF.
- Bytes that have no token: HF drops them (or emits unk_token); tiktoken would raise a Rust PanicException (a
  BaseException). Text containing such bytes takes a slower path that does what HF does.
Added tokens (special or not) are split out of the text before the regex, as HF does.
"""

import base64
import functools
import json
import math
import re
import struct
import unicodedata
from pathlib import Path

import numpy as np
import regex
import tiktoken

from storage.atomic import read_json, write_text_atomically

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def digits_pattern(individual_digits: bool) -> str:
    """Sequence[Digits, ByteLevel(use_regex=True)] as one regex: digits first, then GPT-2's alternatives. Digits
    split the text before GPT-2's regex sees it, so ` ?\\p{N}+` can never fire and whitespace before a digit ends
    its piece: `\\s+(?!\\S)` becomes `\\s+(?![^\\s\\p{N}])`."""
    digits = r"\p{N}" if individual_digits else r"\p{N}+"
    return digits + r"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in which byte-level BPE vocabularies are written."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))  # the others move, in order, past the byte range
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _token_content(x):
    """tokenizer_config.json names tokens either as a string or as an AddedToken dict."""
    return x.get("content") if isinstance(x, dict) else x


# A query point in a human turn: normalized image coordinates "(u, v)", each in [0, 1] (the data engine writes 3
# decimals). With a point token, the VLM reads the image's features at each such point (model.VLM.embed).
POINT_TEXT = re.compile(r"\((0(?:\.\d+)?|1(?:\.0+)?), (0(?:\.\d+)?|1(?:\.0+)?)\)")


def image_count(conversation: list[dict]) -> int:
    return sum(t["value"].count("<image>") for t in conversation if isinstance(t.get("value"), str))


def query_points(conversation: list[dict]) -> list[tuple[float, float]]:
    """The (u, v) of every query point in the human turns, in reading order: the points a tokenizer with a point
    token marks. Only single-image conversations have them: with several images a point's image is ambiguous."""
    if image_count(conversation) != 1:
        return []
    return [(float(m[1]), float(m[2])) for t in conversation if t.get("from") in ("human", "user")
            for m in POINT_TEXT.finditer(t["value"])]


# what Tokenizer.save writes to the .tiktoken file's .json sidecar, and _load_tiktoken requires
CACHE_FIELDS = ("pattern", "specials", "special_ids", "rank_to_id", "normalizer", "unk_id", "extra", "fuse_unk",
                "bos_id", "eos_id", "pad_id", "chat_style", "system_prompt", "name")


class Tokenizer:
    """encode/decode with the checkpoint's own vocabulary, special-token ids, and `render` for chat training data.
    Ids: `bos_id`, `eos_id`, `pad_id`, `eot_id` (end of turn: <|im_end|> or <|eot_id|>), `image_id` (None until
    `add_image_token()`), `point_id` (None until `add_point_token()`: then render marks query points, see
    `query_points`), `stop_ids` (what generation stops on). Any of bos/pad may be None."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], pattern: str, *,
                 rank_to_id: list[int] | None = None, extra: dict[int, bytes] | None = None,
                 special_ids: set[int] | None = None, normalizer: str | None = None, unk_id: int | None = None,
                 fuse_unk: bool = False, bos_id=None, eos_id=None, pad_id=None, chat_style: str = "chatml",
                 system_prompt: str | None = None, name: str = "bpe"):
        """ranks: token bytes -> tiktoken rank (the id itself unless `rank_to_id` maps ranks to ids); specials:
        added tokens' text -> id; extra: id -> bytes of tokens BPE cannot produce (kept for decode)."""
        self.ranks, self.specials, self.pattern, self.name = ranks, dict(specials), pattern, name
        self.rank_to_id = None if rank_to_id is None else list(rank_to_id)
        self.extra = dict(extra or {})
        self.special_ids = set(specials.values()) if special_ids is None else set(special_ids)
        if normalizer not in (None, "NFC"):
            raise ValueError(f"normalizer {normalizer!r} is not supported (supported: None, 'NFC')")
        self.normalizer, self.unk_id, self.fuse_unk = normalizer, unk_id, fuse_unk
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        if chat_style not in ("chatml", "llama3"):
            raise ValueError(f"chat_style {chat_style!r} is not supported (supported: 'chatml', 'llama3')")
        self.chat_style, self.system_prompt = chat_style, system_prompt
        self.image_id = specials.get("<image>")
        self.point_id = specials.get("<point>")
        # Bytes without a single-byte token: their presence sends encode down the slow path.
        self.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._missing_re = re.compile(b"([" + b"".join(re.escape(bytes([b])) for b in self.missing) + b"]+)") if (
            self.missing) else None
        self._build()

    def _build(self):
        """(Re)build the tiktoken Encoding and the decode table; called again when a special token is added."""
        if self.rank_to_id is None:
            special_ranks = dict(self.specials)
            self._to_id = None
        else:  # specials get ranks after every mergeable token
            n = len(self.rank_to_id)
            special_ranks = {s: n + k for k, s in enumerate(self.specials)}
            self._to_id = np.array(self.rank_to_id + list(self.specials.values()), dtype=np.int64)
        self._enc = tiktoken.Encoding(self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                      special_tokens=special_ranks)
        self._pat = regex.compile(self.pattern)
        by_len = sorted(self.specials, key=len, reverse=True)  # longest first, like HF's added-token matcher
        self._special_re = regex.compile("(" + "|".join(map(regex.escape, by_len)) + ")") if by_len else None
        to_id = self.rank_to_id
        table = {r if to_id is None else to_id[r]: b for b, r in self.ranks.items()}  # id -> bytes
        table.update(self.extra)
        table.update({i: s.encode("utf-8") for s, i in self.specials.items()})
        self.n_vocab = max(table) + 1
        self._bytes = [table.get(i, b"") for i in range(self.n_vocab)]  # id -> bytes, for decode

    def encode(self, text: str, specials: bool = True) -> list[int]:
        """Token ids of `text`, as the checkpoint's HF tokenizer gives them without add_special_tokens (no BOS).
        specials: added-token strings such as "<|im_end|>" are recognized (HF's default), else encoded as text."""
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        allowed = self._enc.special_tokens_set if specials else set()
        if self.missing:
            try:
                raw = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: replaced, as tiktoken itself does
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                raw = text.encode("utf-8")
            if len(raw.translate(None, self.missing)) != len(raw):
                return self._encode_missing(text, allowed)
        return self._ids(self._enc.encode(text, allowed_special=allowed, disallowed_special=()))

    def _ids(self, ranks: list[int]) -> list[int]:
        return ranks if self._to_id is None else self._to_id[ranks].tolist()

    def _encode_missing(self, text: str, allowed) -> list[int]:
        """Slow path for text with bytes the vocabulary lacks: per regex piece, drop them (HF without unk_token,
        whose BPE then merges across the gap) or turn each run into unk (fused) or each byte into unk."""
        ids = []
        parts = self._special_re.split(text) if allowed and self._special_re else [text]
        for k, part in enumerate(parts):
            if k % 2:  # split() with one group alternates text, special, text, ...
                ids.append(self.specials[part])
                continue
            for piece in self._pat.findall(part):
                raw = piece.encode("utf-8")
                if self.unk_id is None:
                    raw = raw.translate(None, self.missing)
                    chunks = [raw]
                else:
                    chunks = self._missing_re.split(raw)
                for j, chunk in enumerate(chunks):
                    if j % 2 == 0 and chunk:  # tiktoken's BPE on one piece of bytes, without the regex split
                        ids.extend(self._ids(self._enc._encode_single_piece(chunk)))
                    elif j % 2:
                        ids.extend([self.unk_id] * (1 if self.fuse_unk else len(chunk)))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """ids: ints or a 1-D tensor. Invalid UTF-8 (a character cut between tokens) becomes U+FFFD, as in HF."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(map(self._bytes.__getitem__, ids)).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self.specials.get("<|eot_id|>" if self.chat_style == "llama3" else "<|im_end|>")

    @property
    def stop_ids(self) -> list[int]:
        return sorted({i for i in (self.eot_id, self.eos_id) if i is not None})

    def add_special_token(self, token: str) -> int:
        """Add `token` as a special token with the next free id, once (later calls return the same id). The model's
        embeddings must then cover `n_vocab` rows: `lm.resize_vocab(tok.n_vocab)`."""
        if token not in self.specials:
            self.specials[token] = self.n_vocab
            self.special_ids.add(self.n_vocab)
            self._build()
        return self.specials[token]

    def add_image_token(self, token: str = "<image>") -> int:
        """Add the image placeholder token (see add_special_token) and make it `image_id`, which render uses."""
        self.image_id = self.add_special_token(token)
        return self.image_id

    def add_point_token(self, token: str = "<point>") -> int:
        """Add the point token and make it `point_id`: from then on render follows every query point of a
        single-image conversation with it (`query_points`), and the VLM puts the image's features there."""
        self.point_id = self.add_special_token(token)
        return self.point_id

    def render(self, conversation: list[dict], n_image_tokens: int = 1, add_generation_prompt: bool = False):
        """Conversation [{"from": "human"|"gpt"|"system", "value": str}, ...] -> (ids, mask), two lists of ints of
        equal length. mask[t] = 1 exactly on the tokens the model must produce: each assistant answer and its
        end-of-turn token (not the newline after it, nor any header). Built piece by piece, so the mask needs no
        search in the text; the ids equal encoding the rendered string except where a message starts with two or
        more whitespace characters (the regex then splits that run at the message boundary).
        Formats: ChatML `<|im_start|>{role}\\n{text}<|im_end|>\\n` (SmolLM2, Qwen), or Llama-3
        `<|begin_of_text|>` + `<|start_header_id|>{role}<|end_header_id|>\\n\\n{text.strip()}<|eot_id|>` when the
        checkpoint's template uses those headers. A leading "system" turn is used as given, else `self.system_prompt`
        (the default the checkpoint's own chat template inserts, e.g. SmolLM2's "You are a helpful AI assistant
        named SmolLM, ..."; None: no system turn) is prepended. Each "<image>" in a human turn becomes
        n_image_tokens copies of `image_id`; with `point_id` set, each of `query_points`'s "(u, v)" is followed by
        `point_id`. Message text is encoded with specials=False: a literal "<|im_end|>" in
        data stays text and cannot break the turn structure. add_generation_prompt appends the assistant header."""
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        ids, mask = [], []

        def emit(tokens, train=False):
            ids.extend(tokens)
            mask.extend([int(train)] * len(tokens))

        turns = [(roles.get(t.get("from")), t.get("value")) for t in conversation]
        for k, (role, text) in enumerate(turns):
            if role is None or not isinstance(text, str):
                raise ValueError(f"render: turn {k} {conversation[k]!r} needs 'from' in {sorted(roles)} and a "
                                 "string 'value'")
            if role == "system" and k > 0:
                raise ValueError(f"render: a system turn may only come first (turn {k})")
            if role != "user" and "<image>" in text:
                raise ValueError(f"render: '<image>' may only appear in human turns (turn {k} is {role})")
        if turns and turns[0][0] != "system" and self.system_prompt is not None:
            turns.insert(0, ("system", self.system_prompt))

        llama3 = self.chat_style == "llama3"
        names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") if llama3 else (
            "<|im_start|>", "<|im_end|>")
        absent = [s for s in names if s not in self.specials]
        if absent:
            raise ValueError(f"render: the {self.chat_style} chat format needs special tokens {absent}, which this "
                             f"tokenizer lacks")
        sp, enc = self.specials, lambda text: self.encode(text, False)
        marks = self.point_id is not None and image_count(conversation) == 1

        def user_text(piece):
            if not marks:
                return emit(enc(piece))
            a = 0
            for m in POINT_TEXT.finditer(piece):
                emit(enc(piece[a:m.end()]) + [self.point_id])
                a = m.end()
            emit(enc(piece[a:]))

        def header(role):
            if llama3:
                return [sp["<|start_header_id|>"], *enc(role), sp["<|end_header_id|>"], *enc("\n\n")]
            return [sp["<|im_start|>"], *enc(role + "\n")]

        if llama3:
            emit([sp["<|begin_of_text|>"]])
        for role, text in turns:
            emit(header(role))
            if role == "user":
                pieces = (text.strip() if llama3 else text).split("<image>")
                if len(pieces) > 1 and self.image_id is None:
                    raise ValueError("render: the conversation has '<image>' but the tokenizer has no image token; "
                                     "call tok.add_image_token() first")
                for j, piece in enumerate(pieces):
                    if j:
                        emit([self.image_id] * n_image_tokens)
                    user_text(piece)
            else:
                emit(enc(text.strip() if llama3 else text), train=role == "assistant")
            emit([sp["<|eot_id|>" if llama3 else "<|im_end|>"]], train=role == "assistant")
            if not llama3:
                emit(enc("\n"))
        if add_generation_prompt:
            emit(header("assistant"))
        return ids, mask

    @classmethod
    def byte_level(cls, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> "Tokenizer":
        """The tiny preset's tokenizer: 256 bytes (id = byte value), specials from 256, eos = pad = <|endoftext|>."""
        spec = {s: 256 + k for k, s in enumerate(specials)}
        eos = spec.get("<|endoftext|>")
        return cls({bytes([b]): b for b in range(256)}, spec, GPT2_PATTERN, bos_id=None, eos_id=eos, pad_id=eos,
                   name="byte-level")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """From a tokenizer.json, .gguf or .tiktoken (`save`'s cache) file, or a directory: its tokenizer.tiktoken
        when present (image token included), else tokenizer.json [+ tokenizer_config.json, chat_template.jinja]."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir() and (path / "tokenizer.tiktoken").is_file():
            path = path / "tokenizer.tiktoken"
        if path.suffix == ".tiktoken":
            return cls._load_tiktoken(path)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json (nor tokenizer.tiktoken) at {file}")
        tj = read_json(file)
        cfg_file = folder / "tokenizer_config.json"
        config = read_json(cfg_file) if cfg_file.is_file() else {}
        if (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 saves the template separately
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls.from_hf(tj, config, source=str(file), config_source=str(cfg_file))

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        tj, config = gguf_tokenizer_files(path)
        return cls.from_hf(tj, config, source=str(path))

    @classmethod
    def from_hf(cls, tj: dict, config: dict | None = None, source: str = "tokenizer.json",
                config_source: str | None = None) -> "Tokenizer":
        """From the parsed tokenizer.json and (optionally) tokenizer_config.json; errors name the file and what is
        missing, malformed or unsupported."""
        model, added = _bpe_parts(tj, source)
        norm, decoder = tj.get("normalizer"), tj.get("decoder")
        for key in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ValueError(f"{source}: BPE option {key}={model[key]!r} is not supported")
        if norm is not None and norm.get("type") != "NFC":
            raise ValueError(f"{source}: normalizer {norm.get('type')!r} is not supported (supported: none, NFC)")
        if decoder is not None and decoder.get("type") != "ByteLevel":
            raise ValueError(f"{source}: decoder {decoder.get('type')!r} is not supported (supported: ByteLevel)")
        pattern = pretokenizer_pattern(tj.get("pre_tokenizer"), source)
        for t in added:
            for flag in ("lstrip", "rstrip", "single_word"):
                if t.get(flag):
                    raise ValueError(f"{source}: added token {t['content']!r} has {flag}=true, not supported")
        vocab: dict[str, int] = model["vocab"]
        specials = {t["content"]: t["id"] for t in added}
        special_ids = {t["id"] for t in added if t.get("special")}
        byte_of = {c: b for b, c in enumerate(byte_chars())}

        # None for a string that is not byte-level: BPE can never produce it
        to_bytes = lambda s: bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else None

        taken = set(specials.values())
        singles = sorted(i for s, i in vocab.items() if len(s) == 1 and s in byte_of and i not in taken)
        merged, seen = [], set()
        for k, m in enumerate(model.get("merges") or []):
            a, b = m.split(" ") if isinstance(m, str) else m  # "a b" (classic) or ["a", "b"] (tokenizers >= 0.20)
            if a not in vocab or b not in vocab or a + b not in vocab:
                missing = [s for s in (a, b, a + b) if s not in vocab]
                raise ValueError(f"{source}: merge {k} ({a!r}, {b!r}) uses {missing}, not in the vocabulary")
            i = vocab[a + b]
            if i not in seen and i not in taken:
                seen.add(i)
                merged.append(i)
        reachable = singles + merged
        token_of = {i: s for s, i in vocab.items()}
        if all(x < y for x, y in zip(merged, merged[1:])):
            ranks, rank_to_id = {to_bytes(token_of[i]): i for i in reachable}, None
        else:
            ranks, rank_to_id = {to_bytes(token_of[i]): r for r, i in enumerate(reachable)}, reachable
        reach = set(reachable)
        extra = {i: to_bytes(s) or s.encode("utf-8") for s, i in vocab.items() if i not in reach and i not in taken}

        unk = model.get("unk_token")
        ids, template = _config_tokens(config or {}, lambda s: specials.get(s, vocab.get(s)), config_source or source)
        llama3 = "<|start_header_id|>" in template or (not template and "<|start_header_id|>" in specials)
        return cls(ranks, specials, pattern, rank_to_id=rank_to_id, extra=extra, special_ids=special_ids,
                   normalizer=None if norm is None else "NFC", unk_id=None if unk is None else vocab[unk],
                   fuse_unk=bool(model.get("fuse_unk")), bos_id=ids["bos_token"], eos_id=ids["eos_token"],
                   pad_id=ids["pad_token"], chat_style="llama3" if llama3 else "chatml",
                   system_prompt=None if llama3 else default_system_prompt(template), name=Path(source).stem)

    def save(self, path):
        """Write `path` (.tiktoken: the `base64(token) rank` lines tiktoken.load reads) and `path`.json (the rest),
        atomically; `Tokenizer.load(path)` reads them back without parsing tokenizer.json or GGUF metadata."""
        path = Path(path)
        if path.suffix != ".tiktoken":
            raise ValueError(f"save: {path} should end in .tiktoken")
        lines = (f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        meta = {k: getattr(self, k) for k in CACHE_FIELDS}
        meta.update(special_ids=sorted(self.special_ids),
                    extra={i: base64.b64encode(b).decode() for i, b in self.extra.items()})
        write_text_atomically(path, "".join(lines))
        write_text_atomically(Path(str(path) + ".json"), json.dumps(meta, ensure_ascii=False))

    @classmethod
    def _load_tiktoken(cls, path: Path) -> "Tokenizer":
        meta_file = Path(str(path) + ".json")
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: the sidecar {meta_file.name} written by Tokenizer.save is missing")
        meta = read_json(meta_file)
        missing, unknown = sorted(set(CACHE_FIELDS) - meta.keys()), sorted(meta.keys() - set(CACHE_FIELDS))
        if missing or unknown:
            raise ValueError(f"{meta_file}: " + "; ".join([f"missing keys {missing}"] * bool(missing) + [
                f"unknown keys {unknown}"] * bool(unknown)) + f" (Tokenizer.save writes {', '.join(CACHE_FIELDS)})")
        ranks = {}
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:  # binascii.Error is one too
                raise ValueError(f"{path}:{n}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
        extra = {int(i): base64.b64decode(b) for i, b in meta.pop("extra").items()}
        return cls(ranks, meta.pop("specials"), meta.pop("pattern"), extra=extra,
                   special_ids=set(meta.pop("special_ids")), **meta)


def _bpe_parts(tj: dict, source: str) -> tuple[dict, list]:
    """tokenizer.json's model and added_tokens, checked for the keys and types from_hf reads: a corrupt or foreign
    file fails with the part at fault named, not with a KeyError from deep inside."""
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{source}: expected a 'model' object (the tokenizers library's tokenizer.json format)")
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: model type {model.get('type')!r} is not supported (supported: BPE)")
    vocab, merges, added = model.get("vocab"), model.get("merges") or [], tj.get("added_tokens") or []
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{source}: model.vocab should be an object {{token: integer id}}")
    is_pair = lambda m: (isinstance(m, str) and m.count(" ") == 1 or isinstance(m, list) and len(m) == 2
                         and all(isinstance(x, str) for x in m))
    for k, m in enumerate(merges if isinstance(merges, list) else [merges]):
        if not is_pair(m):
            raise ValueError(f"{source}: model.merges[{k}] is {str(m)[:80]}; expected a list of 'a b' or ['a', 'b']")
    for k, t in enumerate(added if isinstance(added, list) else [added]):
        if not (isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)):
            raise ValueError(f"{source}: added_tokens[{k}] is {str(t)[:80]}; expected {{'id': int, 'content': str}}")
    if model.get("unk_token") is not None and model["unk_token"] not in vocab:
        raise ValueError(f"{source}: model.unk_token {model['unk_token']!r} is not in the vocabulary")
    return model, added


def _config_tokens(config: dict, lookup, source: str) -> tuple[dict, str]:
    """tokenizer_config.json's bos/eos/pad ids ({"eos_token": id or None, ...}) and its chat template as a string.
    A token named but not in the vocabulary is an error: guessing None would silently change what stops generation."""
    ids = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        raw = config.get(key)
        text = _token_content(raw)
        if raw is not None and not isinstance(text, str):
            raise ValueError(f"{source}: {key} should be a token string or an AddedToken object, got {raw!r}")
        ids[key] = None if text is None else lookup(text)
        if text is not None and ids[key] is None:
            raise ValueError(f"{source}: {key} {text!r} is not in the vocabulary")
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        "")
    if not isinstance(template, str):
        raise ValueError(f"{source}: chat_template should be a string or a list of {{'name', 'template'}} objects")
    return ids, template


def _byte_level_json(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _check_byte_level(step: dict, use_regex: bool, source: str):
    if step.get("add_prefix_space"):
        raise ValueError(f"{source}: ByteLevel(add_prefix_space=true) is not supported")
    if step.get("use_regex", True) != use_regex:
        raise ValueError(f"{source}: ByteLevel(use_regex={step.get('use_regex', True)}) is not supported in this "
                         f"position (expected use_regex={use_regex})")


def pretokenizer_pattern(pre: dict | None, source: str = "tokenizer.json") -> str:
    """The tiktoken regex equivalent to a tokenizer.json pre_tokenizer, or a ValueError naming it."""
    kind = pre.get("type") if pre else None
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else []
    types = [s.get("type") for s in steps]
    if kind == "ByteLevel":
        _check_byte_level(pre, True, source)
        return GPT2_PATTERN
    if types == ["Split", "ByteLevel"]:
        split, level = steps
        _check_byte_level(level, False, source)
        if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split.get("pattern", {}):
            raise ValueError(f"{source}: only Split(Regex, behavior=Isolated, invert=false) is supported, got {split}")
        return split["pattern"]["Regex"]
    if types == ["Digits", "ByteLevel"]:
        _check_byte_level(steps[1], True, source)
        return digits_pattern(bool(steps[0].get("individual_digits")))
    raise ValueError(f"{source}: pre_tokenizer {json.dumps(pre)[:300]} is not supported (supported: ByteLevel, "
                     "Sequence[Split(Regex), ByteLevel], Sequence[Digits, ByteLevel])")


def default_system_prompt(template: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none: the first literal
    `<|im_start|>system\\n...<|im_end|>` without template expressions in it."""
    for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, flags=re.S):
        text = m.group(1)
        if not re.search(r"[{}'\"]", text):
            return text.replace("\\n", "\n")
    return None


# llama.cpp's `tokenizer.ggml.pre` names -> the tokenizer.json pre_tokenizer they stand for
GGUF_PRETOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      _byte_level_json(True)]},
    "gpt-2": _byte_level_json(True),
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        _byte_level_json(False)]},
}


# GGUF metadata value types -> struct format; 8 (string) and 9 (array) are walked instead
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def open_gguf(path):
    """A gguf.GGUFReader over `path`, once its layout is checked. gguf's own errors on a bad file are numpy's
    ("cannot reshape array of size 3352 into shape (96,64)") and name neither the file nor the tensor; ours do."""
    import gguf
    path = Path(path)
    size, (data_start, tensors) = path.stat().st_size, _gguf_layout(path)
    known = {int(t): t for t in gguf.GGML_QUANT_SIZES}
    for name, kind, dims, offset in tensors:
        if kind not in known:
            raise ValueError(f"{path}: tensor {name!r} has ggml type {kind}, not one of the {len(known)} types this "
                             "gguf library knows (a corrupt header, or a newer format: upgrade gguf)")
        block, type_size = gguf.GGML_QUANT_SIZES[known[kind]]
        begin = data_start + offset
        end = begin + math.prod(dims) // block * type_size
        if end > size:
            raise ValueError(f"{path}: truncated: tensor {name!r} ({known[kind].name}, {list(dims)}) needs bytes "
                             f"{begin}..{end}, but the file has {size}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # what the walk does not check (a duplicated tensor name, ...)
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _gguf_layout(path: Path) -> tuple[int, list]:
    """Walk a GGUF header (magic, version, counts, metadata, tensor infos), every read checked against the file's
    size: (where the tensor data starts, [(tensor name, ggml type, dims, offset into the data)])."""
    size, order = path.stat().st_size, "<"
    with open(path, "rb") as f:
        def take(n, what, seek=False):
            if f.tell() + n > size:
                raise ValueError(f"{path}: truncated: {what} runs past the end of the file ({size} bytes)")
            return f.seek(n, 1) if seek else f.read(n)

        def read(fmt, what):
            return struct.unpack(order + fmt, take(struct.calcsize(order + fmt), what))

        def text(what):  # a u64 length, then UTF-8 bytes
            return take(read("Q", what)[0], what).decode("utf-8", "replace")

        def skip(vtype, what, count=1):
            if vtype in GGUF_SCALARS:
                take(count * struct.calcsize(order + GGUF_SCALARS[vtype]), what, seek=True)
            elif vtype == 8:
                for _ in range(count):
                    take(read("Q", what)[0], what, seek=True)
            elif vtype == 9:  # an item type, a u64 count, the items
                for _ in range(count):
                    item_type, n = read("IQ", what)
                    skip(item_type, what, n)
            else:
                raise ValueError(f"{path}: {what} has unknown GGUF value type {vtype}")

        magic = f.read(4)
        if magic != b"GGUF":
            start = f", starting {magic!r}" if magic else ""
            raise ValueError(f"{path}: not a GGUF file ({size} bytes{start}; expected the magic b'GGUF')")
        version = read("I", "the version")[0]
        if version and not version & 0xFFFF:  # written on a big-endian machine
            order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
        n_tensors, n_kv = read("QQ", "the tensor and metadata counts")
        alignment = 32
        for _ in range(n_kv):
            key = text("a metadata key")
            vtype = read("I", f"metadata {key!r}")[0]
            if key == "general.alignment" and vtype == 4:
                alignment = read("I", f"metadata {key!r}")[0]
            else:
                skip(vtype, f"metadata {key!r}")
        if alignment == 0 or alignment & (alignment - 1):
            raise ValueError(f"{path}: general.alignment={alignment} is not a power of two")
        tensors = []
        for _ in range(n_tensors):
            name = text("a tensor name")
            n_dims = read("I", f"tensor {name!r}")[0]
            if n_dims > 4:
                raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGML allows at most 4)")
            dims = read(f"{n_dims}Q", f"tensor {name!r}")
            kind, offset = read("IQ", f"tensor {name!r}")
            tensors.append((name, kind, dims, offset))
        return -(-f.tell() // alignment) * alignment, tensors


def gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_tokenizer_files(path, source: str | None = None) -> tuple[dict, dict]:
    """A GGUF file's tokenizer metadata as (tokenizer.json, tokenizer_config.json) dicts. path: the file or its
    open gguf.GGUFReader (then `source` names the file in errors)."""
    import gguf  # only needed for GGUF files
    reader = path if isinstance(path, gguf.GGUFReader) else open_gguf(path)
    field, path = functools.partial(gguf_field, reader), source or path
    kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2', byte-level "
                         "BPE)")
    if pre not in GGUF_PRETOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: "
                         f"{sorted(GGUF_PRETOKENIZERS)})")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    absent = [f"tokenizer.ggml.{k}" for k, v in (("tokens", tokens), ("token_type", types), ("merges", merges))
              if not isinstance(v, list)]
    if absent or len(types) != len(tokens):
        found = f"missing {absent}" if absent else f"{len(types)} types for {len(tokens)} tokens"
        raise ValueError(f"{path}: a gpt2 tokenizer needs the lists tokenizer.ggml.tokens, token_type (one per token) "
                         f"and merges; {found}")
    # llama.cpp token types: 1 normal, 3 control (special), 4 user-defined (added, not special)
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t == 3} for i, t in enumerate(types) if t in (3, 4)]
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": GGUF_PRETOKENIZERS[pre],
          "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}
    config = {"add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)), "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "model_max_length": int(field("llama.context_length", 2048)),
              "tokenizer_class": "GPT2Tokenizer"}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        i = field(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id={i!r} is not a token id (0..{len(tokens) - 1})")
        if i is not None:
            config[name] = tokens[i]
    if field("tokenizer.chat_template") is not None:
        config["chat_template"] = field("tokenizer.chat_template")
    return tj, config
