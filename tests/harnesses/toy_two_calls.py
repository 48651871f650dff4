"""A toy harness that samples (for PPO in the loop): two sampled calls per episode, a short
"thought" and then the answer, matched to the option that the reply's first letter names."""

KNOBS = {"MAX_TOKENS": {"family": "sampling", "int": [1, 8]}}
SIGNALS = {}
ANSWER = "label"
MAX_TOKENS = 3


def solve(instance, llm):
    prompt = f"Text: {instance['text']}\nThought:"
    thought = (
        llm.completions.create(
            model="policy", prompt=prompt, max_tokens=2, temperature=1.0, logprobs=0
        )
        .choices[0]
        .text
    )
    reply = (
        llm.completions.create(
            model="policy",
            prompt=prompt + thought + "\nAnswer:",
            max_tokens=MAX_TOKENS,
            temperature=1.0,
        )
        .choices[0]
        .text
    )
    options = instance["options"]
    pick = next((o for o in options if reply.strip()[:1].lower() == o[:1].lower()), None)
    return {"label": pick or options[len(reply) % len(options)]}
