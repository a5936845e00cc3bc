"""The durable store behind /v1/files and /v1/batches: one SQLite database (WAL mode) and a directory of file bytes.

    <root>/batch.sqlite3   files, batches, and one row per finished batch line
    <root>/files/<id>      the bytes of each file (input files as uploaded, output and error files when written)

Exactly once: a line's result is a row keyed by (batch id, line number), with the line's custom_id unique within its
batch; it is inserted, and the batch's request counts moved, in one transaction, so a result is either wholly there or
not at all. A runner that dies loses only the lines it had in flight; whoever resumes the batch runs every line that
has no row yet, and an insert for a line that already has one (two runners racing after a lost lease) changes
nothing. The output and error files are written from these rows once the batch ends, in line order.

Who runs a batch: a runner claims it with a lease (`owner`, `lease_until`) and renews it while it works. A lease that
ran out, or whose owner was a process of this host that no longer runs, can be claimed by another runner, so a
restarted server resumes its batches at once and a replica that died hands its batches to the others. Every process
that shares the directory shares the batches; SQLite's locking (WAL needs shared memory) holds on one host's local
disk, not on a network filesystem. A commit survives a crash of the process (synchronous=FULL: a power loss too).

File bytes are written under a temporary name, renamed, then recorded: a crash in between leaves only an orphan,
which the next open sweeps. A deleted file disappears from the API at once; its bytes go when no unfinished batch
reads them.
"""

