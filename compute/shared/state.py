"""The shared state file: one small SQLite database in the runtime dir.

Every supervised program (lifecycle driver, monitor, API workers, exit watcher) opens its own
connection after fork; writes are short `BEGIN IMMEDIATE` transactions in WAL mode, so readers
(the API serving /status) never wait for writers. This is the only module that speaks SQL to it.

The data is a key/value table whose values are JSON. Keys in use:
  status, error, start_time, last_active (epoch seconds), spec (decoded JSON), spec_generation,
  metrics (object of integers), launch (the bootstrap's settings: compute.model.launch.Settings as JSON), postgres_exit_code (int),
  pending_restart (list of setting names), shutdown_requested (bool), terminate_waiters ({pid: n}:
  the /terminate calls waiting for their answer), promotion, terminate (the driver's requests:
  compute/shared/driver_requests.py), pg_downtime ({current_ms, total_ms}: the monitor),
  installed_extensions ({collected_at, extensions: [...]}: the monitor),
  cplane_requests ({rpc: {http_status: count}}: the driver's requests to the control plane)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
import urllib.parse
from enum import Enum
from typing import Any, Iterable, Iterator

# The file's name and the variables naming it (compute-ctl needs them before sqlite3): theirs.
from compute.shared.state_names import (RUNTIME_DIR_ENV, STATE_FILE, STATE_ID_ENV,  # noqa: F401
                                        runtime_dir_from_env, state_path)


class Status(str, Enum):
    """The compute's status as /status reports it (Neon's ComputeStatus, snake_case)."""
    EMPTY = "empty"
    CONFIGURATION_PENDING = "configuration_pending"
    INIT = "init"
    RUNNING = "running"
    CONFIGURATION = "configuration"
    FAILED = "failed"
    TERMINATION_PENDING_FAST = "termination_pending_fast"
    TERMINATION_PENDING_IMMEDIATE = "termination_pending_immediate"
    TERMINATED = "terminated"


STATUSES = tuple(s.value for s in Status)
CPLANE_REQUESTS_KEY = "cplane_requests"

# Who moves the status where (the store refuses anything else):
#   init -> empty                      driver: no spec, waiting for /configure
#   init -> init                       driver: spec parsed (again, after a driver restart)
#   empty -> configuration_pending     /configure brings the first spec
#   configuration_pending -> init      driver: the start-up of an `empty` compute begins
#   running -> configuration_pending   /configure of a running compute
#   configuration_pending -> configuration   driver: applying it
#   configuration -> configuration_pending  driver restarted mid-apply: apply again; the driver
#                                      hands a promoted compute's spec over
#   running -> configuration           /promote claims the compute
#   configuration -> running           applied (or a promotion that failed: still the replica)
#   init -> running                    start-up done
#   init, empty, configuration_pending, configuration -> failed   start-up or apply failed
#   empty, running -> termination_pending_<mode>   /terminate (compute/shared/driver_requests.py)
#   termination_pending_<mode> -> terminated       postgres is down and the LSN recorded (the
#                                      driver; the API when postgres never ran)
#   termination_pending_<mode> -> failed           the stop itself failed (supervisord refused)
# `failed` is final: the driver keeps it on /status for the grace period, then the tree exits.
# `terminated` is final: the tree exits once every waiting /terminate has its answer.
ALLOWED_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.INIT: frozenset({Status.INIT, Status.EMPTY, Status.RUNNING, Status.FAILED}),
    Status.EMPTY: frozenset({Status.CONFIGURATION_PENDING, Status.FAILED,
                             Status.TERMINATION_PENDING_FAST, Status.TERMINATION_PENDING_IMMEDIATE}),
    Status.CONFIGURATION_PENDING: frozenset({Status.INIT, Status.CONFIGURATION, Status.FAILED}),
    Status.RUNNING: frozenset({Status.CONFIGURATION_PENDING, Status.CONFIGURATION,
                               Status.TERMINATION_PENDING_FAST, Status.TERMINATION_PENDING_IMMEDIATE}),
    Status.CONFIGURATION: frozenset({Status.RUNNING, Status.CONFIGURATION_PENDING, Status.FAILED}),
    Status.FAILED: frozenset(),
    Status.TERMINATION_PENDING_FAST: frozenset({Status.TERMINATED, Status.FAILED}),
    Status.TERMINATION_PENDING_IMMEDIATE: frozenset({Status.TERMINATED, Status.FAILED}),
    Status.TERMINATED: frozenset(),
}
TERMINATION_PENDING = {"fast": Status.TERMINATION_PENDING_FAST, "immediate": Status.TERMINATION_PENDING_IMMEDIATE}


def hyphenated(status: Any) -> str:
    """A status as Neon's compute_ctl prints it (its Display): in error messages and in
    `compute_ctl_up{status}` (`configuration-pending`, `termination-pending-fast`)."""
    return str(status).replace("_", "-")


class IllegalTransition(ValueError):
    pass


def check_transition(current: Any, new: Any) -> Status:
    """The new status, if moving to it from `current` is allowed; else IllegalTransition.
    A store with no status yet (None) may take any."""
    try:
        target = Status(new)
    except ValueError:
        raise IllegalTransition(f"unknown status {new!r}") from None
    if current is None:
        return target
    try:
        source = Status(current)
    except ValueError:
        raise IllegalTransition(f"the stored status {current!r} is unknown") from None
    if target not in ALLOWED_TRANSITIONS[source]:
        raise IllegalTransition(f"status {source.value} cannot become {target.value}")
    return target

# The smallest state file there can be: SQLite's 100-byte header (WAL mode is written into it
# when compute-ctl creates the file).
MIN_STATE_FILE_BYTES = 100
PARK_MAX_WAIT = 5.0


class StateFileLost(sqlite3.OperationalError):
    """The state file compute-ctl created is gone: removed, replaced by another file, or
    truncated (or overwritten: SQLite finds no database in it). Nothing reads or writes a
    substitute; every use raises this from then on."""


# SQLite's result codes for a file that holds no (sound) database: what a truncated state file
# reads as once a writer that still had it open put pages back past the empty header.
NOT_A_DATABASE_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def state_id_from_env(environ=None) -> str | None:
    return (os.environ if environ is None else environ).get(STATE_ID_ENV) or None


def lost_reason(path: str, expected: str | None) -> str | None:
    """Why the file at `path` is not the state file `expected` (None: it is, or nothing is
    expected yet and the file is there and not empty)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "removed"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if expected is not None and f"{st.st_dev}:{st.st_ino}" != expected:
        return "replaced by another file"
    if st.st_size < MIN_STATE_FILE_BYTES:
        return "truncated"
    return None


