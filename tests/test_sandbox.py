"""The harness sandbox with real worker processes and a real HTTP policy endpoint on loopback.

One module-scoped Sandbox runs a harness whose `mode` field picks a misbehaviour; every test
that breaks the worker then checks that the same Sandbox solves the next instance correctly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sialoop.harness.program import HarnessInvalid, load_harness, validate_harness
from sialoop.harness.sandbox import Sandbox, SandboxLimits, SandboxResult
from sialoop.records import ErrorKind
from stub_policy import stub_policy

ADAPTER = "v3"
COMPLETION_TEXT = " blue"
LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=1024, file_size_mb=4, max_log_bytes=4000)
SECRETS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN")
CANARY = f"canary-{uuid.uuid4().hex}"

HARNESS = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    from pathlib import Path

    TRAIN = Path("public/train.txt").read_text().split()  # module-level state, read once
    SEEN = []

    def solve(instance, llm):
        SEEN.append(instance["id"])
        return MODES[instance["mode"]](instance, llm)

    def ok(instance, llm):
        out = llm.completions.create(model="policy", prompt=instance["id"], max_tokens=1)
        print("solving", instance["id"])
        print("warning for", instance["id"], file=sys.stderr)
        return {"text": out.choices[0].text, "seen": len(SEEN), "train": TRAIN, "pid": os.getpid()}

    def alloc(instance, llm):
        return len([bytearray(256 * 2**20) for _ in range(40)])  # 10 GiB

    def alloc_numpy(instance, llm):
        import numpy as np
        return float(np.ones(10 * 2**30 // 8).sum())

    def fork(instance, llm):
        while True:
            os.fork()

    def spawn(instance, llm):
        import subprocess
        return subprocess.run(["sleep", "30"]).returncode

    def multiprocess(instance, llm):
        import multiprocessing
        process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
        process.start()

    def native_fork(instance, llm):
        import ctypes
        ctypes.CDLL(None).fork()  # bypasses the audit hook: both processes sleep
        time.sleep(3600)

    def connect(instance, llm):
        socket.create_connection((instance["host"], instance["port"]), timeout=2).close()

    def dns(instance, llm):
        return socket.getaddrinfo("example.com", 80)

    def urlopen(instance, llm):
        import urllib.request
        return urllib.request.urlopen("http://1.1.1.1/", timeout=2).read().decode()

    def swallow(instance, llm):
        try:
            socket.create_connection(("1.1.1.1", 80), timeout=2)
        except OSError:
            pass
        return "fine"

    def environ(instance, llm):
        return dict(os.environ)

    def parent_environ(instance, llm):
        return Path(f"/proc/{os.getppid()}/environ").read_bytes().decode(errors="replace")

    def kill_parent(instance, llm):
        os.kill(os.getppid(), signal.SIGUSR1)

    def big_file(instance, llm):
        with open("big.bin", "wb") as f:
            while True:
                f.write(bytes(2**20))

    def write_outside(instance, llm):
        Path(instance["path"]).write_text("x")

    def write_public(instance, llm):
        Path("public/new.txt").write_text("x")

    def raise_(instance, llm):
        raise ValueError("boom 42")

    def exit_(instance, llm):
        sys.exit(5)

    def hard_exit(instance, llm):
        os._exit(3)

    def segfault(instance, llm):
        import ctypes
        ctypes.string_at(0)

    def hang(instance, llm):
        time.sleep(3600)

    def files(instance, llm):  # everyday file work inside the scratch directory
        import shutil, tempfile
        os.makedirs("a/b", exist_ok=True)
        Path("a/b/f.txt").write_text("hi")
        os.rename("a/b/f.txt", "a/g.txt")
        os.replace("a/g.txt", "a/h.txt")
        os.chmod("a/h.txt", 0o600)
        os.symlink("h.txt", "a/link")
        os.link("a/h.txt", "a/hard")
        os.truncate("a/hard", 0)
        shutil.copy("public/train.txt", "copy.txt")
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(b"x")
        shutil.rmtree(tempfile.mkdtemp())
        shutil.rmtree("a")
        os.remove("copy.txt")
        with open("/dev/null", "w") as null:
            null.write("x")
        return os.listdir("public") + [Path("public/train.txt").read_text()]

    def sklearn(instance, llm):
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        texts, labels = ["red apple", "green leaf", "red rose", "green frog"], [0, 1, 0, 1]
        vectorizer = TfidfVectorizer().fit(texts)
        model = LogisticRegression().fit(vectorizer.transform(texts), labels)
        assert np.linalg.norm(np.eye(3)) > 0
        return int(model.predict(vectorizer.transform(["red car"]))[0])

    def chatty(instance, llm):
        print("x" * 100_000)
        return "done"

    MODES = {
        "ok": ok, "alloc": alloc, "alloc_numpy": alloc_numpy, "fork": fork, "spawn": spawn,
        "multiprocess": multiprocess, "native_fork": native_fork, "connect": connect,
        "dns": dns, "urlopen": urlopen, "swallow": swallow, "environ": environ,
        "parent_environ": parent_environ, "kill_parent": kill_parent, "big_file": big_file,
        "write_outside": write_outside, "write_public": write_public, "raise": raise_,
        "exit": exit_, "hard_exit": hard_exit, "segfault": segfault, "hang": hang,
        "chatty": chatty, "files": files, "sklearn": sklearn, "set": lambda instance, llm: {1, 2},
        "nan": lambda instance, llm: float("nan"),
    }
    """
)