import contextlib
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .models import ACTIVE, Batch, BatchError, BatchErrors, FileObject, RequestCounts

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER, expires_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    output_file_id TEXT, error_file_id TEXT,
    errors TEXT, metadata TEXT,
    owner TEXT, lease_until REAL,
    served_by TEXT
);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT,
    ok INTEGER NOT NULL,
    body TEXT NOT NULL,
    worker TEXT,
    PRIMARY KEY (batch_id, line)
);
CREATE UNIQUE INDEX IF NOT EXISTS results_custom_id ON results(batch_id, custom_id) WHERE custom_id IS NOT NULL;
"""
_ORPHAN_AGE_S = 3600  # bytes on disk with no row this old are left over from a crash
_COPY_CHUNK = 1 << 20
OUTPUT_PURPOSE = "batch_output"
Finish = Literal["completed", "cancelled", "expired", "failed"]


class StoreError(Exception):
    """A request the store refuses; `kind` says why (the API maps it to a status)."""

    def __init__(self, kind: Literal["not_found", "conflict", "too_large", "limit", "invalid"], message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """`file-…` / `batch_…`: 24 random hex digits, never derived from anything a client sent."""
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass(frozen=True)
class FileRecord:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int

    def to_api(self) -> FileObject:
        return FileObject(
            id=self.id, bytes=self.bytes, created_at=self.created_at, filename=self.filename, purpose=self.purpose
        )


@dataclass
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    owner: str | None = None
    lease_until: float | None = None
    served_by: str | None = None  # the model of the server that took it: only its runners run it

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "BatchRecord":
        data = dict(row)
        data["errors"] = json.loads(data["errors"]) if data["errors"] else None
        data["metadata"] = json.loads(data["metadata"]) if data["metadata"] else None
        return cls(**data)

    def to_api(self) -> Batch:
        timestamps = (
            "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
            "cancelling_at", "cancelled_at",
        )  # fmt: skip
        return Batch(
            id=self.id,
            endpoint=self.endpoint,
            errors=BatchErrors(data=[BatchError(**e) for e in self.errors]) if self.errors else None,
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            status=self.status,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            created_at=self.created_at,
            request_counts=RequestCounts(total=self.total, completed=self.completed, failed=self.failed),
            metadata=self.metadata,
            **{name: getattr(self, name) for name in timestamps},
        )


_PROCESS_TOKEN = secrets.token_hex(6)  # tells this process from an earlier one that had the same pid


class Owner:
    """Who holds a batch's lease: host, process (pid and a token: a pid can come back in a new process, pid 1 in a
    restarted container) and runner."""

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.process = _PROCESS_TOKEN
        self.token = secrets.token_hex(6)

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}/{self.process}/{self.token}"

    def outlived(self, other: str) -> bool:
        """True when `other` was a process of this host that has gone (so its lease need not be waited out)."""
        parts = other.split("/")
        if len(parts) != 4 or parts[0] != self.host or not parts[1].isdigit():
            return False
        pid, process = int(parts[1]), parts[2]
        if pid == self.pid:
            return process != self.process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class BatchStore:
    def __init__(self, root: str | Path, busy_timeout_s: float = 30.0):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "batch.sqlite3"
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        with self._write() as c:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                c.execute(statement)
        self._sweep()

    # ---- connections and transactions ----
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so a read-then-write cannot be overtaken."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- files ----
    def file_path(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise StoreError("not_found", f"No such File object: {file_id[:80]}")
        return self.files_dir / file_id

    def create_file(self, purpose: str, filename: str, source: BinaryIO, max_bytes: int) -> FileRecord:
        """Copy `source` into the store (refusing it past `max_bytes`) and record it."""
        file_id = new_id("file-")
        size = self._write_bytes(file_id, _chunks(source), max_bytes)
        record = FileRecord(file_id, purpose, filename, size, _now())
        with self._write() as c:
            c.execute(
                "INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                (record.id, record.purpose, record.filename, record.bytes, record.created_at),
            )
        return record

    def _write_bytes(self, file_id: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> int:
        final = self.files_dir / file_id
        part = final.with_name(file_id + ".part")
        size = 0
        try:
            with open(part, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise StoreError("too_large", f"the file is larger than {max_bytes} bytes")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return size

    def get_file(self, file_id: str) -> FileRecord:
        row = (
            self._conn()
            .execute(
                "SELECT id, purpose, filename, bytes, created_at FROM files WHERE id = ? AND deleted = 0", (file_id,)
            )
            .fetchone()
        )
        if row is None:
            raise StoreError("not_found", f"No such File object: {file_id[:80]}")
        return FileRecord(**dict(row))

    def list_files(
        self, purpose: str | None = None, limit: int = 10_000, after: str | None = None, order: str = "desc"
    ) -> tuple[list[FileRecord], bool]:
        """A page of files, newest first (`order="asc"`: oldest first), after the file `after`; and whether more
        follow."""
        descending = order != "asc"
        query = "SELECT id, purpose, filename, bytes, created_at FROM files WHERE deleted = 0"
        params: list[Any] = []
        if purpose is not None:
            query += " AND purpose = ?"
            params.append(purpose)
        if after is not None:
            query += f" AND rowid {'<' if descending else '>'} (SELECT rowid FROM files WHERE id = ?)"
            params.append(after)
        query += f" ORDER BY rowid {'DESC' if descending else 'ASC'} LIMIT ?"
        params.append(limit + 1)
        rows = self._conn().execute(query, params).fetchall()
        return [FileRecord(**dict(r)) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> None:
        with self._write() as c:
            if c.execute("UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0", (file_id,)).rowcount == 0:
                raise StoreError("not_found", f"No such File object: {file_id[:80]}")
        self._reap_deleted()

    def _reap_deleted(self) -> None:
        """Remove the bytes of deleted files that no unfinished batch reads."""
        active = ",".join("?" * len(ACTIVE))
        rows = (
            self._conn()
            .execute(
                f"SELECT id FROM files WHERE deleted = 1 AND id NOT IN "
                f"(SELECT input_file_id FROM batches WHERE status IN ({active}))",
                tuple(ACTIVE),
            )
            .fetchall()
        )
        for row in rows:
            (self.files_dir / row["id"]).unlink(missing_ok=True)
            with self._write() as c:
                c.execute("DELETE FROM files WHERE id = ? AND deleted = 1", (row["id"],))

    def _sweep(self) -> None:
        """Left over from a crash: bytes written but never recorded (old enough not to be in the middle of it)."""
        known = {r["id"] for r in self._conn().execute("SELECT id FROM files").fetchall()}
        cutoff = time.time() - _ORPHAN_AGE_S
        for path in self.files_dir.iterdir():
            name = path.name.removesuffix(".part")
            with contextlib.suppress(FileNotFoundError):
                if (path.name.endswith(".part") or name not in known) and path.stat().st_mtime < cutoff:
                    log.info("removing %s, left over from an interrupted write", path)
                    path.unlink()
        self._reap_deleted()

    # ---- batches ----
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window_s: int,
        completion_window: str,
        metadata: dict[str, str] | None,
        max_active: int,
        served_by: str | None = None,
    ) -> BatchRecord:
        batch_id = new_id("batch_")
        now = _now()
        active = ",".join("?" * len(ACTIVE))
        with self._write() as c:
            row = c.execute("SELECT purpose FROM files WHERE id = ? AND deleted = 0", (input_file_id,)).fetchone()
            if row is None:
                raise StoreError("not_found", f"No such File object: {input_file_id[:80]}")
            if row["purpose"] != "batch":
                raise StoreError("invalid", f"file {input_file_id} has purpose {row['purpose']!r}, not 'batch'")
            (count,) = c.execute(f"SELECT COUNT(*) FROM batches WHERE status IN ({active})", tuple(ACTIVE)).fetchone()
            if count >= max_active:
                raise StoreError("limit", f"{count} batches are already queued or running; try again later")
            c.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at, expires_at,"
                " metadata, served_by) VALUES (?, ?, ?, ?, 'validating', ?, ?, ?, ?)",
                (
                    batch_id,
                    endpoint,
                    input_file_id,
                    completion_window,
                    now,
                    now + completion_window_s,
                    json.dumps(metadata) if metadata is not None else None,
                    served_by,
                ),
            )
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> BatchRecord:
        row = self._conn().execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise StoreError("not_found", f"No such Batch object: {batch_id[:80]}")
        return BatchRecord.from_row(row)

    def list_batches(self, limit: int = 20, after: str | None = None) -> tuple[list[BatchRecord], bool]:
        query, params = "SELECT * FROM batches", []
        if after is not None:
            query += " WHERE rowid < (SELECT rowid FROM batches WHERE id = ?)"
            params.append(after)
        rows = self._conn().execute(query + " ORDER BY rowid DESC LIMIT ?", (*params, limit + 1)).fetchall()
        return [BatchRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def request_cancel(self, batch_id: str) -> BatchRecord:
        """validating / in_progress -> cancelling (the runner then stops and writes what finished); a batch already
        cancelling or cancelled is returned as it is; one that has ended otherwise cannot be cancelled."""
        with self._write() as c:
            row = c.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                raise StoreError("not_found", f"No such Batch object: {batch_id[:80]}")
            if row["status"] in ("validating", "in_progress"):
                c.execute(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?", (_now(), batch_id)
                )
            elif row["status"] not in ("cancelling", "cancelled"):
                raise StoreError("conflict", f"cannot cancel a batch that is {row['status']}")
        return self.get_batch(batch_id)

    # ---- the runner's side ----
    def claim(self, owner: Owner, lease_s: float, served_by: str | None = None) -> BatchRecord | None:
        """The oldest unfinished batch nobody holds (no owner, an expired lease, or a dead owner on this host) among
        those `served_by` took (all, when None), now leased to `owner`."""
        now = time.time()
        active = ",".join("?" * len(ACTIVE))
        with self._write() as c:
            rows = c.execute(
                f"SELECT id, owner, lease_until FROM batches WHERE status IN ({active})"
                + (" AND served_by = ?" if served_by is not None else "")
                + " ORDER BY rowid",
                (*ACTIVE, *([served_by] if served_by is not None else [])),
            ).fetchall()
            for row in rows:
                held = row["owner"] is not None and (row["lease_until"] or 0) > now
                if row["owner"] == str(owner) or not held or owner.outlived(row["owner"]):
                    c.execute(
                        "UPDATE batches SET owner = ?, lease_until = ? WHERE id = ?",
                        (str(owner), now + lease_s, row["id"]),
                    )
                    if row["owner"] and row["owner"] != str(owner):
                        log.info("batch %s: taking over from %s", row["id"], row["owner"])
                    break
            else:
                return None
        return self.get_batch(row["id"])

    def renew(self, batch_id: str, owner: Owner, lease_s: float) -> str | None:
        """Extend the lease; the batch's status, or None when `owner` no longer holds it."""
        with self._write() as c:
            changed = c.execute(
                "UPDATE batches SET lease_until = ? WHERE id = ? AND owner = ?",
                (time.time() + lease_s, batch_id, str(owner)),
            ).rowcount
            if not changed:
                return None
            return c.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()["status"]

    def release(self, batch_id: str, owner: Owner) -> None:
        with self._write() as c:
            c.execute(
                "UPDATE batches SET owner = NULL, lease_until = NULL WHERE id = ? AND owner = ?", (batch_id, str(owner))
            )

    def start(self, batch_id: str, owner: Owner, total: int, errors: Iterable[tuple[int, str]]) -> None:
        """Validation done: record the lines that failed it (line number, error line JSON) and the total, and move
        validating -> in_progress (a batch cancelled meanwhile stays cancelling). Their custom_ids stay out of the
        key: a line that reused one must not take it from the line that had it first."""
        with self._write() as c:
            self._check_owner(c, batch_id, owner)
            c.executemany(
                "INSERT OR IGNORE INTO results (batch_id, line, custom_id, ok, body, worker) VALUES (?, ?, ?, 0, ?, ?)",
                [(batch_id, line, None, body, str(owner)) for line, body in errors],
            )
            (failed,) = c.execute("SELECT COUNT(*) FROM results WHERE batch_id = ? AND ok = 0", (batch_id,)).fetchone()
            c.execute("UPDATE batches SET total = ?, failed = ? WHERE id = ?", (total, failed, batch_id))
            c.execute(
                "UPDATE batches SET status = 'in_progress', in_progress_at = ? WHERE id = ? AND status = 'validating'",
                (_now(), batch_id),
            )

    def done_lines(self, batch_id: str) -> set[int]:
        rows = self._conn().execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,)).fetchall()
        return {r["line"] for r in rows}

    def record(self, batch_id: str, line: int, custom_id: str | None, ok: bool, body: str, owner: Owner) -> bool:
        """A line's result, once: False (and nothing changed) when the line already has one."""
        with self._write() as c:
            inserted = c.execute(
                "INSERT OR IGNORE INTO results (batch_id, line, custom_id, ok, body, worker) VALUES (?, ?, ?, ?, ?, ?)",
                (batch_id, line, custom_id, int(ok), body, str(owner)),
            ).rowcount
            if inserted:
                column = "completed" if ok else "failed"
                c.execute(f"UPDATE batches SET {column} = {column} + 1 WHERE id = ?", (batch_id,))
        return bool(inserted)

    def set_status(self, batch_id: str, owner: Owner, status: str, expected: tuple[str, ...]) -> bool:
        stamp = {"finalizing": "finalizing_at"}.get(status)
        with self._write() as c:
            self._check_owner(c, batch_id, owner)
            sets = "status = ?" + (f", {stamp} = {_now()}" if stamp else "")
            marks = ",".join("?" * len(expected))
            return bool(
                c.execute(
                    f"UPDATE batches SET {sets} WHERE id = ? AND status IN ({marks})", (status, batch_id, *expected)
                ).rowcount
            )

    def finish(
        self, batch_id: str, owner: Owner, status: Finish, errors: list[dict[str, Any]] | None = None
    ) -> BatchRecord:
        """End the batch: write its output file (the lines that succeeded, in line order) and its error file (the
        rest), each only when it has a line, and set the final status. Idempotent up to the commit: a runner that dies
        before it leaves the batch to be finished again; the bytes it wrote are swept as orphans."""
        written: list[str] = []
        try:
            files = []
            for ok, kind in ((1, "output"), (0, "error")):
                (count,) = (
                    self._conn()
                    .execute("SELECT COUNT(*) FROM results WHERE batch_id = ? AND ok = ?", (batch_id, ok))
                    .fetchone()
                )
                if not count:
                    files.append(None)
                    continue
                file_id = new_id("file-")
                size = self._write_bytes(file_id, self._result_lines(batch_id, ok))
                written.append(file_id)
                files.append(FileRecord(file_id, OUTPUT_PURPOSE, f"{batch_id}_{kind}.jsonl", size, _now()))
            with self._write() as c:
                self._check_owner(c, batch_id, owner)
                for record in filter(None, files):
                    c.execute(
                        "INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                        (record.id, record.purpose, record.filename, record.bytes, record.created_at),
                    )
                output, error = (f.id if f else None for f in files)
                c.execute(
                    f"UPDATE batches SET status = ?, {status}_at = ?, output_file_id = ?, error_file_id = ?,"
                    " errors = COALESCE(?, errors), owner = NULL, lease_until = NULL WHERE id = ?",
                    (status, _now(), output, error, json.dumps(errors) if errors else None, batch_id),
                )
        except BaseException:
            for file_id in written:
                (self.files_dir / file_id).unlink(missing_ok=True)
            raise
        self._reap_deleted()
        return self.get_batch(batch_id)

    def _result_lines(self, batch_id: str, ok: int) -> Iterator[bytes]:
        conn = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s)  # a reader of its own while we write
        try:
            cursor = conn.execute(
                "SELECT body FROM results WHERE batch_id = ? AND ok = ? ORDER BY line", (batch_id, ok)
            )
            buffer: list[bytes] = []
            for (body,) in cursor:
                buffer.append(body.encode() + b"\n")
                if len(buffer) >= 256:
                    yield b"".join(buffer)
                    buffer.clear()
            yield b"".join(buffer)
        finally:
            conn.close()

    def results_by_worker(self, batch_id: str) -> dict[str, int]:
        """How many of a batch's lines each runner finished (who did the work, for tests and logs)."""
        rows = (
            self._conn()
            .execute("SELECT worker, COUNT(*) AS n FROM results WHERE batch_id = ? GROUP BY worker", (batch_id,))
            .fetchall()
        )
        return {r["worker"]: r["n"] for r in rows}

    @staticmethod
    def _check_owner(c: sqlite3.Connection, batch_id: str, owner: Owner) -> None:
        row = c.execute("SELECT owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or row["owner"] != str(owner):
            raise LeaseLost(f"batch {batch_id} is no longer held by {owner}")


class LeaseLost(RuntimeError):
    """Another runner holds the batch now: stop working on it."""


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    while chunk := source.read(_COPY_CHUNK):
        yield chunk
