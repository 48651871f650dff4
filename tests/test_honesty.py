"""A canary label planted in test never reaches anything the agents, the trainer or the harness
read: no run file, no stored prompt, decision, dataset or trajectory contains it, nor any prompt
sent to an LLM agent. The run is the answer-task loop of the LLM agents (toy, both levers, the
OpenAI-compatible client against a scripted loopback provider; tests/test_llm_agents.py has the
program-task one): each scripted failure ends as specified and the run goes on, and the API key
reaches the provider and nothing else."""

from pathlib import Path

from rich.console import Console

from scripted_llm import Step, scripted_llm
from sialoop.config import load_config
from sialoop.loop import drive, new_run
from sialoop.records import Lever
from sialoop.runlock import RunLock
from sialoop.tasks.toy import ToyTask
from sialoop.train import sft_examples
from test_llm_agents import BROKEN_EDIT, KEY, MISMATCHED_EDIT, decision, prompt_of

CANARY = "zebra-canary-7f3a"


class CanaryToy(ToyTask):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self._rows["test"] = [(i, text, CANARY) for i, text, _ in self._rows["test"]]


def _n_examples_edit(body: dict) -> str:
    current = int(prompt_of(body).split("N_EXAMPLES = ", 1)[1].split("\n", 1)[0])
    new = 2 if current != 2 else 3
    return (
        f"WHY: {new} examples\n<<<<<<< SEARCH\nN_EXAMPLES = {current}\n=======\n"
        f"N_EXAMPLES = {new}\n>>>>>>> REPLACE\n"
    )


def test_canary_test_label_is_never_seen(tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    monkeypatch.setenv("SCRIPTED_KEY", KEY)
    with scripted_llm() as server:
        agent = {
            "provider": "openai", "base_url": server.url + "/v1", "model": "scripted",
            "key_env": "SCRIPTED_KEY", "timeout_s": 5, "backoff_s": 0.01,
        }  # fmt: skip
        # gen 1: malformed JSON, then weights (SFT). gen 2: a 500 and a 429, then the harness;
        # the Meta-Agent's SEARCH matches nothing, its repair applies. gen 3: a hang, then the
        # harness; the Meta-Agent's harness fails validation twice: the offline agent writes.
        server.script(
            "feedback", "Sure! {lever: weights, method: sft}", decision("weights", method="sft"),
            Step(status=500), Step(status=429, headers={"retry-after-ms": "5"}), decision(),
            Step(hang_s=120), decision(),
        )  # fmt: skip
        server.script("meta", MISMATCHED_EDIT, _n_examples_edit, BROKEN_EDIT, BROKEN_EDIT)
        cfg = load_config(None, {
            "task": "toy", "runs_dir": str(tmp_path), "policy.model": str(tiny_model_dir),
            "policy.dtype": "float32", "loop.generations": 3, "loop.train_batch": 16,
            "loop.train_items": 32, "train.max_steps": 4, "train.batch_size": 8,
            "train.max_len": 256, "loop.levers": ["weights", "harness"],
            "loop.lever_patience": 1, "agents.meta": agent, "agents.feedback": agent,
        })  # fmt: skip
        task = CanaryToy()
        store = new_run(cfg, task, "r")
        drive(store, task, cfg, Console(quiet=True), RunLock(store.root, "run").acquire())
        requests = list(server.requests)
    assert store.run_info().status == "finished"
    assert store.evaluations("test"), "the evaluator scored test"
    assert all(t.score is not None for t in store.trajectories(split="test"))

    for path in store.root.rglob("*"):  # run.db, harness files, public/, adapters, scratch
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
            assert KEY.encode() not in path.read_bytes(), path
    for call in store.llm_calls():
        assert CANARY not in str(call.prompt) and CANARY not in call.completion
    for decision_ in store.decisions():
        assert CANARY not in decision_.model_dump_json()
    for version in store.versions():
        assert CANARY not in version.model_dump_json()
        if version.generation == 0:
            assert all(CANARY not in e.model_dump_json() for e in sft_examples(store, task, "v0"))
    assert requests and all(CANARY not in str(r["body"]) for r in requests)  # every agent prompt
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in requests)

    calls, decisions = store.agent_calls(), {d.generation: d for d in store.decisions()}
    versions = {v.version_id: v for v in store.versions()}
    by = {(c.role, c.generation, c.purpose): c for c in calls}
    # gen 1: the malformed answer went back once with its error; the LLM pulled the weights
    assert decisions[1].lever is Lever.weights and decisions[1].method == "sft"
    assert decisions[1].evidence["agent"].startswith("llm (openai scripted")
    assert "not valid JSON" in by["feedback", 1, "retry"].messages[-1]["content"]
    assert versions["v1"].adapter == "v1" and versions["v1"].status != "broken"
    # gen 2: a 500 and a 429 were retried within one call; the mismatch went back for repair
    assert by["feedback", 2, "decide"].attempts == 3 and decisions[2].lever is Lever.harness
    assert "does not occur" in by["meta", 2, "repair"].messages[-1]["content"]
    assert versions["v2"].detail["llm"]["purpose"] == "repair"
    assert versions["v2"].status != "broken"
    # gen 3: the hang timed out and was retried; two broken harnesses were archived, and the
    # offline Meta-Agent made the generation's candidate, recorded as such
    hang = by["feedback", 3, "decide"]
    assert hang.attempts == 2 and hang.seconds >= 5
    assert versions["v3.llm1"].status == versions["v3.llm2"].status == "broken"
    v3 = versions["v3"]
    assert v3.detail["llm"]["fallback"] == "offline" and "knobs" in v3.detail
    assert v3.note.startswith("offline Meta-Agent") and v3.status != "broken"
