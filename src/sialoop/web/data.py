"""What the dashboard shows, read from run directories with SQL only: no loop code, no writes.

Each reader opens `run.db` with `PRAGMA query_only`, so the dashboard cannot change a run even
by mistake, and reads while the loop writes (WAL). Large tables are never loaded whole:
trajectories come a page at a time with their big fields cut, counts and error kinds are SQL
aggregates, and a trajectory's full record and its LLM calls are read one at a time.

Two things never leave this module: secrets in a run's config (any key that names a key, token,
secret or password has its value replaced) and labels in a test trajectory's score (the keys
below are dropped, whatever a task put there). Test scores appear as the evaluator stored them.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sialoop.runlock import observed_status
from sialoop.store import DB_NAME

PREVIEW_CHARS = 160  # an output or error shown in a list
FIELD_CHARS = 200_000  # a prompt, completion, output or log shown in full, up to this
CONSOLE_TAIL = 40  # lines of console.log shown as a live run's progress
LABEL_KEYS = frozenset({"gold", "label", "labels", "answer", "answers", "target", "expected"})
_SECRET = re.compile(r"(api_?key|secret|password|token)s?$", re.IGNORECASE)
_SAFE_SECRET_NAME = re.compile(r"(_env|_var|_tokens?_\w+|max_tokens|tokens_per\w*)$")


class RunNotFound(LookupError):
    pass


def redact(value: Any, key: str = "") -> Any:
    """`value` with the values of secret-looking keys replaced (names of variables are kept)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if (
        isinstance(value, str)
        and value
        and _SECRET.search(key)
        and not _SAFE_SECRET_NAME.search(key)
    ):
        return "***"
    return value


def without_labels(score: dict[str, Any] | None) -> dict[str, Any] | None:
    if not score:
        return score
    detail = {k: v for k, v in (score.get("detail") or {}).items() if k.lower() not in LABEL_KEYS}
    return score | {"detail": detail}


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they are shown as null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _cut(text: Any, limit: int) -> Any:
    if isinstance(text, str) and len(text) > limit:
        return text[:limit] + f"… [{len(text) - limit} more characters]"
    return text