# -- a policy endpoint and a bystander listener on loopback -----------------------------------
@pytest.fixture(scope="module")
def policy() -> Iterator[ThreadingHTTPServer]:
    with stub_policy(COMPLETION_TEXT, "length") as server:
        yield server


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, list[Any]]]:
    """A TCP listener on another loopback port: it must never see a connection."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    accepted: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, address = sock.accept()
            except TimeoutError:
                continue
            accepted.append(address)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join()
    sock.close()


# -- the shared sandbox ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task")
    (root / "public").mkdir()
    (root / "public" / "train.txt").write_text("alpha beta gamma")
    (root / "harness.py").write_text(HARNESS)
    return root


@pytest.fixture(scope="module")
def sandbox(task_dir: Path, policy: ThreadingHTTPServer) -> Iterator[Sandbox]:
    with pytest.MonkeyPatch.context() as mp:
        for name in SECRETS:  # what a loop run with real credentials would have
            mp.setenv(name, CANARY)
        with Sandbox(
            task_dir / "harness.py",
            policy_url=_url(policy),
            adapter=ADAPTER,
            limits=LIMITS,
            public_dir=task_dir / "public",
            scratch_root=task_dir / "scratch",
        ) as box:
            yield box


@pytest.fixture(scope="module")
def patient(task_dir: Path, policy: ThreadingHTTPServer) -> Iterator[Sandbox]:
    """The same sandbox with a timeout that holds on a loaded machine, for tests whose outcome
    must not be a timeout (an allocation reaching the memory limit, importing sklearn)."""
    with Sandbox(
        task_dir / "harness.py",
        policy_url=_url(policy),
        adapter=ADAPTER,
        limits=LIMITS.model_copy(update={"timeout_s": 120.0}),
        public_dir=task_dir / "public",
        scratch_root=task_dir / "scratch-patient",
    ) as box:
        yield box


def _solve(box: Sandbox, mode: str, **fields: Any) -> SandboxResult:
    return box.solve({"id": uuid.uuid4().hex[:8], "mode": mode, **fields}, f"ep-{mode}")


def _assert_recovers(box: Sandbox) -> SandboxResult:
    result = _solve(box, "ok")
    assert result.error is None, result.error
    assert result.output["text"] == COMPLETION_TEXT
    assert result.output["train"] == ["alpha", "beta", "gamma"]
    return result


def _session(sid: int) -> list[int]:
    """Live (non-zombie) processes in session `sid`; the worker's session is its own pid."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it ended while we looked
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            members.append(int(entry))
    return members


def _assert_session_gone(sid: int) -> None:
    deadline = time.monotonic() + 5
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _session(sid) == []


