"""A user task in about 20 lines: `sialoop run --task examples/capitals.py:Capitals`."""

from sialoop.records import Score
from sialoop.tasks import Instance, Task

PAIRS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi",
         "Italy": "Rome", "Egypt": "Cairo", "Chile": "Santiago", "Spain": "Madrid",
         "Cuba": "Havana", "Iran": "Tehran", "Mali": "Bamako", "Fiji": "Suva"}  # fmt: skip
SPLITS = {"train": list(PAIRS)[:6], "val": list(PAIRS)[6:9], "test": list(PAIRS)[9:]}
HARNESS = """
N_WORDS = 2
KNOBS = {"N_WORDS": {"family": "format", "int": [1, 4]}}

def solve(instance, llm):
    prompt = f"The capital of {instance['country']} is"
    text = llm.completions.create(model="policy", prompt=prompt, max_tokens=4).choices[0].text
    return " ".join(text.split()[:N_WORDS])
"""


class Capitals(Task):
    name = "capitals"

    def spec(self) -> str:
        return "Answer the capital city of instance['country']."

    def instances(self, split):
        return [Instance(id=c, split=split, inputs={"country": c}) for c in SPLITS[split]]

    def label(self, instance):
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return PAIRS[instance.id]

    def score(self, instance, output):
        right = str(output).strip() == PAIRS[instance.id]
        return Score(value=float(right), correct=right)

    def reference_harness(self) -> str:
        return HARNESS
