"""Run a harness's `solve` on many instances in one long-lived, limited child process.

`Sandbox` starts one worker (`python -m sialoop.harness.worker`) per object, which imports the
harness once and runs its optional `setup` once (the contract is in `harness/program.py`), so
module-level state (a fitted retriever, loaded examples) is reused across instances. Every
failure becomes a `SandboxResult` with an `ErrorKind`; the loop never dies of a harness. After a
timeout, a crash of the worker or a memory error the worker's whole process group is killed and
a fresh worker is started for the next instance (setup runs again there, warm when it returned
a state to cache, and never on an instance's clock).

Setup: imports get `startup_timeout_s`, setup `setup_timeout_s`, instances `timeout_s`, each
its own budget, and an instance's clock starts only once its worker is ready. A setup that
raises, is refused by the guard, kills its worker or runs out of time answers every later
instance of this Sandbox with ErrorKind.setup at once, without running again.

Infrastructure failures (`RolloutError.infra`): a worker killed by SIGKILL that the sandbox
did not send (the kernel's OOM killer, a kill from outside) and a timeout on the first instance
of a freshly (re)started worker are the machine's fault, not the harness's. Such an instance is
retried once in a fresh worker (`SandboxResult.attempts` = 2; the LLM calls of the failed
attempt stay in the episode). A timeout in a warm worker, an exception, an invalid output or
any other death is the harness's and is not retried. A harness that SIGKILLs itself is taken
for the OOM killer: it is retried once, then recorded as an infrastructure failure.

Isolation (`isolation=`: "guard", the default here; "namespaces"; or "auto", namespaces where
bubblewrap works and the guard otherwise, with a one-time warning; "namespaces" without
bubblewrap is a ConfigError naming `apt-get install -y bubblewrap`). `Sandbox.isolation` says
which one ran. Under "namespaces" (`harness/isolation.py`) every worker runs under bubblewrap.
Guaranteed there, also against a harness that attacks the sandbox with native code, up to kernel
and bubblewrap bugs:
- New user, mount, pid, ipc, uts, cgroup and network namespaces, `--die-with-parent`, a new
  session, no capabilities, no further user namespaces; uid/gid 65534 inside.
- A filesystem of only: /usr and the /bin, /lib* links, a few /etc files (ld.so, ssl,
  localtime, hosts, alternatives), the interpreter's prefix, the venv and the package's own
  source directory (the repo's src/, none of the rest of the repo), the harness file, the
  task's public folder, all read-only; the worker's scratch dir (`/sialoop/work`, cwd and HOME)
  read-write; a private tmpfs /tmp of 4 x `file_size_mb`; a /proc of its own pid namespace.
  The data roots, the run directory and run.db, other runs and other workers' scratch dirs,
  the home folder and every process outside do not exist there.
- No network but an empty loopback. The policy endpoint is reached only through a Unix socket
  (`isolation.PolicyBridge`), which forwards paths under /v1/ and answers anything else 403 (the
  admin route is unreachable), sets the episode id, the adapter and the API key itself on every
  call whatever the harness sent, and refuses calls between instances (409).
- Timeouts and closes SIGKILL bubblewrap, which takes the whole pid namespace with it (setsid
  does not help). Tasks are capped by a pids cgroup of `max_processes` + 8 where one can be
  made (root with a writable /sys/fs/cgroup); the rlimits below still apply.
- The audit guard still runs inside as a tripwire, but subprocesses, forks and signals to the
  sandbox's own processes are allowed: they die with it. So torch.compile works (g++ from /usr,
  its cache in the scratch dir; precompiled headers off, as they exceed the file-size limit).
Not guaranteed there: the scratch dir's total size (only each file's); a pids cgroup when one
cannot be made (RLIMIT_NPROC is then not enforced for a root-mapped uid); resident memory and
CPU share (rlimits only); the harness's threads between instances run on (their calls are
refused); the worker's pid inside is not its host pid (`worker_pid` is bubblewrap's).

Under "guard" everything below holds and, of the above, only the policy bridge: the worker's
client talks to the bridge's Unix socket, the guard lets it connect to nothing else (not the
endpoint's TCP port), and the bridge stamps the episode, adapter and key and refuses calls
between instances, as under namespaces (native code can still connect elsewhere).

Guaranteed (for a harness that does not deliberately attack the sandbox):
- Wall-clock `timeout_s` per instance, enforced by the parent: SIGKILL to the worker's whole
  process group. A soft RLIMIT_CPU and a parent-death watchdog stop orphaned workers.
- RLIMIT_AS (`memory_mb`; an allocation past it raises MemoryError), RLIMIT_FSIZE
  (`file_size_mb`; a bigger write fails with EFBIG), RLIMIT_CORE=0, RLIMIT_NPROC.
- A fresh scratch directory per worker as cwd, HOME and TMPDIR, deleted when the worker is
  replaced or the sandbox closes; the task's `public_dir` linked in as `public/`.
- An environment of PATH, locale, PYTHONPATH, HOME/TMPDIR and one-thread caps for BLAS/OpenMP:
  no API keys or tokens from the parent's environment.
- An audit hook (`guard.AuditGuard`) refusing, with PermissionError and ErrorKind.forbidden
  even if the harness catches it: fork/exec/spawn/subprocess/system (including
  `_posixsubprocess.fork_exec`, which multiprocessing and joblib's loky use); connecting or
  sending to anything but the policy bridge's socket; binding outside loopback; DNS
  lookups of other names; raw sockets; writes, deletes, renames and chmods outside the scratch
  directory (so `public/` is read-only); reads of other processes' `/proc/<pid>` (their
  environment) and of the usual secrets locations in the parent's HOME; signals to other
  processes; changing resource limits.
- The harness's stdout and stderr (Python and native) are captured per instance, up to
  `max_log_bytes`, and never mixed with the parent-worker protocol (dedicated pipes).
- Each `Sandbox` is safe to use from several threads (calls are serialised) and shares no
  state with other `Sandbox` objects; no global state, no signal handlers in the parent.

Not guaranteed: this is not a security boundary against a determined attacker. There is no
seccomp filter, no namespace, no chroot and no separate user. `ctypes` (or any native code)
calls libc directly and bypasses the audit hook: it can fork, exec, open sockets and write
anywhere the user can. Python code can also find and edit the hook's state through `gc`. What
remains then is the resource limits and the process-group kill on timeout, which misses a
child that calls setsid(). RLIMIT_NPROC is not enforced by the kernel for root, and counts all
of the user's tasks otherwise (the limit is headroom above the count when the worker starts).
Files readable by the user outside the denied locations (secrets locations and the caller's
`deny_read`: the loop passes the task's private data, the run's database and its lock file) stay
readable. Total disk usage is not limited, only the size of each file. Memory is address space,
not resident memory, and does not cover the page cache. A harness can keep threads running after
`solve` returns; their output lands in the next instance's logs. A cached setup state is a
pickle the harness wrote and only its own next worker reads; the parent never loads it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import sialoop
from sialoop.errors import ConfigError, DataError
from sialoop.harness import isolation as iso
from sialoop.harness.program import HarnessInvalid
from sialoop.harness.worker import (
    SETUP_STATE_NAME,
    FrameTooLarge,
    OutputInvalid,
    PipeClosed,
    PipeTimeout,
    WorkerConfig,
    WorkerReply,
    WorkerRequest,
    decode_output,
    encode_frame,
    read_frame,
    write_frame,
)
from sialoop.records import ErrorKind, Record, RolloutError, new_id

_EXIT_GRACE_S = 1.0  # after EOF, how long a dying worker gets to exit with its own status
_MAX_MESSAGE_CHARS = 20_000  # of an error message from the worker (ours are a few KB)
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_FIXED_ENV = {
    "PYTHONUNBUFFERED": "1",  # logs up to a kill are kept
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "JOBLIB_MULTIPROCESSING": "0",  # joblib runs serially instead of trying to spawn
    "LOKY_MAX_CPU_COUNT": "1",  # loky would run `lscpu` to count cores
}
# Locations under the parent's HOME where credentials usually live.
_SECRET_NAMES = (
    ".ssh", ".aws", ".azure", ".config", ".docker", ".gnupg", ".kube", ".netrc",
    ".git-credentials", ".pypirc", ".cache/huggingface", ".huggingface", ".env",
)  # fmt: skip


class SandboxLimits(BaseModel):
    """Limits for one harness worker (per instance where it says so)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    timeout_s: float = Field(default=60.0, gt=0)  # wall clock per instance
    memory_mb: int = Field(default=4096, ge=256)  # address space of the worker
    file_size_mb: int = Field(default=64, ge=1)  # largest file the worker may write
    max_processes: int = Field(default=64, ge=1)  # RLIMIT_NPROC headroom (not for root)
    startup_timeout_s: float = Field(default=120.0, gt=0)  # import of the harness
    setup_timeout_s: float = Field(default=600.0, gt=0)  # the harness's `setup`, once per worker
    max_log_bytes: int = Field(default=16_000, ge=0)  # captured stdout+stderr per instance
    max_start_failures: int = Field(default=3, ge=1)  # consecutive, then stop retrying