# -- the good path -----------------------------------------------------------------------------
def test_good_harness_calls_the_policy_and_keeps_module_state(sandbox, policy):
    first = _assert_recovers(sandbox)
    episodes = [f"ep-state-{i}" for i in range(3)]
    results = [sandbox.solve({"id": f"i{i}", "mode": "ok"}, ep) for i, ep in enumerate(episodes)]
    assert all(r.error is None for r in results)
    # one worker, imported once: module-level state carries over between instances
    assert {r.output["pid"] for r in results} == {first.output["pid"]}
    assert [r.output["seen"] for r in results] == [first.output["seen"] + i for i in (1, 2, 3)]
    # logs are this instance's stdout and stderr only
    assert "solving i1" in results[1].logs and "warning for i1" in results[1].logs
    assert "i0" not in results[1].logs
    calls = [c for c in policy.calls if c["headers"].get("x-sialoop-episode") in episodes]
    assert [c["headers"]["x-sialoop-episode"] for c in calls] == episodes
    for call in calls:
        assert call["path"] == "/v1/completions"
        assert call["headers"]["x-sialoop-adapter"] == ADAPTER
        assert call["headers"]["authorization"] == "Bearer sialoop"
        assert call["body"]["model"] == "policy" and call["body"]["max_tokens"] == 1


# -- time, memory, processes -------------------------------------------------------------------
def test_timeout_kills_the_worker_group_and_the_next_instance_works(sandbox):
    before = _assert_recovers(sandbox).output["pid"]
    result = _solve(sandbox, "hang")
    assert result.error.kind == ErrorKind.timeout
    assert LIMITS.timeout_s <= result.seconds < LIMITS.timeout_s + 2
    _assert_session_gone(before)
    assert _assert_recovers(sandbox).output["pid"] != before


@pytest.mark.parametrize("mode", ["alloc", "alloc_numpy"])
def test_memory_blowup_is_contained(patient, mode):
    result = _solve(patient, mode)
    assert result.error.kind == ErrorKind.memory, result.error
    _assert_recovers(patient)


@pytest.mark.parametrize("mode", ["fork", "spawn", "multiprocess"])
def test_process_creation_is_forbidden_and_leaves_no_process(sandbox, mode):
    pid = _assert_recovers(sandbox).output["pid"]
    result = _solve(sandbox, mode)
    assert result.error.kind == ErrorKind.forbidden, result.error
    assert "blocked" in result.logs
    assert _session(pid) == [pid]  # the worker alone, nothing forked or spawned
    _assert_recovers(sandbox)


def test_native_fork_bypasses_the_hook_but_dies_with_the_process_group(sandbox):
    pid = _assert_recovers(sandbox).output["pid"]
    result = _solve(sandbox, "native_fork")
    assert result.error.kind == ErrorKind.timeout
    _assert_session_gone(pid)
    _assert_recovers(sandbox)


# -- the harness failing -----------------------------------------------------------------------
def test_exception_is_a_crash_with_type_message_and_line(sandbox):
    pid = _assert_recovers(sandbox).output["pid"]
    result = _solve(sandbox, "raise")
    assert result.error.kind == ErrorKind.crash
    first_line, traceback = result.error.message.split("\n", 1)
    assert first_line.startswith("ValueError: boom 42 (at harness.py:")
    assert 'raise ValueError("boom 42")' in traceback
    assert _assert_recovers(sandbox).output["pid"] == pid  # no restart needed


def test_sys_exit_is_a_crash(sandbox):
    result = _solve(sandbox, "exit")
    assert result.error.kind == ErrorKind.crash and "SystemExit: 5" in result.error.message
    _assert_recovers(sandbox)


@pytest.mark.parametrize(("mode", "reason"), [("hard_exit", "code 3"), ("segfault", "SIGSEGV")])
def test_worker_death_is_killed_and_the_worker_restarts(sandbox, mode, reason):
    result = _solve(sandbox, mode)
    assert result.error.kind == ErrorKind.killed and reason in result.error.message
    _assert_recovers(sandbox)


