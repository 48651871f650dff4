"""The LLM agents against a scripted provider on loopback, through the real `openai` and
`anthropic` SDKs: the client's retries, timeout, records and budget; strict edits; the citation
rule; the prompts (golden); the checks before a run; and one real loop on a program task
(sortcost, lower is better) run from the CLI with shipped profile names, every failure path
ending as the issue says while the run goes on. The answer-task loop (toy, both levers) is the
honesty test's canary run (tests/test_honesty.py)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scripted_llm import Step, scripted_llm
from sialoop.agents.base import EditRequest, PastEdit, TrajectoryView
from sialoop.agents.citations import uncited
from sialoop.agents.edits import EditError, apply_reply
from sialoop.agents.llm import AgentBudget, BudgetSpent, LLMClient, LLMUnavailable, endpoint_for
from sialoop.agents.prompts import feedback_prompt, meta_prompt
from sialoop.cli import app
from sialoop.config import AgentsConfig, LLMAgentConfig
from sialoop.records import Decision, Lever, RunInfo
from sialoop.store import Store
from sialoop.tasks.base import Metric

runner = CliRunner()
GOLDEN = Path(__file__).parent / "golden"
KEY = "sk-test-9c1e55d0-never-stored"


# -- replies a scripted model gives, computed from the request as a model would ---------------


def prompt_of(body: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


def decision(lever: str = "harness", **extra: object):
    """A valid Decision JSON citing the batch size the prompt's evidence holds."""

    def reply(body: dict) -> str:
        n = re.search(r'"n": (\d+)', prompt_of(body))
        cite = n.group(1) if n else "0"
        return json.dumps(
            {"lever": lever, "rationale": f"The {cite} trajectories point at the {lever}.", **extra}
        )

    return reply


def harness_of(body: dict) -> str:
    """The incumbent harness in the Meta-Agent's prompt."""
    return prompt_of(body).split("```python\n", 1)[1].split("\n```", 1)[0]


def knob_edit(name: str, choices: list[str], whole: bool = False):
    """Set knob `name` (a string constant) to a choice other than the incumbent's."""

    def reply(body: dict) -> str:
        source = harness_of(body)
        line = re.search(rf'^{name} = "(\w+)"$', source, re.MULTILINE)
        assert line, source[:300]
        new = next(c for c in choices if c != line.group(1))
        replaced = f'{name} = "{new}"'
        if whole:
            return f"WHY: {name} to {new}, whole file\n```python\n" + source.replace(
                line.group(0), replaced
            ) + "\n```"  # fmt: skip
        return f"WHY: {name} to {new}\n<<<<<<< SEARCH\n{line.group(0)}\n=======\n{replaced}\n>>>>>>> REPLACE\n"

    return reply


BROKEN_EDIT = (
    "WHY: scripted, a harness that fails its smoke run\n<<<<<<< SEARCH\ndef solve(instance, llm):\n"
    "=======\ndef solve(instance, llm):\n    raise RuntimeError('scripted broken harness')\n"
    ">>>>>>> REPLACE\n"
)
MISMATCHED_EDIT = (
    "WHY: scripted\n<<<<<<< SEARCH\nNO_SUCH_LINE = 1\n=======\nX = 2\n>>>>>>> REPLACE\n"
)


# -- the client -------------------------------------------------------------------------------


