"""
The training side of the data: a Dataset over a weighted mix of LLaVA-format datasets, the collate that batches or
packs its samples, and the report of what could not be used.

    ds = ConversationDataset([(Path("data/tiny/spatial"), 1.0), (Path("data/tiny/spatial-multiview"), 1.0)], tok,
                             vit.cfg, image_size=224, n_image_tokens=64, max_len=1024)
    loader = DataLoader(ds, batch_sampler=plan, num_workers=2, pin_memory=True,
                        collate_fn=functools.partial(collate, pad_id=tok.pad_id, pack=False))
    report = LoaderReport()
    for batch in loader:
        report.add(batch)            # ... and at the end of the epoch: print(report.summary())

Sources. A dataset directory (its data.jsonl, else its only *.jsonl or *.json file) or such a file: JSON Lines, or one
JSON array (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, LLaVA-Instruct's llava_v1_5_mix665k.json load as they are). A
record needs "conversations", a list of {"from": "human"|"gpt"|"system", "value": str} (an optional system turn, then
human and gpt turns in alternation, ending on an answer), and may have "image": a path or a list of paths, relative to
the file's folder or to its images/ subfolder (never outside it, unless outside_images=True), with one "<image>" per
image in the human turns, in order. JSONL files are indexed by byte offset and read line by line (each worker opens its
own handle); a JSON array is parsed once, kept as one compact blob.

Mixing. Source s with n_s records and weight w_s contributes round(w_s * n_s) samples: whole copies of itself for the
integer part of the weight, then an evenly spaced subset for the rest. The sources are interleaved in proportion
(sample k of source s sits at (k + 0.5) / count_s) so that every prefix of the mix holds them in the mixing ratio;
`limit` keeps such a prefix (a smaller limit is a subset of a larger one). `Mix` does this before any model is built:
a source that gives no samples (an empty file, a weight that rounds to none) or a mix of more than MAX_SAMPLES is a
ValueError naming it.

Samples. ds[i] renders the conversation with Tokenizer.render and preprocesses its images (read by
dataengine/images.read_rgb, as `data.py check` reads them; model.preprocess: squashed to image_size, not cropped, so
normalized coordinates stay valid). Beyond max_len tokens, whole trailing turns (a human message and everything up to
the next one) are dropped and counted, never part of an answer. With a point token
(train.py --point-tokens) an item also has `points` (P, 2), the (u, v) of each point token it kept; collate gathers
them as (P, 3) rows (image index in the batch's pixels, u, v) for VLM.embed. A malformed line, roles out
of order, a missing or unreadable image or one outside the folder, a first turn alone over max_len: the item carries
`problem` (file:line and what is wrong) and no tokens; collate skips it, LoaderReport counts and prints it. strict=True
raises at once instead.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataengine import scenes, text
from dataengine.images import read_rgb
from language.tokenizer import query_points
from llm import block_causal, packed_cuts
from model import preprocess

IMAGE = "<image>"
HUMAN = ("human", "user")
ROLES = (*HUMAN, "gpt", "assistant", "system")
PROBLEMS = (ValueError, KeyError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)

# Which answer tokens the image decides (train.py --loss-on image; tools/answer_stats.py measures their share), by a
# rule on the text alone: (1) a number the conversation has not shown before (not a question's coordinates, not a
# copy of an earlier answer); (2) a verdict or relation word -- yes / no, first / second, left, behind, closer,
# taller, about (a tie), a count, a direction, a third of the image; (3) an object's category or colour and the room's
# words (a caption's contents; the winner of "which of A and B"). Everything else -- phrasing, units, echoed
# coordinates and numbers, end-of-turn tokens -- follows from the text before it and trains the format, not the
# encoder. An echoed name or relation word is kept (a text rule cannot tell it from a "which of" verdict): once the
# format is learnt its loss, and so its gradient, is near zero.
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PHRASES = ([w for spec in text.RELATIONS.values() for w in spec["words"]] + list(text.CLOSER_WORDS)
            + [w for pair in text.MOST.values() for w in pair] + list(text.DIRECTIONS) + list(text.NUMBER_WORDS)
            + [w for row in text.THIRDS for w in row] + list(scenes.OBJECT_CATEGORIES) + list(scenes.COLOURS)
            + list(scenes.WALL_COLOURS) + list(scenes.FLOORS) + list(scenes.PATTERNS)
            + ["yes", "neither", "not clearly", "first", "second", "nearest", "farthest", "walls", "floor"])
_WORDS = sorted({w for p in _PHRASES for w in re.findall("[a-z]+", p.lower())}   # the phrases' deciding words
                - {"to", "the", "of", "as", "than", "at", "with", "in", "from", "is", "camera", "depth", "far",
                   "away", "further", "roughly", "tall", "wide", "big", "height"})
WORD = re.compile(r"\b(" + "|".join(map(re.escape, _WORDS)) + r")\b", re.IGNORECASE)


def image_dependent_spans(answer: str, earlier: str) -> list[tuple[int, int]]:
    """[(start, end)] character spans of `answer` that the image decides (the rule above); `earlier`: the text of
    the conversation before the answer, its question included."""
    seen = set(NUMBER.findall(earlier))
    return sorted([m.span() for m in NUMBER.finditer(answer) if m.group() not in seen]
                  + [m.span() for m in WORD.finditer(answer)])


def image_dependent_weights(tok, conv: list, weights: list) -> list:
    """render's mask (each answer's tokens, then its end-of-turn token) kept only on the answer tokens that overlap
    image_dependent_spans; turns render cut off are simply absent."""
    on = np.flatnonzero(weights)
    runs = np.split(on, np.flatnonzero(np.diff(on) > 1) + 1) if len(on) else []   # one run per answer, in order
    answers = [k for k, m in enumerate(conv) if m["from"] in ("gpt", "assistant")]
    out = [0] * len(weights)
    for run, k in zip(runs, answers):
        answer = conv[k]["value"].strip() if tok.chat_style == "llama3" else conv[k]["value"]
        ends = np.cumsum([len(tok._bytes[i]) for i in tok.encode(answer, False)])   # byte offsets of the tokens
        spans = [(len(answer[:s].encode()), len(answer[:e].encode()))                  # chars -> bytes
                 for s, e in image_dependent_spans(answer, " ".join(m["value"] for m in conv[:k]))]
        for t, (a, b) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
            out[run[t]] = int(t < len(run) - 1 and any(s < b and a < e for s, e in spans))
    return out


def dataset_file(path) -> Path:
    """A source's file: the path itself, or a directory's data.jsonl, else its only *.jsonl or *.json file."""
    path = Path(path)
    if path.is_dir():
        found = [path / "data.jsonl"] if (path / "data.jsonl").is_file() else sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected data.jsonl, or exactly one *.jsonl / *.json file; found "
                                    f"{[p.name for p in found] or 'none'} (name the file instead)")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file or directory")
    return path


class Records:
    """One source's records, by index: (raw bytes, "file:line N")."""

    def __init__(self, path):
        path = dataset_file(path)
        self.file, self.root = path, path.parent
        self.blob, self._fd, self._pid = None, None, None
        st = path.stat()
        self.stat = (st.st_ino, st.st_size, st.st_mtime_ns)       # the file the offsets below index
        if path.suffix == ".json":
            try:
                items = json.loads(path.read_bytes())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); a .json source holds one "
                                 "JSON array of samples (else use .jsonl)") from e
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not a JSON file (byte {e.start} is not UTF-8 text)") from e
            if not isinstance(items, list):
                raise ValueError(f"{path}: a .json source must hold one JSON array of samples, not a "
                                 f"{type(items).__name__} (else use .jsonl)")
            parts = [json.dumps(r, ensure_ascii=False).encode() for r in items]
            self.blob = b"".join(parts)
            self.ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
            self.starts = self.ends - [len(p) for p in parts]
            self.lines, self.unit = np.arange(1, len(parts) + 1), "record"
            return
        newlines, size = [], 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 26):
                newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
                size += len(chunk)
        nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
        starts, ends = np.concatenate([[0], nl + 1]), np.concatenate([nl, [size]])
        keep = ends - starts > 0                                  # blank lines are not samples
        self.starts, self.ends = starts[keep], ends[keep]
        self.lines, self.unit = np.arange(1, len(starts) + 1)[keep], "line"

    def __len__(self):
        return len(self.starts)

    def get(self, k: int) -> tuple:
        a, b = int(self.starts[k]), int(self.ends[k])
        if self.blob is not None:
            return self.blob[a:b], f"{self.file}:{self.unit} {self.lines[k]}"
        if self._pid != os.getpid():                              # a worker process opens its own handle
            self._fd, self._pid = os.open(self.file, os.O_RDONLY), os.getpid()
            st = os.fstat(self._fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.stat:  # offsets into another file: wrong samples
                raise ValueError(f"{self.file} changed since it was indexed (replaced or edited while training): "
                                 "restore it, or start again")
        return os.pread(self._fd, b - a, a), f"{self.file}:{self.unit} {self.lines[k]}"

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")} | dict(_fd=None, _pid=None)

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def check_record(rec) -> tuple:
    """-> (conversation, image paths), or ValueError saying what is malformed."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("no 'conversations' list (LLaVA format: [{'from': 'human', 'value': ...}, ...])")
    for j, m in enumerate(conv):
        if not isinstance(m, dict) or m.get("from") not in ROLES or not isinstance(m.get("value"), str):
            raise ValueError(f"conversations[{j}] = {json.dumps(m)[:80]}: expected {{'from': one of {ROLES}, "
                             "'value': a string}")
    said = ["human" if m["from"] in HUMAN else m["from"] if m["from"] == "system" else "gpt" for m in conv]
    turns = said[1:] if said[0] == "system" else said
    if not turns or turns != ["human", "gpt"] * (len(turns) // 2):
        raise ValueError(f"roles {said[:8]}{' ...' if len(said) > 8 else ''}: expected an optional system turn, "
                         "then human, gpt, human, gpt, ... ending on an answer")
    image = rec.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"'image' = {json.dumps(image)[:80]}: expected a path or a list of paths")
    marks = sum(m["value"].count(IMAGE) for m in conv if m["from"] in HUMAN)
    if marks != len(paths):
        raise ValueError(f"{marks} '<image>' marks in the human turns for {len(paths)} image(s)")
    return conv, paths


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of range(n) without fixed points (Sattolo's algorithm: one cycle through all n)."""
    rng, p = np.random.default_rng(seed), np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))
        p[i], p[j] = p[j], p[i]
    return p