@pytest.mark.parametrize(("mode", "expected"), [("set", "set"), ("nan", "Out of range")])
def test_non_json_output_is_invalid(sandbox, mode, expected):
    result = _solve(sandbox, mode)
    assert result.error.kind == ErrorKind.invalid_output and expected in result.error.message
    assert result.output is None
    _assert_recovers(sandbox)


def test_logs_are_truncated(sandbox):
    result = _solve(sandbox, "chatty")
    assert result.output == "done"
    assert len(result.logs) < LIMITS.max_log_bytes + 100 and "bytes cut" in result.logs
    _assert_recovers(sandbox)


def test_huge_file_stops_at_the_file_size_limit(sandbox):
    result = _solve(sandbox, "big_file")
    assert result.error.kind == ErrorKind.killed and "file-size limit" in result.error.message
    _assert_recovers(sandbox)


def test_everyday_file_work_and_sklearn_are_allowed(patient):
    result = _solve(patient, "files")
    assert result.error is None, result.error
    assert result.output == ["train.txt", "alpha beta gamma"]
    result = _solve(patient, "sklearn")
    assert result.error is None, result.error
    assert result.output == 0 and "blocked" not in result.logs


# -- what the harness must not reach -----------------------------------------------------------
@pytest.mark.parametrize("target", ["listener", "remote", "dns", "urlopen", "swallow"])
def test_network_beyond_the_policy_endpoint_is_forbidden(sandbox, listener, target):
    port, accepted = listener
    if target == "listener":
        result = _solve(sandbox, "connect", host="127.0.0.1", port=port)
    elif target == "remote":
        result = _solve(sandbox, "connect", host="1.1.1.1", port=80)
    else:
        result = _solve(sandbox, target)
    assert result.error.kind == ErrorKind.forbidden, result.error
    assert result.output is None  # also when the harness swallowed the PermissionError
    time.sleep(0.2)
    assert accepted == []
    _assert_recovers(sandbox)


def test_secrets_in_the_parent_environment_do_not_reach_the_harness(sandbox):
    result = _solve(sandbox, "environ")
    env = result.output
    assert not set(SECRETS) & set(env)
    assert CANARY not in json.dumps(env)
    assert env["TMPDIR"] == env["HOME"] + "/tmp"  # the scratch directory
    result = _solve(sandbox, "parent_environ")
    assert result.error.kind == ErrorKind.forbidden and result.output is None
    _assert_recovers(sandbox)


def test_signals_to_the_parent_are_forbidden(sandbox):
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        result = _solve(sandbox, "kill_parent")
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.error.kind == ErrorKind.forbidden and received == []
    _assert_recovers(sandbox)


def test_writes_outside_scratch_are_forbidden(sandbox, task_dir, tmp_path):
    target = tmp_path / "outside.txt"
    result = _solve(sandbox, "write_outside", path=str(target))
    assert result.error.kind == ErrorKind.forbidden and not target.exists()
    result = _solve(sandbox, "write_public")
    assert result.error.kind == ErrorKind.forbidden
    assert not (task_dir / "public" / "new.txt").exists()
    _assert_recovers(sandbox)


# -- several sandboxes, start failures, closing ------------------------------------------------
def _fresh_sandbox(task_dir: Path, policy: ThreadingHTTPServer, scratch: Path) -> Sandbox:
    return Sandbox(
        task_dir / "harness.py",
        policy_url=_url(policy),
        adapter=ADAPTER,
        limits=LIMITS,
        public_dir=task_dir / "public",
        scratch_root=scratch,
    )


def test_sandboxes_work_concurrently_from_threads(task_dir, policy, tmp_path):
    def run(tag: str) -> list[SandboxResult]:
        with _fresh_sandbox(task_dir, policy, tmp_path) as box:
            return [box.solve({"id": f"{tag}{i}", "mode": "ok"}, f"ep-{tag}{i}") for i in range(4)]

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip("ab", pool.map(run, "ab"), strict=True))
    for tag, runs in results.items():
        assert [r.output["seen"] for r in runs] == [1, 2, 3, 4]
        assert all(f"solving {tag}" in r.logs and r.error is None for r in runs)
    assert results["a"][0].output["pid"] != results["b"][0].output["pid"]


