"""The run directory: a SQLite index (WAL) plus artifact files.

Layout of `runs/<run_id>/`:
    run.db          runs, versions, trajectories, llm_calls, agent_calls, evaluations, decisions
    harness/        one file per harness version (`<version_id>.py`)
    adapters/       one peft adapter folder per weights version
    public/         the task's public files, the only task data a harness can read

Guarantees: every write is one transaction, so a process killed with SIGKILL at any point leaves
a database that opens, passes `PRAGMA integrity_check` and holds whole records only. Each row
keeps the record's full JSON (the source of truth) beside a few indexed columns. The store is
safe to use from several threads (one connection per thread) and several processes (WAL plus a
busy timeout); it is not meant for network file systems.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sialoop.errors import StoreError
from sialoop.records import (
    SCHEMA_VERSION,
    AgentCall,
    Decision,
    Evaluation,
    LLMCall,
    RunInfo,
    Trajectory,
    Version,
)

DB_NAME = "run.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, task TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version_id TEXT PRIMARY KEY, generation INTEGER NOT NULL, status TEXT NOT NULL,
    record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trajectories (
    trajectory_id TEXT PRIMARY KEY, version_id TEXT NOT NULL, split TEXT NOT NULL,
    instance_id TEXT NOT NULL, sample INTEGER NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS trajectories_by_version ON trajectories (version_id, split);
CREATE TABLE IF NOT EXISTS llm_calls (
    call_id TEXT PRIMARY KEY, episode_id TEXT, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS llm_calls_by_episode ON llm_calls (episode_id);
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id TEXT PRIMARY KEY, version_id TEXT NOT NULL, split TEXT NOT NULL,
    created_at REAL NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY, generation INTEGER NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agent_calls (
    call_id TEXT PRIMARY KEY, role TEXT NOT NULL, record TEXT NOT NULL);
"""