class SandboxResult(Record):
    """One instance: the output (parsed back from JSON) or the error, never both."""

    output: Any = None
    error: RolloutError | None = None
    logs: str = ""
    seconds: float  # of the last attempt, from its worker being ready
    attempts: int = 1  # 2 when the first failed for the machine's reasons (error.infra)


class _WorkerGone(Exception):
    def __init__(self, error: RolloutError):
        super().__init__(error.message)
        self.error = error


# -- the child process -------------------------------------------------------------------------
def _worker_env(workdir: Path) -> dict[str, str]:
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    # The worker must import this very sialoop, installed or not.
    paths = [str(Path(sialoop.__file__).resolve().parent.parent)]
    paths += [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env |= _FIXED_ENV
    env |= {
        "HOME": str(workdir),
        "TMPDIR": str(workdir / "tmp"),
        "PYTHONPATH": os.pathsep.join(paths),
    }
    return env


def _secret_paths() -> tuple[str, ...]:
    home = Path.home()
    return (*(str(home / name) for name in _SECRET_NAMES), str(Path.cwd() / ".env"))


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0] if err.errors() else {"msg": "invalid"}
    return f"malformed reply: {first.get('msg', 'invalid')}"[:300]


def _death(code: int, during: str) -> RolloutError:
    """Why a worker that closed its pipe died, from its exit status."""
    if code >= 0:
        message = f"the worker exited with code {code} {during} (os._exit, or a fatal error)"
        return RolloutError(kind=ErrorKind.killed, message=message)
    sig = -code
    name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    if sig == signal.SIGXCPU:
        message = f"the worker hit its CPU-time backstop {during} (SIGXCPU)"
        return RolloutError(kind=ErrorKind.timeout, message=message)
    if sig == signal.SIGKILL:  # the sandbox's own kills are timeouts and closes, told apart
        message = (
            f"the worker died of SIGKILL {during} (the kernel's OOM killer, or a kill from outside)"
        )
        return RolloutError(kind=ErrorKind.killed, message=message, infra=True)
    hint = {
        signal.SIGXFSZ: " (file-size limit)",
        signal.SIGSEGV: " (native code crashed)",
        signal.SIGABRT: " (native code aborted)",
    }.get(sig, "")
    return RolloutError(kind=ErrorKind.killed, message=f"the worker died of {name} {during}{hint}")