class RunReader:
    """One run directory, read-only."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not (self.root / DB_NAME).is_file():
            raise RunNotFound(f"no run at {self.root}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.root / DB_NAME, timeout=30.0)) as conn:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA busy_timeout = 30000")
            yield conn

    def _records(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._db() as db:
            return [json.loads(row[0]) for row in db.execute(sql, args)]

    # -- a run at a glance --------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        info = self._records("SELECT record FROM runs")[0]
        status, reason = observed_status(self.root, info["status"], info.get("reason"))
        return info | {"status": status, "reason": reason, "config": redact(info["config"])}

    def stamp(self) -> dict[str, Any]:
        """What changes whenever the run writes anything: the page polls it to update live."""
        with self._db() as db:
            counts = {
                table: db.execute(f"SELECT count(*), max(rowid) FROM {table}").fetchone()
                for table in ("versions", "trajectories", "evaluations", "decisions", "llm_calls")
            }
            record = db.execute("SELECT status, record FROM runs").fetchone()
            statuses = ",".join(
                f"{vid}={status}"
                for vid, status in db.execute(
                    "SELECT version_id, status FROM versions ORDER BY version_id"
                )
            )
        status, _ = observed_status(self.root, record[0], None)
        log = self.root / "console.log"
        size = log.stat().st_size if log.is_file() else 0
        parts = [status, statuses, size, *(f"{c[0]}:{c[1]}" for c in counts.values())]
        return {"stamp": "|".join(map(str, parts)), "status": status}

    def summary(self) -> dict[str, Any]:
        """The run page: versions with their scores and gate, decisions, errors, progress."""
        info = self.info()
        versions = self._records("SELECT record FROM versions ORDER BY generation, rowid")
        decisions = self._records("SELECT record FROM decisions ORDER BY generation, rowid")
        evaluations = self._records("SELECT record FROM evaluations ORDER BY created_at, rowid")
        by_generation = {d["generation"]: d for d in decisions}
        scores = _latest_scores(evaluations)
        metric = next((e for e in evaluations if e["split"] != "test"), None) or next(
            iter(evaluations), None
        )
        direction = (metric or {}).get("direction", "higher")
        accepted_val = [
            v
            for v in versions
            if v["status"] == "accepted" and "val" in scores.get(v["version_id"], {})
        ]
        best = max(accepted_val, key=lambda v: (v["generation"], v["created_at"]), default=None)
        rows = [
            _version(v, by_generation.get(v["generation"]), scores.get(v["version_id"], {}))
            for v in versions
        ]
        stamps = [
            info["created_at"],
            *(r["created_at"] for r in versions + decisions + evaluations),
        ]
        with self._db() as db:
            last_trajectory = db.execute(
                "SELECT max(json_extract(record, '$.created_at')) FROM trajectories WHERE rowid = (SELECT max(rowid) FROM trajectories)"
            ).fetchone()[0]
        if last_trajectory:
            stamps.append(last_trajectory)
        best_scores = scores.get(best["version_id"], {}) if best else {}
        return {
            "run_id": info["run_id"],
            "task": info["task"],
            "status": info["status"],
            "reason": info["reason"],
            "sialoop_version": info.get("sialoop_version"),
            "model": _model(info["config"]),
            "isolation": sorted({str(e["detail"].get("isolation", "guard")) for e in evaluations}),
            "metric": metric["metric"] if metric else None,
            "direction": direction,
            "created_at": info["created_at"],
            "minutes": round((max(stamps) - info["created_at"]) / 60, 2),
            "best": best["version_id"] if best else None,
            "best_val": (best_scores.get("val") or {}).get("value"),
            "best_holdout": (best_scores.get("holdout") or {}).get("value"),
            "best_test": (best_scores.get("test") or {}).get("value"),
            "versions": rows,
            "decisions": [_decision_row(d) for d in decisions],
            "evaluations": [
                _score(e) | {"version": e["version_id"], "split": e["split"]} for e in evaluations
            ],
            "trajectory_counts": self.trajectory_counts(),
            "errors": self.errors_by_kind(),
            "progress": self.console_tail(),
            "config": info["config"],
        }

    def trajectory_counts(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT version_id, split, count(*), "
                "sum(json_extract(record, '$.error') IS NOT NULL), "
                "avg(json_extract(record, '$.score.value')) "
                "FROM trajectories GROUP BY version_id, split ORDER BY min(rowid)"
            ).fetchall()
        return [
            {"version": v, "split": s, "n": n, "errors": e, "mean_score": _finite(m)}
            for v, s, n, e, m in rows
        ]

    def errors_by_kind(self) -> list[dict[str, Any]]:
        """Trajectory errors grouped by kind, most common first, with one example and where."""
        with self._db() as db:
            rows = db.execute(
                "SELECT json_extract(record, '$.error.kind') AS kind, version_id, split, count(*), "
                "min(substr(json_extract(record, '$.error.message'), 1, ?)), "
                "sum(coalesce(json_extract(record, '$.error.infra'), 0)) "
                "FROM trajectories WHERE json_extract(record, '$.error') IS NOT NULL "
                "GROUP BY kind, version_id, split",
                (PREVIEW_CHARS,),
            ).fetchall()
        kinds: dict[str, dict[str, Any]] = {}
        for kind, version, split, count, example, infra in rows:
            entry = kinds.setdefault(
                kind, {"kind": kind, "count": 0, "infra": 0, "example": example, "where": {}}
            )
            entry["count"] += count
            entry["infra"] += int(infra or 0)
            entry["where"][f"{version} {split}"] = count
        return sorted(kinds.values(), key=lambda k: -k["count"])

    def console_tail(self, lines: int = CONSOLE_TAIL) -> list[str]:
        log = self.root / "console.log"
        if not log.is_file():
            return []
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 64_000))
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    # -- a generation -------------------------------------------------------------------------
    def generation(self, generation: int) -> dict[str, Any]:
        """The Decision of a generation, its candidates in full (diff, training, gate) and the
        LLM agents' calls made for it."""
        decisions = self._records(
            "SELECT record FROM decisions WHERE generation = ? ORDER BY rowid", (generation,)
        )
        versions = self._records(
            "SELECT record FROM versions WHERE generation = ? ORDER BY rowid", (generation,)
        )
        if not decisions and not versions:
            raise RunNotFound(f"run {self.root.name} has no generation {generation}")
        evaluations = self._records("SELECT record FROM evaluations ORDER BY created_at, rowid")
        scores = _latest_scores(evaluations)
        calls = self._records(
            "SELECT record FROM agent_calls WHERE json_extract(record, '$.generation') = ? "
            "ORDER BY rowid",
            (generation,),
        )
        candidates = []
        for v in versions:
            detail = v.get("detail") or {}
            training = detail.get("training")
            candidates.append(
                {
                    "version": v["version_id"],
                    "parent": v["parent_id"],
                    "status": v["status"],
                    "adapter": v["adapter"],
                    "note": v["note"],
                    "error": detail.get("error"),
                    "why": detail.get("why"),
                    "knobs": detail.get("knobs"),
                    "diff": detail.get("diff") or self._diff(v),
                    "gate": detail.get("gate"),
                    "training": training,
                    "adapter_files": self._adapter_files(v) if training else [],
                    "scores": scores.get(v["version_id"], {}),
                    "detail_keys": sorted(detail),
                    "program": None if training else self._harness_source(v),
                }
            )
        return {
            "generation": generation,
            "decisions": [redact(d) for d in decisions],
            "candidates": candidates,
            "agent_calls": [_agent_call(c) for c in calls],
        }

    def _harness_source(self, version: dict[str, Any]) -> str | None:
        path = self.root / version["harness_path"]
        try:
            return _cut(path.read_text(), FIELD_CHARS)
        except (OSError, UnicodeDecodeError):
            return None

    def _diff(self, version: dict[str, Any]) -> str | None:
        """A harness version without a stored diff: its file against its parent's."""
        import difflib

        if not version.get("parent_id"):
            return None
        parents = self._records(
            "SELECT record FROM versions WHERE version_id = ?", (version["parent_id"],)
        )
        if not parents or parents[0]["harness_path"] == version["harness_path"]:
            return None
        old, new = self._harness_source(parents[0]), self._harness_source(version)
        if old is None or new is None:
            return None
        lines = difflib.unified_diff(
            old.splitlines(), new.splitlines(), parents[0]["version_id"], version["version_id"],
            lineterm="",
        )  # fmt: skip
        return "\n".join(lines) or None

    def _adapter_files(self, version: dict[str, Any]) -> list[dict[str, Any]]:
        where = self.root / "adapters" / version["version_id"]
        if not where.is_dir():
            return []
        return [
            {"path": str(p.relative_to(self.root)), "bytes": p.stat().st_size}
            for p in sorted(where.rglob("*"))
            if p.is_file() and "checkpoint" not in p.parts
        ][:50]

    # -- trajectories -------------------------------------------------------------------------
    def trajectories(
        self,
        version: str | None = None,
        split: str | None = None,
        correct: bool | None = None,
        error: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        """One page of trajectories, newest filters applied in SQL; `error="any"` keeps every
        failed one, `error="none"` the ones that ran clean."""
        where, args = ["1=1"], []
        if version:
            where, args = [*where, "version_id = ?"], [*args, version]
        if split:
            where, args = [*where, "split = ?"], [*args, split]
        if correct is not None:
            where.append("json_extract(record, '$.score.correct') = ?")
            args.append(1 if correct else 0)
        if error == "any":
            where.append("json_extract(record, '$.error') IS NOT NULL")
        elif error == "none":
            where.append("json_extract(record, '$.error') IS NULL")
        elif error:
            where, args = [*where, "json_extract(record, '$.error.kind') = ?"], [*args, error]
        clause = " AND ".join(where)
        limit = max(1, min(int(limit), 500))
        with self._db() as db:
            total = db.execute(f"SELECT count(*) FROM trajectories WHERE {clause}", args).fetchone()
            rows = db.execute(
                "SELECT trajectory_id, version_id, split, instance_id, sample, "
                "json_extract(record, '$.score.value'), json_extract(record, '$.score.correct'), "
                "json_extract(record, '$.error.kind'), "
                "substr(json_extract(record, '$.error.message'), 1, ?), "
                # an item's cost: the harness's seconds plus the scorer's run of its program
                "json_extract(record, '$.seconds') "
                "+ coalesce(json_extract(record, '$.score.seconds'), 0), "
                "json_extract(record, '$.tokens'), "
                "json_extract(record, '$.calls'), substr(record -> '$.output', 1, ?) "
                f"FROM trajectories WHERE {clause} ORDER BY rowid LIMIT ? OFFSET ?",
                [PREVIEW_CHARS, PREVIEW_CHARS, *args, limit, max(0, int(offset))],
            ).fetchall()
        keys = ("id", "version", "split", "instance", "sample", "score", "correct", "error",
                "error_message", "seconds", "tokens", "calls", "output")  # fmt: skip
        items = [dict(zip(keys, row, strict=True)) for row in rows]
        for item in items:
            item["score"] = _finite(item["score"])
            item["correct"] = None if item["correct"] is None else bool(item["correct"])
        return {"total": total[0], "offset": offset, "limit": limit, "items": items}

    def trajectory(self, trajectory_id: str) -> dict[str, Any]:
        """One trajectory in full, with every LLM call it made (tokens and logprobs)."""
        found = self._records(
            "SELECT record FROM trajectories WHERE trajectory_id = ?", (trajectory_id,)
        )
        if not found:
            raise RunNotFound(f"run {self.root.name} has no trajectory {trajectory_id}")
        t = found[0]
        if t["split"] == "test":
            t["score"] = without_labels(t.get("score"))
        t["output"] = _cut(
            json.dumps(t.get("output"), ensure_ascii=False, default=str), FIELD_CHARS
        )
        t["logs"] = _cut(t.get("logs"), FIELD_CHARS)
        calls = self._records(
            "SELECT record FROM llm_calls WHERE episode_id = ? ORDER BY rowid", (trajectory_id,)
        )
        tokenizer = _tokenizer(_model(self.info()["config"]))
        return t | {"llm_calls": [_call(c, tokenizer) for c in calls]}


def _latest_scores(evaluations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{version: {split: score}} from evaluations in time order: each split's latest one."""
    scores: dict[str, dict[str, Any]] = {}
    for e in evaluations:
        scores.setdefault(e["version_id"], {})[e["split"]] = _score(e)
    return scores


def _score(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "value": _finite(e["value"]),
        "metric": e["metric"],
        "direction": e.get("direction", "higher"),
        "n": e["n"],
        "errors": e["n_errors"],
        "seconds_per_item": e.get("seconds_per_item"),
        "tokens_per_item": e.get("tokens_per_item"),
        "forced": e.get("forced", False),
        "degraded": e.get("degraded", False),
        "created_at": e["created_at"],
    }


def _version(
    v: dict[str, Any], decision: dict[str, Any] | None, scores: dict[str, Any]
) -> dict[str, Any]:
    detail = v.get("detail") or {}
    gate = detail.get("gate") or {}
    training = detail.get("training") or {}
    return {
        "version": v["version_id"],
        "parent": v["parent_id"],
        "generation": v["generation"],
        "status": v["status"],
        "adapter": v["adapter"],
        "lever": decision["lever"] if decision else None,
        "method": training.get("method") or (decision or {}).get("method"),
        "kind": "weights" if training else ("harness" if v["generation"] else "baseline"),
        "note": _cut(v.get("note") or "", PREVIEW_CHARS),
        "error": _cut(detail.get("error"), PREVIEW_CHARS),
        "scores": scores,
        "gate": {
            k: gate.get(k)
            for k in ("verdict", "p_value", "n_paired", "wins", "losses", "margin", "delta")
        }
        if gate
        else None,
        "created_at": v["created_at"],
    }


def _decision_row(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "generation": d["generation"],
        "lever": d["lever"],
        "method": d.get("method"),
        "rule": (d.get("evidence") or {}).get("rule"),
        "rationale": _cut(d["rationale"], 400),
        "created_at": d["created_at"],
    }


def _agent_call(c: dict[str, Any]) -> dict[str, Any]:
    keep = ("role", "purpose", "provider", "model", "prompt_tokens", "completion_tokens",
            "cost_usd", "seconds", "attempts", "error")  # fmt: skip
    return {k: c.get(k) for k in keep} | {
        "system": _cut(c.get("system"), 4000),
        "messages": [
            {"role": m.get("role"), "content": _cut(str(m.get("content")), 20_000)}
            for m in c.get("messages") or []
        ],
        "response": _cut(c.get("response"), 20_000),
    }


def _model(config: dict[str, Any]) -> str | None:
    policy = config.get("policy") or {}
    return policy.get("served_model") if policy.get("base_url") else policy.get("model")


@cache
def _tokenizer(model: str | None) -> Any:
    """The policy's tokenizer where a `tokenizer.json` is on disk (never built here), else None:
    calls then show token ids instead of token text."""
    from sialoop.paths import sialoop_home

    if not model:
        return None
    places = [Path(model), sialoop_home() / "models" / "gemma3-tokenizer"]
    if model != "embedded":
        places = places[:1]
    for place in places:
        if (place / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer

                return Tokenizer.from_file(str(place / "tokenizer.json"))
            except Exception:  # an unreadable tokenizer only costs the token text
                return None
    return None


def _call(c: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """An LLM call with its tokens laid out for a heat map: [text, logprob, prompt?] each."""
    prompt_ids, completion_ids = (
        c.get("prompt_token_ids") or [],
        c.get("completion_token_ids") or [],
    )
    ids = [*prompt_ids, *completion_ids]
    logprobs = list(c.get("token_logprobs") or [])
    aligned: list[float | None] = (
        [None] * (len(ids) - len(logprobs)) + logprobs[-len(ids) :] if ids else []
    )
    texts = (
        [tokenizer.id_to_token(i) or f"<{i}>" for i in ids]
        if tokenizer is not None
        else [f"<{i}>" for i in ids]
    )
    texts = [t.replace("▁", " ").replace("Ċ", "\n") for t in texts]
    tokens = [
        [text, _finite(lp), k < len(prompt_ids)]
        for k, (text, lp) in enumerate(zip(texts, aligned, strict=False))
    ][:4000]
    prompt = c.get("prompt")
    return {
        "call_id": c["call_id"],
        "endpoint": c["endpoint"],
        "adapter": c["adapter"],
        "params": c.get("params") or {},
        "latency_s": c.get("latency_s"),
        "prompt": _cut(
            prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False),
            FIELD_CHARS,
        ),
        "completion": _cut(c.get("completion"), FIELD_CHARS),
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(completion_ids),
        "tokens": tokens,
        "tokens_cut": max(0, len(ids) - 4000),
        "token_text": tokenizer is not None,
    }


LISTED = ("run_id", "task", "status", "reason", "best", "best_val", "best_test", "minutes",
          "isolation", "model", "metric", "direction", "created_at")  # fmt: skip


def run_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A run's line in the runs list, from its summary."""
    generations = max((v["generation"] for v in summary["versions"]), default=-1) + 1
    return {k: summary.get(k) for k in LISTED} | {"dir": name, "generations": generations}


def list_runs(folder: Path) -> list[dict[str, Any]]:
    """Every run directly under `folder`, oldest first; an unreadable one shows its error."""
    out: list[dict[str, Any]] = []
    if not folder.is_dir():
        return out
    for root in sorted(d for d in folder.iterdir() if (d / DB_NAME).is_file()):
        try:
            out.append(run_row(root.name, RunReader(root).summary()))
        except Exception as err:  # a listing shows a broken run instead of failing
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            out.append(
                {
                    "dir": root.name,
                    "run_id": root.name,
                    "status": "unreadable",
                    "reason": reason,
                    "created_at": time.time(),
                }
            )
    return sorted(out, key=lambda r: r["created_at"])
