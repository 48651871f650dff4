"""Operating-system isolation for the sandbox worker: bubblewrap namespaces, a pids cgroup and
the policy bridge (a Unix socket the worker reaches the endpoint through).

`namespaces_available()` says whether bubblewrap works here (probed once per process);
`bwrap_argv` builds the command line that runs one worker in fresh user, mount, pid, ipc, uts,
cgroup and network namespaces, with a filesystem view of only what the worker needs;
`PidsCgroup` caps the number of tasks of one worker (RLIMIT_NPROC is not enforced for a uid
mapped to root, which is what bubblewrap run by root gives); `PolicyBridge` forwards the
worker's HTTP requests under `/v1/` to the real endpoint, stamping the episode and adapter
headers itself. `make_isolation` picks the strategy a `Sandbox` starts its workers with
(`Guard` or `Namespaces`, by name from `ISOLATIONS`). What each mode guarantees is in
`sialoop.harness.sandbox`'s docstring.

Why bubblewrap runs as root when the parent is root: uid 65534 outside could not traverse the
0700 home folder that holds a pyenv interpreter (and bubblewrap resolves bind sources by path,
so passing directory fds does not help). Inside, the harness is uid 65534 of a user namespace
with no capabilities; the task limit that RLIMIT_NPROC cannot give a root-mapped uid comes from
a pids cgroup of its own. An unprivileged parent runs bubblewrap unprivileged: its RLIMIT_NPROC
then holds too.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sialoop
from sialoop.errors import ConfigError

API_KEY = "sialoop"  # as `harness.worker.API_KEY`: the endpoint is on loopback
ISOLATION_MODES = ("auto", "namespaces", "guard")
INSTALL_HINT = "install bubblewrap (`apt-get install -y bubblewrap`, or your system's package)"
# Fixed places inside the sandbox.
INSIDE_ROOT = "/sialoop"
INSIDE_WORK = f"{INSIDE_ROOT}/work"
INSIDE_PUBLIC = f"{INSIDE_ROOT}/public"
INSIDE_HARNESS_DIR = f"{INSIDE_ROOT}/harness"
INSIDE_BRIDGE_DIR = f"{INSIDE_ROOT}/bridge"
INSIDE_SOCKET = f"{INSIDE_BRIDGE_DIR}/policy.sock"
INSIDE_SETUP_STATE = f"{INSIDE_ROOT}/setup-state.pkl"
POLICY_SOCKET_ENV = "SIALOOP_POLICY_SOCKET"  # as tasks/folder_adapter.py reads it
INSIDE_URL = "http://policy/v1"  # the host name is never resolved: the client uses the socket
SANDBOX_UID = 65534  # "nobody", inside the user namespace
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "ssl", "ca-certificates",
    "alternatives", "nsswitch.conf", "hosts", "mime.types", "gai.conf",
)  # fmt: skip
_CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")
_PIDS_BASE = 8  # bubblewrap's two processes, the worker and its own threads
_MAX_BODY = 64 * 2**20  # a request or response body larger than this is refused
_PATH_OK = re.compile(r"^/v1/[A-Za-z0-9_\-./]*$")
_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer"}
    | {"upgrade", "host", "content-length", "authorization", "cookie", "proxy-authorization"}
)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def namespaces_available() -> tuple[bool, str]:
    """(works, why not): bubblewrap is installed and can build a full sandbox here."""
    bwrap = bwrap_path()
    if bwrap is None:
        return False, f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}"
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    argv += ["--new-session", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--ro-bind", "/", "/"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(2**20), "--tmpfs", "/tmp"]
    try:
        done = subprocess.run(
            [*argv, "true"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"bubblewrap does not run here: {err}"
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return False, f"bubblewrap cannot create namespaces here: {why[0][:200]}"
    return True, ""


_warned: set[str] = set()
_warn_lock = threading.Lock()


def resolve_isolation(mode: str) -> str:
    """`namespaces` or `guard` for the configured `mode`; an error when `namespaces` is asked
    for and unavailable, a one-time warning when `auto` falls back to the guard."""
    if mode not in ISOLATION_MODES:
        raise ConfigError(
            f"sandbox.isolation '{mode}' is unknown: use one of {', '.join(ISOLATION_MODES)}"
        )
    if mode == "guard":
        return "guard"
    ok, why = namespaces_available()
    if ok:
        return "namespaces"
    if mode == "namespaces":
        raise ConfigError(f"sandbox.isolation = 'namespaces' is unavailable: {why}")
    with _warn_lock:
        if why not in _warned:
            _warned.add(why)
            warnings.warn(
                f"harness isolation falls back to the audit guard, which is no security "
                f"boundary: {why}",
                RuntimeWarning,
                stacklevel=3,
            )
    return "guard"


def package_root() -> Path:
    """The directory holding the `sialoop` package (the repo's src/ for an editable install)."""
    return Path(sialoop.__file__).resolve().parent.parent


# -- the command line ------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The host paths one worker's sandbox shows (all but `workdir` read-only)."""

    workdir: Path  # the worker's scratch dir: cwd and HOME inside, the only writable bind
    harness: Path
    public: Path | None
    bridge_dir: Path | None  # holds the policy socket
    setup_state: Path | None  # a pickled setup state to hand back, when there is one
    tmp_bytes: int  # size of the private /tmp


def _ro(src: str | Path, dest: str | Path | None = None) -> list[str]:
    return ["--ro-bind", str(src), str(dest if dest is not None else src)]


def bwrap_argv(layout: Layout, command: list[str]) -> list[str]:
    """bubblewrap's argv running `command` (absolute paths) in the sandbox for `layout`."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise ConfigError(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    argv += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(layout.tmp_bytes), "--tmpfs", "/tmp"]
    for name in _SYSTEM_DIRS:
        if os.path.islink(name):
            argv += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            argv += _ro(name)
    for name in _ETC:
        if os.path.exists(f"/etc/{name}"):
            argv += _ro(f"/etc/{name}")
    seen: list[str] = []
    for prefix in (sys.base_prefix, sys.prefix, str(package_root())):
        real = os.path.realpath(prefix)
        if not any(real == s or real.startswith(s + os.sep) for s in seen):
            seen.append(real)
            argv += _ro(real)
            if real != prefix:  # the path python reports must resolve inside too
                argv += ["--symlink", real, prefix]
    exe = os.path.realpath(sys.executable)
    if not any(exe.startswith(s + os.sep) for s in seen):
        argv += _ro(exe)
    argv += _ro(layout.harness, f"{INSIDE_HARNESS_DIR}/{layout.harness.name}")
    if layout.public is not None:
        argv += _ro(layout.public, INSIDE_PUBLIC)
    if layout.bridge_dir is not None:
        argv += _ro(layout.bridge_dir, INSIDE_BRIDGE_DIR)
    if layout.setup_state is not None:
        argv += _ro(layout.setup_state, INSIDE_SETUP_STATE)
    argv += ["--bind", str(layout.workdir), INSIDE_WORK, "--chdir", INSIDE_WORK]
    return [*argv, "--", *command]


def exit_status(code: int) -> int:
    """bubblewrap reports a child killed by signal N as exit code 128 + N: back to -N."""
    if code > 128 and code - 128 < 65:
        return -(code - 128)
    return code


# -- the process limit -----------------------------------------------------------------------
@functools.cache
def _pids_root() -> Path | None:
    for root in _CGROUP_ROOTS:
        path = Path(root)
        controllers = path / "cgroup.controllers"
        if controllers.is_file() and "pids" not in controllers.read_text().split():
            continue
        if not (path / "cgroup.procs").is_file() or not os.access(path, os.W_OK):
            continue
        if controllers.is_file() or root.endswith("/pids"):
            return path
    return None


class PidsCgroup:
    """A pids cgroup holding one worker's sandbox: at most `limit` tasks (threads count)."""

    def __init__(self, name: str, limit: int):
        self.path: Path | None = None
        root = _pids_root()
        if root is None:
            return
        path = root / f"sialoop-{name}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(limit + _PIDS_BASE))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return
        self.path = path

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run by a shell that first moves itself into this cgroup."""
        if self.path is None:
            return argv
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", script, str(self.path), *argv]

    def kill(self) -> None:
        """SIGKILL every task in the cgroup (idempotent)."""
        if self.path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(line), signal.SIGKILL)

    def remove(self) -> None:
        """Delete the cgroup once its last task has left (shortly after their SIGKILL): at
        once when it is empty, else from a background thread that retries for a minute."""
        path, self.path = self.path, None
        if path is not None and not _rmdir(path, tries=3):
            threading.Thread(target=_rmdir, args=(path, 600), daemon=True).start()


def _rmdir(path: Path, tries: int) -> bool:
    for _ in range(tries):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            threading.Event().wait(0.1)
    return False


def pids_cgroup_available() -> bool:
    return _pids_root() is not None


# -- the policy bridge -----------------------------------------------------------------------
class PolicyBridge:
    """A Unix socket the worker's client talks HTTP to; each request under `/v1/` is forwarded
    to the real endpoint with the episode and adapter headers set here (whatever the harness
    sent), and anything else (the admin route, a path outside /v1/) is answered 403. Between
    instances (no episode set) every request is answered 409, so a thread left running after
    `solve` cannot spend calls on the next episode's account."""

    def __init__(self, policy_url: str, adapter: str, episode_header: str,
                 adapter_header: str):  # fmt: skip
        parts = urlsplit(policy_url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._adapter, self._episode_header = adapter, episode_header
        self._adapter_header = adapter_header
        self.episode: str | None = None
        # A short path of its own: a Unix socket's path is limited to 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="sialoop-bridge-"))
        self.path = self.directory / "policy.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self._sock.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="policy-bridge")
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        with conn, conn.makefile("rb") as reader:
            try:
                while not self._closed:
                    request = _read_request(reader)
                    if request is None:
                        return
                    if upstream is None:
                        upstream = http.client.HTTPConnection(self._host, self._port, timeout=600)
                    keep = self._forward(conn, upstream, *request)
                    if not keep:
                        return
            except (OSError, ValueError, http.client.HTTPException):
                return
            finally:
                if upstream is not None:
                    upstream.close()

    def _forward(self, conn: socket.socket, upstream: http.client.HTTPConnection, method: str,
                 path: str, headers: list[tuple[str, str]], body: bytes) -> bool:  # fmt: skip
        route = path.split("?", 1)[0]
        if method not in ("GET", "POST") or not _PATH_OK.match(route) or ".." in route:
            _answer(conn, 403, f"the sandbox's policy bridge serves only /v1/, not {route[:200]}")
            return False
        episode = self.episode
        if episode is None:
            _answer(conn, 409, "no instance is running: calls between instances are refused")
            return True
        sent = [(k, v) for k, v in headers if k.lower() not in _HOP]
        sent = [(k, v) for k, v in sent if not k.lower().startswith("x-sialoop-")]
        sent += [(self._episode_header, episode), (self._adapter_header, self._adapter)]
        sent.append(("Authorization", f"Bearer {API_KEY}"))  # the fixed key, never the harness's
        upstream.putrequest(method, path, skip_accept_encoding=True)
        for key, value in sent:
            upstream.putheader(key, value)
        upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body)
        response = upstream.getresponse()
        data = response.read(_MAX_BODY + 1)
        if len(data) > _MAX_BODY:
            upstream.close()
            _answer(conn, 502, "the endpoint's answer is too large")
            return False
        out = [f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1")]
        for key, value in response.getheaders():
            if key.lower() not in _HOP:
                out.append(f"{key}: {value}\r\n".encode("latin-1"))
        out.append(f"Content-Length: {len(data)}\r\n\r\n".encode("latin-1"))
        conn.sendall(b"".join(out) + data)
        if response.will_close:
            upstream.close()
        return True


def _read_request(reader) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    line = reader.readline(8192)
    if not line:
        return None
    method, path, _version = line.decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    length = 0
    while True:
        raw = reader.readline(65536)
        if raw in (b"\r\n", b"\n", b""):
            break
        if len(headers) > 100:
            raise ValueError("too many headers")
        key, _, value = raw.decode("latin-1").partition(":")
        key, value = key.strip(), value.strip()
        if key.lower() == "content-length":
            length = int(value)
        elif key.lower() == "transfer-encoding":
            raise ValueError("chunked requests are not supported")
        headers.append((key, value))
    if not 0 <= length <= _MAX_BODY:
        raise ValueError("request body too large")
    body = reader.read(length) if length else b""
    if len(body) != length:
        return None
    return method, path, headers, body


def _answer(conn: socket.socket, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "sandbox"}}).encode()
    head = (
        f"HTTP/1.1 {status} {http.client.responses.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        conn.sendall(head.encode("latin-1") + body)


# -- the strategies a Sandbox starts its workers with ----------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What starting one worker needs to know, in host paths."""

    harness: Path
    public: Path | None
    workdir: Path
    setup_state: Path | None  # the pickled setup state to hand back, when there is one
    has_policy: bool
    file_size_mb: int
    max_processes: int


class Guard:
    """The audit guard (`harness/guard.py`): the worker runs as the parent's user. It reaches
    the endpoint through the same policy bridge as under namespaces, and the guard lets it
    connect to the bridge's socket only, so a pure-Python harness can neither reach the
    endpoint's TCP port (the admin route) nor set its own episode or adapter headers."""

    name = "guard"

    def __init__(self, policy_url: str | None, adapter: str):
        from sialoop.harness.worker import ADAPTER_HEADER, EPISODE_HEADER

        self._bridge = (
            PolicyBridge(policy_url, adapter, EPISODE_HEADER, ADAPTER_HEADER)
            if policy_url is not None
            else None
        )

    @contextlib.contextmanager
    def episode(self, episode_id: str) -> Iterator[None]:
        if self._bridge is None:
            yield
            return
        self._bridge.episode = episode_id
        try:
            yield
        finally:
            self._bridge.episode = None

    def public_link(self, public: Path) -> Path | str:
        return public

    def env(self, env: dict[str, str], workdir: Path) -> dict[str, str]:
        if self._bridge is None:
            return env
        return env | {POLICY_SOCKET_ENV: str(self._bridge.path)}

    def config(self, spec: WorkerSpec) -> dict[str, Any]:
        if self._bridge is None or not spec.has_policy:
            return {}  # WorkerConfig as the parent sees the paths
        return {"policy_url": INSIDE_URL, "policy_socket": str(self._bridge.path)}

    def launch(self, argv: list[str], spec: WorkerSpec) -> tuple[list[str], PidsCgroup | None]:
        return argv, None

    def exit_status(self, code: int) -> int:
        return code

    def close(self) -> None:
        if self._bridge is not None:
            self._bridge.close()


class Namespaces(Guard):
    """bubblewrap, a pids cgroup and the policy bridge, with the guard still inside."""

    name = "namespaces"

    def public_link(self, public: Path) -> Path | str:
        return INSIDE_PUBLIC

    def env(self, env: dict[str, str], workdir: Path) -> dict[str, str]:
        return env | {
            "HOME": INSIDE_WORK,
            "TMPDIR": "/tmp",  # a private, size-capped tmpfs
            "PYTHONPATH": str(package_root()),  # bound in at the same path; nothing else is
            "USER": "sandbox",  # no /etc/passwd inside; getpass.getuser() reads these
            "LOGNAME": "sandbox",
            POLICY_SOCKET_ENV: INSIDE_SOCKET,  # for clients the harness builds itself
            # torch.compile's precompiled header (hundreds of MB) exceeds the file-size limit;
            # without it inductor compiles the same code, a little slower the first time.
            "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS": "0",
            "TORCHINDUCTOR_CACHE_DIR": f"{INSIDE_WORK}/.torchinductor",
        }

    def config(self, spec: WorkerSpec) -> dict[str, Any]:
        return {  # the paths as the worker sees them
            "harness_path": f"{INSIDE_HARNESS_DIR}/{spec.harness.name}",
            "workdir": INSIDE_WORK,
            "setup_cache": INSIDE_SETUP_STATE if spec.setup_state is not None else None,
            "policy_url": INSIDE_URL if spec.has_policy else None,
            "policy_socket": INSIDE_SOCKET if spec.has_policy else None,
            "allow_subprocess": True,
        }

    def launch(self, argv: list[str], spec: WorkerSpec) -> tuple[list[str], PidsCgroup | None]:
        layout = Layout(
            workdir=spec.workdir,
            harness=spec.harness,
            public=spec.public,
            bridge_dir=self._bridge.directory if self._bridge is not None else None,
            setup_state=spec.setup_state,
            tmp_bytes=4 * spec.file_size_mb * 2**20,
        )
        cgroup = PidsCgroup(uuid.uuid4().hex[:12], spec.max_processes)
        return cgroup.wrap(bwrap_argv(layout, argv)), cgroup

    def exit_status(self, code: int) -> int:
        return exit_status(code)  # bubblewrap's 128 + N for a child killed by N


ISOLATIONS: dict[str, type[Guard]] = {"guard": Guard, "namespaces": Namespaces}


def make_isolation(mode: str, policy_url: str | None, adapter: str) -> Guard:
    """The strategy for `mode` ("auto", "namespaces", "guard"; see `resolve_isolation`)."""
    return ISOLATIONS[resolve_isolation(mode)](policy_url, adapter)
