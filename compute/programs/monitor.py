"""The activity monitor (contract §6), run as the supervised program `monitor`.

Every `monitor_interval` seconds (compute.model.launch) it runs one query on a persistent connection to the
local postgres, one scan of pg_stat_activity. The last activity is now when any of these is
there (Neon's compute_ctl at HEAD, monitor.rs, counts the same, in four queries):
- a client backend other than its own and other than the connstr's superuser that is not
  `idle` (`idle in transaction` counts as active);
- a walsender other than Neon's walproposer (HEAD: `pg_stat_replication` rows whose
  `application_name` is not `walproposer`): a replica, pg_receivewal, a logical subscriber
  reading from us;
- a logical replication worker of a subscription (HEAD: `pg_stat_subscription` rows with a
  `pid`; a subscription without a worker, e.g. disabled, does not count; the launcher is no
  worker);
- an autovacuum worker (not the launcher).
Otherwise it is the latest `state_change` among the idle client backends. So a compute serving
logical replication or vacuuming is never idle. The shared `last_active` only moves forward,
and is written only when it does; the time of each finished tick is written too
(`monitor_tick`: the tree restarts a monitor that stops ticking).

Postgres being unreachable (not started yet, restarting, crashed) is normal: the monitor retries
quietly every tick, logging once per outage. SIGTERM/SIGINT end it promptly, even in the middle
of a connection attempt.

    COMPUTE_RUNTIME_DIR=/run/compute python -m compute.programs.monitor
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

import psycopg

from compute.postgres.libpq import LibpqSession, SessionError
from compute.base import proctitle
from compute.programs import extensions
from compute.base.logs import setup_program_logging
from compute.postgres.sessions import read_postmaster_pid, session_params, socket_params, superuser_of
from compute.base.procutil import die_with_parent
from compute.model.launch import LaunchSettings, default, require as require_settings
from compute.shared.state import StateFileLost, StateStore, park_without_state, runtime_dir_from_env, state_path

log = logging.getLogger("compute.programs.monitor")

APPLICATION_NAME = "compute_ctl:activity_monitor"
DEFAULT_INTERVAL = default("monitor_interval")
STATEMENT_TIMEOUT_MS = 5_000
# Statuses in which postgres is up (or about to be): before that there is nothing to watch, and
# a connection attempt would only fill the postgres log with "the database system is starting up".
CONNECT_TIMEOUT = 2  # seconds
QUERY_TIMEOUT = STATEMENT_TIMEOUT_MS / 1000 + 1  # the server ends it first (statement_timeout)
WATCHED_STATUSES = frozenset({"running", "configuration_pending", "configuration"})
EXTENSIONS_RETRY = 60.0  # seconds after a failed collection of the installed extensions

# NULL state (a client backend that has not reported yet) counts neither way; 'idle in
# transaction', 'active', 'fastpath function call', 'disabled' all count as activity. The other
# backend types counted are activity whatever their state. backend_type names: PG15 has
# 'logical replication worker', PG16+ 'logical replication apply/tablesync/parallel worker'.
ACTIVITY_QUERY = """
SELECT coalesce(bool_or(CASE WHEN backend_type = 'client backend' THEN state <> 'idle' ELSE true END), false),
       extract(epoch FROM max(state_change)
                          FILTER (WHERE backend_type = 'client backend' AND state = 'idle'))::float8
  FROM pg_catalog.pg_stat_activity
 WHERE pid <> pg_catalog.pg_backend_pid()
   AND (backend_type = 'client backend' AND usename IS DISTINCT FROM $1
        OR backend_type = 'walsender' AND application_name IS DISTINCT FROM 'walproposer'
        OR backend_type LIKE 'logical replication %worker'
        OR backend_type = 'autovacuum worker')