_log = logging.getLogger("compute.shared.state")


def park_without_state(error: BaseException, program: str, stop: threading.Event | None = None,
                       max_wait: float = PARK_MAX_WAIT) -> None:
    """What a program that cannot work without the state file does when it is lost: one log
    line, then wait to be stopped (SIGTERM; the tree stops itself when the file is lost,
    compute/tree/exitwatch.py). Never an exit that supervisord would answer with a restart,
    and so a loop of restarts and log lines. Returns when `stop` is set (checked at most every
    `max_wait` seconds, backing off from 0.1 s); without `stop`, only a signal ends it."""
    _log.error("%s: %s; waiting to be stopped", program, error)
    delay = 0.1
    while stop is None or not stop.is_set():
        if stop is None:
            signal.pause()
        else:
            stop.wait(delay)
            delay = min(max_wait, delay * 2)


_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"


BUSY_TIMEOUT_MS = 10_000
_thread_busy_timeout = threading.local()


def bound_busy_wait(ms: int) -> None:
    """Connections opened by the calling thread from now on wait at most `ms` for a lock held
    by another process (then sqlite3.OperationalError): for a thread that must never stall,
    the API worker's poller (compute/api/fastpath.py). Others keep BUSY_TIMEOUT_MS."""
    _thread_busy_timeout.ms = int(ms)


