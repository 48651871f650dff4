"""The parent takes everything from a worker and a harness as hostile data (issue 14, rows 7-9).

Real worker processes and the real policy endpoint on the tiny model. A harness writes hand-made
reply frames to the worker's reply pipe, returns outputs the store cannot hold, and calls the
endpoint's admin route and forged episodes. Each becomes a failed trajectory or a refused call,
and the next instance or request is served as usual.
"""

from __future__ import annotations

import json
import resource
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sialoop.config import PolicyConfig, SandboxConfig
from sialoop.errors import PolicyError
from sialoop.harness.isolation import namespaces_available
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.harness.worker import MAX_OUTPUT_CONTAINERS, MAX_OUTPUT_DEPTH, MAX_REPLY_FRAME
from sialoop.levers import register_adapter
from sialoop.policy.launch import admin_headers, live_episode, serve_policy
from sialoop.policy.recorder import MemoryRecorder
from sialoop.policy.server import ADMIN_HEADER, EPISODE_HEADER
from sialoop.records import ErrorKind, RunInfo, Score, Version, new_id
from sialoop.rollout import RolloutContext, rollout
from sialoop.store import Store
from sialoop.tasks.toy import ToyTask

LIMITS = SandboxLimits(timeout_s=20.0, memory_mb=1024, startup_timeout_s=60.0)

# `frame(payload, declared)` writes one reply frame by hand to the worker's reply pipe (its second
# argument), then blocks: the parent must act on that frame alone.
HARNESS = textwrap.dedent(
    """
    import json, os, struct, sys, time

    def frame(payload, declared=None):
        fd = int(sys.argv[2])
        os.write(fd, struct.pack(">I", len(payload) if declared is None else declared) + payload)
        time.sleep(3600)

    def reply(**fields):
        frame(json.dumps(fields).encode())

    def deep(n):
        out = []
        for _ in range(n):
            out = [out]
        return out

    MODES = {
        "ok": lambda i, llm: {"label": i["options"][0], "pid": os.getpid()},
        "huge_header": lambda i, llm: frame(b"", declared=0xFFFFFFFF),
        "over_cap": lambda i, llm: frame(b"{", declared=i["cap"] + 1),
        "garbage": lambda i, llm: frame(b"not a reply at all"),
        "many_lists": lambda i, llm: reply(output_json="[" + ",".join(["[]"] * i["n"]) + "]"),
        "nan": lambda i, llm: reply(output_json="NaN"),
        "forged_infra": lambda i, llm: reply(
            error={"kind": "killed", "message": "x" * 10**6, "infra": True}),
        "deep": lambda i, llm: deep(300),
        "surrogate": lambda i, llm: "a\\ud800b",
        "surrogate_error": lambda i, llm: b"\\xff".decode("utf-8", "surrogateescape") + 1,
    }

    def solve(instance, llm):
        return MODES[instance["mode"]](instance, llm)
    """
)


def _item(mode: str, **extra: object) -> dict:
    return {"id": mode, "mode": mode, "options": ["red", "blue"], **extra}


def _isolations() -> list:
    ok, why = namespaces_available()
    skip = pytest.mark.skip(reason=f"namespaces unavailable: {why}")
    return ["guard", pytest.param("namespaces", marks=() if ok else skip)]


@pytest.fixture(params=_isolations())
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    harness = tmp_path / "hostile.py"
    harness.write_text(HARNESS)
    with Sandbox(
        harness, policy_url=None, adapter="base", limits=LIMITS, scratch_root=tmp_path / "s",
        isolation=request.param,
    ) as sandbox:  # fmt: skip
        yield sandbox


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("mode", "extra", "says"),
    [
        ("huge_header", {}, f"a reply frame of {0xFFFFFFFF} bytes; the limit is {MAX_REPLY_FRAME}"),
        ("over_cap", {"cap": MAX_REPLY_FRAME}, f"the limit is {MAX_REPLY_FRAME}"),
        ("garbage", {}, "malformed reply"),
    ],
)
def test_a_hand_written_frame_is_refused_and_the_worker_replaced(box, mode, extra, says):
    """Attack 8: the declared length is refused from the header alone, before any read."""
    before = _peak_rss_mb()
    bad = box.solve(_item(mode, **extra), "ep-bad")
    assert bad.error is not None and bad.error.kind == ErrorKind.invalid_output, bad.error
    assert says in bad.error.message and "it was killed" in bad.error.message
    assert not bad.error.infra and bad.attempts == 1  # the harness's doing: never retried
    assert bad.seconds < LIMITS.timeout_s / 2  # refused at once, not read until a timeout
    assert _peak_rss_mb() - before < 256  # nothing of the declared size was allocated
    ok = box.solve(_item("ok"), "ep-ok")
    assert ok.error is None and ok.output["label"] == "red"
    assert box.starts == 2


