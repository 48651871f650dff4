"""Running a SIA-layout folder's own programs unchanged: its reference agent inside the sandbox
worker (`run_reference_agent`, called by the harness `FolderTask.reference_harness` writes), and
its evaluator outside it (`EvaluatorProcess` over `serve_evaluator`, used by `FolderTask.score`);
and reading and writing the folder's data files (`read_table`, `table_text`).

The reference agent is a script (`--dataset_dir D --working_dir W`, writes `W/submission.csv`).
`run_reference_agent` gives it a dataset view holding one item and runs its `main()` with:
- `openai.OpenAI` / `openai.AsyncOpenAI` (module attributes, names the agent bound to them, and
  client objects it built at import) replaced by subclasses that always use the episode's `llm`
  base_url, api key and `X-Sialoop-*` headers, and send `model="policy"` whatever model the agent
  names: every call is recorded under the episode. `anthropic.Anthropic`, when the agent
  imported anthropic, is replaced by a text-only shim over the same endpoint's chat API.
- dummy values for the API-key variables the agent reads (named in `view["env_keys"]`) that are
  unset, and `sys.argv` set for its argparse; all three are restored after each instance.

Not guaranteed: a client built some other way (raw httpx, another SDK, a subprocess) is not
routed and the sandbox refuses its network access. The anthropic shim maps `system`, text
content blocks, `max_tokens`, `temperature`, `top_p` and `stop_sequences`, and nothing else
(no tools: such an agent stops after its first turn). Everything here is process-global while
`main()` runs, so a harness must not run two agents at once in threads.

This module imports only the standard library at the top: the evaluator server runs it as a
script (`python -P folder_adapter.py --serve-evaluator`) without importing sialoop.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

POLICY_MODEL = "policy"
POLICY_SOCKET_ENV = "SIALOOP_POLICY_SOCKET"  # set by the sandbox under namespace isolation
_HEADER_PREFIX = "x-sialoop-"
_DUMMY_KEY = "sialoop-policy"
# SDK arguments that would override the base_url (newer openai clients take them).
_DROPPED_KWARGS = ("provider", "data_residency", "websocket_base_url", "workload_identity")
JSON_SUBMISSIONS = ("submission*.json", "results/*.json", "responses*.json", "results*.json")


class AgentFailed(RuntimeError):
    """The reference agent exited with an error status or wrote no usable submission."""


# -- the folder's data files ---------------------------------------------------------------------
MAP_ID, MAP_LABEL = "id", "label"  # the columns a JSON {id: answer} object is read as


@dataclass(frozen=True)
class Table:
    """One data file read as rows; a JSON {id: answer} object is kind "map" (id, label)."""

    path: Path
    kind: str  # csv | json | jsonl | map
    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]

    def ids(self, key: str) -> list[str]:
        return [str(r.get(key)) for r in self.rows]


def read_table(path: Path) -> Table | None:
    """The rows of a CSV, JSON or JSON-lines file; None for anything that is not a table."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = tuple(reader)
                return Table(path, "csv", tuple(reader.fieldnames or ()), rows)
        text = path.read_text(encoding="utf-8")
        data = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return None
    if isinstance(data, dict):
        rows = tuple({MAP_ID: k, MAP_LABEL: v} for k, v in data.items())
        return Table(path, "map", (MAP_ID, MAP_LABEL), rows)
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        columns = tuple(dict.fromkeys(k for r in data for k in r))
        return Table(path, path.suffix.lstrip("."), columns, tuple(data))
    return None


