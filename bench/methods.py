"""The training methods side by side: each trains one weights candidate from the same parent
(generation 0 on the base model) with the same train items and steps, on toy and on LawBench.

    python bench/methods.py                      # every task and method (about 40 min on 2 cores)
    python bench/methods.py --task toy --method dpo --redo

A row is one run directory (`bench/results/methods-runs/<task>-<method>`): generation 0, then
one generation whose Feedback-Agent pulls the weights lever with that method (a plug-in around
the offline agent, whose own choice and rationale the row keeps), gated on val as usual. Then
the evaluator scores the parent and the candidate on the same test items (LawBench: the first
`--test-size`), so the test gain is paired. Printed side by side: val and test of parent and
candidate, the gate's verdict, wall minutes of the weights attempt, training tokens per second,
and what the offline Feedback-Agent would have chosen there and why.

PPO and GRPO learn from sampled tokens: their rows start from the task's chat template (the
answer generated, then matched to the options; GRPO with 4 samples per train instance, a group),
so their parent is another harness than the SFT and DPO rows' and the table says so. JSON:
bench/results/methods.json, one row stored as it finishes; a finished row is not re-run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sialoop.agents.registry import FEEDBACK
from sialoop.config import load_config
from sialoop.evaluator import served_adapters
from sialoop.loop import drive, new_run
from sialoop.policy.dtype import native_bf16, resolve_dtype
from sialoop.policy.launch import serve_policy
from sialoop.records import Decision, Lever
from sialoop.rollout import RolloutContext, evaluate
from sialoop.runlock import RunLock
from sialoop.store import Store
from sialoop.tasks import task_for

RESULTS = Path(__file__).parent / "results" / "methods.json"
RUNS = Path(__file__).parent / "results" / "methods-runs"
METHODS = ("sft", "dpo", "grpo", "ppo")
SRC = Path(__file__).resolve().parents[1] / "src" / "sialoop" / "tasks"
# PPO and GRPO learn from sampled tokens, which an option-scoring template has none of: their
# rows start from each task's sampling (chat) template instead, so their parent differs from the
# others'; GRPO compares the k samples of an instance, so it samples 4.
SAMPLING = {name: SRC / name / "templates" / "chat.py" for name in ("toy", "lawbench")}
SAMPLED = {"ppo": {}, "grpo": {"loop.samples": 4}}
TASKS: dict[str, dict[str, Any]] = {
    "toy": {"split.val_size": 0, "split.holdout_size": 0, "loop.train_batch": 32},
    "lawbench": {"split.val_size": 150, "split.holdout_size": 0, "loop.train_batch": 48},
}
COMMON = {
    "loop.generations": 1, "loop.levers": ["weights"], "eval_test": False,
    "loop.minutes": 60, "loop.train_items": 96, "train.max_steps": 24,
}  # fmt: skip


class OneMethod:
    """The offline agent's evidence and choice, then the weights lever with `method`."""

    def __init__(self, inner: Any, method: str) -> None:
        self.inner, self.method = inner, method

    def decide_before_rollout(self, *args: Any, **kwargs: Any) -> Decision | None:
        return self.inner.decide_before_rollout(*args, **kwargs)

    def decide(self, *args: Any, **kwargs: Any) -> Decision:
        d = self.inner.decide(*args, **kwargs)
        would = {"lever": d.lever.value, "method": d.method, "rationale": d.rationale}
        return d.model_copy(
            update={
                "lever": Lever.weights, "method": self.method,
                "settings": {},
                "rationale": f"bench: weights with {self.method}",
                "evidence": {**d.evidence, "offline_would": would},
            }
        )  # fmt: skip


for _m in METHODS:
    FEEDBACK[f"bench-{_m}"] = lambda cfg, m=_m: OneMethod(FEEDBACK["offline"](cfg), m)


def _test(store: Store, task: Any, cfg: Any, ids: list[str], console: Console) -> dict[str, float]:
    """Parent and candidate on the same test items, through the evaluator's path."""
    items = [i for i in task.instances("test") if i.id in set(ids)]
    out = {}
    with serve_policy(cfg.policy, store, served_adapters(store)) as url:
        for vid in ("v0", "v1"):
            ctx = RolloutContext(store, task, store.version(vid), url, cfg.sandbox)
            out[vid] = evaluate(ctx, items, forced=True).value
    return out


