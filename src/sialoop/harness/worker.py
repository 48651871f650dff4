"""The sandbox's child process: imports one harness once and answers `solve` requests over pipes.

Started by `Sandbox` as `python -P -m sialoop.harness.worker REQUEST_FD REPLY_FD`, in a new
session, with a scrubbed environment and a fresh scratch directory as its working directory.
Before it imports the harness it sets resource limits, warms what the policy client needs, and
installs `AuditGuard`. It then serves one request at a time until the request pipe closes.

The wire format is a 4-byte big-endian length followed by one JSON document: first a
`WorkerConfig` from the parent and a `WorkerReply` (ready, or why not) back, then one
`WorkerRequest` and one `WorkerReply` per instance. The harness's stdout and stderr never carry
protocol data: they go to a log file the parent reads.

What the guard does and does not stop is listed in `sialoop.harness.sandbox`'s docstring.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import resource
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import openai
from pydantic import BaseModel, ConfigDict

from sialoop.harness.program import HarnessInvalid, load_harness
from sialoop.records import ErrorKind, RolloutError

HEADER = struct.Struct(">I")
MAX_OUTPUT_BYTES = 32 * 2**20  # a serialised output larger than this is an invalid output
EPISODE_HEADER = "X-Sialoop-Episode"
ADAPTER_HEADER = "X-Sialoop-Adapter"
API_KEY = "sialoop"  # the endpoint is on loopback; the key only satisfies the client
_MB = 2**20
_MAX_BLOCKED = 20  # blocked events remembered per instance (a loop can trigger thousands)
_TRACEBACK_FRAMES = 6
_TRACEBACK_CHARS = 2000


class WorkerConfig(BaseModel):
    """What the parent tells a fresh worker: the harness, the endpoint and the limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    harness_path: str
    policy_url: str | None  # None: no endpoint; `solve` gets llm=None and no network at all
    adapter: str
    workdir: str
    timeout_s: float
    startup_timeout_s: float
    memory_mb: int
    file_size_mb: int
    max_processes: int
    deny_read: tuple[str, ...] = ()


class WorkerRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    instance: dict[str, Any]
    episode_id: str


class WorkerReply(BaseModel):
    """Ready (no error, no output), an instance's output as JSON text, or its error."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    output_json: str | None = None
    error: RolloutError | None = None
    restart: bool = False  # the worker's state is suspect (e.g. after a MemoryError)


def encode_frame(message: BaseModel) -> bytes:
    data = message.model_dump_json().encode("utf-8")
    return HEADER.pack(len(data)) + data


# -- blocking pipe I/O (the worker's side; the parent has deadline-aware versions) -------------
def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _receive(fd: int) -> bytes | None:
    """The next frame's payload, or None when the parent closed the pipe."""
    head = _read_exact(fd, HEADER.size)
    if head is None:
        return None
    return _read_exact(fd, HEADER.unpack(head)[0])


def _send(fd: int, reply: WorkerReply) -> None:
    view = memoryview(encode_frame(reply))
    while view:
        view = view[os.write(fd, view) :]


# -- the audit guard ---------------------------------------------------------------------------
_PROCESS_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn"}
    | {"subprocess.Popen", "os.startfile", "socket.sethostname"}
)
# event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_WRITE_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),),
    "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_WRITABLE_DEVICES = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})
_INET = (socket.AF_INET, socket.AF_INET6)


def _host_key(host: object) -> str:
    """A host as compared by the guard: a normalised IP address, or a lower-case name."""
    text = host.decode() if isinstance(host, bytes) else str(host)
    text = text.strip("[]").lower()
    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return text


def _is_ip(key: str) -> bool:
    try:
        ipaddress.ip_address(key)
    except ValueError:
        return False
    return True


def _is_loopback(key: str) -> bool:
    return key == "localhost" or (_is_ip(key) and ipaddress.ip_address(key).is_loopback)


def policy_hosts(policy_url: str | None) -> tuple[int, frozenset[str]]:
    """The endpoint's port and every host key that reaches it (its name and its addresses)."""
    if policy_url is None:
        return -1, frozenset()
    parts = urlsplit(policy_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    keys = {_host_key(host)}
    for *_, address in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP):
        keys.add(_host_key(address[0]))
    return port, frozenset(keys)


