"""Generation-0 harness for LawBench charge prediction with a base (not instruction-tuned) model.

A completion prompt with a few train examples; the answer is the shortlisted charge with the
highest log-probability under the policy (optionally plus a weighted prior from the shortlist's
retriever or classifier). The shortlist comes from the nearest train cases by character n-gram
TF-IDF, or from a linear classifier on the same features, both fitted on the public train split
only. The constants below are the knobs the Meta-Agent turns, declared with their domains and
families in KNOBS; SIGNALS names what `solve` returns beside its answer.
"""

import json
from functools import cache
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from sialoop.harness.kit import argmax, read_jsonl, score_options

N_EXAMPLES = 3
EXAMPLE_SELECTION = "fixed"  # "fixed": one case of each of the most frequent charges; "similar"
EXAMPLE_CHARS = 160
QUERY_CHARS = 400
SHORTLIST = 8
SHORTLIST_SOURCE = "neighbours"  # "neighbours" (TF-IDF nearest train cases) or "classifier"
NEIGHBOURS = 40
PRIOR_WEIGHT = 0.0  # weight of log(shortlist prior) added to the option's log-probability
NORMALIZE = "sum"  # "sum" or "mean" of the option's token log-probabilities
# The policy scores the shortlist only when the prior's first option leads its second by at
# most this (in prior probability); above it the prior alone answers. 1.0: always score.
LM_MARGIN = 1.0
INSTRUCTION = "根据案情描述，判断被告人的罪名。\n\n"
TEMPLATE = "案情：{text}\n罪名：{label}\n\n"

KNOBS = {
    "EXAMPLE_SELECTION": {"family": "examples", "choices": ["fixed", "similar"]},
    "N_EXAMPLES": {"family": "examples", "int": [1, 8]},
    "EXAMPLE_CHARS": {"family": "examples", "int": [80, 480], "step": 80},
    # The source first: the first shortlist move is the classifier.
    "SHORTLIST_SOURCE": {"family": "shortlist", "choices": ["neighbours", "classifier"]},
    "SHORTLIST": {"family": "shortlist", "values": [2, 4, 8, 16, 32]},
    "NEIGHBOURS": {"family": "shortlist", "values": [20, 40, 80, 160]},
    "PRIOR_WEIGHT": {"family": "scoring", "values": [0.0, 1.0, 3.0, 10.0, 30.0, 100.0]},
    "NORMALIZE": {"family": "scoring", "choices": ["sum", "mean"]},
    "QUERY_CHARS": {"family": "format", "int": [200, 1200], "step": 200},
    # Cheaper first: a smaller margin sends more items to the prior alone (no model call).
    "LM_MARGIN": {"family": "cost", "values": [1.0, 0.5, 0.3, 0.2, 0.1]},
}
SIGNALS = {
    # The final ranking of the shortlist: is gold in it, and how high?
    "ranked": {"kind": "ranking", "family": "shortlist"},
    # The shortlist prior's own ranking: when its first item beats the answer, weigh it more.
    "prior_ranked": {
        "kind": "alternative",
        "family": "scoring",
        "raises": "PRIOR_WEIGHT",
        "bound_family": "shortlist",
    },
}
ANSWER = "label"

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
    """Train indices by decreasing similarity to `text`, leaving out the case itself (a train
    instance would otherwise retrieve its own label)."""
    sims = (_MATRIX @ _VECTORIZER.transform([text]).T).toarray().ravel()
    return [i for i in np.argsort(-sims)[: NEIGHBOURS + 1] if _TRAIN[i]["text"] != text][
        :NEIGHBOURS
    ]


def shortlist(near):
    picked = []
    for i in near:
        if _TRAIN[i]["label"] not in picked:
            picked.append(_TRAIN[i]["label"])
        if len(picked) == SHORTLIST:
            break
    return picked


CLASSIFIER_FOLDS = 3
# A train case is assigned a fold; the classifier that scores it never saw that fold, so train
# rollouts (the Feedback-Agent's evidence, the trainer's prompts) do not see their own label.
_FOLD = {r["text"]: i % CLASSIFIER_FOLDS for i, r in enumerate(_TRAIN)}
_CLASSIFIERS = {}


def classifier_for(text):
    """A LinearSVC on the TF-IDF features, fitted without the fold of `text` (all of train for a
    text outside it): in `setup` when the shortlist comes from the classifier, else on first use,
    so harnesses that never ask pay nothing."""
    return _classifier(_FOLD.get(text))