class StateStore:
    """A handle on the state file. Safe to share between threads of one process (one
    connection per thread); reopened automatically in a forked child."""

    def __init__(self, path: str, identity: str | None = None):
        self.path = path
        self._local = threading.local()
        # The file compute-ctl created (STATE_ID_ENV); without it, the first one opened.
        self.identity = identity or state_id_from_env()
        self.lost: str | None = None  # sticky: once lost, never again a database here

    # -- connections ----------------------------------------------------------------------
    def check(self) -> None:
        """StateFileLost if the state file is not (any more) the one compute-ctl created.
        One stat(2) per use of the store: an open connection would otherwise go on reading
        a removed file's last contents (a stale `running`), and a new connection would open
        whatever now has the name."""
        if self.lost is None:
            reason = lost_reason(self.path, self.identity)
            if reason is None:
                return
            self.lost = reason
        raise StateFileLost(f"the state file {self.path} was {self.lost}")

    @contextlib.contextmanager
    def _sound(self) -> Iterator[None]:
        """SQLite finding no database in the file is the file lost (StateFileLost), as a stat
        would say for a truncated one (check); recorded, so every later use says it too."""
        try:
            yield
        except StateFileLost:
            raise
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", None) not in NOT_A_DATABASE_CODES:
                raise
            self.lost = f"overwritten ({e})"
            raise StateFileLost(f"the state file {self.path} was {self.lost}") from None

    def _conn(self) -> sqlite3.Connection:
        with self._sound():
            return self._open()

    def _open(self) -> sqlite3.Connection:
        self.check()
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            busy_ms = int(getattr(_thread_busy_timeout, "ms", BUSY_TIMEOUT_MS))
            if self.identity is None:
                self.identity = file_identity(self.path)
            # mode=rw: SQLite never creates the file (a removed one stays removed).
            uri = "file:" + urllib.parse.quote(self.path) + "?mode=rw"
            conn = sqlite3.connect(uri, uri=True, timeout=busy_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across process crashes
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened if need be); any thread may close() it."""
        return self._conn()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @classmethod
    def create(cls, path: str, initial: dict[str, Any]) -> "StateStore":
        """Start a fresh state file (a compute start is always a fresh start). It is made whole
        under another name and renamed into place: the name never holds a half-made database,
        and the file found there from then on is this one (its identity is the store's)."""
        fresh = path + ".new"
        for name in (path, fresh):
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(name + suffix)
                except FileNotFoundError:
                    pass
        old_umask = os.umask(0o077)  # it holds the spec: password hashes, the storage token
        try:
            conn = sqlite3.connect(fresh, isolation_level=None)
            try:
                # No fsync while it is made (this connection closes last: the checkpoint is
                # its): a fresh file, not yet named, that a machine crash would discard with the
                # compute anyway. On a disk (the runtime dir off tmpfs) the syncs cost compute-ctl
                # 50-150 ms before its first storage request (issue 22).
                conn.execute("PRAGMA synchronous = OFF")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(_SCHEMA)
                made = cls(fresh, identity=file_identity(fresh))
                made.set(**initial)
                made.close()
            finally:
                conn.close()  # the last connection: the WAL is checkpointed into the file, removed
        finally:
            os.umask(old_umask)
        os.rename(fresh, path)
        return cls(path, identity=made.identity)

    # -- reads ----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        with self._sound():
            row = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        marks = ",".join("?" * len(keys))
        with self._sound():
            rows = self._conn().execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", keys).fetchall()
        found = {k: json.loads(v) for k, v in rows}
        return {k: found.get(k) for k in keys}

    def snapshot(self) -> dict[str, Any]:
        with self._sound():
            rows = self._conn().execute("SELECT key, value FROM kv").fetchall()
        return {k: json.loads(v) for k, v in rows}

    # -- writes ---------------------------------------------------------------------------
    def _write(self, fn) -> Any:
        with self._sound():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    @staticmethod
    def _put(conn: sqlite3.Connection, fields: dict[str, Any]) -> None:
        conn.executemany(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v)) for k, v in fields.items()],
        )

    @staticmethod
    def _current_status(conn: sqlite3.Connection) -> Any:
        row = conn.execute("SELECT value FROM kv WHERE key = 'status'").fetchone()
        return json.loads(row[0]) if row else None

    def set(self, **fields: Any) -> None:
        """Set fields. A status among them must be an allowed move from the current one
        (checked in the same transaction): else IllegalTransition and nothing is written."""
        if "status" not in fields:
            self._write(lambda conn: self._put(conn, fields))
            return

        def txn(conn: sqlite3.Connection) -> None:
            target = check_transition(self._current_status(conn), fields["status"])
            self._put(conn, {**fields, "status": target.value})

        self._write(txn)

    def transition(self, allowed_from: Iterable[str] | None, status: str, *, bump: str | None = None,
                   **fields: Any) -> int | bool:
        """Set status (and fields) only if the current status is in `allowed_from` (None: any).
        Atomic, so of two concurrent /configure requests exactly one wins. With `bump`, that
        integer key is incremented in the same transaction and its new value returned.
        A move the transitions table forbids raises IllegalTransition (a bug, not a race)."""
        check_transition(None, status)
        allowed = None if allowed_from is None else {Status(s).value for s in allowed_from}

        def txn(conn: sqlite3.Connection) -> bool:
            current = self._current_status(conn)
            if allowed is not None and current not in allowed:
                return False
            check_transition(current, status)
            extra = {}
            if bump:
                row = conn.execute("SELECT value FROM kv WHERE key = ?", (bump,)).fetchone()
                extra[bump] = int((json.loads(row[0]) if row else 0) or 0) + 1
            self._put(conn, {**fields, **extra, "status": Status(status).value})
            return extra[bump] if bump else True

        return self._write(txn)

    def update(self, keys: Iterable[str], decide) -> dict[str, Any] | None:
        """Read `keys`, write what `decide(values)` returns (a dict of fields, or None: write
        nothing), in one transaction: a read-decide-write no other process can interleave. A
        status among the fields is checked against the transitions table. Returns the fields."""
        keys = list(keys)

        def txn(conn: sqlite3.Connection) -> dict[str, Any] | None:
            marks = ",".join("?" * len(keys))
            rows = conn.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", keys).fetchall()
            found = {k: json.loads(v) for k, v in rows}
            fields = decide({k: found.get(k) for k in keys})
            if fields:
                if "status" in fields:
                    fields = {**fields, "status": check_transition(self._current_status(conn), fields["status"]).value}
                self._put(conn, fields)
            return fields

        return self._write(txn)

    def advance_last_active(self, ts: float) -> bool:
        """Move last_active forward to `ts`; never backwards. True if it changed."""
        def txn(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT value FROM kv WHERE key = 'last_active'").fetchone()
            current = json.loads(row[0]) if row is not None else None
            if current is not None and current >= ts:
                return False
            self._put(conn, {"last_active": ts})
            return True

        return self._write(txn)

    def set_once(self, key: str, value: Any) -> bool:
        """Set `key` only if it has no value yet (first writer wins). True if set."""
        def txn(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone():
                return False
            self._put(conn, {key: value})
            return True

        return self._write(txn)

    def record_metrics(self, **values: int) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT value FROM kv WHERE key = 'metrics'").fetchone()
            metrics = json.loads(row[0]) if row else {}
            metrics.update({k: int(v) for k, v in values.items()})
            self._put(conn, {"metrics": metrics})

        self._write(txn)

    def integrity_ok(self) -> bool:
        return self._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def now() -> float:
    return time.time()
