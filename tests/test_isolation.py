"""The isolation conformance suite: the same pure-Python (and ctypes) attacks, run through a real
`Sandbox` in each isolation mode. Each attack must obtain nothing. Under the guard fallback the
holes an audit hook cannot close are strict expected failures, so the difference stays visible.

Rows refer to issue 14's table. Set ISOLATION_REPORT=path to write what each attack got."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sysconfig
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sialoop.errors import ConfigError
from sialoop.harness import isolation as iso
from sialoop.harness.sandbox import Sandbox, SandboxLimits, SandboxResult
from sialoop.records import ErrorKind
from stub_policy import stub_policy

CANARY = "LABEL-CANARY-" + uuid.uuid4().hex[:10]
SCRATCH_CANARY = "SCRATCH-CANARY-" + uuid.uuid4().hex[:10]
LIMITS = SandboxLimits(
    timeout_s=30.0, memory_mb=2048, startup_timeout_s=60.0, max_processes=16, max_log_bytes=4000
)
HAS_BWRAP = iso.namespaces_available()[0]
MODES = [
    pytest.param(
        "namespaces",
        marks=pytest.mark.skipif(not HAS_BWRAP, reason=iso.namespaces_available()[1] or "-"),
    ),
    "guard",
]
OUTCOMES: dict[str, dict[str, str]] = {}


HARNESS = r"""
import ctypes, json, os, signal, sqlite3, sys, threading, time

def _read_fd(fd):
    with os.fdopen(fd, "rb") as f:
        return f.read(4096).decode(errors="replace")

def _try(fn):
    try:
        return fn()
    except BaseException as exc:
        return f"refused: {type(exc).__name__}: {exc}"

def dir_fd(p):
    def label():
        fd = os.open(p["data_root"], os.O_RDONLY | os.O_DIRECTORY)
        return _read_fd(os.open(p["label_rel"], os.O_RDONLY, dir_fd=fd))
    def environ():
        fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
        return _read_fd(os.open(f"{os.getppid()}/environ", os.O_RDONLY, dir_fd=fd))
    return {"label": _try(label), "environ": _try(environ)}

def sqlite(p):
    def go():
        con = sqlite3.connect(p["run_db"])
        rows = con.execute("select label from t").fetchall()
        con.execute("update t set label = 'pwned'")
        con.commit()
        return str(rows)
    return _try(go)

def fork_exec(p):
    def go():
        del sys.modules["_posixsubprocess"]
        import _posixsubprocess
        out = os.open("cat.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err_r, err_w = os.pipe()
        args = [b"/bin/cat", p["label"].encode()]
        pid = _posixsubprocess.fork_exec(
            args, [b"/bin/cat"], True, (err_w,), None, None, -1, -1, -1, out, -1, -1,
            err_r, err_w, True, False, -1, None, None, None, -1, None, False)
        os.waitpid(pid, 0)
        token = [b"/bin/sleep", p["sleep"].encode()]
        _posixsubprocess.fork_exec(
            token, [b"/bin/sleep"], True, (err_w,), None, None, -1, -1, -1, -1, -1, -1,
            err_r, err_w, True, True, -1, None, None, None, -1, None, False)
        with open("cat.txt") as f:
            return f.read()
    return _try(go)

def pidfd(p):
    def go():
        signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGURG)
        return "sent"
    return _try(go)

def listing(p):
    ppid = os.getppid()
    return {
        "proc_list": _try(lambda: sorted(os.listdir(f"/proc/{ppid}"))[:5]),
        "proc_cwd": _try(lambda: os.readlink(f"/proc/{ppid}/cwd")),
        "denied_list": _try(lambda: os.listdir(p["private_dir"])),
        "denied_stat": _try(lambda: os.stat(p["label"]).st_size),
        "run_list": _try(lambda: os.listdir(p["run_dir"])),
        "data_list": _try(lambda: os.listdir(p["data_root"])),
    }

def ctypes_open(p):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.open(p["label"].encode(), 0)
    if fd < 0:
        return f"refused: errno {ctypes.get_errno()}"
    return _read_fd(fd)

