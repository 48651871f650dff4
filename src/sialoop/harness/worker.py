"""The sandbox's child process: imports one harness once and answers `solve` requests over pipes.

Started by `Sandbox` as `python -P -m sialoop.harness.worker REQUEST_FD REPLY_FD`, in a new
session, with a scrubbed environment and a fresh scratch directory as its working directory.
Before it imports the harness it sets resource limits, warms what the policy client needs, and
installs `AuditGuard` (from `sialoop.harness.guard`). It then serves one request at a time until
the request pipe closes.

The wire format is a 4-byte big-endian length followed by one JSON document: first a
`WorkerConfig` from the parent and a `WorkerReply` back (imported, or why not), then a second
`WorkerReply` when the harness's `setup` has run (ready, or why not; sent at once for a harness
without one), then one `WorkerRequest` and one `WorkerReply` per instance. The parent gives the
import `startup_timeout_s` and setup `setup_timeout_s`, each its own budget. The harness's stdout and stderr never carry
protocol data: they go to a log file the parent reads. Both ends of the framing live here: the
worker's blocking reads and writes, and the parent's deadline-aware ones that `Sandbox` uses.

The parent reads the reply pipe as hostile data, since harness code can write to it: a declared
length over `MAX_REPLY_FRAME` is refused from the header alone (nothing is read or allocated),
and an `output_json` goes through `decode_output` (size, container count and nesting depth
checked without recursion before it is parsed; strict JSON; storable) before it is believed.

What the guard does and does not stop is listed in `sialoop.harness.sandbox`'s docstring.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import re
import resource
import select
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from itertools import accumulate
from types import ModuleType
from typing import Any

import openai
import pydantic_core
from pydantic import BaseModel, ConfigDict

from sialoop.harness.guard import AuditGuard, install_guard
from sialoop.harness.program import HarnessInvalid, load_harness, setup_takes_cached
from sialoop.records import ErrorKind, RolloutError

HEADER = struct.Struct(">I")
MAX_OUTPUT_BYTES = 32 * 2**20  # a serialised output larger than this is an invalid output
MAX_OUTPUT_DEPTH = 64  # nesting of lists and objects; the store's serialiser stops at 255
MAX_OUTPUT_CONTAINERS = 1_000_000  # lists and objects in one output: bounds the parent's memory
# The largest reply frame the parent reads. The output's JSON text is ASCII (json.dumps escapes
# the rest), so quoting it as a string inside the reply at most doubles it (`"` and `\`); the
# worker's error messages are a few KB. A bigger header is refused before anything is read.
MAX_REPLY_FRAME = 2 * MAX_OUTPUT_BYTES + 2**20
EPISODE_HEADER = "X-Sialoop-Episode"
ADAPTER_HEADER = "X-Sialoop-Adapter"
API_KEY = "sialoop"  # the endpoint is on loopback; the key only satisfies the client
_MB = 2**20
_TRACEBACK_FRAMES = 6
_TRACEBACK_CHARS = 2000
# The harness module's name in the worker: fixed, so a pickled setup state naming its types loads.
HARNESS_MODULE = "sialoop_harness"
SETUP_STATE_NAME = ".sialoop-setup.pkl"  # written in the worker's scratch dir, moved by the parent


class WorkerConfig(BaseModel):
    """What the parent tells a fresh worker: the harness, the endpoint and the limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    harness_path: str
    policy_url: str | None  # None: no endpoint; `solve` gets llm=None and no network at all
    adapter: str
    workdir: str
    timeout_s: float
    startup_timeout_s: float
    setup_timeout_s: float = 600.0
    run_setup: bool = True  # False: import and check only (validation)
    setup_cache: str | None = None  # a pickled state from an earlier worker's setup, to hand back
    memory_mb: int
    file_size_mb: int
    max_processes: int
    deny_read: tuple[str, ...] = ()
    # Set under namespace isolation (`harness/isolation.py`): the client reaches the endpoint
    # through this Unix socket (the bridge), and subprocesses are allowed (they die with it).
    policy_socket: str | None = None
    allow_subprocess: bool = False


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
    setup_cached: bool = False  # setup's state was pickled to SETUP_STATE_NAME in the scratch dir


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class OutputInvalid(ValueError):
    """An output the parent will not take: too large, too deep, not JSON, or not storable."""


