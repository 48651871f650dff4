"""The `sialoop` command line: run, resume, eval, report, runs, web, doctor, tasks."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from sialoop import __version__
from sialoop.config import RunConfig, load_config, parse_override
from sialoop.errors import ConfigError, SialoopError
from sialoop.preflight import RESUMABLE_KEYS

if TYPE_CHECKING:
    from sialoop.store import Store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",  # paragraphs reflow to the terminal width
)
console = Console()


def _version(value: bool) -> None:
    if value:
        print(f"sialoop {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="show third-party progress bars and warnings"),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """sialoop: self-improving agents through the harness and the weights, in one loop."""
    from sialoop.verbosity import set_verbose

    set_verbose(verbose)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user-fixable failure ends the command with one red line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SialoopError as err:
            console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _print_table(table: Any) -> None:
    """A report table; piped output (CI logs, files) gets a width that fits its columns."""
    if console.is_terminal:
        console.print(table)
        return
    width = console.width
    console.width = max(width, 150)
    try:
        console.print(table)
    finally:
        console.width = width


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key: key=value (dotted); repeatable"),
]
ResumeSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="change what a stored run may change ("
        + ", ".join(RESUMABLE_KEYS)
        + "): key=value; repeatable",
    ),
]
DataOpt = Annotated[Path | None, typer.Option("--data", help="data root the task reads")]
TaskOpt = Annotated[
    str | None,
    typer.Option(help="a task name (see `sialoop tasks`), file.py:Class or module:Class"),
]
TaskDirOpt = Annotated[
    Path | None, typer.Option("--task-dir", help="a task folder in SIA's layout")
]
RunDirArg = Annotated[Path, typer.Argument(help="a run directory")]


def _quiet() -> None:
    """Silence third-party progress bars and warnings unless `--verbose` (before they load)."""
    from sialoop.progress import silence_third_party
    from sialoop.verbosity import is_verbose

    silence_third_party(is_verbose())


def _config(config: Path | None, sets: list[str] | None, **flags: Any) -> RunConfig:
    overrides = dict(parse_override(s) for s in sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


def _final_table(root: Path) -> None:
    """The run's report, also appended to its console.log."""
    from sialoop.report import report_data, report_table
    from sialoop.rundir import console_log
    from sialoop.store import Store

    with console_log(console, root):
        _print_table(report_table(report_data(Store.open(root))))


@app.command()
@one_line_errors
def run(
    config: ConfigOpt = None,
    task: TaskOpt = None,
    task_dir: TaskDirOpt = None,
    data: DataOpt = None,
    runs_dir: Annotated[
        Path | None, typer.Option(help="where run directories go (default: runs)")
    ] = None,
    val_size: Annotated[
        int | None, typer.Option(help="val items per version (0: all) (default: 150)")
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(help="name of the run directory: letters, digits, . _ - (default: time-task)"),
    ] = None,
    no_test: Annotated[
        bool, typer.Option("--no-test", help="skip the final test evaluation")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Run the loop on a task and print the final table.

    Everything the run needs (config, paths, harness, model, data) is checked first, before a
    run directory exists or a model loads.
    """
    from sialoop.loop import run as run_loop
    from sialoop.preflight import check_run

    cfg = _config(
        config,
        set_,
        task=task,
        task_dir=task_dir,
        data=data,
        runs_dir=runs_dir,
        **{"split.val_size": val_size, "eval_test": False if no_test else None},
    )
    task = check_run(cfg, run_id)
    _quiet()
    _final_table(run_loop(cfg, console, run_id, task=task))


def _stored(run_dir: Path, sets: list[str] | None, data: Path | None) -> tuple[Store, RunConfig]:
    """The run's store and its config with the changes `--set` and `--data` make."""
    from pydantic import ValidationError

    from sialoop.preflight import resume_config
    from sialoop.store import Store

    store = Store.open(run_dir)
    try:
        stored = RunConfig.model_validate(store.run_info().config)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"run {run_dir}: its stored config key '{where}' no longer validates "
            f"({first['msg']}); use the sialoop version that wrote the run"
        ) from None
    return store, resume_config(stored, sets, data)


@app.command()
@one_line_errors
def resume(run_dir: RunDirArg, data: DataOpt = None, set_: ResumeSetOpt = None) -> None:
    """Continue a run that was stopped or killed at any point; prints the final table."""
    from sialoop.loop import resume as resume_loop
    from sialoop.preflight import finished_note

    store, cfg = _stored(run_dir, set_, data)
    note = finished_note(store, cfg)
    if note is not None:
        console.print(note, highlight=False, soft_wrap=True)
        return
    _quiet()
    _final_table(resume_loop(store.root, console, config=cfg))


@app.command("eval")
@one_line_errors
def eval_(
    run_dir: RunDirArg,
    split: Annotated[str, typer.Option(help="split to score: val or test; test once")] = "test",
    force: Annotated[bool, typer.Option(help="re-score (marked in the report)")] = False,
    data: DataOpt = None,
    set_: ResumeSetOpt = None,
) -> None:
    """Score the run's best version on a split."""
    from sialoop.evaluator import score_split

    if split not in ("val", "test"):
        raise ConfigError(f"--split {split}: use val or test")
    store, cfg = _stored(run_dir, set_, data)
    _quiet()
    ev = score_split(store.root, split, console, force=force, config=cfg)
    shown = "n/a" if ev.value is None else f"{ev.value:.4f}"
    console.print(
        f"{ev.version_id} {ev.split} {ev.metric} = {shown} ({ev.direction} is better; "
        f"n={ev.n}, errors={ev.n_errors})"
    )


@app.command()
@one_line_errors
def report(
    run_dir: RunDirArg,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    html: Annotated[
        bool, typer.Option("--html", help="write the dashboard's pages as one HTML file")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="the HTML file (default RUN/report.html)")
    ] = None,
    max_trajectories: Annotated[
        int, typer.Option(help="--html: trajectories sampled into the file")
    ] = 300,
    max_mb: Annotated[float, typer.Option(help="--html: the file's size cap in MB")] = 20.0,
) -> None:
    """Versions, splits, scores, n and seconds of a run (`--html`: a shareable file)."""
    from sialoop.report import report_data, report_table
    from sialoop.store import Store

    store = Store.open(run_dir)
    if html:
        from sialoop.web.export import export_html

        page, counts = export_html(run_dir, max_trajectories, int(max_mb * 1_000_000))
        target = out or run_dir / "report.html"
        target.write_text(page, encoding="utf-8")
        console.print(
            f"wrote {target} ({len(page.encode()) / 1e6:.1f} MB): every generation, "
            f"{counts['stored']} trajectories ({counts['left_out']} left out)",
            highlight=False,
        )
        return
    data = report_data(store)
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        _print_table(report_table(data))


