"""Generation-0 harness for a free-form numeric task: a few-shot completion prompt, N_SAMPLES
generations in one request (the endpoint's `n`), and a majority vote over the numbers parsed
out of them. KNOBS declares the constants the Meta-Agent turns; SIGNALS what `solve` returns
beside its answer ("votes": the parsed numbers, most voted first)."""

import re
from collections import Counter

from sialoop.harness.kit import read_jsonl

N_SAMPLES = 3
TEMPERATURE = 0.7
PROMPT = "qa"
N_SHOTS = 3
MAX_TOKENS = 6
KNOBS = {
    "N_SAMPLES": {"family": "sampling", "int": [1, 8]},
    "TEMPERATURE": {"family": "sampling", "float": [0.0, 1.5]},
    "PROMPT": {"family": "prompt", "choices": ["qa", "equation", "instruct"]},
    "N_SHOTS": {"family": "prompt", "int": [0, 6]},
}
# The votes are candidates, best first (their first is the answer itself, so they are no
# alternative to it): gold missing from them points at sampling more widely.
SIGNALS = {"votes": {"kind": "ranking", "family": "sampling"}}
ANSWER = "answer"

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_HEADER = {"instruct": "Solve each problem. Reply with the number only.\n\n"}
_EXAMPLES = read_jsonl("public/train.jsonl")[:N_SHOTS]


def _expression(question):
    return question.removeprefix("What is ").removesuffix("?")


def _shot(question, answer=""):
    if PROMPT == "equation":
        return f"{_expression(question)} = {answer}"
    return f"Question: {question}\nAnswer: {answer}"


def prompt(question):
    shots = "".join(_shot(r["question"], r["label"]) + "\n\n" for r in _EXAMPLES)
    return _HEADER.get(PROMPT, "") + shots + _shot(question).rstrip()


def parse(text):
    found = _NUMBER.search(text)
    if found is None:
        return None
    value = float(found.group())
    return str(int(value)) if value.is_integer() else repr(value)


def solve(instance, llm):
    response = llm.completions.create(
        model="policy",
        prompt=prompt(instance["question"]),
        max_tokens=MAX_TOKENS,
        temperature=TEMPERATURE,
        n=N_SAMPLES,
        stop=["\n"],
    )
    generations = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    numbers = [n for n in map(parse, generations) if n is not None]
    # Most votes first; ties go to the number generated first.
    votes = [n for n, _ in Counter(numbers).most_common()]
    return {"answer": votes[0] if votes else "", "votes": votes, "generations": generations}