def test_a_harness_that_cannot_start_is_reported_then_not_retried(tmp_path):
    harness = tmp_path / "broken.py"
    harness.write_text(
        "raise RuntimeError('no data here')\ndef solve(instance, llm):\n    return 1\n"
    )
    limits = LIMITS.model_copy(update={"max_start_failures": 2})
    with Sandbox(
        harness, policy_url=None, adapter="base", limits=limits, scratch_root=tmp_path
    ) as box:
        results = [box.solve({"id": str(i)}, f"ep-{i}") for i in range(3)]
        assert box.starts == 2
    assert all(r.error.kind == ErrorKind.crash for r in results)
    assert "harness failed to import: RuntimeError: no data here" in results[0].error.message
    assert results[2].error.message.startswith("not restarted after 2 failed starts")


def test_close_kills_the_worker_and_deletes_scratch(task_dir, policy, tmp_path):
    box = _fresh_sandbox(task_dir, policy, tmp_path)
    pid = _assert_recovers(box).output["pid"]
    box.close()
    _assert_session_gone(pid)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        box.solve({"id": "1", "mode": "ok"}, "ep-1")


def test_close_from_another_thread_ends_an_in_flight_solve(task_dir, policy, tmp_path):
    box = _fresh_sandbox(task_dir, policy, tmp_path)
    box.start()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_solve, box, "hang")
        time.sleep(0.3)
        started = time.monotonic()
        box.close()
        result = pending.result()
    assert result.error.kind == ErrorKind.killed and "SIGKILL" in result.error.message
    assert time.monotonic() - started < LIMITS.timeout_s


def test_worker_dies_with_its_parent(task_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        from sialoop.harness.sandbox import Sandbox, SandboxLimits
        box = Sandbox(
            {str(task_dir / "harness.py")!r}, policy_url=None, adapter="base",
            limits=SandboxLimits(timeout_s=600), public_dir={str(task_dir / "public")!r},
            scratch_root={str(tmp_path)!r},
        )
        box.start()
        print(box.worker_pid, flush=True)
        box.solve({{"id": "1", "mode": "hang"}}, "ep-1")
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    time.sleep(0.3)  # the worker is now inside the hanging solve
    parent.kill()  # the loop dies without closing its sandbox
    parent.wait()
    parent.stdout.close()
    _assert_session_gone(pid)


# -- validating harness files ------------------------------------------------------------------
GOOD = "def solve(instance, llm):\n    return instance['id']\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def solve(instance):\n    return 1\n", "exactly 2 positional parameters"),
        ("def solve(instance, llm, k):\n    return 1\n", "exactly 2 positional parameters"),
        ("def solve(*args):\n    return 1\n", "exactly 2 positional parameters"),
        ("def solve(instance, llm, *, k):\n    return 1\n", "keyword-only"),
        ("async def solve(instance, llm):\n    return 1\n", "not async"),
        ("solve = 3\n", "not a function"),
        ("x = 1\n", "defines no `solve"),
        ("def solve(instance, llm)\n    return 1\n", "does not parse: line 1"),
        ("import missing_module_xyz\n" + GOOD, "ModuleNotFoundError"),
        ("import os\nos.system('true')\n" + GOOD, "os.system"),
    ],
)
def test_validate_rejects_bad_harnesses_in_one_line(tmp_path, source, expected):
    path = tmp_path / "harness.py"
    path.write_text(source)
    with pytest.raises(HarnessInvalid) as info:
        validate_harness(path)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_validate_accepts_good_harnesses_reading_public_files(tmp_path, task_dir):
    path = tmp_path / "harness.py"
    path.write_text(GOOD)
    validate_harness(path)
    validate_harness(task_dir / "harness.py", public_dir=task_dir / "public")
    with pytest.raises(HarnessInvalid, match="FileNotFoundError"):
        validate_harness(task_dir / "harness.py")  # it reads public/ at import


def test_load_harness_imports_in_process(tmp_path):
    path = tmp_path / "harness.py"
    path.write_text(GOOD)
    assert load_harness(path).solve({"id": "7"}, None) == "7"
