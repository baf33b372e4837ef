"""
How much of a dataset's supervised text depends on the image: the share of supervised tokens that belong to numbers
and relation words (yes / no, left / right, closer / farther, ...) that appear nowhere earlier in the conversation.
Everything else -- phrasing, echoed coordinates, numbers copied from an earlier answer, the end-of-turn tokens -- can
be predicted without looking at the image, and its loss trains the format, not the encoder.

    python tools/answer_stats.py data/b15/spatial --llm weights/smollm2-135m-instruct [--limit 200]
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.text import CLOSER_WORDS, RELATIONS  # noqa: E402
from language.tokenizer import Tokenizer  # noqa: E402

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
WORDS = sorted({w for spec in RELATIONS.values() for w in spec["words"]} | set(CLOSER_WORDS) |
               {"Yes", "No", "Neither", "Not clearly", "first", "second", "left", "right", "up", "down", "forward",
                "backward"}, key=len, reverse=True)
WORD = re.compile(r"\b(" + "|".join(re.escape(w) for w in WORDS) + r")\b")


def image_dependent(answer: str, earlier: str) -> list:
    """The numbers and relation words of an answer that the conversation has not shown before it."""
    found = [m.group() for m in NUMBER.finditer(answer) if m.group() not in earlier]
    return found + [m.group() for m in WORD.finditer(answer) if m.group() not in earlier]


def stats(data_dir, tok: Tokenizer, limit: int | None = None) -> dict:
    supervised = dependent = samples = 0
    with open(Path(data_dir) / "data.jsonl") as f:
        for line in f:
            if limit and samples >= limit:
                break
            conv = json.loads(line)["conversations"]
            _, mask = tok.render(conv, 1)
            supervised += sum(mask)
            for k, m in enumerate(conv):
                if m["from"] == "gpt":
                    earlier = " ".join(x["value"] for x in conv[:k])
                    dependent += sum(len(tok.encode(" " + s)) - len(tok.encode(" ")) for s in
                                     image_dependent(m["value"], earlier))
            samples += 1
    return {"samples": samples, "supervised_tokens_per_sample": supervised / max(samples, 1),
            "image_dependent_tokens_per_sample": dependent / max(samples, 1),
            "image_dependent_share": dependent / max(supervised, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", help="dataset directories (data.py output)")
    ap.add_argument("--llm", default="weights/smollm2-135m-instruct", help="the tokenizer's checkpoint directory")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    tok = Tokenizer.load(args.llm)
    tok.add_image_token()
    for d in args.data:
        print(d, json.dumps({k: round(v, 4) for k, v in stats(d, tok, args.limit).items()}))


if __name__ == "__main__":
    main()