def table_text(table: Table, rows: list[dict[str, Any]]) -> str:
    """`rows` as the text of a file in `table`'s format and column order."""
    if table.kind == "csv":
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=list(table.columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if table.kind == "map":
        return json.dumps({r[MAP_ID]: r[MAP_LABEL] for r in rows}, ensure_ascii=False)
    if table.kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return json.dumps(rows, ensure_ascii=False, indent=1)


# -- the harness side: one instance through the agent's main() -------------------------------
def run_reference_agent(
    main: Callable[[], Any],
    namespace: MutableMapping[str, Any],
    instance: Mapping[str, Any],
    llm: Any,
    view: Mapping[str, Any],
) -> dict[str, Any]:
    """Run the agent's `main()` on a one-item view of the folder; its prediction for the item.

    `namespace` is the harness module's globals (where the agent bound its SDK names), `view`
    the `FOLDER_VIEW` literal of the harness. Returns `{"label": ...}` read from the agent's
    submission CSV, or `{"submission": ..., "file": ...}` for a folder whose agents write JSON.
    """
    if llm is None:
        raise AgentFailed("no policy endpoint: the reference agent needs an `llm` client")
    dataset = Path.cwd() / "sialoop-folder" / "dataset"
    write_view(dataset, instance, view)
    working = Path(tempfile.mkdtemp(prefix="working-", dir=dataset.parent))
    try:
        argv = [view.get("agent_name", "agent.py"), "--dataset_dir", str(dataset)]
        argv += ["--working_dir", str(working)]
        with routed_clients(namespace, llm), _dummy_keys(view.get("env_keys", ())), _argv(argv):
            _call_main(main)
        return read_prediction(working, str(instance["id"]), view)
    finally:
        shutil.rmtree(working, ignore_errors=True)


def _call_main(main: Callable[[], Any]) -> None:
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise AgentFailed(f"the reference agent exited with {exc.code!r}") from None


def write_view(dataset: Path, instance: Mapping[str, Any], view: Mapping[str, Any]) -> None:
    """`public/` mirrored by symlinks (made once per worker: the sandbox counts removing a link
    as writing its target), plus the item file (and sample submission) for this one item."""
    if not dataset.is_dir():
        dataset.mkdir(parents=True)
        public = Path("public")
        for entry in sorted(public.iterdir()) if public.is_dir() else ():
            os.symlink(entry.resolve(), dataset / entry.name)
    id_key = view["id_key"]
    item_id: Any = int(instance["id"]) if view.get("id_type") == "int" else str(instance["id"])
    row = {k: (item_id if k == id_key else instance.get(k)) for k in view["columns"]}
    items = Table(Path(view["input_file"]), view["format"], tuple(view["columns"]), ())
    (dataset / items.path.name).write_text(table_text(items, [row]), encoding="utf-8")
    sample = view.get("sample_submission")
    if sample:
        cells = {c: sample["placeholder"] for c in sample["columns"]}
        cells[sample["columns"][0]] = item_id
        table = Table(Path(sample["file"]), "csv", tuple(sample["columns"]), ())
        (dataset / table.path.name).write_text(table_text(table, [cells]), encoding="utf-8")


def read_prediction(working: Path, item_id: str, view: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's answer for `item_id`: from `submission.csv`, else (JSON folders) the newest
    JSON submission file it wrote."""
    sub = view["submission"]
    path = working / sub["file"]
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        id_col = sub["id"] if sub["id"] in fields else (fields[0] if fields else "")
        label_col = sub["label"] if sub["label"] in fields else (fields[-1] if fields else "")
        for row in rows:
            if str(row.get(id_col, "")).strip() == item_id:
                return {"label": row.get(label_col)}
        raise AgentFailed(f"{sub['file']} has no row for id {item_id!r} (columns: {fields})")
    if view["format"] != "csv":
        found = [p for pattern in JSON_SUBMISSIONS for p in working.glob(pattern) if p.is_file()]
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime)
            submission = json.loads(newest.read_text(encoding="utf-8"))
            return {"submission": submission, "file": newest.name}
    raise AgentFailed(f"the reference agent wrote no {sub['file']} in its working_dir")


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _dummy_keys(names: Any) -> Iterator[None]:
    """Set the unset API-key variables the agent checks; the client ignores their values."""
    added = [n for n in names if not os.environ.get(n)]
    for name in added:
        os.environ[name] = _DUMMY_KEY
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


# -- routing the agent's SDK clients to the policy endpoint ----------------------------------
def _route(llm: Any) -> dict[str, Any]:
    headers = {k: v for k, v in llm.default_headers.items() if k.lower().startswith(_HEADER_PREFIX)}
    # Under namespace isolation the endpoint is the sandbox's bridge, a Unix socket.
    uds = os.environ.get(POLICY_SOCKET_ENV) or None
    return {"base_url": str(llm.base_url), "api_key": llm.api_key, "headers": headers, "uds": uds}


def _policy_body(body: Any) -> Any:
    if isinstance(body, Mapping) and "model" in body:
        return {**body, "model": POLICY_MODEL}
    return body


def _routed_kwargs(
    route: Mapping[str, Any], kwargs: dict[str, Any], asynchronous: bool = False
) -> dict[str, Any]:
    out = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
    out["base_url"], out["api_key"] = route["base_url"], route["api_key"]
    out["default_headers"] = {**(kwargs.get("default_headers") or {}), **route["headers"]}
    if route.get("uds"):  # the agent's own http_client would not reach the socket
        import httpx

        if asynchronous:
            transport: Any = httpx.AsyncHTTPTransport(uds=route["uds"])
            out["http_client"] = httpx.AsyncClient(transport=transport, timeout=None)
        else:
            transport = httpx.HTTPTransport(uds=route["uds"])
            out["http_client"] = httpx.Client(transport=transport, timeout=None)
    return out


def routed_openai(route: Mapping[str, Any]) -> tuple[type, type]:
    """Subclasses of `openai.OpenAI` and `openai.AsyncOpenAI` bound to `route`."""
    import openai

    class PolicyOpenAI(openai.OpenAI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **_routed_kwargs(route, kwargs))

        def post(self, path: str, *args: Any, **kwargs: Any) -> Any:
            kwargs["body"] = _policy_body(kwargs.get("body"))
            return super().post(path, *args, **kwargs)

    class PolicyAsyncOpenAI(openai.AsyncOpenAI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **_routed_kwargs(route, kwargs, asynchronous=True))

        async def post(self, path: str, *args: Any, **kwargs: Any) -> Any:
            kwargs["body"] = _policy_body(kwargs.get("body"))
            return await super().post(path, *args, **kwargs)

    return PolicyOpenAI, PolicyAsyncOpenAI


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or ():
        text = block.get("text") if isinstance(block, Mapping) else getattr(block, "text", None)
        if isinstance(text, str):
            parts.append(text)
    return "\n".join(parts)


def anthropic_shim(llm: Any) -> type:
    """A stand-in for `anthropic.Anthropic` whose `messages.create` is the endpoint's chat API."""

    class Messages:
        def create(self, *, messages: list[Any], max_tokens: int, **kw: Any) -> SimpleNamespace:
            chat = [{"role": "system", "content": _text(kw["system"])}] if kw.get("system") else []
            chat += [{"role": m["role"], "content": _text(m["content"])} for m in messages]
            extra = {"temperature": kw.get("temperature"), "top_p": kw.get("top_p")}
            extra["stop"] = kw.get("stop_sequences")
            sent = {k: v for k, v in extra.items() if v is not None}
            out = llm.chat.completions.create(
                model=POLICY_MODEL, messages=chat, max_tokens=max_tokens, **sent
            )
            choice = out.choices[0]
            usage = out.usage
            return SimpleNamespace(
                id=out.id, type="message", role="assistant", model=kw.get("model"),
                content=[SimpleNamespace(type="text", text=choice.message.content or "")],
                stop_reason="max_tokens" if choice.finish_reason == "length" else "end_turn",
                stop_sequence=None,
                usage=SimpleNamespace(
                    input_tokens=usage.prompt_tokens if usage else 0,
                    output_tokens=usage.completion_tokens if usage else 0,
                ),
            )  # fmt: skip

    class PolicyAnthropic:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.messages = Messages()

    return PolicyAnthropic


def _swaps(namespace: Mapping[str, Any], llm: Any) -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement) for every SDK class and client the agent can reach."""
    import openai

    sync_cls, async_cls = routed_openai(_route(llm))
    classes: list[tuple[Any, str, Any]] = [(openai, "OpenAI", sync_cls)]
    classes.append((openai, "AsyncOpenAI", async_cls))
    anthropic = sys.modules.get("anthropic")
    if anthropic is not None and isinstance(getattr(anthropic, "Anthropic", None), type):
        classes.append((anthropic, "Anthropic", anthropic_shim(llm)))
    swaps: list[tuple[Any, str, Any]] = list(classes)
    for name, value in namespace.items():
        for module, attr, routed in classes:
            original = getattr(module, attr)
            if value is original:
                swaps.append((namespace, name, routed))
            elif isinstance(value, original):  # a client the agent built at import time
                swaps.append((namespace, name, routed()))
    return swaps


@contextlib.contextmanager
def routed_clients(namespace: MutableMapping[str, Any], llm: Any) -> Iterator[None]:
    """While the block runs, every OpenAI/Anthropic client the agent makes reaches `llm`'s
    endpoint with its headers; the originals are put back afterwards."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for owner, name, routed in _swaps(namespace, llm):
            if isinstance(owner, MutableMapping):
                saved.append((owner, name, owner[name]))
                owner[name] = routed
            else:
                saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, routed)
        yield
    finally:
        for owner, name, original in reversed(saved):
            if isinstance(owner, MutableMapping):
                owner[name] = original
            else:
                setattr(owner, name, original)


