"""Generation-0 harness for a small classification task: few-shot prompt, options scored by
log-probability through the policy endpoint. KNOBS declares the constants the Meta-Agent
turns; SIGNALS what `solve` returns beside its answer."""

from sialoop.harness.kit import argmax, read_jsonl, score_options

N_EXAMPLES = 4
NORMALIZE = "sum"
TEMPLATE = "Text: {text}\nAnswer: {label}\n\n"

KNOBS = {
    "N_EXAMPLES": {"family": "examples", "int": [1, 8]},
    "NORMALIZE": {"family": "scoring", "choices": ["sum", "mean"]},
}
SIGNALS = {"ranked": {"kind": "ranking", "family": "scoring"}}
ANSWER = "label"

_EXAMPLES = read_jsonl("public/train.jsonl")[:N_EXAMPLES]
_HEADER = "".join(TEMPLATE.format(text=r["text"], label=r["label"]) for r in _EXAMPLES)


def solve(instance, llm):
    prefix = _HEADER + TEMPLATE.split("{label}")[0].format(text=instance["text"])
    scores = score_options(llm, prefix, instance["options"], suffix="\n", normalize=NORMALIZE)
    ranked = [
        o for _, o in sorted(zip(scores, instance["options"], strict=True), key=lambda p: -p[0])
    ]
    return {"label": argmax(instance["options"], scores), "ranked": ranked}
