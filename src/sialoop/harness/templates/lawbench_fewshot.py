"""Generation-0 harness for LawBench charge prediction with a base (not instruction-tuned) model.

A completion prompt with a few train examples; the answer is the shortlisted charge with the
highest log-probability under the policy. The shortlist is the charges of the nearest train
cases by character n-gram TF-IDF, fitted on the public train split only. The constants below
are the knobs the Meta-Agent's operators turn.
"""

import json
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from sialoop.harness.kit import argmax, read_jsonl, score_options

N_EXAMPLES = 3
EXAMPLE_SELECTION = "fixed"  # "fixed": one case of each of the most frequent charges; "similar"
EXAMPLE_CHARS = 160
QUERY_CHARS = 400
SHORTLIST = 8
NEIGHBOURS = 40
NORMALIZE = "sum"  # "sum" or "mean" of the option's token log-probabilities
INSTRUCTION = "根据案情描述，判断被告人的罪名。\n\n"
TEMPLATE = "案情：{text}\n罪名：{label}\n\n"

_TRAIN = read_jsonl("public/train.jsonl")
_OPTIONS = json.loads(Path("public/options.json").read_text(encoding="utf-8"))
_VECTORIZER = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
_MATRIX = _VECTORIZER.fit_transform([r["text"] for r in _TRAIN])


def _fixed_examples():
    counts = {}
    for r in _TRAIN:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    top = sorted(counts, key=lambda c: -counts[c])[:N_EXAMPLES]
    return [next(r for r in _TRAIN if r["label"] == c) for c in top]


_FIXED = _fixed_examples()


def neighbours(text):
    """Train indices by decreasing similarity to `text`."""
    sims = (_MATRIX @ _VECTORIZER.transform([text]).T).toarray().ravel()
    return np.argsort(-sims)[:NEIGHBOURS]


def shortlist(near):
    picked = []
    for i in near:
        if _TRAIN[i]["label"] not in picked:
            picked.append(_TRAIN[i]["label"])
        if len(picked) == SHORTLIST:
            break
    return picked


def prompt(text, near):
    examples = _FIXED if EXAMPLE_SELECTION == "fixed" else [_TRAIN[i] for i in near[:N_EXAMPLES]]
    # The most similar example goes last, nearest to the query.
    shots = "".join(
        TEMPLATE.format(text=r["text"][:EXAMPLE_CHARS], label=r["label"]) for r in examples[::-1]
    )
    return INSTRUCTION + shots + TEMPLATE.split("{label}")[0].format(text=text[:QUERY_CHARS])


def solve(instance, llm):
    near = neighbours(instance["text"])
    options = shortlist(near) or _OPTIONS
    scores = score_options(
        llm, prompt(instance["text"], near), options, suffix="\n", normalize=NORMALIZE
    )
    return argmax(options, scores)
