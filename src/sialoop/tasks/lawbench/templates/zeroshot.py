"""Zero-shot LawBench harness: the base model alone, no examples, no shortlist, no train data.

The benchmark's floor (bench/lawbench.py): the model continues "罪名：" greedily and the answer
is the charge name its text matches, first exactly, then as the longest charge name inside the
text, then by the most characters in common. Nothing here reads public/train.jsonl.
"""

import difflib
import json
from pathlib import Path

INSTRUCTION = "根据案情描述，判断被告人的罪名。\n\n"
TEMPLATE = "案情：{text}\n罪名："
QUERY_CHARS = 400
MAX_TOKENS = 16

_OPTIONS = json.loads(Path("public/options.json").read_text(encoding="utf-8"))


def closest_option(text):
    """The charge `text` names: exact, else the longest one inside it, else the most similar."""
    text = text.strip().removesuffix("罪")
    if text in _OPTIONS:
        return text
    inside = [o for o in _OPTIONS if o in text]
    if inside:
        return max(inside, key=len)
    return max(_OPTIONS, key=lambda o: difflib.SequenceMatcher(None, o, text).ratio())


def solve(instance, llm):
    response = llm.completions.create(
        model="policy",
        prompt=INSTRUCTION + TEMPLATE.format(text=instance["text"][:QUERY_CHARS]),
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stop=["\n"],
    )
    generated = response.choices[0].text
    return {"label": closest_option(generated), "generated": generated}