def fork_bomb(p):
    children, failed = [], None
    for _ in range(120):
        try:
            pid = os.fork()
        except BaseException as exc:
            failed = f"{type(exc).__name__}: {exc}"
            break
        if pid == 0:
            time.sleep(20)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"forked": len(children), "stopped_by": failed}

def allocate(p):
    return len(bytearray(10 * 2**30))

def stray_thread(p, llm):
    def loop():
        for _ in range(40):
            try:
                llm.completions.create(model="policy", prompt="stray", max_tokens=1)
            except Exception:
                pass
            time.sleep(0.05)
    threading.Thread(target=loop, daemon=True).start()
    return "started"

def pth(p):
    def go():
        fd = os.open(p["site"], os.O_RDONLY | os.O_DIRECTORY)
        w = os.open(p["pth_name"], os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b"# sialoop isolation test: harmless\n")
        os.close(w)
        return "written"
    return _try(go)

def write_secret(p):
    with open("secret.txt", "w") as f:
        f.write(p["secret"])
    return "ok"

def read_other(p):
    return _try(lambda: open(os.path.join(p["other"], "secret.txt")).read())

def network(p):
    import socket
    def connect(host, port):
        def go():
            socket.create_connection((host, port), timeout=3).close()
            return "connected"
        return _try(go)
    return {"internet": connect("1.1.1.1", 53), "endpoint_tcp": connect("127.0.0.1", p["port"])}

def native_connect(p):
    import socket, struct
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", p["listener"])
    addr += socket.inet_aton("127.0.0.1") + bytes(8)
    if libc.connect(fd, addr, len(addr)) != 0:
        return f"refused: errno {ctypes.get_errno()}"
    os.close(fd)
    return "connected"

def admin(p, llm):
    got = {}
    got["admin"] = _try(lambda: llm._client.post(
        str(llm.base_url).rstrip("/").rsplit("/v1", 1)[0] + "/sialoop/adapters",
        json={"name": "evil", "path": "/tmp"}).status_code)
    got["escape"] = _try(lambda: llm._client.post(
        str(llm.base_url) + "../sialoop/adapters", json={}).status_code)
    forged = llm.with_options(default_headers={"X-Sialoop-Episode": "ep-victim",
                                               "X-Sialoop-Adapter": "evil"})
    got["forged"] = _try(lambda: forged.completions.create(
        model="policy", prompt="x", max_tokens=1).choices[0].text)
    return got

def race(p):
    # Swap a scratch path between a decoy folder and the private one while opening through it:
    # a check-then-open guard loses this race now and then (row 5).
    base = os.path.join(os.getcwd(), "race")
    os.makedirs(base + "/decoy", exist_ok=True)
    with open(base + "/decoy/labels.txt", "w") as f:
        f.write("decoy")
    link, stop, got, tries = base + "/x", [], set(), 0
    def swap():
        while not stop:
            for target in (base + "/decoy", p["private_dir"]):
                try:
                    os.symlink(target, base + "/tmp")
                    os.replace(base + "/tmp", link)
                except BaseException:
                    pass
    threading.Thread(target=swap, daemon=True).start()
    deadline = time.monotonic() + 10
    while tries < 4000 and time.monotonic() < deadline:
        tries += 1
        try:
            with open(link + "/labels.txt") as f:
                got.add(f.read(200))
        except BaseException:
            pass
    stop.append(1)
    _STASH.update(got)
    return {"tries": tries, "got": sorted(got)}

_STASH = set()

def stash(p):  # a later, clean instance hands over what the race got
    return sorted(_STASH)

def solve(instance, llm):
    fn = globals()[instance["attack"]]
    if instance["attack"] in ("stray_thread", "admin"):
        return fn(instance["paths"], llm)
    return fn(instance["paths"])
"""

IMPORT_LEAK = r"""
LEAK = open(__LABEL__).read()
raise RuntimeError("module level: " + LEAK)

def solve(instance, llm):
    return None