def _store(tmp: Path) -> Store:
    return Store.create(tmp / "run", RunInfo(run_id="r", task="t", config={}))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_client_retries_5xx_429_and_a_hang_then_records_the_call(tmp_path, provider, monkeypatch):
    monkeypatch.setenv("SCRIPTED_KEY", KEY)
    with scripted_llm() as server:
        url = server.url + ("/v1" if provider == "openai" else "")
        endpoint = endpoint_for(
            LLMAgentConfig(
                provider=provider, model="auto", base_url=url, key_env="SCRIPTED_KEY",
                timeout_s=3, backoff_s=0.01, retries=3, usd_per_mtok_in=1, usd_per_mtok_out=2,
            ),
            "meta",
        )  # fmt: skip
        store = _store(tmp_path)
        client = LLMClient(endpoint, store, AgentBudget(AgentsConfig(budget_tokens=10**6), store))
        server.script(
            "meta", Step(status=500), Step(status=429, headers={"retry-after-ms": "5"}),
            Step(hang_s=60), "the answer",
        )  # fmt: skip
        text = client.chat("You are the Meta-Agent.", [{"role": "user", "content": "x" * 400}],
                           purpose="edit", generation=4)  # fmt: skip
        assert text == "the answer"
        sent = server.of("meta")
        assert len(sent) == 4  # 500, 429, the hang (timed out), the answer
        header = sent[-1]["headers"].get("x-api-key") or sent[-1]["headers"]["authorization"]
        assert KEY in header  # the key was sent, from its variable
        (call,) = store.agent_calls("meta")
        assert call.attempts == 4 and call.error is None and call.generation == 4
        assert call.provider == provider and call.model == "scripted-model"  # "auto": listed
        assert call.response == "the answer" and call.prompt_tokens == 100
        assert call.cost_usd == pytest.approx((100 * 1 + call.completion_tokens * 2) / 1e6)
        assert call.seconds >= 3  # it waited for the hang's timeout

        # retries exhausted: an LLMUnavailable, stored with its error; the key never stored
        server.script("meta", Step(status=503), Step(status=503))
        short = LLMClient(endpoint.model_copy(update={"retries": 1}), store, client.budget)
        with pytest.raises(LLMUnavailable, match="HTTP 503"):
            short.chat(
                "You are the Meta-Agent.", [{"role": "user", "content": "x"}], purpose="edit"
            )
        failed = store.agent_calls("meta")[-1]
        assert failed.error and failed.attempts == 2 and failed.response == ""
        assert KEY.encode() not in (store.root / "run.db").read_bytes()

        # a 400 is not retried
        server.script("meta", Step(status=400))
        with pytest.raises(LLMUnavailable, match="HTTP 400"):
            client.chat(
                "You are the Meta-Agent.", [{"role": "user", "content": "x"}], purpose="edit"
            )
        assert store.agent_calls("meta")[-1].attempts == 1

        # the budget stops the agent, not the process: it raises before sending
        spent = LLMClient(endpoint, store, AgentBudget(AgentsConfig(budget_tokens=50), store))
        before = len(server.requests)
        with pytest.raises(BudgetSpent, match="token budget is spent"):
            spent.chat(
                "You are the Meta-Agent.", [{"role": "user", "content": "x"}], purpose="edit"
            )
        assert len(server.requests) == before


# -- edits and citations ----------------------------------------------------------------------

SOURCE = 'A = 1\nB = "x"\n\n\ndef solve(instance, llm):\n    return A\n'


def test_edits_apply_strictly_or_say_why():
    block = "<<<<<<< SEARCH\n{}=======\n{}>>>>>>> REPLACE\n"
    two = "WHY: two\n" + block.format("A = 1\n", "A = 2\n") + block.format('B = "x"\n', 'B = "y"\n')
    assert apply_reply(SOURCE, two) == SOURCE.replace("A = 1", "A = 2").replace('"x"', '"y"')
    whole = "Here:\n```python\nA = 3\n\n\ndef solve(instance, llm):\n    return A\n```\n"
    assert apply_reply(SOURCE, whole).startswith("A = 3")
    twice = SOURCE + "\n\ndef other():\n    return A\n"
    for source, reply, says in [
        (SOURCE, block.format("A = 9\n", "A = 2\n"), "does not occur"),
        (twice, block.format("    return A\n", "    return 0\n"), "occurs 2 times"),
        (SOURCE, block.format("\n", "\n\n"), "SEARCH part is empty"),
        (SOURCE, block.format("A = 1\n", "A = 1\n"), "change nothing"),
        (SOURCE, "<<<<<<< SEARCH\nA = 1\n>>>>>>> REPLACE", "no well-formed block"),
        (SOURCE, "I would lower A.", "neither"),
        (SOURCE, f"```python\n{SOURCE}```", "unchanged"),
    ]:
        with pytest.raises(EditError, match=says):
            apply_reply(source, reply)


