"""Where async jobs are recorded: SQLite in JOBS_DIR by default, or PostgreSQL when
JOBS_DATABASE_URL names one, so that every replica reads and writes the same jobs.

One table, one row per job. A row is owned by the replica that runs the job (`owner`),
which renews its `heartbeat` while the job is queued or running; a replica that finds a
row whose heartbeat went stale (its owner died) claims it with a compare-and-set on
(owner, heartbeat), so exactly one replica takes it over. The SQL is written once, with
`?` placeholders, and runs on both databases. Every call is synchronous: `JobStore` runs
them in a thread of its own, in order.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

TABLE = "bentosvd_jobs"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    queue_position INTEGER,
    seed BIGINT NOT NULL,
    format TEXT NOT NULL,
    request TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    owner TEXT NOT NULL,
    heartbeat DOUBLE PRECISION NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    error TEXT,
    timings TEXT,
    media_type TEXT,
    video_bytes BIGINT
)"""

# The columns a job's status is made of (the `request` column holds what to run).
STATUS_COLUMNS = ("id", "status", "step", "total_steps", "queue_position", "seed", "format",
                  "attempt", "owner", "heartbeat", "cancel_requested", "created_at",
                  "finished_at", "error", "timings", "media_type", "video_bytes")
UNFINISHED = ("queued", "running")


class DatabaseUnavailable(Exception):
    """The job database could not be reached or written."""


class JobDatabase:
    """The `jobs` table in SQLite (`url` empty: `folder`/jobs.sqlite3) or PostgreSQL
    (`url` postgresql://...)."""

    def __init__(self, url: str | None, folder: Path):
        self.url = url or ""
        self.postgres = self.url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.Lock()
        if self.postgres:
            self.where = "PostgreSQL"
            self._connect = self._connect_postgres
        else:
            if self.url and not self.url.startswith("sqlite:///"):
                raise ValueError(f"JOBS_DATABASE_URL must be postgresql://... or sqlite:///<path>, "
                                 f"got {self.url.split('://')[0]}://...")
            self.path = Path(self.url[len("sqlite:///"):]) if self.url else folder / "jobs.sqlite3"
            self.where = f"SQLite at {self.path}"
            self._connect = self._connect_sqlite
        self._conn = None

    # ------------------------------------------------------------------ connection

    def _connect_sqlite(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=30)
        # WAL: a write is on disk when the call returns, and a crash loses nothing committed.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _connect_postgres(self):
        import psycopg  # only needed with PostgreSQL

        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def _execute(self, sql: str, params: Iterable = ()) -> tuple[list[tuple], int]:
        """Rows and row count; one reconnection when the connection was lost."""
        if self.postgres:
            sql = sql.replace("?", "%s")
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    cursor = self._conn.execute(sql, tuple(params))
                    rows = cursor.fetchall() if cursor.description else []
                    return rows, cursor.rowcount
                except Exception as e:
                    if not _is_connection_error(e) or attempt == 2:
                        if _is_connection_error(e):
                            self._close()
                            raise DatabaseUnavailable(f"the job database ({self.where}) is "
                                                      f"unavailable: {e}") from e
                        raise
                    self._close()
        raise AssertionError("unreachable")

    def _close(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:
            pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()

    # ------------------------------------------------------------------ jobs

    def create_table(self) -> None:
        self._execute(SCHEMA)

    def insert(self, row: dict) -> None:
        names = ", ".join(row)
        self._execute(f"INSERT INTO {TABLE} ({names}) VALUES ({', '.join('?' * len(row))})",
                      row.values())

    def update(self, job_id: str, owner: str, **fields) -> bool:
        """Set `fields` on the job if `owner` still owns it; False when it does not."""
        sets = ", ".join(f"{name} = ?" for name in fields)
        _, count = self._execute(f"UPDATE {TABLE} SET {sets} WHERE id = ? AND owner = ?",
                                 [*_values(fields), job_id, owner])
        return count == 1

    def get(self, job_id: str) -> dict | None:
        rows, _ = self._execute(f"SELECT {', '.join(STATUS_COLUMNS)} FROM {TABLE} WHERE id = ?",
                                [job_id])
        return dict(zip(STATUS_COLUMNS, rows[0])) if rows else None

    def request(self, job_id: str) -> dict:
        rows, _ = self._execute(f"SELECT request FROM {TABLE} WHERE id = ?", [job_id])
        return json.loads(rows[0][0])

    def delete(self, job_id: str) -> None:
        self._execute(f"DELETE FROM {TABLE} WHERE id = ?", [job_id])

    def request_cancel(self, job_id: str) -> None:
        self._execute(f"UPDATE {TABLE} SET cancel_requested = 1 WHERE id = ?", [job_id])

    def renew(self, owner: str, now: float) -> list[str]:
        """Renew the heartbeat of `owner`'s unfinished jobs; the ids of those whose cancel
        was asked (at any replica)."""
        self._execute(f"UPDATE {TABLE} SET heartbeat = ? WHERE owner = ? AND status IN (?, ?)",
                      [now, owner, *UNFINISHED])
        rows, _ = self._execute(
            f"SELECT id FROM {TABLE} WHERE owner = ? AND cancel_requested = 1 AND status IN (?, ?)",
            [owner, *UNFINISHED])
        return [r[0] for r in rows]

    def orphans(self, owner: str, stale_before: float) -> list[tuple[str, str, float]]:
        """Unfinished jobs of other owners whose heartbeat is older than `stale_before`:
        (id, owner, heartbeat), oldest job first."""
        rows, _ = self._execute(
            f"SELECT id, owner, heartbeat FROM {TABLE} WHERE status IN (?, ?) AND owner <> ? "
            f"AND heartbeat < ? ORDER BY created_at", [*UNFINISHED, owner, stale_before])
        return [tuple(r) for r in rows]

    def claim(self, job_id: str, old_owner: str, old_heartbeat: float, owner: str,
              now: float) -> int | None:
        """Take the job over if nobody did since it was seen; its new attempt number."""
        _, count = self._execute(
            f"UPDATE {TABLE} SET owner = ?, heartbeat = ?, attempt = attempt + 1, "
            f"status = 'queued', step = 0 WHERE id = ? AND owner = ? AND heartbeat = ?",
            [owner, now, job_id, old_owner, old_heartbeat])
        if count != 1:
            return None
        rows, _ = self._execute(f"SELECT attempt FROM {TABLE} WHERE id = ?", [job_id])
        return rows[0][0]

    def finished(self) -> list[tuple[str, float, int, str | None]]:
        """Finished jobs, newest first: (id, finished_at, video_bytes, format)."""
        rows, _ = self._execute(
            f"SELECT id, finished_at, COALESCE(video_bytes, 0), format FROM {TABLE} "
            f"WHERE status NOT IN (?, ?) ORDER BY finished_at DESC", UNFINISHED)
        return [tuple(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows, _ = self._execute(f"SELECT status, COUNT(*) FROM {TABLE} GROUP BY status")
        return {status: n for status, n in rows}


def _values(fields: dict) -> list:
    return [json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values()]


def _is_connection_error(e: Exception) -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(e, psycopg.OperationalError)