"""


@pytest.fixture(scope="module")
def policy() -> Iterator[ThreadingHTTPServer]:
    with stub_policy() as server:
        yield server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, policy) -> dict[str, Any]:
    """A data root with private labels, a run directory with run.db, a public folder."""
    root = tmp_path_factory.mktemp("iso")
    data = root / "data"
    (data / "private").mkdir(parents=True)
    (data / "private" / "labels.txt").write_text(CANARY)
    (data / "public").mkdir()
    (data / "public" / "train.txt").write_text("public text")
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    con = sqlite3.connect(run / "run.db")
    con.execute("create table t (label text)")
    con.execute("insert into t values (?)", (CANARY,))
    con.commit()
    con.close()
    (root / "harness.py").write_text(HARNESS)
    return {
        "root": root,
        "harness": root / "harness.py",
        "public": data / "public",
        "scratch": run / "scratch",
        "deny": (data / "private", run / "run.db"),  # what the loop denies
        "paths": {
            "data_root": str(data),
            "label_rel": "private/labels.txt",
            "label": str(data / "private" / "labels.txt"),
            "private_dir": str(data / "private"),
            "run_db": str(run / "run.db"),
            "run_dir": str(run),
            "site": sysconfig.get_paths()["purelib"],
            "port": policy.server_address[1],
        },
    }


def _sandbox(world: dict[str, Any], policy, mode: str, harness: Path | None = None, **kw: Any):
    return Sandbox(
        harness or world["harness"],
        policy_url=f"http://127.0.0.1:{policy.server_address[1]}/v1",
        adapter="base",
        limits=kw.pop("limits", LIMITS),
        public_dir=world["public"],
        scratch_root=world["scratch"],
        deny_read=world["deny"],
        isolation=mode,
        **kw,
    )


@pytest.fixture(scope="module", params=MODES)
def box(request, world, policy) -> Iterator[Sandbox]:
    with _sandbox(world, policy, request.param) as sandbox:
        yield sandbox


def _attack(box: Sandbox, world, attack: str, episode: str | None = None, **extra: Any):
    paths = {**world["paths"], **extra}
    result = box.solve({"attack": attack, "paths": paths}, episode or f"ep-{attack}")
    OUTCOMES.setdefault(attack, {})[box.isolation] = _summary(result)
    return result


def _summary(result: SandboxResult) -> str:
    if result.error is not None:
        return f"{result.error.kind.value}: {result.error.message.splitlines()[0][:160]}"
    return json.dumps(result.output)[:300]


def _seen(result: SandboxResult) -> str:
    error = result.error.message if result.error is not None else ""
    return json.dumps(result.output) + error + result.logs


@pytest.fixture(autouse=True)
def _report() -> Iterator[None]:
    yield
    target = os.environ.get("ISOLATION_REPORT")
    if target:
        Path(target).write_text(json.dumps(OUTCOMES, indent=1, sort_keys=True))


def _guard_xfail(request, reason: str) -> None:
    if "guard" in request.node.callspec.id:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


# -- the attacks -------------------------------------------------------------------------------
def test_row1_dir_fd_open_reads_no_label_and_no_parent_environ(box, world, request):
    _guard_xfail(request, "the open audit event carries no dir_fd: relative opens escape")
    result = _attack(box, world, "dir_fd")
    parent = Path("/proc/self/environ").read_bytes().split(b"\0")
    markers = [e.decode() for e in parent if e.startswith((b"HOME=", b"PWD=", b"VIRTUAL_ENV="))]
    assert CANARY not in _seen(result)
    assert not any(m in _seen(result) for m in markers), markers


def test_row2_sqlite_cannot_read_or_rewrite_run_db(box, world, request):
    _guard_xfail(request, "sqlite opens the file in C, with no open audit event")
    result = _attack(box, world, "sqlite")
    con = sqlite3.connect(world["paths"]["run_db"])
    try:
        assert con.execute("select label from t").fetchall() == [(CANARY,)]
    finally:
        con.close()
    assert CANARY not in _seen(result)


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("mode", MODES)
def test_row3_reimported_fork_exec_reads_no_label_and_nothing_outlives(
    mode, world, policy, request
):
    _guard_xfail(request, "a re-imported _posixsubprocess.fork_exec raises no audit event")
    token = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6}"
    try:
        with _sandbox(world, policy, mode) as box:
            result = _attack(box, world, "fork_exec", sleep=token)
        # closed, as a timeout closes a worker: the setsid'd child must go too
        deadline = time.monotonic() + 5
        while _processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = _processes_with(token)
        assert CANARY not in _seen(result)
        assert survivors == []
    finally:
        for pid in _processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_row4_pidfd_signal_does_not_reach_the_parent(box, world, request):
    _guard_xfail(request, "pidfd_open and pidfd_send_signal raise no audit event")
    received: list[int] = []
    previous = signal.signal(signal.SIGURG, lambda signum, frame: received.append(signum))
    try:
        _attack(box, world, "pidfd")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGURG, previous)
    assert received == []


def test_row5_a_check_then_open_race_reads_no_label(box, world, request):
    if "guard" in request.node.callspec.id:  # the race is won by chance: not strict
        request.applymarker(pytest.mark.xfail(reason="the guard checks a path, then opens it"))
    raced = _attack(box, world, "race")
    later = _attack(box, world, "stash")
    assert CANARY not in _seen(raced) and CANARY not in _seen(later)
    assert raced.error is None or raced.error.kind == ErrorKind.forbidden, raced.error
    assert later.error is None and later.output in ([], ["decoy"]), (later.output, later.error)


@pytest.mark.parametrize("mode", MODES)
def test_row6_module_level_code_at_validation_reads_no_label(
    mode, world, policy, tmp_path, request
):
    _guard_xfail(request, "validation imports with no read denial (deny_read is empty)")
    harness = tmp_path / "leak.py"
    harness.write_text(IMPORT_LEAK.replace("__LABEL__", repr(world["paths"]["label"])))
    with Sandbox(  # as validate_harness builds it: no endpoint, no deny_read, no setup
        harness, policy_url=None, adapter="base", limits=LIMITS, public_dir=world["public"],
        scratch_root=tmp_path / "scratch", run_setup=False, isolation=mode,
    ) as sandbox:  # fmt: skip
        error = sandbox.start()
    OUTCOMES.setdefault("import_time_read", {})[mode] = str(error and error.message)[:200]
    assert error is not None and CANARY not in error.message


def test_row9_admin_route_and_forged_episode_are_refused(box, world, policy, request):
    before = len(policy.calls)
    _attack(box, world, "admin", episode="ep-admin")
    calls = policy.calls[before:]
    assert [c for c in calls if not c["path"].startswith("/v1/")] == []
    assert [c["headers"].get("x-sialoop-episode") for c in calls] == ["ep-admin"]
    assert calls[0]["headers"].get("x-sialoop-adapter") == "base"


def test_row10_listing_proc_and_denied_folders_shows_nothing(box, world, request):
    _guard_xfail(request, "listdir, stat and readlink are not checked by the guard")
    result = _attack(box, world, "listing")
    got = result.output or {}
    for key in ("denied_list", "denied_stat", "run_list", "data_list"):
        assert str(got.get(key, "refused")).startswith("refused"), (key, got)
    shown = json.dumps({k: v for k, v in got.items() if not str(v).startswith("refused")})
    assert os.getcwd() not in shown and "labels.txt" not in shown and "run.db" not in shown


def test_ctypes_open_reads_no_label(box, world, request):
    _guard_xfail(request, "native code bypasses the audit hook")
    result = _attack(box, world, "ctypes_open")
    assert CANARY not in _seen(result)


def test_fork_bomb_is_bounded(box, world):
    if box.isolation == "namespaces" and not iso.pids_cgroup_available() and os.geteuid() == 0:
        pytest.xfail("no writable pids cgroup, and RLIMIT_NPROC is not enforced for root")
    result = _attack(box, world, "fork_bomb")
    if box.isolation == "guard":
        assert result.error is not None and result.error.kind == ErrorKind.forbidden
    else:
        assert result.error is None, result.error
        assert result.output["forked"] <= LIMITS.max_processes + 8
        assert result.output["stopped_by"] is not None


def test_ten_gigabytes_is_a_memory_error(box, world):
    result = _attack(box, world, "allocate")
    assert result.error is not None and result.error.kind == ErrorKind.memory


def test_a_thread_left_running_spends_no_calls_between_or_for_other_episodes(
    box, world, policy, request
):
    start = len(policy.calls)
    _attack(box, world, "stray_thread", episode="ep-stray")
    ended = time.monotonic()
    time.sleep(1.0)  # between instances: no episode is running
    gap_end = time.monotonic()
    calls = policy.calls[start:]
    assert [c for c in calls if ended < c["t"] < gap_end] == []
    assert [c for c in calls if c["t"] > ended and c["headers"].get("x-sialoop-episode") ==
            "ep-stray"] == []  # fmt: skip


def test_no_pth_file_lands_in_site_packages(box, world, request):
    _guard_xfail(request, "the open audit event carries no dir_fd: relative writes escape")
    name = f"sialoop-test-{uuid.uuid4().hex[:8]}.pth"
    target = Path(world["paths"]["site"]) / name
    try:
        _attack(box, world, "pth", pth_name=name)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_another_workers_scratch_is_unreadable(box, world, policy, request):
    _guard_xfail(request, "other workers' scratch dirs are readable by the same user")
    with _sandbox(world, policy, box.isolation) as other:
        done = other.solve({"attack": "write_secret", "paths": {"secret": SCRATCH_CANARY}}, "ep-w")
        assert done.error is None, done.error
        workdir = other._dir / f"work-{other.starts}"
        assert (workdir / "secret.txt").read_text() == SCRATCH_CANARY
        result = _attack(box, world, "read_other", other=str(workdir))
    assert SCRATCH_CANARY not in _seen(result)


def test_network_reaches_nothing_but_the_bridge(box, world):
    result = _attack(box, world, "network")
    got = result.output or {}
    assert got.get("internet", "refused").startswith("refused")
    if box.isolation == "namespaces":  # under the guard the endpoint's port is how it is reached
        assert got.get("endpoint_tcp", "refused").startswith("refused")


def test_native_connect_to_a_loopback_port_reaches_nothing(box, world, request):
    _guard_xfail(request, "a ctypes connect() bypasses the audit hook")
    server = socket.create_server(("127.0.0.1", 0))
    try:
        result = _attack(box, world, "native_connect", listener=server.getsockname()[1])
    finally:
        server.close()
    assert str(result.output).startswith("refused"), result


def test_the_honest_path_still_works(box, world, policy):
    result = box.solve({"attack": "write_secret", "paths": {"secret": "x"}}, "ep-ok")
    assert result.error is None and result.output == "ok"


# -- the mode switch ---------------------------------------------------------------------------
def test_an_unknown_mode_is_a_config_error(world, policy):
    with pytest.raises(ConfigError, match=r"sandbox\.isolation"):
        _sandbox(world, policy, "chroot")


def test_namespaces_without_bubblewrap_is_a_one_line_error(world, policy, monkeypatch):
    monkeypatch.setattr(iso, "bwrap_path", lambda: None)
    iso.namespaces_available.cache_clear()
    try:
        with pytest.raises(ConfigError, match="apt-get install -y bubblewrap"):
            _sandbox(world, policy, "namespaces")
        warned = pytest.warns(RuntimeWarning, match="falls back to the audit guard")
        with warned, _sandbox(world, policy, "auto") as sandbox:
            assert sandbox.isolation == "guard"
    finally:
        iso.namespaces_available.cache_clear()


COMPILE = r"""
def solve(instance, llm):
    import torch
    f = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum())
    x = torch.randn(64)
    return abs(f(x).item() - (x.sin() * 2 + x.cos()).sum().item()) < 1e-4
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BWRAP, reason="torch.compile needs the namespaces mode")
def test_torch_compile_works_inside_the_namespaces_sandbox(world, policy, tmp_path):
    harness = tmp_path / "compile.py"
    harness.write_text(COMPILE)
    limits = LIMITS.model_copy(update={"timeout_s": 600.0, "memory_mb": 4096, "max_processes": 64})
    with _sandbox(world, policy, "namespaces", harness=harness, limits=limits) as box:
        result = box.solve({}, "ep-compile")
    assert result.error is None, result.error
    assert result.output is True