"""


ACTIVITY_QUERY_BYTES = ACTIVITY_QUERY.encode()


class _Stop(Exception):
    """Raised from the signal handler to cut a blocking connect/query short."""


def _os_user() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


class ActivityMonitor:
    def __init__(self, store: StateStore, connstr: str, *, interval: float = DEFAULT_INTERVAL,
                 superuser: str | None = None, clock=time.time, pgdata: str | None = None):
        self.store = store
        self.connstr = connstr
        self.pgdata = pgdata  # given: connect over the running postmaster's unix socket if we can
        self.interval = max(0.05, float(interval))
        self.superuser = superuser if superuser is not None else superuser_of(connstr)
        self.clock = clock
        self.stop_event = threading.Event()
        self._write_failing = False
        self._conn: LibpqSession | None = None
        self._interruptible = False
        self._ever_connected = False
        self._in_outage = False
        self._last_written: float | None = None
        self.ticks = 0  # ticks done: what a test waits on instead of a clock
        # Neon's downtime metrics: a check that fails while postgres should be up (a watched
        # status) is downtime; `_checked` says how this tick's check went (None: not watched).
        self._checked: bool | None = None
        self._last_up: float | None = None
        self._last_check: float | None = None
        self._downtime: dict[str, float] | None = None
        self._extensions_retry_at = 0.0

    # -- signals ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_event.set()
        if self._interruptible:  # never in the middle of a state-file write
            raise _Stop()

    # -- one tick ---------------------------------------------------------------------------
    def _connect(self, dbname: str | None = None, application_name: str = APPLICATION_NAME) -> LibpqSession:
        # search_path and role pinned (compute/postgres/sessions.py); a stuck query cannot stall the loop
        params = {**session_params(self.connstr, statement_timeout_ms=STATEMENT_TIMEOUT_MS),
                  "connect_timeout": CONNECT_TIMEOUT, "application_name": application_name}
        if dbname is not None:
            params["dbname"] = dbname
        # The unix socket when we can: no SCRAM, so no OpenSSL in the monitor (compute/postgres/sessions.py).
        sock = socket_params(params, read_postmaster_pid(self.pgdata), _os_user()) if self.pgdata else None
        if sock is not None:
            try:
                return LibpqSession(sock, CONNECT_TIMEOUT, QUERY_TIMEOUT)
            except (SessionError, psycopg.Error) as e:
                log.debug("unix socket refused, using the connstr: %s", e)
        return LibpqSession(params, CONNECT_TIMEOUT, QUERY_TIMEOUT)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _should_connect(self) -> bool:
        try:
            return self.store.get("status") in WATCHED_STATUSES
        except Exception:  # the state file being rewritten, busy...: try again next tick
            return False

    def poll(self) -> float | None:
        """Query postgres once; the last activity it shows, or None (no sessions / no postgres)."""
        self._checked = None
        if self._conn is None:
            if not self._should_connect():
                return None
            try:
                self._interruptible = True
                self._conn = self._connect()
            except (SessionError, psycopg.Error) as e:  # psycopg.pq raises OperationalError too
                self._interruptible = False
                self._checked = False
                if self._ever_connected and not self._in_outage:
                    log.warning("postgres unreachable, retrying quietly: %s", e)
                    self._in_outage = True
                return None
            finally:
                self._interruptible = False
            if self._in_outage:
                log.info("postgres reachable again")
            elif not self._ever_connected:
                log.info("watching postgres activity (excluding user %r)", self.superuser)
            self._ever_connected, self._in_outage = True, False
        try:
            self._interruptible = True
            any_active, last_idle = self._conn.query_row(
                ACTIVITY_QUERY_BYTES, [None if self.superuser is None else self.superuser.encode()])
        except (SessionError, psycopg.Error) as e:
            self._interruptible = False
            # Postgres stopped on purpose (/terminate) or failing the start: not downtime.
            self._checked = False if self._should_connect() else None
            self._close()
            if not self._in_outage:
                log.warning("lost the postgres connection, retrying quietly: %s", e)
                self._in_outage = True
            return None
        finally:
            self._interruptible = False
        self._checked = True
        if any_active == b"t":
            return self.clock()
        return None if last_idle is None else float(last_idle)

    def record(self, ts: float | None) -> bool:
        """Advance the shared last_active to `ts` if that moves it forward. True if written."""
        if ts is None:
            return False
        if self._last_written is None:
            self._last_written = self.store.get("last_active")
        if self._last_written is not None and ts <= self._last_written:
            return False
        try:
            advanced = self.store.advance_last_active(ts)
        except TypeError:
            # last_active stored as JSON null (unknown): advance_last_active cannot compare it.
            if self.store.get("last_active") is not None:
                raise
            self.store.set(last_active=ts)
            advanced = True
        if advanced:
            self._last_written = ts
            return True
        self._last_written = self.store.get("last_active")  # someone else moved it further
        return False

    def tick(self) -> None:
        ts = self.poll()
        try:
            self.record(ts)
            fields: dict[str, Any] = {"monitor_tick": time.time()}
            downtime = self.downtime(self.clock())
            if downtime is not None:
                fields["pg_downtime"] = downtime
            # Our progress, for the tree: a monitor whose tick stops moving is restarted
            # (compute/tree/monitor_watch.py), and /status and /metrics show it.
            self.store.set(**fields)
        except StateFileLost:
            raise  # nothing to record into any more: main() waits to be stopped
        except Exception as e:  # a busy/locked/full state file must not kill the monitor
            # One line per outage (a full runtime dir fails every tick); /status and /metrics
            # say so meanwhile (compute/api/bodies.py state_health).
            if not self._write_failing:
                log.warning("could not record last_active: %s", e)
            self._write_failing = True
        else:
            if self._write_failing:
                log.info("recording last_active again")
            self._write_failing = False
        if self._checked:
            self.collect_extensions()

    def downtime(self, now: float) -> dict[str, float] | None:
        """Neon's rule (its monitor.rs): while checks fail, current = ms since the last good
        check, total += ms since the previous check; a good check sets current to 0. The new
        record when it changed, else None (no write on a healthy tick)."""
        last_check, self._last_check = self._last_check, now
        if self._downtime is None:
            recorded = self.store.get("pg_downtime")  # a restarted monitor continues the total
            self._downtime = {"current_ms": 0.0, "total_ms": 0.0, **(recorded if isinstance(recorded, dict) else {})}
        if self._checked is None:
            return None
        if self._last_up is None:
            self._last_up = now  # the first watched tick: postgres is expected up from here
        before = dict(self._downtime)
        if self._checked:
            self._last_up = now
            self._downtime["current_ms"] = 0.0
        else:
            self._downtime["current_ms"] = round((now - self._last_up) * 1000, 3)
            if last_check is not None:
                self._downtime["total_ms"] = float(int(self._downtime["total_ms"] + (now - last_check) * 1000))
        return dict(self._downtime) if self._downtime != before else None

    def collect_extensions(self) -> None:
        """compute_installed_extensions (compute/programs/extensions.py) when due: one session
        per database over the same socket, closed at once. Only once postgres answered this
        tick. A failed collection (postgres restarting, a database refusing us) is tried again
        EXTENSIONS_RETRY later; the last good list stays on /metrics meanwhile."""
        now = self.clock()
        if now < self._extensions_retry_at:
            return
        try:
            v = self.store.get_many(("installed_extensions", "spec_generation", "status"))
            generation = int(v["spec_generation"] or 0)
            if v["status"] != "running" or not extensions.due(v["installed_extensions"], generation, now):
                return
            found = extensions.collect(self._query_in, lambda: self.store.set(monitor_tick=time.time()))
            self.store.set(installed_extensions={"collected_at": self.clock(), "generation": generation,
                                                 "extensions": found})
        except _Stop:
            raise
        except Exception as e:  # next time; never the monitor's end, nor a warning per try
            self._extensions_retry_at = now + EXTENSIONS_RETRY
            log.info("could not collect the installed extensions (again in %.0f s): %s", EXTENSIONS_RETRY,
                     str(e).strip())

    def _query_in(self, dbname: str | None, query: bytes) -> bytes | None:
        self._interruptible = True
        try:
            session = self._connect(dbname, extensions.APPLICATION_NAME)
            try:
                return session.query_row(query, [])[0]
            finally:
                session.close()
        finally:
            self._interruptible = False

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            next_tick = time.monotonic()
            while not self.stop_event.is_set():
                self.tick()
                self.ticks += 1
                next_tick += self.interval
                delay = next_tick - time.monotonic()
                if delay < 0:  # fell behind (slow connect): do not try to catch up in a burst
                    next_tick, delay = time.monotonic(), 0
                self._interruptible = True
                try:
                    self.stop_event.wait(delay)
                finally:
                    self._interruptible = False
        except _Stop:
            pass
        finally:
            self._close()


def _wait_for_launch(store: StateStore, path: str, stop: threading.Event) -> LaunchSettings | None:
    """Run on its own, the monitor may start before the state file exists: it waits for the
    file; from then on the settings are there (compute/model/launch.py `require`)."""
    while not stop.is_set():
        if os.path.exists(path):
            try:
                return require_settings(store)
            except StateFileLost as e:
                park_without_state(e, "monitor", stop)
                return None
            except sqlite3.OperationalError:
                pass  # being created: not a database yet
        stop.wait(0.5)
    return None


def main(argv: list[str] | None = None) -> int:
    runtime_dir = runtime_dir_from_env(required=False)
    if not runtime_dir:
        print("compute.programs.monitor: COMPUTE_RUNTIME_DIR is not set", file=sys.stderr)
        return 2
    proctitle.set_title("monitor", runtime_dir)
    path = state_path(runtime_dir)
    store = StateStore(path)

    stop = threading.Event()
    early = lambda *_: stop.set()  # noqa: E731
    signal.signal(signal.SIGTERM, early)
    signal.signal(signal.SIGINT, early)
    parent = os.getppid()
    die_with_parent(signal.SIGTERM)  # supervisord killed outright: do not linger as an orphan
    if os.getppid() != parent:
        return 0
    setup_program_logging()  # `LEVEL: message`; the logrelay adds time and program name
    found = _wait_for_launch(store, path, stop)
    if found is None:
        return 0

    monitor = ActivityMonitor(store, found.connstr, interval=found.monitor_interval, pgdata=found.pgdata)
    monitor.install_signal_handlers()
    if stop.is_set():  # a SIGTERM (supervisord's death) caught by `early` since the launch was found
        return 0
    try:
        monitor.run()
    except StateFileLost as e:
        park_without_state(e, "monitor", monitor.stop_event)  # its SIGTERM handler sets it
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