def _classifier(fold):
    if fold not in _CLASSIFIERS:
        rows = [i for i, r in enumerate(_TRAIN) if fold is None or _FOLD[r["text"]] != fold]
        _CLASSIFIERS[fold] = LinearSVC(C=0.5).fit(_MATRIX[rows], [_TRAIN[i]["label"] for i in rows])
    return _CLASSIFIERS[fold]


def _margins(classifier, text):
    raw = classifier.decision_function(_VECTORIZER.transform([text]))
    return raw[0] if raw.ndim == 2 else np.array([-raw[0], raw[0]])  # two classes: one margin


@cache  # fitted once per worker: the softmax temperature that turns margins into a prior
def margin_sharpness():
    """The scale `t` for which softmax(t * margins) best predicts gold on out-of-fold train
    margins (a seeded sample, train data only): raw LinearSVC margins sit in about [-1, 1], so
    their plain softmax is nearly flat and would carry far less weight than the neighbours'
    vote at the same PRIOR_WEIGHT."""
    rows = np.random.default_rng(0).permutation(len(_TRAIN))[:600]
    scored = []
    for i in rows:
        classifier = classifier_for(_TRAIN[i]["text"])
        classes = list(classifier.classes_)
        if _TRAIN[i]["label"] in classes:
            scored.append(
                (_margins(classifier, _TRAIN[i]["text"]), classes.index(_TRAIN[i]["label"]))
            )

    def loglik(t):
        return sum(
            t * m[g] - np.log(np.exp(t * (m - m.max())).sum()) - t * m.max() for m, g in scored
        )

    return max((1.0, 2.0, 5.0, 10.0, 20.0, 50.0), key=loglik) if scored else 1.0


def setup():
    """One-time work, run by the sandbox once per worker before any item and in its own time
    budget: with the classifier shortlist, fit every fold's classifier and the margins' sharpness
    now, so no item pays for them. Their state (hundreds of MB of LinearSVC weights on LawBench)
    is too large to cache across a worker restart, so a replacement worker fits them again here."""
    if SHORTLIST_SOURCE == "classifier":
        for fold in (*range(CLASSIFIER_FOLDS), None):
            _classifier(fold)
        margin_sharpness()


def classifier_shortlist(text):
    """Top charges by the classifier, with a softmax of its sharpened margins as their prior."""
    classifier = classifier_for(text)
    margins = _margins(classifier, text) * margin_sharpness()
    top = np.argsort(-margins)[:SHORTLIST]
    prior = np.exp(margins[top] - margins[top].max())
    return [str(classifier.classes_[i]) for i in top], list(prior / prior.sum())


def neighbour_prior(near, options):
    """Share of the nearest cases' similarity mass on each option (rank-weighted vote)."""
    votes = dict.fromkeys(options, 0.0)
    for rank, i in enumerate(near):
        if _TRAIN[i]["label"] in votes:
            votes[_TRAIN[i]["label"]] += 1.0 / (rank + 1)
    total = sum(votes.values()) or 1.0
    return [votes[o] / total for o in options]


def prompt(text, near):
    examples = _FIXED if EXAMPLE_SELECTION == "fixed" else [_TRAIN[i] for i in near[:N_EXAMPLES]]
    # The most similar example goes last, nearest to the query.
    shots = "".join(
        TEMPLATE.format(text=r["text"][:EXAMPLE_CHARS], label=r["label"]) for r in examples[::-1]
    )
    return INSTRUCTION + shots + TEMPLATE.split("{label}")[0].format(text=text[:QUERY_CHARS])


def solve(instance, llm):
    near = neighbours(instance["text"])
    if SHORTLIST_SOURCE == "classifier":
        options, prior = classifier_shortlist(instance["text"])
    else:
        options = shortlist(near) or _OPTIONS
        prior = neighbour_prior(near, options)
    ordered = sorted(prior, reverse=True)
    if len(options) > 1 and ordered[0] - ordered[1] > LM_MARGIN:
        scores = [float(np.log(p + 1e-3)) for p in prior]  # the prior alone: no model call
    else:
        scores = score_options(
            llm, prompt(instance["text"], near), options, suffix="\n", normalize=NORMALIZE
        )
        if PRIOR_WEIGHT:
            scores = [
                s + PRIOR_WEIGHT * float(np.log(p + 1e-3))
                for s, p in zip(scores, prior, strict=True)
            ]
    ranked = [o for _, o in sorted(zip(scores, options, strict=True), key=lambda pair: -pair[0])]
    # The prior's own ranking lets the Feedback-Agent see whether the final answer uses it well.
    prior_ranked = [o for _, o in sorted(zip(prior, options, strict=True), key=lambda p: -p[0])]
    return {"label": argmax(options, scores), "ranked": ranked, "prior_ranked": prior_ranked}
