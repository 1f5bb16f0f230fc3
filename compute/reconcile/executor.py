"""Running a plan.

Each step runs on the (reused) connection to its database, which must be in autocommit mode.
A transactional step is sent as one multi-statement simple query when it fits in one batch
(postgres runs such a query as one implicit transaction: all or nothing, one round trip);
larger steps are sent in batches inside an explicit transaction. A non-transactional step
(CREATE/DROP DATABASE) runs its statements one by one; consecutive `parallel_safe` ones (CREATE
DATABASE: each copies template1, the slowest part of a first apply) run on up to `workers`
connections at once when the factory can open extra connections (`open_extra`).

When a transactional batch fails, the transaction is rolled back and its statements are replayed
one by one in a transaction that is rolled back too, only to name the failing statement in the
error (its redacted text: never a password).

A step whose statements carry password hashes runs in an explicit transaction that first turns
off every way the server could log or record its text (compute.postgres.sessions.NO_LOG_SETTINGS, SET
LOCAL): log_statement=all set by the spec, a failing batch under log_min_error_statement, slow
statement logging, pg_stat_statements. It costs one more round trip, only when roles change.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import psycopg

from compute.postgres.sessions import NO_LOG_SETTINGS

from compute.reconcile.errors import ApplyError
from compute.reconcile.planner import Plan, Statement, Step

log = logging.getLogger("compute.reconcile")

MAX_BATCH_BYTES = 1 << 20
MAX_BATCH_STATEMENTS = 2000
# SET LOCAL for a transaction whose statements must not reach the server log (fixed text).
QUIET_SQL = "; ".join(f"SET LOCAL {name} = '{value}'" for name, value in NO_LOG_SETTINGS)
# Why a statement was cancelled, for the error (SQLSTATE -> hint).
TIMEOUT_HINTS = {
    "55P03": "another session holds a lock this statement needs (lock timeout, --lock-timeout)",
    "57014": "the statement ran into its time limit (statement timeout, --statement-timeout)",
}


def execute(conn_factory: Callable[[str], psycopg.Connection], plan: Plan, *, workers: int = 4) -> int:
    """Run the plan's steps in order; return the number of statements run."""
    count = 0
    for step in plan.steps:
        if not step.statements:
            continue
        try:
            conn = conn_factory(step.dbname)
        except psycopg.Error as e:
            raise ApplyError(f"applying the spec failed: cannot connect to database {step.dbname!r} "
                             f"({step.purpose}): {str(e).strip()}", dbname=step.dbname) from e
        if not conn.autocommit:
            conn.autocommit = True
        log.info("applying %d %s statement(s) in database %r%s", len(step.statements), step.purpose,
                 step.dbname, " (one transaction)" if step.transactional else "")
        if step.transactional:
            _run_transaction(conn, step)
        else:
            _run_autocommit(conn_factory, conn, step, workers)
        count += len(step.statements)
    return count


def _close_for(conn_factory: Any, statements: Sequence[Statement]) -> None:
    discard = getattr(conn_factory, "discard", None)
    if discard is not None:
        for st in statements:
            for dbname in st.closes:
                discard(dbname)


def _run_autocommit(conn_factory: Any, conn: psycopg.Connection, step: Step, workers: int) -> None:
    sts = step.statements
    i = 0
    while i < len(sts):
        j = i
        while j < len(sts) and sts[j].parallel_safe:
            j += 1
        if j - i > 1 and workers > 1 and hasattr(conn_factory, "open_extra"):
            group = sts[i:j]
            _close_for(conn_factory, group)
            _run_parallel(conn_factory, conn, step, group, workers)
            i = j
        else:
            _close_for(conn_factory, sts[i:i + 1])
            _run_one(conn, step, sts[i])
            i += 1