def run_row(name: str, method: str, test_size: int, console: Console) -> dict[str, Any]:
    overrides = {
        "task": name, "runs_dir": str(RUNS), "agents.feedback": f"bench-{method}",
        **COMMON, **TASKS[name],
    }  # fmt: skip
    if method in SAMPLED:
        overrides |= {"harness": str(SAMPLING[name]), **SAMPLED[method]}
    cfg = load_config(None, overrides)
    task = task_for(cfg)
    run_id = f"{name}-{method}"
    root = RUNS / run_id
    store = Store.open(root) if root.exists() else new_run(cfg, task, run_id)
    started = time.monotonic()
    if store.run_info().status != "finished":
        drive(store, task, cfg, console, RunLock(store.root, "bench").acquire())
    v1 = store.version("v1")
    val = {e.version_id: e.value for e in store.evaluations("val")}
    ids = [i.id for i in task.instances("test")][: test_size or None]
    test = _test(store, task, cfg, ids, console) if v1.status != "broken" else {}
    d1 = next(d for d in store.decisions() if d.generation == 1)
    training = v1.detail.get("training", {})
    return {
        "task": name, "method": method, "status": v1.status,
        "harness": "chat (sampling)" if method in SAMPLED else "reference (option scoring)",
        "error": v1.detail.get("error"), "val_parent": val.get("v0"), "val": val.get("v1"),
        "test_parent": test.get("v0"), "test": test.get("v1"), "test_n": len(ids),
        "gate": (v1.detail.get("gate") or {}).get("reason"),
        "minutes": v1.detail.get("minutes"), "train_seconds": training.get("seconds"),
        "tokens_per_s": training.get("tokens_per_s"), "steps": training.get("steps"),
        "examples": training.get("examples"), "first_loss": training.get("first_loss"),
        "last_loss": training.get("last_loss"), "kl": training.get("kl"),
        "logprob_gap": training.get("logprob_gap"),
        "gate_n": (v1.detail.get("gate") or {}).get("n_paired"),
        "offline_would": d1.evidence.get("offline_would"),
        "wall_minutes": (time.monotonic() - started) / 60,
        # rows are run in different sessions, on different CPUs
        "dtype": resolve_dtype("auto"), "native_bf16": native_bf16(),
    }  # fmt: skip


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", choices=list(TASKS))
    parser.add_argument("--method", action="append", choices=list(METHODS))
    parser.add_argument("--test-size", type=int, default=300, help="LawBench test items (0: all)")
    parser.add_argument("--redo", action="store_true", help="re-run the rows asked for")
    args = parser.parse_args()
    console = Console()
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    for name in args.task or list(TASKS):
        for method in args.method or list(METHODS):
            done = [r for r in rows if r["task"] == name and r["method"] == method]
            if done and not args.redo:
                continue
            if args.redo:
                import shutil

                shutil.rmtree(RUNS / f"{name}-{method}", ignore_errors=True)
            size = args.test_size if name == "lawbench" else 0
            row = run_row(name, method, size, console)
            rows = [r for r in rows if (r["task"], r["method"]) != (name, method)] + [row]
            RESULTS.write_text(json.dumps({
                "machine": platform.processor() or platform.machine(),
                "dtype": resolve_dtype("auto"), "rows": rows,
            }, indent=2))  # fmt: skip
    console.print(
        "task      method status    val parent -> cand   test parent -> cand (n)   "
        "gain   minutes  tok/s   offline would choose"
    )
    for r in rows:
        gain = (
            None if r["test"] is None or r["test_parent"] is None else r["test"] - r["test_parent"]
        )
        would = r.get("offline_would") or {}
        console.print(
            f"{r['task']:9} {r['method']:6} {r['status']:9} {_num(r['val_parent'])} -> "
            f"{_num(r['val'])}   {_num(r['test_parent'])} -> {_num(r['test'])} ({r['test_n']})  "
            f"{_num(gain, '+.4f')}  {_num(r['minutes'], '.1f'):>6}  "
            f"{_num(r['tokens_per_s'], '.0f'):>5}   {would.get('lever')} {would.get('method') or ''}"
        )
        if r.get("harness", "").startswith("chat"):
            console.print(
                "    harness: the task's chat template (samples its answer), not option scoring"
            )
        if r["error"]:
            console.print(f"    error: {r['error'][:200]}")
        if would.get("rationale"):
            console.print(f"    why: {would['rationale'][:300]}")


if __name__ == "__main__":
    sys.exit(main())
