"""What a run holds, read from the store only: every version (accepted, rejected, broken with its
error, or a candidate still waiting for its gate) with the lever and method that made it, its
parent, its val and test scores beside n, errors, cost per item and the gate's p-value; the errors
of all trajectories by kind with an example; the run's observed status (a stored `running`
without a live lock holder is `interrupted`), its reason and wall time; and the best version's
val score beside its score on val items the search never used, and on test.

A run is not shown as clean when an evaluation failed on every item, when one is marked
`degraded` (infrastructure failures beyond the configured share), or when the run did not
finish: `problems` lists why, and the table prints it in red under the versions.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.markup import escape
from rich.table import Table

from sialoop.records import Decision, Evaluation, Trajectory, Version
from sialoop.runlock import observed_status
from sialoop.store import Store

EXAMPLE_CHARS = 160  # an example error message, first line only


def first_line(text: str | None, limit: int = EXAMPLE_CHARS) -> str:
    """The first non-empty line of `text`, cut to `limit` characters ("" for none)."""
    line = next((s.strip() for s in (text or "").splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _evaluation_row(e: Evaluation, versions: dict[str, Version]) -> dict[str, Any]:
    v = versions.get(e.version_id)
    return {
        "version": e.version_id,
        "generation": v.generation if v else None,
        "status": v.status if v else None,
        "adapter": v.adapter if v else None,
        "split": e.split,
        "metric": e.metric,
        "direction": e.direction,
        "value": e.value,
        "n": e.n,
        "errors": e.n_errors,
        "errors_by_kind": dict(e.detail.get("errors") or {}),
        "all_failed": e.n > 0 and e.n_errors >= e.n,
        "seconds": round(e.seconds, 1),
        "seconds_per_item": e.seconds_per_item,
        "tokens_per_item": e.tokens_per_item,
        "forced": e.forced,
        "degraded": bool(getattr(e, "degraded", False)),
        "infra_failures": getattr(e, "infra_failures", 0),
        "created_at": e.created_at,
    }


def _groups(trajectories: list[Trajectory]) -> dict[tuple[str, str], list[Trajectory]]:
    """Trajectories by (version, split)."""
    out: dict[tuple[str, str], list[Trajectory]] = {}
    for t in trajectories:
        out.setdefault((t.version_id, t.split), []).append(t)
    return out


def _errors_by_kind(trajectories: list[Trajectory]) -> list[dict[str, Any]]:
    """Counts of `error.kind` over all trajectories, most common first, each with how many were
    the machine's fault (`infra`), one example message and where ("v0 val": count)."""
    kinds: dict[str, dict[str, Any]] = {}
    for t in trajectories:
        if t.error is None:
            continue
        entry = kinds.setdefault(
            t.error.kind.value,
            {"kind": t.error.kind.value, "count": 0, "infra": 0},
        )
        entry["count"] += 1
        entry["infra"] += bool(getattr(t.error, "infra", False))
        entry.setdefault("example", first_line(t.error.message))
        where = entry.setdefault("where", Counter())
        where[f"{t.version_id} {t.split}"] += 1
    ordered = sorted(kinds.values(), key=lambda k: -k["count"])
    return [k | {"where": dict(k["where"].most_common())} for k in ordered]