def _run_parallel(conn_factory: Any, conn: psycopg.Connection, step: Step,
                  group: Sequence[Statement], workers: int) -> None:
    lock = threading.Lock()
    todo = iter(enumerate(group))
    failures: list[tuple[int, ApplyError]] = []

    def worker(n: int) -> None:
        own = conn if n == 0 else None
        try:
            while True:
                with lock:
                    if failures:
                        return
                    item = next(todo, None)
                if item is None:
                    return
                index, st = item
                try:
                    if own is None:
                        own = conn_factory.open_extra(step.dbname)
                    _run_one(own, step, st)
                except ApplyError as e:
                    with lock:
                        failures.append((index, e))
                except psycopg.Error as e:
                    with lock:
                        failures.append((index, ApplyError(
                            f"applying the spec failed in database {step.dbname!r} ({step.purpose}): "
                            f"cannot open a connection: {e}", dbname=step.dbname)))
        finally:
            if own is not None and own is not conn:
                own.close()

    with ThreadPoolExecutor(min(workers, len(group))) as pool:
        list(pool.map(worker, range(min(workers, len(group)))))
    if failures:
        raise min(failures, key=lambda f: f[0])[1]


def _run_one(conn: psycopg.Connection, step: Step, st: Statement) -> None:
    log.debug("%s", _Lazy(st, conn))
    try:
        conn.execute(st.sql)
    except psycopg.Error as e:
        raise _error(conn, step, st, e) from e


def _batches(conn: psycopg.Connection, statements: tuple[Statement, ...]) -> list[bytes]:
    batches: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for st in statements:
        text = st.sql.as_bytes(conn)
        if current and (size + len(text) > MAX_BATCH_BYTES or len(current) >= MAX_BATCH_STATEMENTS):
            batches.append(b";\n".join(current))
            current, size = [], 0
        current.append(text)
        size += len(text) + 2
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", st.render_redacted(conn))
    if current:
        batches.append(b";\n".join(current))
    return batches


def _run_transaction(conn: psycopg.Connection, step: Step) -> None:
    batches = _batches(conn, step.statements)
    secret = any(st.carries_secret for st in step.statements)
    try:
        if len(batches) == 1 and not secret:
            conn.execute(batches[0])  # one simple query: one implicit transaction
        else:
            with conn.transaction():
                if secret:
                    conn.execute(QUIET_SQL)  # in force before the batch's text reaches the server
                for batch in batches:
                    conn.execute(batch)
    except psycopg.Error as e:
        if e.sqlstate in TIMEOUT_HINTS or len(step.statements) == 1:
            culprit = step.statements[0] if len(step.statements) == 1 else None  # no replay: it would wait again
        else:
            culprit = _find_culprit(conn, step.statements, quiet=secret)
        raise _error(conn, step, culprit, e) from e


class _Found(Exception):
    pass


def _find_culprit(conn: psycopg.Connection, statements: tuple[Statement, ...], *,
                  quiet: bool = False) -> Statement | None:
    if conn.closed or conn.broken:
        return None
    found: list[Statement] = []
    try:
        with conn.transaction():
            if quiet:
                conn.execute(QUIET_SQL)
            for st in statements:
                try:
                    conn.execute(st.sql)
                except psycopg.Error:
                    found.append(st)
                    raise _Found from None
            raise psycopg.Rollback()
    except _Found:
        return found[0]
    except psycopg.Error:
        return None
    return None


def _error(conn: psycopg.Connection, step: Step, st: Statement | None, e: psycopg.Error) -> ApplyError:
    diag: Any = e.diag
    message = diag.message_primary or str(e).strip() or type(e).__name__
    detail = f" ({diag.message_detail})" if diag.message_detail else ""
    text = None
    if st is not None:
        try:
            text = st.render_redacted(conn if not conn.closed else None)
        except Exception:  # noqa: BLE001 - rendering must not hide the real error
            text = st.render_redacted(None)
    where = f"in database {step.dbname!r} ({step.purpose})"
    hint = f" ({TIMEOUT_HINTS[diag.sqlstate]})" if diag.sqlstate in TIMEOUT_HINTS else ""
    stmt = f" while running: {text}" if text else ""
    return ApplyError(f"applying the spec failed {where}: {message}{hint}{detail}{stmt}",
                      dbname=step.dbname, statement=text, sqlstate=diag.sqlstate)


class _Lazy:
    def __init__(self, st: Statement, conn: psycopg.Connection):
        self.st, self.conn = st, conn

    def __str__(self) -> str:
        return self.st.render_redacted(self.conn)
