"""A generator harness for TriMul: it asks the policy for a kernel's settings and answers the
kernel template (`public/kernel_template.py`) with them, so the weights lever can learn from
the rewards of its proposals (k samples per instance make a GRPO group).

The policy completes one line of `NAME=value` pairs after a prompt naming the shape and every
setting's choices; a pair it leaves out, misspells or gives an unknown value keeps the
template's default. A capable policy could be asked for whole code instead; the embedded base
model is asked for the short text. KNOBS: how the proposals are sampled."""

import json
import re
from pathlib import Path

TEMPERATURE = 1.0
MAX_TOKENS = 48
KNOBS = {
    "TEMPERATURE": {"family": "sampling", "values": [0.3, 0.7, 1.0, 1.3]},
    "MAX_TOKENS": {"family": "sampling", "values": [24, 48, 96]},
}
SIGNALS = {}
ANSWER = "program"

_TEMPLATE = Path("public/kernel_template.py").read_text()
_CHOICES = json.loads(Path("public/kernel_knobs.json").read_text())
_PAIR = re.compile(r"([A-Z_]+)\s*=\s*\"?([A-Za-z0-9_.]+)\"?")


def _prompt(case):
    options = "; ".join(f"{k} in {'|'.join(map(str, v))}" for k, v in _CHOICES.items())
    return (
        f"# TriMul kernel settings. Options: {options}.\n"
        f"# Fast settings for N={case['seqlen']} B={case['bs']} C={case['dim']} "
        f"{case['distribution']} inputs:\n"
    )


def _parse(text):
    chosen = {}
    for name, raw in _PAIR.findall(text):
        for value in _CHOICES.get(name, []):
            if str(value) == raw:
                chosen[name] = value
    return chosen


def _program(settings):
    source = _TEMPLATE
    for name, value in settings.items():
        source = re.sub(rf"(?m)^{name} = .*$", f"{name} = {value!r}", source, count=1)
    return source


def solve(instance, llm):
    settings = {}
    if llm is not None:
        response = llm.completions.create(
            model="policy",
            prompt=_prompt(instance["case"]),
            max_tokens=MAX_TOKENS,
            temperature=TEMPERATURE,
        )
        settings = _parse(response.choices[0].text)
    return {"program": _program(settings), "settings": settings}