def _failing(
    rows: list[dict[str, Any]], groups: dict[tuple[str, str], list[Trajectory]]
) -> list[dict[str, Any]]:
    """Evaluations (and unevaluated phases) in which every item failed, with the main error."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if not r["all_failed"] or (r["version"], r["split"]) in seen:
            continue
        seen.add((r["version"], r["split"]))
        source = "val" if r["split"] == "holdout" else r["split"]
        failed = [t for t in groups.get((r["version"], source), []) if t.error is not None]
        out.append({"version": r["version"], "split": r["split"], "n": r["n"]} | _main(failed))
    evaluated = {(r["version"], "val" if r["split"] == "holdout" else r["split"]) for r in rows}
    for (vid, split), group in groups.items():
        if (vid, split) in evaluated or any(t.error is None for t in group):
            continue
        out.append({"version": vid, "split": split, "n": len(group)} | _main(group))
    return out


def _main(failed: list[Trajectory]) -> dict[str, Any]:
    kinds = Counter(t.error.kind.value for t in failed if t.error is not None)
    if not kinds:
        return {"kind": None, "example": ""}
    kind = kinds.most_common(1)[0][0]
    example = next(t.error.message for t in failed if t.error and t.error.kind.value == kind)
    return {"kind": kind, "kinds": dict(kinds), "example": first_line(example)}


def _score(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("value", "n", "errors", "seconds_per_item", "tokens_per_item", "forced", "degraded")
    return {k: row[k] for k in keys} | {"all_failed": row["all_failed"]}


def _version_row(
    v: Version,
    decision: Decision | None,
    rows: list[dict[str, Any]],
    failing: list[dict[str, Any]],
    best: str | None,
) -> dict[str, Any]:
    gate = v.detail.get("gate") or {}
    latest = {r["split"]: r for r in rows if r["version"] == v.version_id}  # rows are by time
    error = v.detail.get("error")
    return {
        "version": v.version_id,
        "parent": v.parent_id,
        "generation": v.generation,
        "status": v.status,
        "best": v.version_id == best,
        "lever": decision.lever.value if decision else None,
        "method": decision.method if decision else None,
        "adapter": v.adapter,
        "note": v.note,
        "error": error,
        "error_line": first_line(error) if error else None,
        "scores": {split: _score(latest.get(split)) for split in ("val", "holdout", "test")},
        "failed_everywhere_on": [f["split"] for f in failing if f["version"] == v.version_id],
        "verdict": gate.get("verdict"),
        "p_value": gate.get("p_value"),
        "p_noninferior": gate.get("p_noninferior"),
        "gate_reason": gate.get("reason"),
        "gate_n": gate.get("n_paired"),
        "gate_looks": len(gate.get("looks") or []) or (1 if gate else None),
        "minutes": v.detail.get("minutes"),
        "created_at": v.created_at,
    }


def _problems(
    status: str,
    failing: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    versions: dict[str, Version],
) -> list[str]:
    """Why the run is not clean. A rejected or broken candidate failing on every item is a
    search outcome the table shows; the same on a kept version, or on holdout or test, is not."""
    out = []
    if status != "finished":
        out.append(f"the run is {status}, not finished")
    for f in failing:
        v = versions.get(f["version"])
        if v is not None and v.status in ("rejected", "broken") and f["split"] in ("val", "train"):
            continue
        kind = f" — {f['kind']}: {f['example']}" if f.get("kind") else ""
        out.append(f"{f['version']} {f['split']}: {f['n']}/{f['n']} items failed{kind}")
    for r in rows:
        if r["degraded"]:
            out.append(
                f"{r['version']} {r['split']} is degraded: {r['errors']}/{r['n']} items failed "
                "for the machine's reasons, so its score is not a clean one"
            )
    return out


def report_data(store: Store) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data (`sialoop report --json`)."""
    info = store.run_info()
    status, reason = observed_status(store.root, info.status, info.reason)
    version_list = store.versions()
    versions = {v.version_id: v for v in version_list}
    evaluations = store.evaluations()
    decisions = store.decisions()
    trajectories = store.trajectories()
    rows = [_evaluation_row(e, versions) for e in evaluations]
    incumbent = store.incumbent()
    best = incumbent.version_id if incumbent else None
    by_split = {r["split"]: r["value"] for r in rows if r["version"] == best and not r["forced"]}
    by_generation = {d.generation: d for d in decisions}  # the last decision of each generation
    failing = _failing(rows, _groups(trajectories))
    stamps = [info.created_at] + [
        x.created_at for x in (*version_list, *evaluations, *decisions, *trajectories)
    ]
    problems = _problems(status, failing, rows, versions)
    return {
        "run_id": info.run_id,
        "task": info.task,
        "status": status,
        "reason": reason,
        "stored_status": info.status,
        "sialoop_version": getattr(info, "sialoop_version", None),
        "clean": not problems,
        "problems": problems,
        "val_size": info.config.get("split", {}).get("val_size"),
        "sandbox": info.config.get("sandbox", {}).get("runtime"),
        # what each evaluation ran under: a resume on another machine may differ
        "isolation": sorted({str(e.detail.get("isolation", "guard")) for e in evaluations}),
        "created_at": info.created_at,
        "last_record_at": max(stamps),
        "started": _iso(info.created_at),
        "last_record": _iso(max(stamps)),
        "wall_seconds": round(max(stamps) - info.created_at, 1),
        "best": best,
        "best_val": by_split.get("val"),
        "best_holdout": by_split.get("holdout"),
        "best_test": by_split.get("test"),
        "versions": [
            _version_row(v, by_generation.get(v.generation), rows, failing, best)
            for v in version_list
        ],
        "evaluations": rows,
        "errors": _errors_by_kind(trajectories),
        "trajectories": len(trajectories),
        "failing": failing,
        "decisions": [
            {
                "generation": d.generation,
                "lever": d.lever.value,
                "method": d.method,
                "rule": d.evidence.get("rule"),
                "rationale": d.rationale,
                "created_at": d.created_at,
            }
            for d in decisions
        ],
        "config": info.config,
        "agents": _agents(store, decisions, version_list),
    }


