"""Generation-0 harness for a small classification task: few-shot prompt, options scored by
log-probability through the policy endpoint."""

from sialoop.harness.kit import argmax, read_jsonl, score_options

N_EXAMPLES = 4
NORMALIZE = "sum"
TEMPLATE = "Text: {text}\nAnswer: {label}\n\n"

_EXAMPLES = read_jsonl("public/train.jsonl")[:N_EXAMPLES]
_HEADER = "".join(TEMPLATE.format(text=r["text"], label=r["label"]) for r in _EXAMPLES)


def solve(instance, llm):
    prefix = _HEADER + TEMPLATE.split("{label}")[0].format(text=instance["text"])
    scores = score_options(llm, prefix, instance["options"], suffix="\n", normalize=NORMALIZE)
    ranked = [
        o for _, o in sorted(zip(scores, instance["options"], strict=True), key=lambda p: -p[0])
    ]
    return {"label": argmax(instance["options"], scores), "ranked": ranked}