def check_output_text(text: str) -> None:
    """Raise `OutputInvalid` unless `text` is within the size, container and depth limits.

    Runs before `json.loads` (whose memory and recursion it bounds) without recursing itself:
    strings are cut out by one regex, so the brackets left are the structure's, counted in C.
    The verdict is exact for valid JSON; for anything else `json.loads` fails afterwards.
    """
    if len(text) > MAX_OUTPUT_BYTES:
        raise OutputInvalid(
            f"output is {len(text)} characters of JSON; the limit is {MAX_OUTPUT_BYTES}"
        )
    skeleton = _JSON_STRING.sub("", text)
    containers = skeleton.count("[") + skeleton.count("{")
    if containers > MAX_OUTPUT_CONTAINERS:
        raise OutputInvalid(
            f"output holds {containers} lists and objects; the limit is {MAX_OUTPUT_CONTAINERS}"
        )
    brackets = _NOT_BRACKET.sub("", skeleton)
    depth = max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)
    if depth > MAX_OUTPUT_DEPTH:
        raise OutputInvalid(f"output is nested {depth} deep; the limit is {MAX_OUTPUT_DEPTH}")


def _no_constant(name: str) -> Any:
    raise OutputInvalid(f"output holds {name}, which JSON does not allow")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise OutputInvalid(f"output holds the number {text}, which overflows a float")
    return value


def decode_output(text: str) -> Any:
    """The value of a worker's `output_json`, parsed as hostile data; `OutputInvalid` if it is
    over a limit, not strict JSON (NaN, Infinity, 1e400), or not storable (lone surrogates)."""
    check_output_text(text)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        pydantic_core.to_json(value)  # what the store will do with it: surrogates fail here
    except OutputInvalid:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise OutputInvalid(f"output is not storable JSON: {type(exc).__name__}: {exc}") from None
    return value


def encode_frame(message: BaseModel) -> bytes:
    data = message.model_dump_json().encode("utf-8")
    return HEADER.pack(len(data)) + data