def _agents(
    store: Store, decisions: list[Decision], versions: list[Version]
) -> list[dict[str, Any]]:
    """Per LLM agent: its calls, tokens, cost, failed requests, and the generations the
    offline agent made in its place."""
    out = []
    calls = store.agent_calls()
    fallbacks = {
        "feedback": [d.generation for d in decisions if d.evidence.get("llm_error") is not None],
        "meta": [v.generation for v in versions if (v.detail.get("llm") or {}).get("fallback")],
    }
    for role in ("meta", "feedback"):
        mine = [c for c in calls if c.role == role]
        if not mine:
            continue
        costs = [c.cost_usd for c in mine if c.cost_usd is not None]
        out.append(
            {
                "role": role,
                "model": f"{mine[-1].provider} {mine[-1].model}",
                "calls": len(mine),
                "failed": sum(c.error is not None for c in mine),
                "tokens": sum((c.prompt_tokens or 0) + (c.completion_tokens or 0) for c in mine),
                "usd": sum(costs) if costs else None,
                "seconds": sum(c.seconds for c in mine),
                "offline_generations": fallbacks[role],
            }
        )
    return out


# -- the table -------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`."""
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _cell(score: dict[str, Any] | None) -> tuple[str, str]:
    """(score, "n err") cells of one split."""
    if score is None:
        return "-", ""
    value = _num(score["value"]) + ("*" if score["forced"] else "")
    if score["degraded"]:
        value += " degraded"
    if score["all_failed"]:
        value = f"[red]{value} all failed[/]"
    errors = f" [red]{score['errors']}✗[/]" if score["errors"] else ""
    return value, f"{score['n']}{errors}"


def _status_cell(v: dict[str, Any]) -> str:
    if v["status"] == "broken":
        return f"[red]broken[/]: {escape(first_line(v['error_line'] or v['note'], 70))}"
    if v["failed_everywhere_on"]:
        return f"{v['status']} [red](all {', '.join(v['failed_everywhere_on'])} failed)[/]"
    return str(v["status"])


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _title(data: dict[str, Any]) -> str:
    val = "all" if not data["val_size"] else data["val_size"]
    status = escape(data["status"] + (f": {data['reason']}" if data.get("reason") else ""))
    if data["status"] != "finished":
        status = f"[red]{status}[/]"
    return (
        f"run {escape(data['run_id'])} ({escape(data['task'])}) {status}\n"
        f"wall {duration(data['wall_seconds'])} since {data['started']}; "
        f"val subset: {val} items; sandbox: {data.get('sandbox') or '-'} "
        f"({' and '.join(data.get('isolation') or []) or 'no'} isolation)"
    )