# -- the evaluator side: a long-lived process that runs the folder's evaluate.py ---------------
_VALUE = re.compile(
    r"\b(accuracy|score)\b\s*[:=]\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*(%?)", re.I
)


def _parse_printed(text: str) -> dict[str, Any]:
    match = _VALUE.search(text)
    if match is None:
        return {}
    value = float(match.group(2)) / (100.0 if match.group(3) else 1.0)
    return {match.group(1).lower(): value}


def evaluate_once(root: Path, submission: Path) -> dict[str, Any]:
    """Run `root/data/public/evaluate.py` on `submission`: its `evaluate(path)` when it has one,
    else its `main()` with `--submission PATH` (then a results.json it wrote beside the
    submission, or an "Accuracy: x" line it printed). Returns {"ok", "result" | "error", "log"}."""
    script = root / "data" / "public" / "evaluate.py"
    name = f"sialoop_folder_evaluator_{uuid.uuid4().hex[:12]}"
    saved = (os.getcwd(), sys.argv, list(sys.path))
    printed = io.StringIO()
    try:
        os.chdir(root)
        sys.argv = [str(script), "--submission", str(submission)]
        sys.path.insert(0, str(script.parent))
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            spec = importlib.util.spec_from_file_location(name, script)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            result = _run_evaluator(module, submission)
        if not result:
            result = _parse_printed(printed.getvalue())
        return {"ok": True, "result": result, "log": printed.getvalue()[-2000:]}
    except BaseException as exc:  # the folder's evaluator failing is reported, not fatal
        first = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        return {"ok": False, "error": first, "log": printed.getvalue()[-2000:]}
    finally:
        sys.modules.pop(name, None)
        os.chdir(saved[0])
        sys.argv, sys.path[:] = saved[1], saved[2]