# -- blocking pipe I/O (the worker's side; the parent's deadline-aware versions follow) ---------
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
    try:
        data = encode_frame(reply)
    except ValueError:  # a harness's error message with lone surrogates (surrogateescape)
        assert reply.error is not None  # output_json is json.dumps's ASCII
        message = reply.error.message.encode("utf-8", "backslashreplace").decode("utf-8")
        error = reply.error.model_copy(update={"message": message})
        data = encode_frame(reply.model_copy(update={"error": error}))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- deadline-aware pipe I/O (the parent's side, for `Sandbox`; its ends are non-blocking) -----
class PipeTimeout(Exception):
    """The deadline passed before the worker's pipe was ready."""


class PipeClosed(Exception):
    """The worker closed its end of a pipe, or sent a frame it never would."""


class FrameTooLarge(PipeClosed):
    """The worker declared a reply frame over `MAX_REPLY_FRAME`: never something it writes."""

    def __init__(self, size: int):
        super().__init__(f"a reply frame of {size} bytes; the limit is {MAX_REPLY_FRAME}")
        self.size = size


def _poll(fd: int, events: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, events)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PipeTimeout
        if poller.poll(max(1, int(remaining * 1000))):
            return


def _read_exact_by(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _poll(fd, select.POLLIN, deadline)
        try:
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise PipeClosed
        buf += chunk
    return bytes(buf)


def read_frame(fd: int, deadline: float) -> bytes:
    """The next frame's payload from the worker."""
    (size,) = HEADER.unpack(_read_exact_by(fd, HEADER.size, deadline))
    if size > MAX_REPLY_FRAME:  # refused from the header alone: nothing of it is read
        raise FrameTooLarge(size)
    return _read_exact_by(fd, size, deadline)


def write_frame(fd: int, data: bytes, deadline: float) -> None:
    """All of `data` (an `encode_frame` result) to the worker."""
    view = memoryview(data)
    while view:
        _poll(fd, select.POLLOUT, deadline)
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except BrokenPipeError as err:
            raise PipeClosed from err


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


def _prefer_for_oom() -> None:
    """Make this worker the OOM killer's first choice, before the loop and the endpoint: raising
    one's own score needs no privilege. Without a writable /proc it stays as it was."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def _limit_resources(config: WorkerConfig) -> None:
    _prefer_for_oom()
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
    http_client = None
    if config.policy_socket is not None:  # the bridge stamps the episode and adapter itself
        import httpx

        http_client = httpx.Client(
            transport=httpx.HTTPTransport(uds=config.policy_socket), timeout=config.timeout_s
        )
    client = openai.OpenAI(
        base_url=config.policy_url,
        api_key=API_KEY,
        default_headers={ADAPTER_HEADER: config.adapter},
        timeout=config.timeout_s,
        http_client=http_client,
    )
    # platform.platform() runs `uname -p` in a subprocess on the first request; do it now,
    # before the guard would refuse it.
    client.platform_headers()
    return client


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
    try:
        check_output_text(text)  # the parent checks again; this gives an honest harness the reason
    except OutputInvalid as exc:
        return WorkerReply(error=RolloutError(kind=ErrorKind.invalid_output, message=str(exc)))
    return WorkerReply(output_json=text)


# -- the two phases: start, then serve ---------------------------------------------------------
SolveFn = Callable[[dict[str, Any], Any], Any]


def _load(config: WorkerConfig, guard: AuditGuard) -> tuple[ModuleType | None, WorkerReply]:
    _cpu_backstop(config.startup_timeout_s, guard)
    try:
        module = load_harness(config.harness_path, name=HARNESS_MODULE)
    except HarnessInvalid as exc:
        error = RolloutError(kind=ErrorKind.crash, message=f"harness invalid: {exc}")
        return None, WorkerReply(error=error)
    except BaseException as exc:  # a harness that fails to import is data too
        error = _classify(exc, guard, config)
        message = f"harness failed to import: {error.message}"
        return None, WorkerReply(error=error.model_copy(update={"message": message}))
    return module, WorkerReply()


def _read_cached(path: str | None) -> Any:
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # written by this harness's own earlier worker
    except Exception as exc:  # a state that does not load back: set up afresh
        print(f"[sialoop sandbox] setup state not read back: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return None


def _cache(state: Any) -> bool:
    try:
        with open(SETUP_STATE_NAME, "wb") as f:  # cwd is the scratch dir
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # unpicklable, or past the file-size limit: not an error
        with suppress(OSError):
            os.remove(SETUP_STATE_NAME)
        print(f"[sialoop sandbox] setup state not cached: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def _setup(module: ModuleType, config: WorkerConfig, guard: AuditGuard) -> WorkerReply:
    """Run the harness's `setup` once, in its own CPU budget; an error of kind `setup`."""
    setup = getattr(module, "setup", None)
    if setup is None or not config.run_setup:
        return WorkerReply()
    _cpu_backstop(config.setup_timeout_s, guard)
    guard.blocked.clear()
    takes_cached = setup_takes_cached(setup)
    cached = _read_cached(config.setup_cache) if takes_cached else None
    try:
        state = setup(cached) if takes_cached else setup()
    except BaseException as exc:
        error = _classify(exc, guard, config)
        message = f"setup failed ({error.kind.value}): {error.message}"
        return WorkerReply(error=RolloutError(kind=ErrorKind.setup, message=message))
    if guard.blocked:
        blocked = "; ".join(guard.blocked[:3])
        message = f"setup failed (forbidden): blocked by the sandbox: {blocked}"
        return WorkerReply(error=RolloutError(kind=ErrorKind.setup, message=message))
    fresh = takes_cached and cached is None and state is not None
    return WorkerReply(setup_cached=fresh and _cache(state))


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
    guard = install_guard(config)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    module, imported = _load(config, guard)
    _flush()
    _send(reply_fd, imported)
    if module is None:
        return 1
    ready = _setup(module, config, guard)
    _flush()
    _send(reply_fd, ready)
    if ready.error is not None:
        return 1
    solve = module.solve
    while (raw := _receive(request_fd)) is not None:
        reply = _run_instance(WorkerRequest.model_validate_json(raw), solve, llm, guard, config)
        _flush()
        _send(reply_fd, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