class AuditGuard:
    """A `sys.addaudithook` hook that refuses what a harness must not do (PermissionError).

    Refused: process creation and `exec`; signals to other processes; sockets to anything but
    the policy endpoint; binding outside loopback; DNS lookups of other names; raw sockets;
    writes, deletes and renames outside the scratch directory; reads of other processes'
    `/proc/<pid>` and of the `deny_read` paths; changing resource limits. Every refusal is
    remembered in `blocked` (so a harness that catches the PermissionError is still reported)
    and printed to stderr. This is a tripwire for honest mistakes, not a security boundary:
    `ctypes` and code that edits this object bypass it (see the sandbox module docstring).
    """

    def __init__(self, config: WorkerConfig):
        self.blocked: list[str] = []
        self._internal = False
        self._workdir = os.path.realpath(config.workdir)
        self._deny = tuple(os.path.realpath(p) for p in config.deny_read)
        self._pid, self._pgid = os.getpid(), os.getpgrp()
        self._port, self._hosts = policy_hosts(config.policy_url)
        self._handlers: dict[str, Callable[[tuple[Any, ...]], str | None]] = {
            "open": self._open,
            "socket.__new__": self._new_socket,
            "socket.connect": self._connect,
            "socket.sendto": self._connect,
            "socket.sendmsg": self._connect,
            "socket.bind": self._bind,
            "socket.getaddrinfo": self._lookup_name,
            "socket.gethostbyname": self._lookup_name,
            "socket.gethostbyaddr": self._lookup_address,
            "socket.getnameinfo": self._lookup_address,
            "os.kill": self._kill,
            "os.killpg": self._killpg,
            "resource.setrlimit": self._rlimit,
            "resource.prlimit": self._prlimit,
        }
        for event in _PROCESS_EVENTS:
            self._handlers[event] = _refuse_process
        for event, places in _WRITE_EVENTS.items():
            self._handlers[event] = self._path_writer(places)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        handler = self._handlers.get(event)
        if handler is None:
            return
        try:
            reason = handler(args)
        except Exception as exc:  # fail closed: arguments we cannot read are refused
            reason = f"unreadable arguments ({type(exc).__name__}: {exc})"
        if reason is not None:
            self.refuse(event, reason)

    def refuse(self, event: str, reason: str) -> None:
        note = f"{event}: {reason}"
        if len(self.blocked) < _MAX_BLOCKED:
            self.blocked.append(note)
        # A closed or broken stderr must not hide the refusal itself.
        with suppress(Exception):
            sys.stderr.write(f"[sialoop sandbox] blocked {note}\n")
        raise PermissionError(f"sialoop sandbox blocked {note}")

    def refuse_fork_exec(self, *args: Any, **kwargs: Any) -> None:
        """Stands in for `_posixsubprocess.fork_exec`, which raises no audit event itself."""
        self.refuse("_posixsubprocess.fork_exec", "no subprocesses in the sandbox")

    @contextmanager
    def internal(self):
        """Lets the worker itself change resource limits between instances."""
        self._internal = True
        try:
            yield
        finally:
            self._internal = False

    # -- files ---------------------------------------------------------------------------------
    def _open(self, args: tuple[Any, ...]) -> str | None:
        path, mode, flags = args[0], args[1], args[2]
        if isinstance(path, int):  # fdopen of a descriptor that is already open
            return None
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        return self._check_write(path, None) if writing else self._check_read(path)

    def _check_read(self, path: Any) -> str | None:
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        for denied in self._deny:
            if real == denied or real.startswith(denied + os.sep):
                return f"reading {real!r} (a secrets location)"
        parts = real.split(os.sep)
        if (
            len(parts) > 2
            and parts[1] == "proc"
            and parts[2].isdigit()
            and int(parts[2]) != self._pid
        ):
            return f"reading another process's {real!r}"
        return None

    def _check_write(self, path: Any, dir_fd: Any) -> str | None:
        if isinstance(path, int):
            real = os.readlink(f"/proc/self/fd/{path}")
        else:
            raw = os.fsdecode(os.fspath(path))
            # dir_fd is -1 (or AT_FDCWD) when the call did not pass one
            if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(raw):
                raw = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), raw)
            if os.path.abspath(raw) in _WRITABLE_DEVICES:
                return None
            real = os.path.realpath(raw)
        if real == self._workdir or real.startswith(self._workdir + os.sep):
            return None
        return f"changing {real!r} outside the scratch directory"

    def _path_writer(
        self, places: tuple[tuple[int, int | None], ...]
    ) -> Callable[[tuple[Any, ...]], str | None]:
        def check(args: tuple[Any, ...]) -> str | None:
            for path_at, dir_fd_at in places:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None else None
                reason = self._check_write(args[path_at], dir_fd)
                if reason is not None:
                    return reason
            return None

        return check

    # -- network -------------------------------------------------------------------------------
    def _new_socket(self, args: tuple[Any, ...]) -> str | None:
        family, kind = args[1], args[2]
        if family not in (*_INET, socket.AF_UNIX, -1):
            return f"socket family {family}"
        if isinstance(kind, int) and kind & 0xF == socket.SOCK_RAW:
            return "raw sockets"
        return None

    def _connect(self, args: tuple[Any, ...]) -> str | None:
        sock, address = args[0], args[1]
        if address is None:  # sendmsg on a connected socket: its connect was checked
            return None
        if (
            sock.family in _INET
            and isinstance(address, tuple)
            and len(address) >= 2
            and address[1] == self._port
            and _host_key(address[0]) in self._hosts
        ):
            return None
        return f"network access to {address!r} (only the policy endpoint is reachable)"

    def _bind(self, args: tuple[Any, ...]) -> str | None:
        sock, address = args[0], args[1]
        if (
            sock.family in _INET
            and isinstance(address, tuple)
            and _is_loopback(_host_key(address[0]))
        ):
            return None
        return f"binding {address!r} (only loopback addresses)"

    def _lookup_name(self, args: tuple[Any, ...]) -> str | None:
        host = args[0]
        if host is None:
            return None
        key = _host_key(host)
        # A numeric address resolves without a DNS query; a name could carry data out.
        if key in self._hosts or key == "localhost" or _is_ip(key):
            return None
        return f"DNS lookup of {host!r}"

    def _lookup_address(self, args: tuple[Any, ...]) -> str | None:
        address = args[0]
        host = address[0] if isinstance(address, tuple) else address
        key = _host_key(host)
        if key in self._hosts or _is_loopback(key):
            return None
        return f"reverse DNS lookup of {host!r}"

    # -- processes and limits ------------------------------------------------------------------
    def _kill(self, args: tuple[Any, ...]) -> str | None:
        pid, sig = args[0], args[1]
        if sig == 0 or pid in (0, self._pid, -self._pgid):
            return None
        return f"signal {sig} to pid {pid}"

    def _killpg(self, args: tuple[Any, ...]) -> str | None:
        pgid, sig = args[0], args[1]
        if sig == 0 or pgid in (0, self._pgid):
            return None
        return f"signal {sig} to process group {pgid}"

    def _rlimit(self, args: tuple[Any, ...]) -> str | None:
        return None if self._internal else "changing resource limits"

    def _prlimit(self, args: tuple[Any, ...]) -> str | None:
        limits = args[2] if len(args) > 2 else None
        return None if limits is None or self._internal else "changing resource limits"