def test_a_rationale_may_quote_only_numbers_of_its_input_at_a_stated_rounding():
    given = '{"accuracy": 0.4375, "n": 16, "seconds_per_item": 0.01234, "v12": 3}'
    assert uncited("accuracy 0.44 on 16 items (43.8%, 44%), 0.0123 s; v12 gen3", given) == []
    assert uncited("accuracy 0.45 on 17 items, 45%", given) == ["0.45", "17", "45%"]
    assert uncited("0.4375 is 43.75%", given) == []


# -- prompts: locked by golden files ----------------------------------------------------------


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if not path.exists():  # a new golden file is written once, then reviewed and committed
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: review it, then delete and re-run"


def test_the_agents_prompts_match_their_golden_files():
    metric = Metric(name="accuracy", correct="the label equals gold")
    d = Decision(
        run_id="r", generation=3, lever=Lever.harness, rationale="Format failures: 25% of 16.",
        evidence={"n": 16, "format_share": 0.25, "rule": "format_failures"},
        settings={"focus": "scoring"},
    )  # fmt: skip
    request = EditRequest(
        generation=3, task_spec="Classify the text's colour.", metric=metric, parent_id="v1",
        parent_val=0.5, source=SOURCE, decision=d, n_trajectories=16,
        trajectories=(
            TrajectoryView(instance_id="t7", split="train", inputs='{"text": "sky"}',
                           output='{"label": "??"}', score=0.0, correct=False,
                           error="invalid_output: not an option", seconds=0.1, tokens=40),
        ),
        edits=(
            PastEdit(version_id="v1", parent_id="v0", lever="harness", status="accepted",
                     val=0.5, note="A to 1", diff="-A = 0\n+A = 1\n"),
            PastEdit(version_id="v2.llm1", parent_id="v1", lever="harness", status="broken",
                     val=None, note="scripted", error="smoke run: crash: boom"),
        ),
    )  # fmt: skip
    system, user = meta_prompt(request)
    _golden("agent_meta_prompt.txt", system + "\n\n=====\n\n" + user)
    system, user = feedback_prompt(
        generation=3, metric="accuracy, higher is better", levers="- harness: available",
        methods="- sft", families="scoring", budget="5.0 minutes left", evidence='{"n": 16}',
        offline='{"lever": "harness"}', history="(none yet)", n_shown=0, n_total=16,
        trajectories="(none)",
    )  # fmt: skip
    _golden("agent_feedback_prompt.txt", system + "\n\n=====\n\n" + user)


# -- before a run: a missing key or an unreachable URL is one line, and no run starts ---------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_key_or_an_unreachable_agent_stops_before_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = ["run", "--task", "toy", "--runs-dir", str(tmp_path), "--run-id", "r"]
    result = runner.invoke(app, [*base, "--set", "agents.meta=openai"])
    assert result.exit_code != 0
    assert "OPENAI_API_KEY is not set" in result.output and len(result.output.splitlines()) == 1
    config = tmp_path / "agents.toml"
    config.write_text(
        f'[agents.feedback]\nprofile = "vllm"\nbase_url = "http://127.0.0.1:{_free_port()}/v1"\n'
    )
    result = runner.invoke(app, [*base, "--config", str(config)])
    assert result.exit_code != 0 and "is unreachable" in result.output, result.output
    assert "agents.feedback" in result.output and len(result.output.splitlines()) == 1
    result = runner.invoke(app, [*base, "--set", "agents.meta=claude"])
    assert result.exit_code != 0 and "anthropic" in result.output  # names the profiles
    assert not (tmp_path / "r").exists()

    result = runner.invoke(app, ["doctor", "--task", "toy", "--config", str(config)])
    assert "agents" in result.output and "unreachable" in result.output


# -- one real loop on a program task, from the CLI, with the shipped profiles ------------------


