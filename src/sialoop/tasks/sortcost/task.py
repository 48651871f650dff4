"""A small lower-is-better program task: a sort that makes as few comparisons as it can.

An instance names a list length `n` (8, 16, 32 or 48) and an input order ("random",
"nearly_sorted", "reversed"). A harness answers with a program, `{"program": source}`, whose
`sort(items, less)` returns the items sorted (or sorts the list in place and returns None),
comparing them only through `less(a, b)`. The score is the number of comparisons divided by
n·log2(n), averaged over REPS fresh inputs; lower is better.

How a program is measured (`score`): the program never runs in this process. Each call writes
it, with the trusted wrapper `runner.py`, into a fresh temp dir and runs the wrapper as the
harness of its own `Sandbox` (one per call, closed before it returns: nothing is shared
between calls, so scoring is thread-safe and one program's state never reaches another's), with
no policy endpoint, no network and tight limits (`timeout_s` per input, 512 MB). The parent
draws each input's keys (distinct integers) from the OS's randomness, so a program cannot know
them in advance; the wrapper hands the program opaque items that `sorted(items)` cannot order,
counts the calls of `less`, and answers the original position of each returned item. The
parent checks that this is a permutation ordering its own keys. A wrong order, an exception, a
timeout or a crash of the worker raises `ProgramFailed`: the score is never computed (the
rollout records invalid_output), and never stands in as 0 or as a bad value.

`Score.detail`: n, order, the raw count per input ("comparisons"), and `units` (`rep0`...,
each input's normalised count: `value` is their mean; the task's noise model is "units").

Guaranteed: the order is checked outside the program's process, on inputs it cannot predict.
Not guaranteed: the count is measured by the wrapper inside the worker, where the program
runs too; a determined program can read the keys from the wrapper (its frames, `gc`), sort
without `less`, or reset the counter, and the parent cannot tell. The sandbox's own limits
apply (see `sialoop.harness.sandbox`): this is not a security boundary against native code.
The task has no private data, so there is nothing of the parent's beyond the sandbox's
defaults for the worker to be denied.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from importlib.resources import files
from itertools import pairwise
from pathlib import Path
from typing import Any

from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.records import Score, new_id
from sialoop.tasks.base import Instance, Metric, Split, Task
from sialoop.tasks.templates import template_source

LENGTHS = (8, 16, 32, 48)
ORDERS = ("random", "nearly_sorted", "reversed")
REPS = 3
_SIZES: dict[Split, int] = {"train": 12, "val": 12, "test": 12}
_MAX_PROGRAM_CHARS = 100_000

SPEC = """# Sort with few comparisons

`instance["n"]` is the length of a list and `instance["order"]` how it arrives: "random",
"nearly_sorted" (sorted, then a few neighbours swapped) or "reversed". Output
`{"program": source}`: Python source defining `sort(items, less)`, which returns the items in
ascending order (or sorts the list in place and returns None). Items are opaque: `sorted(items)`
and `<` raise TypeError; `less(a, b)` is True when a's key is smaller and counts one
comparison. Keys are distinct integers, drawn fresh for every measurement.