def _refuse_process(args: tuple[Any, ...]) -> str:
    return "no subprocesses, forks or exec in the sandbox"


# -- setting up the process --------------------------------------------------------------------
def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _user_task_count() -> int:
    """Tasks (processes and threads) of this real uid: what RLIMIT_NPROC counts."""
    uid, total = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="utf-8") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _limit_resources(config: WorkerConfig) -> None:
    _set_limit(resource.RLIMIT_AS, config.memory_mb * _MB)
    _set_limit(resource.RLIMIT_FSIZE, config.file_size_mb * _MB)
    _set_limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts every task of the user, so the cap is headroom above today's count.
    # The kernel does not apply it to root; the audit guard is what stops process creation.
    _set_limit(resource.RLIMIT_NPROC, _user_task_count() + config.max_processes)


def _cpu_backstop(seconds: float, guard: AuditGuard) -> None:
    """Soft RLIMIT_CPU a little past `seconds` of wall time on every core, from now.

    The parent's wall-clock kill is the real limit; this one stops a worker whose parent died
    (or that holds the GIL against the watchdog) from spinning forever. The hard limit is left
    alone so the next instance can move the soft one again.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds * (os.cpu_count() or 1) + 30)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    with guard.internal():
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _watch_parent(parent: int) -> None:
    # A worker whose parent died would otherwise run (or hang) on; its pipes stay open while
    # it is busy, so it would not notice.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _make_client(config: WorkerConfig) -> openai.OpenAI | None:
    if config.policy_url is None:
        return None
    client = openai.OpenAI(
        base_url=config.policy_url,
        api_key=API_KEY,
        default_headers={ADAPTER_HEADER: config.adapter},
        timeout=config.timeout_s,
    )
    # platform.platform() runs `uname -p` in a subprocess on the first request; do it now,
    # before the guard would refuse it.
    client.platform_headers()
    return client


def _install_guard(config: WorkerConfig) -> AuditGuard:
    import _posixsubprocess  # multiprocessing and loky call its fork_exec without an audit event

    guard = AuditGuard(config)
    _posixsubprocess.fork_exec = guard.refuse_fork_exec
    sys.addaudithook(guard)
    return guard


# -- classifying what happened -----------------------------------------------------------------
def _describe(exc: BaseException, harness_path: str) -> str:
    """`Type: message (at file:line)` on the first line, then a short traceback that starts
    at the harness's first frame (the worker's and importlib's frames say nothing)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if f.filename == harness_path] or frames
    where = f" (at {os.path.basename(own[-1].filename)}:{own[-1].lineno})" if own else ""
    head = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500] + where
    tb = exc.__traceback__
    if own is not frames:
        while tb is not None and tb.tb_frame.f_code.co_filename != harness_path:
            tb = tb.tb_next
    tail = "".join(traceback.format_exception(type(exc), exc, tb, limit=-_TRACEBACK_FRAMES))
    return f"{head}\n{tail[-_TRACEBACK_CHARS:]}"