@pytest.fixture(scope="module")
def sortcost_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("llm-sortcost")
    choices = ["bubble", "insertion", "selection", "merge", "binary_insertion"]
    uncited_reply = json.dumps({"lever": "harness", "rationale": "Accuracy is 99.7% here."})
    retry_fast = {"retry-after-ms": "5"}
    with scripted_llm() as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_BASE_URL", server.url + "/v1")
        mp.setenv("ANTHROPIC_BASE_URL", server.url)
        mp.setenv("OPENAI_API_KEY", KEY)
        mp.setenv("ANTHROPIC_API_KEY", KEY)
        # gen 1: an uncited number is refused, the retry is valid; the Meta-Agent's harness
        # fails validation, its repair passes. gen 2: the Feedback-Agent's endpoint fails every
        # retry (offline decides); the Meta-Agent sends a whole file.
        server.script("feedback", uncited_reply, decision(),
                      *[Step(status=500, headers=retry_fast)] * 4)  # fmt: skip
        server.script("meta", BROKEN_EDIT, knob_edit("ALGORITHM", ["merge", *choices]),
                      knob_edit("ALGORITHM", ["insertion", *choices], whole=True))  # fmt: skip
        server.defaults = {"feedback": decision(), "meta": MISMATCHED_EDIT}
        result = runner.invoke(app, [
            "run", "--task", "sortcost", "--runs-dir", str(tmp), "--run-id", "r",
            "--set", "agents.meta=anthropic", "--set", "agents.feedback=openai",
            "--set", f"policy.model='{tiny_model_dir}'", "--set", "policy.dtype='float32'",
            "--set", "loop.generations=2", "--set", "loop.train_batch=4",
            "--set", "loop.levers=['harness']", "--set", "split.val_size=6",
            "--set", "split.holdout_size=0", "--set", "split.test_size=4",
            "--set", "gate.alpha=0.3",
        ])  # fmt: skip
        requests = list(server.requests)
    assert result.exit_code == 0, result.output
    return Store.open(tmp / "r"), requests


def test_llm_agents_run_a_program_task_and_every_failure_ends_as_specified(sortcost_run):
    store, requests = sortcost_run
    info = store.run_info()
    assert info.status == "finished" and store.evaluations("test")
    versions = {v.version_id: v for v in store.versions()}
    decisions = {d.generation: d for d in store.decisions()}

    # providers as named: the meta through Anthropic's Messages API, feedback through OpenAI's
    paths = {(r["role"], r["path"]) for r in requests}
    assert paths == {("meta", "/v1/messages"), ("feedback", "/v1/chat/completions")}
    calls = store.agent_calls()
    assert {(c.role, c.provider) for c in calls} == {("meta", "anthropic"), ("feedback", "openai")}
    assert all(c.seconds > 0 for c in calls)
    assert all(c.prompt_tokens for c in calls if c.error is None)

    # gen 1 feedback: the uncited 99.7% was refused and said so; the retry decided
    d1 = decisions[1]
    assert d1.evidence["agent"].startswith("llm (openai") and d1.evidence["chosen_by"] == "llm"
    retry = [c for c in calls if c.role == "feedback" and c.generation == 1]
    assert [c.purpose for c in retry] == ["decide", "retry"]
    assert "99.7%" in retry[1].messages[-1]["content"]
    assert "structured" not in d1.rationale and d1.lever is Lever.harness

    # gen 1 meta: the broken harness is archived with its error, the repair is the candidate
    archived = versions["v1.llm1"]
    assert archived.status == "broken" and "scripted broken harness" in archived.detail["error"]
    v1 = versions["v1"]
    assert v1.status in ("accepted", "rejected") and v1.detail["llm"]["purpose"] == "repair"
    assert v1.detail["llm"]["attempts"][0]["version_id"] == "v1.llm1"
    repair = [c for c in calls if c.role == "meta" and c.generation == 1]
    assert [c.purpose for c in repair] == ["edit", "repair"]
    assert "scripted broken harness" in repair[1].messages[-1]["content"]
    assert 'ALGORITHM = "merge"' in store.path(v1.harness_path).read_text()

    # gen 2 feedback: every retry failed, the offline agent decided, and the Decision says so
    d2 = decisions[2]
    assert d2.evidence["agent"] == "offline (fallback)" and "HTTP 500" in d2.evidence["llm_error"]
    assert d2.rationale.startswith("The LLM Feedback-Agent gave no usable decision")
    (failed,) = [c for c in calls if c.role == "feedback" and c.generation == 2]
    assert failed.attempts == 4 and failed.error.startswith("HTTP 500")

    # gen 2 meta: a whole file; its prompt held the task, the metric, the incumbent, the
    # decision, trajectories and the run's past edits with their diffs and val scores
    v2 = versions["v2"]
    assert v2.status != "broken" and v2.detail["llm"]["purpose"] == "edit"
    (prompt,) = [c.messages[0]["content"] for c in calls if c.role == "meta" and c.generation == 2]
    incumbent = v1 if v1.status == "accepted" else versions["v0"]
    assert store.path(incumbent.harness_path).read_text()[:200] in prompt
    assert "lower is better" in prompt and "Trajectories of the incumbent" in prompt
    assert "## v1 (parent v0, harness)" in prompt and "## v1.llm1" in prompt
    assert '+ALGORITHM = "merge"' in prompt  # v1's diff
    assert d2.rationale[:60] in prompt

    # the metric's direction held: lower comparisons is better, and merge sort is accepted
    val = {e.version_id: e.value for e in store.evaluations("val")}
    assert v1.status == "accepted" and val["v1"] < val["v0"], (val, v1.detail.get("gate"))

    # the report says what each agent spent and where the offline agent stood in for it
    shown = runner.invoke(app, ["report", str(store.root)]).output
    assert "meta agent anthropic claude-sonnet-4-5: 3 calls" in " ".join(shown.split()), shown
    assert "offline in its place at generations: 2" in " ".join(shown.split())

    # the key reached the provider and nothing else
    assert all(KEY in (r["headers"].get("x-api-key", "") + r["headers"].get("authorization", ""))
               for r in requests)  # fmt: skip
    for path in store.root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