class _Worker:
    """One live child: its process, the parent's ends of the two pipes, its scratch dir.

    The isolation strategy wraps the command line: under namespaces `proc` is bubblewrap (or
    the shell that moves itself into the worker's pids cgroup and execs it), whose death takes
    the whole pid namespace with it."""

    def __init__(
        self, env: dict[str, str], log_path: Path, isolation: iso.Guard, spec: iso.WorkerSpec
    ):
        self.workdir = spec.workdir
        self.isolation = isolation
        request_r, self.request_fd = os.pipe()
        self.reply_fd, reply_w = os.pipe()
        argv = [sys.executable, "-P", "-m", "sialoop.harness.worker", str(request_r), str(reply_w)]
        argv, self.cgroup = isolation.launch(argv, spec)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                pass_fds=(request_r, reply_w),
                start_new_session=True,  # its own process group, killed as one
            )
        except BaseException:
            os.close(self.request_fd)
            os.close(self.reply_fd)
            if self.cgroup is not None:
                self.cgroup.remove()
            raise
        finally:
            for fd in (request_r, reply_w, log_fd):
                os.close(fd)
        os.set_blocking(self.request_fd, False)
        os.set_blocking(self.reply_fd, False)

    def signal_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.cgroup is not None:  # bubblewrap's death kills the pid namespace; this too
            self.cgroup.kill()

    def stop(self, grace_s: float = 0.0) -> int:
        """Kill the process group (after `grace_s` for the worker to exit by itself), reap the
        worker, close the pipes and delete the scratch dir; the worker's exit status."""
        if grace_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        self.signal_group()  # also when the worker exited: strays in its group go too
        code = self.proc.wait()
        code = self.isolation.exit_status(code)
        if self.cgroup is not None:
            self.cgroup.remove()
        for fd in (self.request_fd, self.reply_fd):
            with contextlib.suppress(OSError):  # closed by an earlier stop()
                os.close(fd)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code