Metric: comparisons, the count divided by n·log2(n), mean of 3 fresh inputs; lower is better.
A wrong order, an exception or a run past the time limit scores nothing. The program runs in
an isolated worker without network or LLM, with the standard library only.
"""


class ProgramFailed(Exception):
    """The program could not be measured: it crashed, timed out or sorted wrongly."""


def draw_keys(n: int, order: str, rng: random.Random) -> list[int]:
    """`n` distinct integer keys arranged as `order` says."""
    keys = sorted(rng.sample(range(10 * n), n))
    if order == "random":
        rng.shuffle(keys)
    elif order == "reversed":
        keys.reverse()
    elif order == "nearly_sorted":
        for _ in range(max(1, n // 8)):
            i = rng.randrange(n - 1)
            keys[i], keys[i + 1] = keys[i + 1], keys[i]
    else:
        raise ValueError(f"unknown order {order!r}")
    return keys


def check_order(keys: list[int], order: Any) -> list[int]:
    """`order` as a list of positions, if it is a permutation that sorts `keys`; else raise."""
    n = len(keys)
    if not isinstance(order, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in order
    ):
        raise ProgramFailed("the wrapper's answer holds no list of positions")
    if sorted(order) != list(range(n)):
        raise ProgramFailed(f"sort returned {len(order)} items, not a permutation of the {n}")
    arranged = [keys[i] for i in order]
    if any(a > b for a, b in pairwise(arranged)):
        raise ProgramFailed("sort returned the items out of order")
    return order


class SortCostTask(Task):
    """See the module docstring. `timeout_s`: the limit per input (tests shorten it)."""

    name = "sortcost"
    metric = Metric(name="comparisons", direction="lower", correct=None, failure_value=None)
    noise = "units"

    def __init__(self, seed: int = 0, timeout_s: float = 10.0, memory_mb: int = 512):
        rng = random.Random(seed)
        combos = [(n, order) for n in LENGTHS for order in ORDERS]
        self._instances: dict[Split, list[Instance]] = {}
        for split, size in _SIZES.items():
            picked = [combos[i % len(combos)] for i in range(size)]
            rng.shuffle(picked)
            self._instances[split] = [
                Instance(id=f"{split}-{i}", split=split, inputs={"n": n, "order": order})
                for i, (n, order) in enumerate(picked)
            ]
        self._limits = SandboxLimits(
            timeout_s=timeout_s,
            startup_timeout_s=max(30.0, timeout_s),
            memory_mb=memory_mb,
            file_size_mb=4,
            max_log_bytes=4_000,
            max_start_failures=1,
        )
        self._fresh = random.SystemRandom()

    def spec(self) -> str:
        return SPEC

    def instances(self, split: Split) -> list[Instance]:
        return list(self._instances[split])

    def label(self, instance: Instance) -> None:
        """A measurement task has no gold answer: None for train and val; test is refused."""
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return None

    def score(self, instance: Instance, output: Any) -> Score:
        """Measure the program in `output` on REPS fresh inputs (see the module docstring);
        raises ProgramFailed (or ValueError for an output without a program) on failure."""
        source = output.get("program") if isinstance(output, dict) else output
        if not isinstance(source, str) or not source.strip():
            raise ValueError('the output holds no program: expected {"program": "<source>"}')
        if len(source) > _MAX_PROGRAM_CHARS:
            raise ValueError(f"the program is longer than {_MAX_PROGRAM_CHARS} characters")
        n, order = int(instance.inputs["n"]), str(instance.inputs["order"])
        counts = self._measure(source, n, order)
        norm = n * math.log2(n)
        units = {f"rep{k}": count / norm for k, count in enumerate(counts)}
        detail: dict[str, Any] = {"n": n, "order": order, "comparisons": counts, "units": units}
        return Score(value=sum(units.values()) / len(units), detail=detail)

    def _measure(self, source: str, n: int, order: str) -> list[int]:
        scratch = Path(tempfile.mkdtemp(prefix="sialoop-sortcost-"))
        try:
            harness = scratch / "harness.py"
            harness.write_text((files(__package__) / "runner.py").read_text(encoding="utf-8"))
            (scratch / "program.py").write_text(source, encoding="utf-8")
            counts = []
            with Sandbox(
                harness,
                policy_url=None,
                adapter="base",
                limits=self._limits,
                scratch_root=scratch,
                deny_read=tuple(self.private_paths()),
            ) as sandbox:
                for _ in range(REPS):
                    keys = draw_keys(n, order, self._fresh)
                    result = sandbox.solve({"keys": keys}, new_id("sortcost"))
                    if result.error is not None:
                        raise ProgramFailed(f"{result.error.kind.value}: {result.error.message}")
                    reply = result.output if isinstance(result.output, dict) else {}
                    check_order(keys, reply.get("order"))
                    count = reply.get("comparisons")
                    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                        raise ProgramFailed("the wrapper's answer holds no comparison count")
                    counts.append(count)
            return counts
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def reference_harness(self) -> str:
        return template_source(__package__, "generator.py")
