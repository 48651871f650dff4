"""LawBench harness for an instruction-tuned chat model (an external policy: a hosted model, or
a local vLLM, llama.cpp or Ollama server), beside the completion-style templates for the
embedded base model. A chat model gives no prompt log-probabilities to score options by, so it
is asked to name one charge from a shortlist, and its reply is matched to the shortlist.

The shortlist is a linear classifier's top SHORTLIST charges on character n-gram TF-IDF,
fitted on the public train split only (a train case is scored by a classifier that never saw
its fold, as in the few-shot template). N_EXAMPLES train cases of the shortlist's charges go
before the case as earlier turns of the conversation. A reply naming no shortlisted charge
falls back to the classifier's first. KNOBS declares the constants the Meta-Agent turns.
"""

import json
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from sialoop.harness.kit import read_jsonl

SHORTLIST = 8
N_EXAMPLES = 2
EXAMPLE_CHARS = 160
QUERY_CHARS = 600
MAX_TOKENS = 24
SAMPLE_TEMPERATURE = 1.0  # a group's samples after the first (see _temperature)
SYSTEM = "你是中国刑法专家。根据案情描述，从候选罪名中选出被告人所犯的一个罪名，只回答罪名本身。"

KNOBS = {
    "SHORTLIST": {"family": "shortlist", "values": [2, 4, 8, 16, 32]},
    "N_EXAMPLES": {"family": "examples", "int": [0, 6]},
    "EXAMPLE_CHARS": {"family": "examples", "int": [80, 480], "step": 80},
    "QUERY_CHARS": {"family": "format", "int": [200, 1200], "step": 200},
}
SIGNALS = {"ranked": {"kind": "ranking", "family": "shortlist"}}
ANSWER = "label"

_TRAIN = read_jsonl("public/train.jsonl")
_OPTIONS = json.loads(Path("public/options.json").read_text(encoding="utf-8"))
_VECTORIZER = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
_MATRIX = _VECTORIZER.fit_transform([r["text"] for r in _TRAIN])
FOLDS = 3
_FOLD = {r["text"]: i % FOLDS for i, r in enumerate(_TRAIN)}
_CLASSIFIERS = {}


def _classifier(text):
    fold = _FOLD.get(text)
    if fold not in _CLASSIFIERS:
        rows = [i for i, r in enumerate(_TRAIN) if fold is None or _FOLD[r["text"]] != fold]
        _CLASSIFIERS[fold] = LinearSVC(C=0.5).fit(_MATRIX[rows], [_TRAIN[i]["label"] for i in rows])
    return _CLASSIFIERS[fold]


def shortlist(text):
    """The classifier's charges for `text`, most likely first."""
    classifier = _classifier(text)
    margins = classifier.decision_function(_VECTORIZER.transform([text]))
    margins = margins[0] if margins.ndim == 2 else np.array([-margins[0], margins[0]])
    order = np.argsort(-margins)[:SHORTLIST]
    return [str(classifier.classes_[i]) for i in order]


def _case(text, options):
    return f"案情：{text[:QUERY_CHARS]}\n候选罪名：{'、'.join(options)}"


def messages(text, options):
    out = [{"role": "system", "content": SYSTEM}]
    for charge in options[:N_EXAMPLES]:
        example = next((r for r in _TRAIN if r["label"] == charge and r["text"] != text), None)
        if example is not None:
            out.append({"role": "user", "content": _case(example["text"][:EXAMPLE_CHARS], options)})
            out.append({"role": "assistant", "content": charge})
    out.append({"role": "user", "content": _case(text, options)})
    return out


def matched(reply, options):
    """The shortlisted charge the reply names (the longest one inside it), else None."""
    said = reply.strip().removesuffix("。").removesuffix("罪")
    if said in options:
        return said
    inside = [o for o in options if o in reply]
    return max(inside, key=len) if inside else None


def _temperature(instance):
    """Greedy, except for a group's later samples (`instance["sample"]` > 0, when the loop asks
    for k per instance): those explore, so the group's rewards can differ."""
    return SAMPLE_TEMPERATURE if instance.get("sample", 0) > 0 else 0.0


def solve(instance, llm):
    text = instance["text"]
    options = shortlist(text)
    response = llm.chat.completions.create(
        model="policy",
        messages=messages(text, options),
        max_tokens=MAX_TOKENS,
        temperature=_temperature(instance),
    )
    reply = response.choices[0].message.content or ""
    answer = matched(reply, options) or options[0]
    return {
        "label": answer,
        "ranked": [answer, *[o for o in options if o != answer]],
        "reply": reply,
    }