def test_an_output_of_millions_of_lists_is_refused_before_it_is_parsed(box):
    """Attack 8's payload: 32 MiB of `[[],[],...]` parsed would take gigabytes."""
    many = box.solve(_item("many_lists", n=MAX_OUTPUT_CONTAINERS + 10), "ep-many")
    assert many.error.kind == ErrorKind.invalid_output
    assert f"the limit is {MAX_OUTPUT_CONTAINERS}" in many.error.message


def test_a_non_json_constant_is_an_invalid_output(box):
    nan = box.solve(_item("nan"), "ep-nan")
    assert nan.error.kind == ErrorKind.invalid_output and "NaN" in nan.error.message


def test_a_worker_cannot_claim_an_infrastructure_failure(box):
    forged = box.solve(_item("forged_infra"), "ep-infra")
    assert forged.error.kind == ErrorKind.killed
    assert not forged.error.infra and forged.attempts == 1  # not retried, not "degraded"
    assert len(forged.error.message) <= 20_000


def test_outputs_the_store_cannot_hold_are_invalid_and_the_worker_goes_on(box):
    """Attack 7: a list nested 300 deep, a lone surrogate; and an error message with one."""
    deep = box.solve(_item("deep"), "ep-deep")
    assert deep.error.kind == ErrorKind.invalid_output
    assert f"nested 301 deep; the limit is {MAX_OUTPUT_DEPTH}" in deep.error.message
    surrogate = box.solve(_item("surrogate"), "ep-sur")
    assert surrogate.error.kind == ErrorKind.invalid_output
    assert "surrogates not allowed" in surrogate.error.message
    crash = box.solve(_item("surrogate_error"), "ep-crash")
    assert crash.error.kind == ErrorKind.crash and "TypeError" in crash.error.message
    ok = box.solve(_item("ok"), "ep-ok")
    assert ok.error is None and box.starts == 1  # the same worker answered all four


class _UnstorableScore(ToyTask):
    """A scorer whose detail SQLite's JSON cannot hold (a surrogate-escaped byte)."""

    def score(self, instance, output):  # type: ignore[no-untyped-def]
        if instance.id == "val-2":
            return Score(value=1.0, detail={"raw": b"\xff".decode("utf-8", "surrogateescape")})
        return super().score(instance, output)


def test_a_rollout_stores_a_failed_trajectory_for_what_cannot_be_stored(tmp_path):
    store = Store.create(tmp_path / "run", RunInfo(run_id="r", task="toy", config={}))
    store.path("public").mkdir(exist_ok=True)
    body = HARNESS.replace(
        'def solve(instance, llm):\n    return MODES[instance["mode"]](instance, llm)',
        "def solve(instance, llm):\n"
        "    mode = {'val-0': 'deep', 'val-1': 'surrogate'}.get(instance['id'], 'ok')\n"
        "    return MODES[mode](instance, llm)",
    )
    (store.root / "h.py").write_text(body)
    version = Version(
        version_id="v0", run_id="r", parent_id=None, generation=0, harness_path="h.py"
    )
    task = _UnstorableScore(seed=0)
    sandbox = SandboxConfig(workers=1, timeout_s=LIMITS.timeout_s)
    ctx = RolloutContext(store, task, version, "http://127.0.0.1:9/v1", sandbox)
    items = task.instances("val")[:4]
    trajectories = rollout(ctx, items)
    kinds = [t.error.kind if t.error else None for t in trajectories]
    assert kinds == [ErrorKind.invalid_output] * 3 + [None]
    assert "could not be stored" in trajectories[2].error.message
    assert trajectories[2].score is None and trajectories[3].score is not None
    assert store.trajectories("v0", "val") == trajectories  # all four stored, in order


