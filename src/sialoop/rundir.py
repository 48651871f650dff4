"""A run directory that explains itself: `config.toml` (the resolved config), `README.md` (what
each file and folder is), `console.log` (everything the run printed, as plain text), and no
stale scratch folders.

`console_log` streams each printed line to the file as it is printed, so a run killed with
SIGKILL keeps its log up to its last line. It captures what goes through the console's
`print`, `log`, `rule` and `out` (every message and phase line of a run), not the live frames
of a terminal progress bar (each phase ends with a printed line instead).
"""

from __future__ import annotations

import math
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager, suppress
from functools import wraps
from pathlib import Path
from typing import Any

from rich.console import Console, NewLine
from rich.control import Control

from sialoop.runlock import LOCK_NAME
from sialoop.store import DB_NAME

CONFIG_NAME = "config.toml"
README_NAME = "README.md"
CONSOLE_LOG = "console.log"
SCRATCH = "scratch"
LOG_WIDTH = 150

# -- config.toml -------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str | Path):
        return _string(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"config value {v!r} ({type(v).__name__}) has no TOML form")


def to_toml(data: dict[str, Any], _prefix: str = "") -> str:
    """TOML for nested dicts of str, int, float, bool, lists and dicts; None values are left out
    (TOML has no null). Nested dicts become tables, dicts inside lists inline tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((f"{_prefix}{_key(str(k))}", v))
        else:
            lines.append(f"{_key(str(k))} = {_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        body = to_toml(table, f"{name}.")
        if body:
            lines.append(body.rstrip("\n"))
    return "\n".join(lines).lstrip("\n") + "\n"


# -- README.md ---------------------------------------------------------------------------------

TABLES = {
    "runs": "the run: task, status (running, finished, failed, interrupted), its reason, config",
    "versions": "every (harness, adapter) version with its parent, status (candidate, accepted, "
    "rejected, broken with its error) and detail (operator or training summary, the gate)",
    "trajectories": "one harness run on one item: output, score, error, logs, seconds, tokens",
    "llm_calls": "every request the policy endpoint served, by episode (= trajectory id)",
    "agent_calls": "every request of an LLM Meta-Agent or Feedback-Agent: prompt, reply, cost",
    "evaluations": "a version's score on a split (train, val, holdout, test), with n, errors, cost",
    "decisions": "the Feedback-Agent's choice per generation: lever, method, rationale, evidence",
}

FILES = {
    DB_NAME: "the run store (SQLite, WAL): the source of truth for every number in a report; "
    f"`{DB_NAME}-wal` and `{DB_NAME}-shm` are its write-ahead log and shared memory, part of it "
    "while a process has it open (copy all three, or none)",
    "harness/": "one file per harness version, `<version_id>.py` (v0 is a copy of the task's "
    "reference harness or of the `harness=` file)",
    "adapters/": "one peft LoRA adapter folder per weights version (`<version_id>/adapter`, and "
    "`<version_id>/checkpoint` while it trains)",
    "public/": "the task's public files: the only task data a harness can read",
    f"{SCRATCH}/": "one `sandbox-<id>/` folder per harness sandbox (one per rollout worker): its "
    "`worker.log`, the harness's setup state, and `work-<n>/` (cwd, HOME and TMPDIR of each "
    "worker start); removed when the phase ends and on resume, so nothing in it is kept",
    CONFIG_NAME: "the run's resolved config (every default filled in), as TOML; "
    "`sialoop run --config` reads it",
    CONSOLE_LOG: "everything the run's commands printed (run, resume, eval), as plain text, "
    "appended",
    LOCK_NAME: "the one-writer lock: an OS file lock (flock) held by the process driving the run, "
    "which writes its pid, command and start time into it; the kernel drops the lock when "
    "that process dies, so a stored `running` without a holder reads as `interrupted`",
    README_NAME: "this file",
}


def _tables(root: Path) -> list[str]:
    """The tables of the run's database, or the known ones when it does not exist yet."""
    db = root / DB_NAME
    if not db.exists():
        return list(TABLES)
    uri = f"file:{db}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY rowid"
        ).fetchall()
    return [r[0] for r in rows] or list(TABLES)


def readme(root: Path, task_summary: str) -> str:
    tables = "\n".join(f"  - `{t}`: {TABLES.get(t, '(see store.py)')}" for t in _tables(root))
    files = "\n".join(f"- `{name}`: {what}" for name, what in FILES.items())
    db_line = f"- `{DB_NAME}` tables:\n{tables}"
    return (
        f"# sialoop run `{root.name}`\n\n{task_summary.strip()}\n\n"
        "## What is here\n\n"
        f"{files}\n{db_line}\n\n"
        "## Commands\n\n"
        f"- `sialoop report {root}` (add `--json` for everything, config included)\n"
        f"- `sialoop resume {root}` continues the run where it stopped\n"
        f"- `sialoop eval {root} --split test` scores the best version on test (once)\n"
    )


def write_run_files(root: Path, config: dict[str, Any], task_summary: str) -> None:
    """Write `config.toml` and `README.md` into the run directory (replacing older ones)."""
    for name, text in ((CONFIG_NAME, to_toml(config)), (README_NAME, readme(root, task_summary))):
        tmp = root / (name + ".partial")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(root / name)


# -- console.log -------------------------------------------------------------------------------

_TEED = ("print", "log", "rule", "out")


@contextmanager
def console_log(console: Console, root: Path) -> Iterator[Path]:
    """Tee everything printed through `console` into `root/console.log` (appended, plain text,
    one write per printed block) for the duration of the block; yields the log's path."""
    path = root / CONSOLE_LOG
    with path.open("a", encoding="utf-8", buffering=1) as file:
        log = Console(
            file=file,
            width=LOG_WIDTH,
            no_color=True,
            color_system=None,
            force_terminal=False,
            force_jupyter=False,
            log_path=False,
            emoji=False,
        )
        saved = {name: console.__dict__.get(name) for name in _TEED}
        for name in _TEED:
            setattr(console, name, _tee(getattr(console, name), getattr(log, name)))
        try:
            yield path
        finally:
            for name, before in saved.items():
                if before is None:
                    console.__dict__.pop(name, None)
                else:
                    setattr(console, name, before)


def _tee(shown: Callable[..., Any], logged: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(shown)
    def both(*args: Any, **kwargs: Any) -> Any:
        if shown.__name__ == "log":  # its caller, not this wrapper, is the line it names
            kwargs = {**kwargs, "_stack_offset": kwargs.get("_stack_offset", 1) + 1}
        result = shown(*args, **kwargs)
        if all(isinstance(a, Control | NewLine) for a in args):
            return result  # a live display's cursor moves and blank lines: nothing to log
        with suppress(OSError, ValueError):  # a full disk or a closed log never stops the run
            logged(*args, **kwargs)
        return result

    return both


# -- scratch -----------------------------------------------------------------------------------


def remove_scratch(root: Path, keep: Iterable[str] = ()) -> list[Path]:
    """Delete what is under `root/scratch` except the entries named in `keep`; the removed
    paths. Call it when no phase is running (at a phase's end, or on resume before work starts):
    a live sandbox's folder would be removed under it."""
    scratch = root / SCRATCH
    if not scratch.is_dir():
        return []
    kept, removed = set(keep), []
    for entry in sorted(scratch.iterdir()):
        if entry.name in kept:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
