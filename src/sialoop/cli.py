"""The `sialoop` command line: run, eval, report, doctor, tasks."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sialoop.config import RunConfig, load_config, parse_override
from sialoop.errors import SialoopError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user-fixable failure ends the command with one red line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SialoopError as err:
            console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _print_table(table: Any) -> None:
    """A report table; piped output (CI logs, files) gets a width that fits its columns."""
    out = console if console.is_terminal else Console(width=max(console.width, 150))
    out.print(table)


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: key=value (dotted)")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="data root the task reads")]


def _config(config: Path | None, sets: list[str] | None, **flags: Any) -> RunConfig:
    overrides = dict(parse_override(s) for s in sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


@app.command()
@one_line_errors
def run(
    config: ConfigOpt = None,
    task: Annotated[
        str | None,
        typer.Option(help="a task name (see `sialoop tasks`), file.py:Class or module:Class"),
    ] = None,
    task_dir: Annotated[
        Path | None, typer.Option("--task-dir", help="a task folder in SIA's layout")
    ] = None,
    data: DataOpt = None,
    runs_dir: Annotated[Path | None, typer.Option(help="where run directories go")] = None,
    val_size: Annotated[int | None, typer.Option(help="val items per version (0: all)")] = None,
    run_id: Annotated[str | None, typer.Option(help="name of the run directory")] = None,
    no_test: Annotated[
        bool, typer.Option("--no-test", help="skip the final test evaluation")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Run the loop on a task and print the final table."""
    from sialoop.loop import run as run_loop
    from sialoop.report import report_data, report_table
    from sialoop.store import Store

    cfg = _config(
        config,
        set_,
        task=task,
        task_dir=task_dir,
        data=data,
        runs_dir=runs_dir,
        **{"split.val_size": val_size, "eval_test": False if no_test else None},
    )
    root = run_loop(cfg, console, run_id)
    _print_table(report_table(report_data(Store.open(root))))


@app.command()
@one_line_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    data: DataOpt = None,
) -> None:
    """Continue a run that was stopped or killed at any point; prints the final table."""
    from sialoop.loop import resume as resume_loop
    from sialoop.report import report_data, report_table
    from sialoop.store import Store

    root = resume_loop(run_dir, console, data)
    _print_table(report_table(report_data(Store.open(root))))


@app.command("eval")
@one_line_errors
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    split: Annotated[str, typer.Option(help="split to score; test is scored once")] = "test",
    force: Annotated[bool, typer.Option(help="re-score test (marked in the report)")] = False,
    data: DataOpt = None,
) -> None:
    """Score the run's best version on a split."""
    from sialoop.errors import ConfigError
    from sialoop.evaluator import best_version, evaluate_test
    from sialoop.loop import served_adapters, val_subset
    from sialoop.policy.launch import serve_policy
    from sialoop.progress import phase_bar
    from sialoop.rollout import RolloutContext, evaluate
    from sialoop.store import Store
    from sialoop.tasks import load_task

    store = Store.open(run_dir)
    cfg = RunConfig.model_validate(store.run_info().config)
    if data is not None:
        cfg = cfg.model_copy(update={"data": data})
    if split not in ("val", "test"):
        raise ConfigError(f"--split {split}: use val or test")
    task = load_task(
        cfg.task or "",
        cfg.data,
        seed=cfg.seed,
        val_fraction=cfg.split.val_fraction,
        task_dir=cfg.task_dir,
    )
    with ExitStack() as stack:
        url = stack.enter_context(serve_policy(cfg.policy, store, served_adapters(store)))
        if split == "test":
            ev = evaluate_test(store, task, cfg, url, console, force=force)
        else:
            ctx = RolloutContext(store, task, best_version(store), url, cfg.sandbox)
            instances = val_subset(task, cfg)
            with phase_bar(console, "val", len(instances)) as advance:
                ev = evaluate(ctx, instances, advance, forced=force)
    shown = "n/a" if ev.value is None else f"{ev.value:.4f}"
    console.print(
        f"{ev.version_id} {ev.split} {ev.metric} = {shown} ({ev.direction} is better; "
        f"n={ev.n}, errors={ev.n_errors})"
    )


@app.command()
@one_line_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Versions, splits, scores, n and seconds of a run."""
    from sialoop.report import report_data, report_table
    from sialoop.store import Store

    data = report_data(Store.open(run_dir))
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        _print_table(report_table(data))


@app.command()
def doctor(data: DataOpt = None, runs_dir: Path = Path("runs")) -> None:
    """Check torch, the model files, the data path, a free port and disk; say what to fix."""
    from sialoop.doctor import run_checks
    from sialoop.paths import default_data_root

    checks = run_checks(data or default_data_root(), runs_dir)
    for c in checks:
        mark = "[green]ok[/]  " if c.ok else "[red]FIX[/] "
        console.print(f"{mark} {c.name:14} {c.detail}" + (f"  -> {c.fix}" if c.fix else ""))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command()
def tasks() -> None:
    """List the tasks known by name (built-in ones and installed entry points)."""
    from sialoop.tasks import task_names

    for name, target in task_names().items():
        console.print(f"{name:12} {target}", highlight=False)


if __name__ == "__main__":
    app()
