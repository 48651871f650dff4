"""The sandbox worker's audit hook: `AuditGuard` (what a harness may not do) and its installer."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

# For annotations only: the worker imports this module while it runs as __main__, so importing
# sialoop.harness.worker here at run time would load the worker a second time.
if TYPE_CHECKING:
    from sialoop.harness.worker import WorkerConfig

_MAX_BLOCKED = 20  # blocked events remembered per instance (a loop can trigger thousands)
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
        # Under namespaces the endpoint is a Unix socket (the bridge) and there is no DNS.
        self._socket = getattr(config, "policy_socket", None)
        self._subprocess = bool(getattr(config, "allow_subprocess", False))
        self._port, self._hosts = (
            (-1, frozenset()) if self._socket else policy_hosts(config.policy_url)
        )
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
        # Under namespaces /tmp is the sandbox's own size-capped tmpfs.
        self._writable = (self._workdir, "/tmp") if self._subprocess else (self._workdir,)
        if self._subprocess:  # inside a pid namespace: children die with it
            del self._handlers["os.kill"], self._handlers["os.killpg"]
        else:
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
        for place in self._writable:
            if real == place or real.startswith(place + os.sep):
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
        if self._socket and sock.family == socket.AF_UNIX and address == self._socket:
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


def install_guard(config: WorkerConfig) -> AuditGuard:
    """Installs the hook for the rest of the process's life (audit hooks cannot be removed)."""
    import _posixsubprocess  # multiprocessing and loky call its fork_exec without an audit event

    guard = AuditGuard(config)
    if not guard._subprocess:
        _posixsubprocess.fork_exec = guard.refuse_fork_exec
    sys.addaudithook(guard)
    return guard
