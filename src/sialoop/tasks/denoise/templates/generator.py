"""A generator harness for denoising: it asks the policy for a pipeline's settings and answers
the pipeline template (`public/program_template.py`) with them, so the weights lever can learn
from the rewards of its proposals (k samples per instance make a GRPO group).

The policy completes one line of `NAME=value` pairs after a prompt naming the dataset and every
setting's choices; a pair it leaves out, misspells or gives an unknown value keeps the
template's default. KNOBS: how the proposals are sampled."""

import json
import re
from pathlib import Path

TEMPERATURE = 1.0
MAX_TOKENS = 64
KNOBS = {
    "TEMPERATURE": {"family": "sampling", "values": [0.3, 0.7, 1.0, 1.3]},
    "MAX_TOKENS": {"family": "sampling", "values": [32, 64, 128]},
}
SIGNALS = {}
ANSWER = "program"

_TEMPLATE = Path("public/program_template.py").read_text()
_CHOICES = json.loads(Path("public/program_knobs.json").read_text())
_PAIR = re.compile(r"([A-Z_]+)\s*=\s*\"?([A-Za-z0-9_.]+)\"?")


def _prompt(inputs):
    options = "; ".join(f"{k} in {'|'.join(map(str, v))}" for k, v in _CHOICES.items())
    return (
        f"# scRNA-seq denoising pipeline settings. Options: {options}.\n"
        f"# Settings with the best valid mse_norm on {inputs['dataset']} "
        f"({inputs['cells']} cells x {inputs['genes']} genes, {inputs['counts']} counts):\n"
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
            prompt=_prompt(instance),
            max_tokens=MAX_TOKENS,
            temperature=TEMPERATURE,
        )
        settings = _parse(response.choices[0].text)
    return {"program": _program(settings), "settings": settings}
