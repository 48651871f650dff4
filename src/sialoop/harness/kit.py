"""Building blocks a harness may import (`from sialoop.harness.kit import ...`).

They run inside the sandboxed worker and talk to the policy endpoint only through the `llm`
client the harness receives, so every call is recorded for the episode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Normalize = Literal["sum", "mean"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_options(
    llm: Any, prefix: str, options: list[str], *, suffix: str = "", normalize: Normalize = "sum"
) -> list[float]:
    """Log-probability of each `option + suffix` after `prefix`, one request for all options.

    The endpoint computes the shared prefix once; `echo_logprobs_from` tells it not to spend
    the vocabulary-sized softmax on prefix tokens. `mean` divides by the option's token count.
    """
    response = llm.completions.create(
        model="policy",
        prompt=[prefix + option + suffix for option in options],
        max_tokens=0,
        echo=True,
        logprobs=0,
        extra_body={"echo_logprobs_from": len(prefix)},
    )
    scores = [0.0] * len(options)
    for choice in response.choices:
        lp = choice.logprobs
        # Tokens ending inside the prefix are not the option's (and come back null here).
        picked = [
            value
            for value, offset, token in zip(
                lp.token_logprobs, lp.text_offset, lp.tokens, strict=True
            )
            if offset + len(token) > len(prefix) and value is not None
        ]
        total = sum(picked)
        scores[choice.index] = total / max(1, len(picked)) if normalize == "mean" else total
    return scores


def argmax(options: list[str], scores: list[float]) -> str:
    return max(zip(scores, options, strict=True))[1]