MAX_SAMPLES = 10**8        # per epoch: the mix's index takes 24 bytes a sample (2.4 GB here)


class Mix:
    """The sources read and mixed (see "Mixing" above): records, counts per source, index (sample -> (source,
    record)). Every source must give samples: an empty file, or a weight that rounds its count to 0, is a ValueError
    naming it, as is a mix of more than MAX_SAMPLES. Built before any model, so that bad data stops a run early."""

    def __init__(self, sources, limit: int | None = None):
        if not sources:
            raise ValueError("no data sources")
        self.records, self.counts, parts, keys = [], [], [], []
        for s, (path, weight) in enumerate(sources):
            weight = float(weight)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"source {path}: weight {weight} must be a finite number >= 0")
            rec = Records(path)
            n = len(rec)
            count = round(weight * n)
            if n == 0:
                raise ValueError(f"source {rec.file}: no samples (the file is empty)")
            if count == 0:
                raise ValueError(f"source {path}: weight {weight:g} x {n} records gives it no samples (an empty "
                                 f"share of the mix): drop it, or give a weight >= {0.5 / n:.2g}")
            if sum(self.counts) + count > MAX_SAMPLES:
                raise ValueError(f"source {path}: weight {weight:g} x {n} records asks for {count:,} samples; the mix "
                                 f"holds at most {MAX_SAMPLES:,} per epoch (repeat data with --epochs instead)")
            whole, rest = divmod(count, n)
            idx = np.concatenate([np.tile(np.arange(n), whole), np.arange(rest) * n // max(rest, 1)]).astype(np.int64)
            self.records.append(rec)
            self.counts.append(count)
            parts.append(np.stack([np.full(count, s), idx], 1))
            keys.append((np.arange(count) + 0.5) / count)
        index, keys = np.concatenate(parts), np.concatenate(keys)
        self.index = index[np.lexsort((index[:, 0], keys))][:limit]          # by position in the mix, then source

    def __len__(self):
        return len(self.index)


class ConversationDataset(torch.utils.data.Dataset):
    """sources: [(dataset dir or file, weight)]. ds[i] -> dict(ids (T,) long, weights (T,) uint8 (render's mask),
    pixels (k, 3, S, S) float, dropped_turns int, problem None | str, max_len int). shuffle_images (a seed): the
    shuffled-answer control -- each record's conversation comes with another record's images (same source): a model
    trained on it learns the format and the answers' statistics, nothing that ties them to the image. outside_images:
    let records name images outside their file's folder (absolute paths, '..'). loss_on "image": weights only on the
    answer tokens the image decides (image_dependent_weights), "answers": render's mask."""

    def __init__(self, sources, tok, vit_cfg, image_size: int, n_image_tokens: int, max_len: int,
                 limit: int | None = None, strict: bool = False, shuffle_images: int | None = None,
                 outside_images: bool = False, loss_on: str = "answers"):
        if tok.image_id is None:
            raise ValueError("the tokenizer has no image token: call tok.add_image_token() before building the dataset")
        self.tok, self.vit_cfg, self.image_size = tok, vit_cfg, image_size
        self.n_image_tokens, self.max_len, self.strict = n_image_tokens, max_len, strict
        self.outside_images, self.loss_on = outside_images, loss_on
        self.start_id = tok.specials["<|start_header_id|>" if tok.chat_style == "llama3" else "<|im_start|>"]
        mixed = sources if isinstance(sources, Mix) else Mix(sources, limit)
        self.records, self.counts, self.index = mixed.records, mixed.counts, mixed.index
        self.image_from = None if shuffle_images is None else [derangement(len(r), shuffle_images + s)
                                                                for s, r in enumerate(self.records)]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        s, k = (int(x) for x in self.index[i])
        raw, where = self.records[s].get(k)
        ids, weights, pixels, dropped, problem = [], [], torch.zeros(0, 3, self.image_size, self.image_size), 0, None
        try:
            conv, paths = check_record(json.loads(raw))
            if self.image_from is not None:
                paths = check_record(json.loads(self.records[s].get(int(self.image_from[s][k]))[0]))[1]
            ids, weights, n_images, dropped = self.render(conv)
            if self.loss_on == "image":
                weights = image_dependent_weights(self.tok, conv, weights)
            pixels = self.images(self.records[s].root, paths[:n_images])
            # the query points the kept turns mark (render cuts whole turns, so they are the first ones)
            points = query_points(conv)[:ids.count(self.tok.point_id)] if self.tok.point_id is not None else []
        except PROBLEMS as e:
            if self.strict:
                raise ValueError(f"{where}: {e}") from e
            ids, weights, dropped, problem, points = [], [], 0, f"{where}: {e}", []
        return dict(ids=torch.tensor(ids, dtype=torch.long), weights=torch.tensor(weights, dtype=torch.uint8),
                    pixels=pixels, points=torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
                    dropped_turns=dropped, problem=problem, max_len=self.max_len)

    def render(self, conv: list) -> tuple:
        """-> (ids, mask, images kept, turns dropped): whole trailing turns go until max_len holds the rest."""
        ids, mask = self.tok.render(conv, self.n_image_tokens)
        humans = [j for j, m in enumerate(conv) if m["from"] in HUMAN]
        n_images = sum(m["value"].count(IMAGE) for m in conv if m["from"] in HUMAN)
        if len(ids) <= self.max_len:
            return ids, mask, n_images, 0
        starts = np.flatnonzero(np.asarray(ids) == self.start_id)     # one per message (and a system turn render added)
        offset = len(starts) - len(conv)
        if offset not in (0, 1):
            raise ValueError(f"render gave {len(starts)} message starts for {len(conv)} messages")
        cuts = [int(starts[offset + j]) for j in humans[1:]]          # a prefix may end before any later human turn
        fits = [c for c in cuts if c <= self.max_len]
        if not fits:
            first = cuts[0] if cuts else len(ids)
            raise ValueError(f"the first turn alone is {first} tokens, more than max_len {self.max_len}")
        kept = len(fits)                                              # cutting before human turn `kept` keeps
        end = humans[kept]                                            # turns 0 .. kept-1
        n_images = sum(m["value"].count(IMAGE) for m in conv[:end] if m["from"] in HUMAN)
        return ids[:fits[-1]], mask[:fits[-1]], n_images, len(humans) - kept

    def images(self, root: Path, paths: list) -> torch.Tensor:
        S, arrays = self.image_size, []
        for p in paths:
            if not self.outside_images and (os.path.isabs(p) or os.path.normpath(p).split(os.sep)[0] == ".."):
                raise ValueError(f"image {p!r} is outside the dataset folder {root} (allow it with "
                                 "outside_images=True, train.py --images-outside-data)")
            f = root / p
            if not f.exists() and (root / "images" / p).exists():       # LLaVA-Pretrain keeps them in images/
                f = root / "images" / p
            arrays.append(read_rgb(f, draft=S))   # the reader data.py check uses: it flags what this skips
        return preprocess(arrays, self.vit_cfg, size=S) if arrays else torch.zeros(0, 3, S, S)    # (k, 3, S, S)


def collate(items: list, pad_id: int | None, pack: bool = False, max_len: int | None = None) -> dict:
    """Samples -> a batch. Without packing: one row per sample, right-padded with pad_id (0 if None; weight 0). With
    packing: samples fill rows greedily in order up to max_len (default: the samples' own), with llm.block_causal's
    per-sample positions and block-diagonal causal mask, so packed samples cannot see each other, and `segments`
    (B, T) (0 = padding) and `cu_seqlens` (llm.packed_cuts), with which the GPU keeps samples apart without the
    mask. pixels: every kept sample's images in row order, as the VLM splices them in. Items with a problem are left out and listed in
    `problems`. n_supervised counts the positions t >= 1 with weight > 0: exactly the tokens LLM.loss scores."""
    pad = 0 if pad_id is None else pad_id
    good = [it for it in items if it["problem"] is None]
    if pack:
        limit = max_len or max((it["max_len"] for it in good), default=1)
        rows = []
        for it in good:
            if rows and sum(len(x["ids"]) for x in rows[-1]) + len(it["ids"]) <= limit:
                rows[-1].append(it)
            else:
                rows.append([it])
    else:
        rows = [[it] for it in good]
    # numpy for the bookkeeping: small torch ops pay for intra-op thread hand-offs, which on a busy machine cost
    # more than the work itself
    B, T = len(rows), max([sum(len(it["ids"]) for it in row) for row in rows], default=1)
    ids = np.full((B, T), pad, np.int64)
    weights = np.zeros((B, T), np.float32)
    segments = np.zeros((B, T), np.int64)                           # 0 = padding, 1.. = the samples of a row
    for r, row in enumerate(rows):
        a = 0
        for j, it in enumerate(row):
            b = a + len(it["ids"])
            ids[r, a:b] = it["ids"].numpy()
            weights[r, a:b] = it["weights"].numpy()
            weights[r, a] = 0           # a sample's first token is never predicted from the sample before it
            segments[r, a:b] = j + 1
            a = b
    S = items[0]["pixels"].shape[-1] if items else 0
    kept = [it for row in rows for it in row]                       # the order the VLM fills image and point tokens
    pixels = torch.cat([it["pixels"] for it in kept]) if good else torch.zeros(0, 3, S, S)
    first_image = np.cumsum([0] + [len(it["pixels"]) for it in kept])[:-1]
    points = [torch.cat([torch.full((len(it["points"]), 1), float(i)), it["points"]], 1)     # (P, 3): image, u, v
              for i, it in zip(first_image, kept) if len(it.get("points", ()))]
    batch = dict(ids=torch.from_numpy(ids), weights=torch.from_numpy(weights), pixels=pixels,
                 points=torch.cat(points) if points else None,
                 n_supervised=int(np.count_nonzero(weights[:, 1:])), n_tokens=sum(len(it["ids"]) for it in good),
                 n_tokens_sq=sum(len(it["ids"]) ** 2 for it in good),  # attention's work (training/flops.py)
                 n_samples=len(good), problems=[it["problem"] for it in items if it["problem"] is not None],
                 dropped_turns=sum(it["dropped_turns"] for it in items),
                 n_truncated=sum(it["dropped_turns"] > 0 for it in items))
    if pack:
        positions, mask = block_causal(torch.from_numpy(segments))
        batch.update(positions=positions, mask=mask, segments=torch.from_numpy(segments),
                     cu_seqlens=packed_cuts(torch.from_numpy(segments)).cu_seqlens)  # the GPU's mask-free path
    return batch


@dataclass
class LoaderReport:
    """Sums what collate reports over an epoch: report.add(batch) per batch, report.summary() at the end."""
    samples: int = 0
    truncated: int = 0
    dropped_turns: int = 0
    problems: list = field(default_factory=list)

    def add(self, batch: dict):
        self.samples += batch["n_samples"]
        self.truncated += batch.get("n_truncated", 0)
        self.dropped_turns += batch["dropped_turns"]
        self.problems += batch["problems"]

    def summary(self, show: int = 5) -> str:
        text = (f"data: {self.samples} samples used; {self.truncated} truncated to max_len ({self.dropped_turns} "
                f"trailing turns dropped); {len(self.problems)} unusable")
        return text + "".join(f"\n  {p}" for p in self.problems[:show]) + (
            f"\n  ... and {len(self.problems) - show} more" if len(self.problems) > show else "")
