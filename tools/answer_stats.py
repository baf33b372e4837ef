"""
How much of a dataset's supervised text depends on the image: the share of supervised tokens (each answer and its
end-of-turn token) that training/dataset.py's rule says the image decides -- numbers the conversation has not shown
before, verdict and relation words, object names (train.py --loss-on image trains on exactly these). Everything else
-- phrasing, echoed coordinates, numbers copied from an earlier answer, the end-of-turn tokens -- can be predicted
without looking at the image, and its loss trains the format, not the encoder.

    python tools/answer_stats.py data/b15/spatial --llm weights/smollm2-135m-instruct [--limit 200]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from language.tokenizer import Tokenizer  # noqa: E402
from training.dataset import dataset_file, image_dependent_weights  # noqa: E402


def stats(data_dir, tok: Tokenizer, limit: int | None = None) -> dict:
    supervised = dependent = samples = 0
    with open(dataset_file(data_dir)) as f:
        for line in f:
            if limit and samples >= limit:
                break
            conv = json.loads(line)["conversations"]
            _, mask = tok.render(conv, 1)
            supervised += sum(mask)
            dependent += sum(image_dependent_weights(tok, conv, mask))
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
