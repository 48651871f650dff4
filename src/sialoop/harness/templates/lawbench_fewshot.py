"""Generation-0 harness for LawBench charge prediction with a base (not instruction-tuned) model.

A completion prompt with a few fixed train examples; the answer is the shortlisted charge with
the highest log-probability under the policy. The shortlist is the charges of the nearest train
cases by character n-gram TF-IDF (fitted on the public train split only).
"""

import json
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from sialoop.harness.kit import argmax, read_jsonl, score_options

N_EXAMPLES = 3
EXAMPLE_CHARS = 160
QUERY_CHARS = 400
SHORTLIST = 8
NEIGHBOURS = 40
NORMALIZE = "sum"
INSTRUCTION = "根据案情描述，判断被告人的罪名。\n\n"
TEMPLATE = "案情：{text}\n罪名：{label}\n\n"

_TRAIN = read_jsonl("public/train.jsonl")
_OPTIONS = json.loads(Path("public/options.json").read_text(encoding="utf-8"))
_VECTORIZER = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
_MATRIX = _VECTORIZER.fit_transform([r["text"] for r in _TRAIN])


def _examples():
    # Fixed, diverse examples: the first train case of the N most frequent charges.
    counts = {}
    for r in _TRAIN:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    top = sorted(counts, key=lambda c: -counts[c])[:N_EXAMPLES]
    return [next(r for r in _TRAIN if r["label"] == c) for c in top]


_HEADER = INSTRUCTION + "".join(
    TEMPLATE.format(text=r["text"][:EXAMPLE_CHARS], label=r["label"]) for r in _examples()
)


def shortlist(text):
    sims = (_MATRIX @ _VECTORIZER.transform([text]).T).toarray().ravel()
    picked = []
    for i in np.argsort(-sims)[:NEIGHBOURS]:
        label = _TRAIN[i]["label"]
        if label not in picked:
            picked.append(label)
        if len(picked) == SHORTLIST:
            break
    return picked


def solve(instance, llm):
    options = shortlist(instance["text"]) or _OPTIONS
    prefix = _HEADER + TEMPLATE.split("{label}")[0].format(text=instance["text"][:QUERY_CHARS])
    scores = score_options(llm, prefix, options, suffix="\n", normalize=NORMALIZE)
    return argmax(options, scores)
