"""Generation-0 harness for an instruction-tuned chat model (an external policy, which gives no
prompt log-probabilities to score options by): a few-shot chat asks for one option, and the
reply is matched to the options. KNOBS declares the constants the Meta-Agent turns."""

from sialoop.harness.kit import read_jsonl

N_EXAMPLES = 4
SYSTEM = "Answer with exactly one of the options, and nothing else."
MAX_TOKENS = 8
SAMPLE_TEMPERATURE = 1.0  # a group's samples after the first (see _temperature)

KNOBS = {
    "N_EXAMPLES": {"family": "examples", "int": [0, 8]},
    "MAX_TOKENS": {"family": "decoding", "int": [4, 32]},
}
SIGNALS = {}
ANSWER = "label"

_EXAMPLES = read_jsonl("public/train.jsonl")[:N_EXAMPLES]


def _ask(text, options):
    return f"Text: {text}\nOptions: {', '.join(options)}"


def _temperature(instance):
    """Greedy, except for a group's later samples (`instance["sample"]` > 0, when the loop asks
    for k per instance): those explore, so the group's rewards can differ."""
    return SAMPLE_TEMPERATURE if instance.get("sample", 0) > 0 else 0.0


def solve(instance, llm):
    options = instance["options"]
    messages = [{"role": "system", "content": SYSTEM}]
    for row in _EXAMPLES:
        messages.append({"role": "user", "content": _ask(row["text"], options)})
        messages.append({"role": "assistant", "content": row["label"]})
    messages.append({"role": "user", "content": _ask(instance["text"], options)})
    reply = llm.chat.completions.create(
        model="policy", messages=messages, max_tokens=MAX_TOKENS, temperature=_temperature(instance)
    )
    said = (reply.choices[0].message.content or "").strip().lower()
    exact = [o for o in options if o.lower() == said]
    within = [o for o in options if o.lower() in said]
    return {"label": (exact or within or [said])[0]}