def _columns(table: Table) -> None:
    for col in ("version", "gen", "lever", "parent", "status"):
        table.add_column(col, justify="left", overflow="fold")
    for col in ("val", "n", "test", "n ", "s/item", "tok/item", "gate"):
        table.add_column(col, justify="right", no_wrap=col not in ("val", "test", "gate"))


def report_table(data: dict[str, Any]) -> Table:
    """One row per version, val and test side by side; errors by kind and problems below."""
    metric = next((r for r in data["evaluations"]), None)
    table = Table(title=_title(data), caption_justify="left", title_justify="left")
    _columns(table)
    for v in data["versions"]:
        lever = v["lever"] or "-"
        if v["method"]:
            lever += f" {v['method']}"
        val, val_n = _cell(v["scores"]["val"])
        test, test_n = _cell(v["scores"]["test"])
        cost = v["scores"]["val"] or v["scores"]["test"] or {}
        table.add_row(
            v["version"] + (" ★" if v["best"] else ""),
            str(v["generation"]),
            lever,
            v["parent"] or "-",
            _status_cell(v),
            val,
            val_n,
            test,
            test_n,
            _num(cost.get("seconds_per_item"), ".2f"),
            _num(cost.get("tokens_per_item"), ".0f"),
            _gate_cell(v),
        )
    table.caption = "\n".join(_footer(data, metric))
    return table


def _gate_cell(v: dict[str, Any]) -> str:
    if not v["verdict"]:
        return "-"
    cell = f"{v['verdict']} p {_p(v['p_value'])}"
    if (v["gate_looks"] or 1) > 1:  # the adaptive gate widened: say to what
        cell += f" @{v['gate_n']} (look {v['gate_looks']})"
    return cell


def _footer(data: dict[str, Any], metric: dict[str, Any] | None) -> list[str]:
    notes = []
    if metric:
        arrow = "higher" if metric["direction"] == "higher" else "lower"
        notes.append(f"metric: {metric['metric']} ({arrow} is better); n: items (✗ failed)")
    if data.get("best"):
        notes.append(
            f"★ best {data['best']}: val {_num(data['best_val'])}, val items the search never "
            f"used {_num(data['best_holdout'])}, test {_num(data['best_test'])}"
        )
    else:
        notes.append("no best version: nothing was accepted and scored on val")
    forced = sorted({r["split"] for r in data["evaluations"] if r["forced"]})
    if forced:
        notes.append(f"* forced re-score (`eval --force`) of {' and '.join(forced)}")
    for d in data["decisions"]:
        if d["lever"] == "stop":
            notes.append(f"gen {d['generation']}: stop — {escape(first_line(d['rationale']))}")
    for a in data.get("agents", []):
        usd = "" if a["usd"] is None else f", ${a['usd']:.2f}"
        offline = ", ".join(str(g) for g in a["offline_generations"]) or "none"
        notes.append(
            f"{a['role']} agent {escape(a['model'])}: {a['calls']} calls ({a['failed']} failed), "
            f"{a['tokens']} tokens{usd}, {duration(a['seconds'])}; offline in its place at "
            f"generations: {offline}"
        )
    if data["errors"]:
        notes.append(f"errors by kind (of {data['trajectories']} trajectories):")
        for k in data["errors"]:
            where = ", ".join(f"{w} {c}" for w, c in list(k["where"].items())[:4])
            infra = f", {k['infra']} the machine's" if k["infra"] else ""
            notes.append(
                f"  {k['kind']}: {k['count']} ({where}{infra}) — e.g. {escape(k['example'])}"
            )
    if data["problems"]:
        notes.append("[red]problems:[/]")
        notes.extend(f"  [red]{escape(p)}[/]" for p in data["problems"])
    return notes