def _run_evaluator(module: Any, submission: Path) -> dict[str, Any]:
    evaluate = getattr(module, "evaluate", None)
    if callable(evaluate):
        out = evaluate(submission)
        return dict(out) if isinstance(out, Mapping) else {"score": out}
    main = getattr(module, "main", None)
    if not callable(main):
        raise AttributeError("evaluate.py defines neither evaluate(path) nor main()")
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    results = submission.parent / "results.json"
    if results.is_file():
        loaded = json.loads(results.read_text(encoding="utf-8"))
        return dict(loaded) if isinstance(loaded, Mapping) else {}
    return {}


def serve_evaluator() -> int:
    """One JSON request per stdin line ({"root", "submission"}), one JSON reply per line on the
    original stdout; whatever the evaluator prints (even from native code) goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        reply = evaluate_once(Path(request["root"]), Path(request["submission"]))
        proto.write(json.dumps(reply, default=str) + "\n")
        proto.flush()
    return 0


class EvaluatorProcess:
    """The parent's side of `serve_evaluator`: one subprocess per task root, started on first
    use, restarted after it dies or times out; calls are serialised (safe from threads)."""

    def __init__(self, task_root: Path, timeout_s: float = 120.0):
        self._root, self._timeout_s = Path(task_root), timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        # The staged truth lives here, a private folder (mode 0700) the task denies harnesses.
        self.staging = Path(tempfile.mkdtemp(prefix="sialoop-folder-eval-"))
        weakref.finalize(self, shutil.rmtree, self.staging, True)

    def run(self, answers: Path, truth: str, name: str, submission: str) -> dict[str, Any]:
        """The reply for `submission` (file `name`) scored against a copy of the task root whose
        `answers` file holds `truth`: {"ok": True, "result": {...}} or {"ok": False, "error"}."""
        with tempfile.TemporaryDirectory(dir=self.staging) as tmp:
            root = self._stage(Path(tmp), Path(answers), truth)
            (root / "gen").mkdir()
            (root / "gen" / name).write_text(submission, encoding="utf-8")
            request = {"root": str(root), "submission": str(root / "gen" / name)}
            with self._lock:
                return self._exchange(request)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                _stop(self._proc)
                self._proc = None

    def _stage(self, tmp: Path, answers: Path, truth: str) -> Path:
        """data/public and data/private mirrored by symlinks, but a copy of evaluate.py (its own
        path locates the truth) and the answers file replaced by `truth`."""
        root = tmp / "task"
        for part in ("public", "private"):
            (root / "data" / part).mkdir(parents=True)
            for entry in (self._root / "data" / part).iterdir():
                target = root / "data" / part / entry.name
                if part == "public" and entry.name == "evaluate.py":
                    shutil.copyfile(entry, target)
                elif entry.resolve() == answers.resolve():
                    target.write_text(truth, encoding="utf-8")
                else:
                    target.symlink_to(entry.resolve())
        return root

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-P", str(Path(__file__).resolve()), "--serve-evaluator"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, encoding="utf-8", cwd=self._root,
        )  # fmt: skip
        weakref.finalize(self, _stop, proc)
        return proc

    def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        alive = self._proc is not None and self._proc.poll() is None
        proc = self._proc = self._proc if alive and self._proc else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], self._timeout_s)
            line = proc.stdout.readline() if ready else ""
        except OSError:  # a broken pipe: the process died
            line = ""
        if line:
            return json.loads(line)
        running = proc.poll() is None
        _stop(proc)
        self._proc = None
        why = f"timed out after {self._timeout_s:.0f} s" if running else "exited"
        return {"ok": False, "error": f"the evaluator process {why}"}


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


if __name__ == "__main__" and sys.argv[1:] == ["--serve-evaluator"]:
    sys.exit(serve_evaluator())