class Sandbox:
    """One harness worker at a time, answering `solve(instance, episode_id)` in sequence.

    The worker starts on the first `solve` (or `start`) and is replaced after any failure that
    leaves it suspect. After `max_start_failures` consecutive failed starts the sandbox stops
    retrying and answers every instance with the last start error at once. `policy_url=None`
    gives the harness `llm=None` and no network at all. Use as a context manager (or call
    `close`); see the module docstring for what is and is not contained.
    """

    def __init__(
        self,
        harness_path: str | Path,
        *,
        policy_url: str | None,
        adapter: str,
        limits: SandboxLimits | None = None,
        public_dir: str | Path | None = None,
        scratch_root: str | Path,
        deny_read: tuple[str | Path, ...] = (),
        run_setup: bool = True,
        isolation: str = "guard",
    ):
        iso.resolve_isolation(isolation)  # a ConfigError when "namespaces" is unavailable
        self._harness = Path(harness_path).resolve()
        if not self._harness.is_file():
            raise HarnessInvalid(f"harness file not found: {self._harness}")
        if policy_url is not None:
            parts = urlsplit(policy_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"policy_url must be an http(s) URL, not {policy_url!r}")
        self._public = Path(public_dir).resolve() if public_dir is not None else None
        if self._public is not None and not self._public.is_dir():
            raise DataError(f"public directory not found: {self._public}")
        self._policy_url, self._adapter = policy_url, adapter
        self._iso = iso.make_isolation(isolation, policy_url, adapter)  # starts the workers
        self._limits = limits or SandboxLimits()
        self._dir = Path(scratch_root).resolve() / new_id("sandbox")
        self._dir.mkdir(parents=True)
        self._log = self._dir / "worker.log"
        self._setup_state = self._dir / "setup-state.pkl"  # the harness's, never read here
        self._run_setup = run_setup
        # Private task data and the run's own database hold labels a harness must not read.
        self._deny = _secret_paths() + tuple(str(Path(p).resolve()) for p in deny_read)
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._pending: _Worker | None = None  # starting (importing, in setup), not yet ready
        self._served = 0  # instances the live worker has answered
        self._starts = 0
        self._start_failures = 0
        self._start_error: RolloutError | None = None
        self._setup_error: RolloutError | None = None  # sticky: setup is not re-run per item
        self._closing = False  # set without the lock by close(): its kill is no machine fault
        self._closed = False

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def isolation(self) -> str:
        """Which isolation the worker runs under: "namespaces" (bubblewrap) or "guard"."""
        return self._iso.name

    @property
    def starts(self) -> int:
        """How many workers this sandbox has started (1 + restarts)."""
        return self._starts

    @property
    def worker_pid(self) -> int | None:
        """The live worker's pid, which is also its process group and session id."""
        worker = self._worker
        return worker.proc.pid if worker is not None else None

    @property
    def workdir(self) -> Path | None:
        """The live worker's scratch dir as this process sees it (a program task reads the
        files its trusted wrapper writes there), or None between workers."""
        worker = self._worker
        return worker.workdir if worker is not None else None

    def start(self) -> RolloutError | None:
        """Start the worker now unless one is running; why it could not start, or None."""
        with self._lock:
            self._check_open()
            return self._ensure_worker()

    def solve(self, instance: dict[str, Any], episode_id: str) -> SandboxResult:
        """Run `solve(instance, llm)` in the worker; failures are results, not exceptions.

        Raises only for the caller's mistakes: an instance that is not a JSON object
        (pydantic's errors) or a closed sandbox (RuntimeError).
        """
        request = encode_frame(WorkerRequest(instance=instance, episode_id=episode_id))
        with self._lock:
            self._check_open()
            with self._iso.episode(episode_id):  # the bridge stamps it on every call
                return self._solve(request)

    def _solve(self, request: bytes) -> SandboxResult:
        result = self._attempt(request)
        if result.error is None or not result.error.infra:
            return result
        if self._closing:  # our own kill: not the machine's
            return result.model_copy(
                update={"error": result.error.model_copy(update={"infra": False})}
            )
        first = result.error.message.splitlines()[0]
        retried = self._attempt(request)
        note = (
            f"[sialoop sandbox] attempt 1 failed ({result.error.kind.value}: {first}); "
            "retried once in a fresh worker\n"
        )
        return retried.model_copy(update={"attempts": 2, "logs": note + retried.logs})

    def _attempt(self, request: bytes) -> SandboxResult:
        self._clear_log()
        started = time.monotonic()
        error = self._ensure_worker()
        if error is not None:
            return self._result(None, error, started)
        started = time.monotonic()  # the instance's clock starts once its worker is ready
        try:
            reply = self._exchange(request)
        except _WorkerGone as gone:
            return self._result(None, gone.error, started)
        if reply.restart:
            self._stop_worker()
        if reply.error is not None:
            return self._result(None, reply.error, started)
        if reply.output_json is None:  # our worker never sends this; a harness might
            error = RolloutError(kind=ErrorKind.killed, message="the worker sent no output")
            return self._result(None, error, started)
        return self._decoded(reply.output_json, started)

    def close(self) -> None:
        """Kill the worker (an in-flight `solve` returns ErrorKind.killed) and delete the
        sandbox's scratch files. Idempotent; safe from another thread, and quick: a worker still
        starting or in setup is killed too."""
        self._closing = True
        for worker in (self._worker, self._pending):
            if worker is not None:
                worker.signal_group()  # without the lock, so an in-flight solve ends now
        with self._lock:
            self._closed = True
            self._stop_worker()
            self._iso.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- internals (called with the lock held) -------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Sandbox is closed")

    def _ensure_worker(self) -> RolloutError | None:
        if self._setup_error is not None:
            return self._setup_error
        if self._worker is not None:
            if self._worker.proc.poll() is None:
                return None
            self._stop_worker()  # it died between instances (a stray thread, a kill)
        if (
            self._start_error is not None
            and self._start_failures >= self._limits.max_start_failures
        ):
            message = f"not restarted after {self._start_failures} failed starts; last: "
            return self._start_error.model_copy(
                update={"message": message + self._start_error.message}
            )
        error = self._start_worker()
        self._start_failures = 0 if error is None else self._start_failures + 1
        self._start_error = error
        return error

    def _spec(self, workdir: Path) -> iso.WorkerSpec:
        return iso.WorkerSpec(
            harness=self._harness,
            public=self._public,
            workdir=workdir,
            setup_state=self._setup_state if self._setup_state.is_file() else None,
            has_policy=self._policy_url is not None,
            file_size_mb=self._limits.file_size_mb,
            max_processes=self._limits.max_processes,
        )

    def _worker_config(self, spec: iso.WorkerSpec) -> WorkerConfig:
        limits = self._limits
        return WorkerConfig(
            harness_path=str(self._harness),
            policy_url=self._policy_url,
            adapter=self._adapter,
            workdir=str(spec.workdir),
            timeout_s=limits.timeout_s,
            startup_timeout_s=limits.startup_timeout_s,
            setup_timeout_s=limits.setup_timeout_s,
            run_setup=self._run_setup,
            setup_cache=str(spec.setup_state) if spec.setup_state is not None else None,
            memory_mb=limits.memory_mb,
            file_size_mb=limits.file_size_mb,
            max_processes=limits.max_processes,
            deny_read=self._deny,
        ).model_copy(update=self._iso.config(spec))  # the paths as the worker sees them

    def _start_worker(self) -> RolloutError | None:
        self._starts += 1
        workdir = self._dir / f"work-{self._starts}"
        (workdir / "tmp").mkdir(parents=True)
        if self._public is not None:
            target = self._iso.public_link(self._public)
            (workdir / "public").symlink_to(target, target_is_directory=True)
        spec = self._spec(workdir)
        config = self._worker_config(spec)
        worker = _Worker(self._iso.env(_worker_env(workdir), workdir), self._log, self._iso, spec)
        self._pending = worker  # close() kills it from another thread
        if self._closing:  # close() ran before it could see this worker
            worker.signal_group()
        try:
            error = self._handshake(worker, config)
        finally:
            self._pending = None
        if error is not None:
            if error.kind is ErrorKind.setup:
                self._setup_error = error
            return error
        state = workdir / SETUP_STATE_NAME
        if state.is_file():  # only a fresh setup's state is pickled; keep it for restarts
            with contextlib.suppress(OSError):
                os.replace(state, self._setup_state)
        self._worker, self._served = worker, 0
        return None

    def _handshake(self, worker: _Worker, config: WorkerConfig) -> RolloutError | None:
        """Send the config, then wait for the import (`startup_timeout_s`) and for setup
        (`setup_timeout_s`); why the worker is not ready (it is stopped then), or None."""
        limits, during = self._limits, "while starting"
        try:
            deadline = time.monotonic() + limits.startup_timeout_s
            write_frame(worker.request_fd, encode_frame(config), deadline)
            reply = WorkerReply.model_validate_json(read_frame(worker.reply_fd, deadline))
            if reply.error is None:
                during = "during setup"
                deadline = time.monotonic() + limits.setup_timeout_s
                reply = WorkerReply.model_validate_json(read_frame(worker.reply_fd, deadline))
        except PipeTimeout:
            worker.stop()
            if during == "during setup":
                message = f"setup did not finish within {limits.setup_timeout_s:g} s"
                return RolloutError(kind=ErrorKind.setup, message=message)
            message = (
                f"the worker did not start within {limits.startup_timeout_s:g} s "
                "(slow module-level code in the harness? one-time work belongs in `setup`)"
            )
            return RolloutError(kind=ErrorKind.timeout, message=message)
        except (FrameTooLarge, ValidationError) as err:  # hostile: our worker never sends these
            worker.stop()
            what = str(err) if isinstance(err, FrameTooLarge) else _first_error(err)
            message = f"the worker sent an invalid reply {during} ({what}); it was killed"
            kind = ErrorKind.setup if during == "during setup" else ErrorKind.invalid_output
            return RolloutError(kind=kind, message=message)
        except PipeClosed:
            error = _death(worker.stop(_EXIT_GRACE_S), during)
            last = self._read_log().strip().splitlines()[-1:]  # often the reason, e.g. a traceback
            note = f"; last log line: {last[0][:300]}" if last else ""
            error = error.model_copy(update={"message": error.message + note})
            if during == "during setup" and not error.infra and not self._closing:
                message = f"setup failed ({error.kind.value}): {error.message}"
                return RolloutError(kind=ErrorKind.setup, message=message)
            return error
        if reply.error is not None:  # the worker's word: never a machine fault, bounded in size
            worker.stop(_EXIT_GRACE_S)
            return reply.error.model_copy(
                update={"infra": False, "message": reply.error.message[:_MAX_MESSAGE_CHARS]}
            )
        return None

    def _exchange(self, request: bytes) -> WorkerReply:
        worker = self._worker
        assert worker is not None  # _ensure_worker() just succeeded
        deadline = time.monotonic() + self._limits.timeout_s
        try:
            write_frame(worker.request_fd, request, deadline)
            reply = WorkerReply.model_validate_json(read_frame(worker.reply_fd, deadline))
        except PipeTimeout:
            cold = self._served == 0  # a fresh worker's first instance: the machine, maybe
            self._stop_worker()
            message = (
                f"no answer within {self._limits.timeout_s:g} s"
                f"{' on a fresh worker' if cold else ''}; the worker's process group was killed"
            )
            error = RolloutError(kind=ErrorKind.timeout, message=message, infra=cold)
            raise _WorkerGone(error) from None
        except (FrameTooLarge, ValidationError) as err:  # hostile: our worker never sends these
            self._stop_worker()
            what = str(err) if isinstance(err, FrameTooLarge) else _first_error(err)
            message = f"the worker sent an invalid reply ({what}); it was killed"
            error = RolloutError(kind=ErrorKind.invalid_output, message=message)
            raise _WorkerGone(error) from None
        except PipeClosed:
            code = self._stop_worker(_EXIT_GRACE_S)
            raise _WorkerGone(_death(code, "during the instance")) from None
        self._served += 1
        if reply.error is not None:  # the worker's word: never a machine fault, bounded in size
            error = reply.error.model_copy(
                update={"infra": False, "message": reply.error.message[:_MAX_MESSAGE_CHARS]}
            )
            reply = reply.model_copy(update={"error": error})
        return reply

    def _stop_worker(self, grace_s: float = 0.0) -> int:
        worker, self._worker = self._worker, None
        return worker.stop(grace_s) if worker is not None else 0

    def _clear_log(self) -> None:
        # The worker appends (O_APPEND), so truncating between instances is safe.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self._log, 0)

    def _read_log(self) -> str:
        limit = self._limits.max_log_bytes
        try:
            with open(self._log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= limit:
                    data = f.read(limit)
                else:
                    head = f.read(limit // 2)
                    f.seek(size - limit // 2)
                    skipped = size - 2 * (limit // 2)
                    data = head + f"\n[... {skipped} bytes cut ...]\n".encode() + f.read()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", errors="replace")

    def _decoded(self, output_json: str, started: float) -> SandboxResult:
        """The output parsed as hostile data (`worker.decode_output`); invalid_output if not."""
        try:
            output = decode_output(output_json)
        except OutputInvalid as exc:
            error = RolloutError(kind=ErrorKind.invalid_output, message=str(exc))
            return self._result(None, error, started)
        return self._result(output, None, started)

    def _result(self, output: Any, error: RolloutError | None, started: float) -> SandboxResult:
        return SandboxResult(
            output=output,
            error=error,
            logs=self._read_log(),
            seconds=time.monotonic() - started,
        )