def _classify(exc: BaseException, guard: AuditGuard, config: WorkerConfig) -> RolloutError:
    if guard.blocked:
        message = "blocked by the sandbox: " + "; ".join(guard.blocked[:3])
        return RolloutError(kind=ErrorKind.forbidden, message=message)
    if isinstance(exc, MemoryError):
        message = f"MemoryError: address-space limit of {config.memory_mb} MB reached"
        return RolloutError(kind=ErrorKind.memory, message=message)
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        message = f"file-size limit of {config.file_size_mb} MB exceeded: {exc}"
        return RolloutError(kind=ErrorKind.killed, message=message)
    if isinstance(exc, openai.APIConnectionError) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code >= 500
    ):
        return RolloutError(kind=ErrorKind.policy, message=_describe(exc, config.harness_path))
    return RolloutError(kind=ErrorKind.crash, message=_describe(exc, config.harness_path))


def _encode_output(output: Any) -> WorkerReply:
    try:
        text = json.dumps(output, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"output is not JSON-serialisable: {type(exc).__name__}: {exc}"
        return WorkerReply(error=RolloutError(kind=ErrorKind.invalid_output, message=message))
    if len(text) > MAX_OUTPUT_BYTES:
        message = f"output is {len(text)} characters of JSON; the limit is {MAX_OUTPUT_BYTES}"
        return WorkerReply(error=RolloutError(kind=ErrorKind.invalid_output, message=message))
    return WorkerReply(output_json=text)


# -- the two phases: start, then serve ---------------------------------------------------------
SolveFn = Callable[[dict[str, Any], Any], Any]


def _load(config: WorkerConfig, guard: AuditGuard) -> tuple[SolveFn | None, WorkerReply]:
    _cpu_backstop(config.startup_timeout_s, guard)
    try:
        module = load_harness(config.harness_path)
    except HarnessInvalid as exc:
        error = RolloutError(kind=ErrorKind.crash, message=f"harness invalid: {exc}")
        return None, WorkerReply(error=error)
    except BaseException as exc:  # a harness that fails to import is data too
        error = _classify(exc, guard, config)
        message = f"harness failed to import: {error.message}"
        return None, WorkerReply(error=error.model_copy(update={"message": message}))
    return module.solve, WorkerReply()


def _run_instance(
    request: WorkerRequest, solve: SolveFn, llm: openai.OpenAI | None, guard: AuditGuard,
    config: WorkerConfig,
) -> WorkerReply:  # fmt: skip
    guard.blocked.clear()
    _cpu_backstop(config.timeout_s, guard)
    client = None
    if llm is not None:
        client = llm.with_options(default_headers={EPISODE_HEADER: request.episode_id})
    try:
        output = solve(request.instance, client)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from a harness are data
        error = _classify(exc, guard, config)
        return WorkerReply(error=error, restart=error.kind == ErrorKind.memory)
    if guard.blocked:  # the harness caught our PermissionError and carried on
        message = "blocked by the sandbox: " + "; ".join(guard.blocked[:3])
        return WorkerReply(error=RolloutError(kind=ErrorKind.forbidden, message=message))
    return _encode_output(output)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # the harness may have closed or replaced them
            stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    request_fd, reply_fd = int(args[0]), int(args[1])
    raw = _receive(request_fd)
    if raw is None:
        return 2
    config = WorkerConfig.model_validate_json(raw)
    sys.dont_write_bytecode = True  # __pycache__ beside the harness is outside the scratch dir
    llm = _make_client(config)
    _limit_resources(config)
    guard = _install_guard(config)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    solve, ready = _load(config, guard)
    _flush()
    _send(reply_fd, ready)
    if solve is None:
        return 1
    while (raw := _receive(request_fd)) is not None:
        reply = _run_instance(WorkerRequest.model_validate_json(raw), solve, llm, guard, config)
        _flush()
        _send(reply_fd, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