class Store:
    """One run directory. Create with `Store.create`, reopen with `Store.open`."""

    def __init__(self, root: Path):
        self.root = root
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, info: RunInfo) -> Store:
        if (root / DB_NAME).exists():
            raise StoreError(f"run directory {root} already exists: pick another run id")
        for sub in ("harness", "adapters", "public"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        store = cls(root)
        store._connection().executescript(_SCHEMA)  # DDL is idempotent; it runs outside BEGIN
        with store.transaction() as db:
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?)",
                (info.run_id, info.task, info.status, info.model_dump_json()),
            )
        return store

    @classmethod
    def open(cls, root: Path) -> Store:
        if not (root / DB_NAME).exists():
            raise StoreError(f"no run at {root}: pass a run directory made by `sialoop run`")
        store = cls(root)
        store._check_schema()
        store._connection().executescript(_SCHEMA)  # tables added since the run was made
        return store

    def _check_schema(self) -> None:
        """A run written by another schema is refused in one line saying which wrote it."""
        try:
            rows = self._rows("SELECT record FROM runs")
        except sqlite3.DatabaseError as err:
            raise StoreError(
                f"{self.root / DB_NAME} is not a readable run database: {err}"
            ) from None
        if not rows:
            raise StoreError(f"{self.root / DB_NAME} holds no run record: start a new run")
        raw = json.loads(rows[0])
        found = raw.get("schema_version")
        if found != SCHEMA_VERSION:
            by = raw.get("sialoop_version") or "an unknown sialoop version"
            raise StoreError(
                f"run {self.root} was written by {by} with record schema {found}; this sialoop "
                f"reads schema {SCHEMA_VERSION}: use the sialoop version that wrote it"
            )
        try:
            RunInfo.model_validate(raw)
        except ValidationError as err:
            raise StoreError(
                f"run {self.root}: its run record does not match schema {SCHEMA_VERSION} "
                f"({err.errors()[0]['msg']}); use the sialoop version that wrote it"
            ) from None

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.root / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: all of it lands or none of it does."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _rows(self, sql: str, args: Iterable[object] = ()) -> list[str]:
        return [row[0] for row in self._connection().execute(sql, tuple(args))]

    # -- runs ----------------------------------------------------------------------------
    def run_info(self) -> RunInfo:
        rows = self._rows("SELECT record FROM runs")
        return RunInfo.model_validate_json(rows[0])

    def set_run_status(self, status: str, reason: str | None = None) -> None:
        info = self.run_info().model_copy(update={"status": status, "reason": reason})
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, record = ? WHERE run_id = ?",
                (status, info.model_dump_json(), info.run_id),
            )

    def set_run_config(self, config: dict[str, Any]) -> None:
        """The config a resume changed (model path, budget, generations), for later resumes."""
        info = self.run_info().model_copy(update={"config": config})
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET record = ? WHERE run_id = ?", (info.model_dump_json(), info.run_id)
            )

    # -- versions ------------------------------------------------------------------------
    def put_version(self, version: Version) -> None:
        """Insert or replace a version (its status changes as the gate decides)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)",
                (version.version_id, version.generation, version.status, version.model_dump_json()),
            )

    def versions(self) -> list[Version]:
        rows = self._rows("SELECT record FROM versions ORDER BY generation, rowid")
        return [Version.model_validate_json(r) for r in rows]

    def incumbent(self) -> Version | None:
        """The latest accepted version scored on val (see `evaluator.best_version`), or None."""
        val = {e.version_id for e in self.evaluations("val")}
        accepted = [v for v in self.versions() if v.status == "accepted" and v.version_id in val]
        return max(accepted, key=lambda v: (v.generation, v.created_at)) if accepted else None

    def version(self, version_id: str) -> Version:
        rows = self._rows("SELECT record FROM versions WHERE version_id = ?", [version_id])
        if not rows:
            raise StoreError(f"no version '{version_id}' in {self.root}: see `sialoop report`")
        return Version.model_validate_json(rows[0])

    # -- trajectories and their LLM calls --------------------------------------------------
    def add_trajectory(self, trajectory: Trajectory, calls: Iterable[LLMCall] = ()) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO trajectories VALUES (?, ?, ?, ?, ?, ?)",
                (
                    trajectory.trajectory_id,
                    trajectory.version_id,
                    trajectory.split,
                    trajectory.instance_id,
                    trajectory.sample,
                    trajectory.model_dump_json(),
                ),
            )
            for call in calls:
                db.execute(
                    "INSERT INTO llm_calls VALUES (?, ?, ?)",
                    (call.call_id, call.episode_id, call.model_dump_json()),
                )

    def trajectories(
        self, version_id: str | None = None, split: str | None = None
    ) -> list[Trajectory]:
        sql, args = "SELECT record FROM trajectories WHERE 1=1", []
        if version_id is not None:
            sql, args = sql + " AND version_id = ?", [*args, version_id]
        if split is not None:
            sql, args = sql + " AND split = ?", [*args, split]
        return [
            Trajectory.model_validate_json(r) for r in self._rows(sql + " ORDER BY rowid", args)
        ]

    def stored_for(
        self, version_id: str, instances: Iterable[Any], samples: int = 1
    ) -> list[Trajectory]:
        """What a phase over `instances` (k samples each) will reuse: their stored trajectories."""
        wanted = {(i.split, i.id) for i in instances}
        splits = {split for split, _ in wanted}
        return [
            t
            for split in sorted(splits)
            for t in self.trajectories(version_id, split)
            if (t.split, t.instance_id) in wanted and t.sample < samples
        ]

    def record(self, call: LLMCall) -> None:
        """The policy endpoint's recorder: one LLM call, written as it is served."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO llm_calls VALUES (?, ?, ?)",
                (call.call_id, call.episode_id, call.model_dump_json()),
            )

    def episode_tokens(self, episode_id: str) -> int:
        """Prompt plus completion tokens of an episode's recorded calls: 0 if it made none, since
        the policy endpoint that records them is a harness's only way to the model."""
        row = (
            self._connection()
            .execute(
                "SELECT count(*), sum(json_array_length(record, '$.prompt_token_ids') + "
                "json_array_length(record, '$.completion_token_ids') + "
                "coalesce(json_extract(record, '$.tokens'), 0)) FROM llm_calls "
                "WHERE episode_id = ?",
                (episode_id,),
            )
            .fetchone()
        )
        return int(row[1] or 0)

    def episode_shape(self, episode_id: str) -> tuple[int, int]:
        """An episode's recorded calls, and the tokens the policy sampled in them: the sum of
        `LLMCall.sampled_tokens`, in SQL so that no call record is parsed."""
        row = (
            self._connection()
            .execute(
                "SELECT count(*), sum(CASE WHEN json_extract(record, '$.params.max_tokens') = 0 "
                "THEN 0 ELSE json_array_length(record, '$.completion_token_ids') END) "
                "FROM llm_calls WHERE episode_id = ?",
                (episode_id,),
            )
            .fetchone()
        )
        return int(row[0] or 0), int(row[1] or 0)

    def llm_calls(self, episode_id: str | None = None) -> list[LLMCall]:
        if episode_id is None:
            rows = self._rows("SELECT record FROM llm_calls ORDER BY rowid")
        else:
            rows = self._rows(
                "SELECT record FROM llm_calls WHERE episode_id = ? ORDER BY rowid", [episode_id]
            )
        return [LLMCall.model_validate_json(r) for r in rows]

    def add_agent_call(self, call: AgentCall) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO agent_calls VALUES (?, ?, ?)",
                (call.call_id, call.role, call.model_dump_json()),
            )

    def agent_calls(self, role: str | None = None) -> list[AgentCall]:
        sql, args = "SELECT record FROM agent_calls", []
        if role is not None:
            sql, args = sql + " WHERE role = ?", [role]
        return [AgentCall.model_validate_json(r) for r in self._rows(sql + " ORDER BY rowid", args)]

    # -- evaluations and decisions -------------------------------------------------------
    def add_evaluation(self, evaluation: Evaluation) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?)",
                (
                    evaluation.evaluation_id,
                    evaluation.version_id,
                    evaluation.split,
                    evaluation.created_at,
                    evaluation.model_dump_json(),
                ),
            )

    def evaluations(self, split: str | None = None) -> list[Evaluation]:
        sql, args = "SELECT record FROM evaluations", []
        if split is not None:
            sql, args = sql + " WHERE split = ?", [split]
        rows = self._rows(sql + " ORDER BY created_at, rowid", args)
        return [Evaluation.model_validate_json(r) for r in rows]

    def add_decision(self, decision: Decision) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO decisions VALUES (?, ?, ?)",
                (decision.decision_id, decision.generation, decision.model_dump_json()),
            )

    def replace_decision(self, decision: Decision) -> None:
        """Rewrite a stored Decision (the gate adds the n it used)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE decisions SET record = ? WHERE decision_id = ?",
                (decision.model_dump_json(), decision.decision_id),
            )

    def decisions(self) -> list[Decision]:
        rows = self._rows("SELECT record FROM decisions ORDER BY generation, rowid")
        return [Decision.model_validate_json(r) for r in rows]

    # -- artifacts -----------------------------------------------------------------------
    def write_harness(self, version_id: str, source: str) -> str:
        """Write a harness file atomically; returns its path relative to the run directory."""
        rel = f"harness/{version_id}.py"
        tmp = self.root / (rel + ".partial")
        tmp.write_text(source)
        tmp.replace(self.root / rel)
        return rel

    def path(self, rel: str) -> Path:
        return self.root / rel

    def integrity_ok(self) -> bool:
        return self._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