@app.command()
@one_line_errors
def runs(
    folder: Annotated[Path, typer.Argument(help="a folder of run directories")] = Path("runs"),
) -> None:
    """List the runs in FOLDER: id, task, status, best val, test, minutes; newest last."""
    from rich.table import Table

    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: pass the runs folder (`sialoop runs DIR`)")
    rows = run_rows(folder)
    if not rows:
        console.print(f"no runs in {folder}", highlight=False)
        return
    columns = [
        ("run", "left"), ("task", "left"), ("status", "left"),
        ("best val", "right"), ("test", "right"), ("minutes", "right"), ("error", "left"),
    ]  # fmt: skip
    if not any(row[-1] for row in rows):
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    table = Table(box=None, pad_edge=False)
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name == "run")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    _print_table(table)


def _run_row(root: Path) -> tuple[float, list[str]]:
    """(created_at, cells) of one run; a run that fails to open shows its error in the row."""
    from sialoop.runlock import observed_status
    from sialoop.store import Store

    try:
        store = Store.open(root)
        info = store.run_info()
        status, _ = observed_status(root, info.status, info.reason)
        best = store.incumbent()
        val = [e for e in store.evaluations("val") if best and e.version_id == best.version_id]
        test = store.evaluations("test")
        stamps = [info.created_at]
        stamps += [r.created_at for r in [*store.versions(), *store.decisions()]]
        stamps += [e.created_at for e in store.evaluations()]
        store.close()
    except Exception as err:  # a listing shows a broken run instead of stopping
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return float("inf"), [root.name, "", "unreadable", "", "", "", message]

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    cells = [
        info.run_id if info.run_id == root.name else f"{root.name} ({info.run_id})",
        info.task,
        status,
        shown(val[-1].value) if val else "-",
        shown(test[-1].value) if test else "-",
        f"{(max(stamps) - info.created_at) / 60:.1f}",
        "",
    ]
    return info.created_at, cells


def run_rows(folder: Path) -> list[list[str]]:
    """Every run directory directly in `folder`, oldest first; other folders are skipped."""
    from sialoop.store import DB_NAME

    found = [_run_row(d) for d in folder.iterdir() if (d / DB_NAME).is_file()]
    return [cells for _, cells in sorted(found, key=lambda row: row[0])]


@app.command()
@one_line_errors
def web(
    runs_dir: Annotated[Path, typer.Argument(help="a folder of runs, or one run directory")] = Path(
        "runs"
    ),
    port: Annotated[int, typer.Option(help="the port to listen on")] = 8765,
    host: Annotated[
        str,
        typer.Option(help="the address to bind; anything but 127.0.0.1 exposes your runs"),
    ] = "127.0.0.1",
) -> None:
    """A dashboard of the runs in RUNS_DIR at http://127.0.0.1:PORT (read-only, live)."""
    import uvicorn

    from sialoop.web.app import create_app

    if not runs_dir.is_dir():
        raise ConfigError(f"{runs_dir} is not a folder: pass a runs folder (`sialoop web DIR`)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning:[/] binding {host}: anyone who can reach this machine on port "
            f"{port} can read these runs (prompts, outputs, configs)",
            highlight=False,
        )
    console.print(f"sialoop web: http://{host}:{port}/ showing {runs_dir}", highlight=False)
    uvicorn.run(create_app(runs_dir), host=host, port=port, log_level="warning")


@app.command()
def doctor(
    task: TaskOpt = None,
    task_dir: TaskDirOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    runs_dir: Annotated[
        Path | None, typer.Option(help="where run directories go (default: runs)")
    ] = None,
) -> None:
    """Check what a run needs and say what to fix.

    With --task, --task-dir or --config: what THAT run needs (config, data, harness, model,
    tokenizer, LoRA targets, runs folder, sandbox, RAM, packages). Without: torch, the embedded
    model, each built-in task's data, a port and disk.
    """
    from sialoop.doctor import Check, run_checks, run_checks_for
    from sialoop.paths import default_data_root

    if task is None and task_dir is None and config is None and not set_:
        checks = run_checks(data or default_data_root(), runs_dir or Path("runs"))
    else:
        try:
            cfg = _config(config, set_, task=task, task_dir=task_dir, data=data, runs_dir=runs_dir)
        except SialoopError as err:
            checks = [Check(name="config", ok=False, detail=str(err), fix="see above")]
        else:
            _quiet()
            checks = run_checks_for(cfg)
    for c in checks:
        mark = "[green]ok[/]  " if c.ok else "[red]FIX[/] "
        console.print(
            f"{mark} {c.name:14} {escape(c.detail)}" + (f"  -> {escape(c.fix)}" if c.fix else ""),
            highlight=False,
            soft_wrap=True,
        )
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