# -- an external policy: any OpenAI-compatible URL, inference only ------------------------------


def test_an_external_policy_serves_a_chat_harness_and_the_weights_lever_is_off(tmp_path):
    template = Path(__file__).resolve().parents[1] / "src/sialoop/tasks/toy/templates/chat.py"
    with scripted_llm() as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLICY_KEY", KEY)
        server.defaults = {"policy": "Red."}
        args = [
            "run", "--task", "toy", "--runs-dir", str(tmp_path), "--run-id", "r",
            "--set", "policy.backend=external", "--set", f"policy.url='{server.url}/v1'",
            "--set", "policy.key_env=POLICY_KEY", "--set", f"harness='{template}'",
            "--set", "loop.generations=1", "--set", "split.val_size=8",
            "--set", "split.test_size=4", "--set", "loop.train_batch=4",
        ]  # fmt: skip
        result = runner.invoke(app, args)
        requests = list(server.requests)
        at = next(i for i, a in enumerate(args) if a.startswith("policy.url"))
        no_url = runner.invoke(app, [*args[: at - 1], *args[at + 1 :], "--run-id", "r2"])
    assert result.exit_code == 0, result.output
    assert no_url.exit_code != 0 and "needs policy.url" in no_url.output
    store = Store.open(tmp_path / "r")
    assert store.run_info().status == "finished" and store.evaluations("test")
    policy = [r for r in requests if r["role"] == "policy"]
    assert policy and all(r["body"]["model"] == "scripted-model" for r in policy)  # "auto"
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in policy)
    # every harness call recorded under its episode, with the upstream's token count
    calls = store.llm_calls()
    assert len(calls) == len(policy) and all(c.episode_id and c.tokens for c in calls)
    assert all(c.completion == "Red." for c in calls)
    trajectories = store.trajectories("v0", "val")
    assert trajectories and all(t.tokens and t.output == {"label": "red"} for t in trajectories)
    # the Feedback-Agent was told the weights lever is unavailable, and never pulled it
    (d1,) = [d for d in store.decisions() if d.generation == 1]
    assert d1.lever is not Lever.weights and "external URL" in d1.rationale, d1.rationale
    for path in store.root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