# -- the policy endpoint: the admin route and the episode header (attack 9) -------------------
@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> Iterator[tuple[str, MemoryRecorder]]:
    recorder = MemoryRecorder()
    with serve_policy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"), recorder) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapters") / "v1"
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def test_the_admin_route_needs_the_parents_token(policy, adapter_dir):
    url, _ = policy
    route, body = url.removesuffix("/v1") + "/sialoop/adapters", {"name": "evil", "path": "/x"}
    assert httpx.post(route, json=body).status_code == 403
    assert httpx.post(route, json=body, headers={ADMIN_HEADER: "guess"}).status_code == 403
    assert httpx.post(route, json=body, headers=admin_headers(url)).status_code == 400  # no dir
    register_adapter(url, "v1", str(adapter_dir))
    models = httpx.get(url + "/models").json()["data"]
    assert [m["id"] for m in models] == ["base", "v1"]
    assert admin_headers("http://127.0.0.1:9/v1") == {}  # not served here: no token to give
    elsewhere = url.replace("127.0.0.1", "localhost")  # not how this process knows it: no token
    with pytest.raises(PolicyError, match="refused adapter"):
        register_adapter(elsewhere, "v2", str(adapter_dir))


def _ask(url: str, episode: str) -> openai.types.Completion:
    client = openai.OpenAI(base_url=url, api_key="sialoop", max_retries=0, timeout=60)
    return client.completions.create(
        model="base", prompt="hi", max_tokens=1, extra_headers={EPISODE_HEADER: episode}
    )


def test_only_a_live_episode_with_its_secret_gets_calls(policy):
    url, recorder = policy
    victim, other = new_id("ep"), new_id("ep")
    with live_episode(url, victim) as header, live_episode(url, other) as other_header:
        assert header.startswith(victim + ".") and header != victim
        _ask(url, header)
        for forged in (victim, f"{victim}.guess", other_header.replace(other, victim)):
            with pytest.raises(openai.PermissionDeniedError):
                _ask(url, forged)
    with pytest.raises(openai.PermissionDeniedError):  # closed: its secret is stale now
        _ask(url, header)
    with pytest.raises(openai.PermissionDeniedError):  # never opened, but shaped like a trajectory
        _ask(url, new_id("ep"))
    assert len(recorder.calls(victim)) == 1
    _ask(url, "ep-ad-hoc")  # a tag that names no trajectory is recorded as sent
    assert len(recorder.calls("ep-ad-hoc")) == 1


FORGER = textwrap.dedent(
    """
    import os, sys

    def solve(instance, llm):
        mine = llm.completions.create(model="policy", prompt="a", max_tokens=1)
        if instance.get("victim"):
            forged = llm.with_options(default_headers={"X-Sialoop-Episode": instance["victim"]})
            forged.completions.create(model="policy", prompt="b", max_tokens=1)
        return {"environ": dict(os.environ), "argv": sys.argv, "text": mine.choices[0].text}
    """
)


def test_a_harness_cannot_attach_calls_to_another_episode_nor_see_the_token(policy, tmp_path):
    url, recorder = policy
    harness = tmp_path / "forger.py"
    harness.write_text(FORGER)
    victim, own, honest = new_id("ep"), new_id("ep"), new_id("ep")
    with Sandbox(
        harness, policy_url=url, adapter="base", limits=LIMITS, scratch_root=tmp_path / "s"
    ) as sandbox:
        # The victim's episode is open at the same time, as in a rollout with several workers.
        with live_episode(url, victim), live_episode(url, own) as header:
            forged = sandbox.solve({"id": "1", "victim": victim}, header)
        with live_episode(url, honest) as header:
            fine = sandbox.solve({"id": "2"}, header)
    assert recorder.calls(victim) == []
    # In every mode the bridge stamps the episode over whatever the harness sent.
    assert forged.error is None and len(recorder.calls(own)) == 2, forged
    assert fine.error is None and len(recorder.calls(honest)) == 1
    token = admin_headers(url)[ADMIN_HEADER]
    assert token not in json.dumps(fine.output)  # not in its environment nor its arguments


@pytest.mark.parametrize("at", ["import", "setup"])
def test_a_hand_written_frame_while_starting_is_the_harness_fault(tmp_path, at):
    """Attack 8 before the first item: a frame forged by module-level code or by `setup` is
    refused from its header, not mistaken for the machine killing the worker (no retry)."""
    forge = 'frame(b"", declared=0xFFFFFFFF)'
    body = f"{forge}\n" if at == "import" else f"def setup():\n    {forge}\n"
    harness = tmp_path / "forge.py"
    harness.write_text(HARNESS + body)
    with Sandbox(
        harness, policy_url=None, adapter="base", limits=LIMITS, scratch_root=tmp_path / "s",
        isolation="guard",
    ) as box:  # fmt: skip
        result = box.solve(_item("ok"), "ep-1")
    kind = ErrorKind.setup if at == "setup" else ErrorKind.invalid_output
    assert result.error is not None and result.error.kind == kind, result.error
    assert "invalid reply" in result.error.message and not result.error.infra
    assert result.attempts == 1 and box.starts == 1
