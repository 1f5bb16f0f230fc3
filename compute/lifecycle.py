"""The lifecycle driver (supervised program `lifecycle`).

Start-up (§4): wait for a spec if there is none, prepare PGDATA (fresh every start), get the
data (sync safekeepers + basebackup, or initdb for the embedded default), have supervisord
start postgres, wait until it is ready, apply the spec. Then it stays up to apply live
reconfigurations (/configure sets status `configuration_pending` and sends us SIGUSR1).

It may be killed and restarted at any moment (supervisord restarts it), so it decides what to do
from the state file and supervisord's view of postgres, never from memory:
- postgres never started: (re)do the start-up from scratch;
- postgres running but the start not finished: wait for ready and apply the spec again
  (applying is idempotent);
- start finished: serve reconfigurations; one that was being applied when the previous driver
  died (status `configuration`) is applied again, after ending that driver's sessions;
- start failed: finish the grace period, then take the tree down with exit code 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import localauth, modes, pgconf, replica, settings, storage, warmfork
from .procutil import die_with_parent
from .trace import mark
from .reconcile.connections import APPLICATION_NAME as APPLY_APPLICATION_NAME
from .lifecycle_plan import (STARTUP_STEPS, DriverView, Readiness, Step, grace_remaining, idle, plan_run,
                             readiness, wants_reconfiguration)
from .logs import setup_program_logging
from .pgsession import local_sslmode, session_params
from .spec import ComputeSpec, SpecError, parse_spec
from .state import StateStore, state_path
from .supervision import rpc, shutdown_tree

log = logging.getLogger("compute.lifecycle")

READY_TIMEOUT = 60.0
LAST_REMOVED = ("PG_VERSION", "postgresql.conf")  # compute.paths recognises PGDATA by these
POLL = 0.5
STALE_SESSION_WAIT_MS = 5000  # pg_terminate_backend's wait for each stale apply session to end
# An idle driver is woken by the API's SIGUSR1; this look at the state file only covers a
# signal the API could not send (it ignores that failure: configure.py _wake_driver).
IDLE_RECHECK = 5.0
WAKE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StartupError(Exception):
    pass


def describe(e: Exception) -> str:
    """Our own errors say what went wrong in one line; anything else also says what it is."""
    from .control_plane import ControlPlaneError
    from .reconcile import ReconcileError
    if isinstance(e, (StartupError, storage.StorageError, SpecError, ReconcileError, ControlPlaneError,
                      replica.ReplicaError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def ms_since(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


def empty_directory(path: str) -> None:
    """Remove everything inside `path` and make it 0700. The directory itself stays: its parent
    may belong to root (a volume mount), where we could not recreate it."""
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name in LAST_REMOVED)
    # What tells compute-ctl this is our data directory goes last: a driver killed half-way
    # leaves a PGDATA that the next start still recognises (and empties) instead of refusing.
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    os.chmod(path, 0o700)


def postmaster_status(pgdata: str) -> str | None:
    """The last line of postmaster.pid: `starting`, `ready`, `stopping` (padded), or None."""
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    return lines[7].strip() if len(lines) >= 8 else None


class Driver:
    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.store = StateStore(state_path(runtime_dir))
        self.settings = settings.load(self.store)
        if self.settings is None:
            raise RuntimeError("the state file has no settings: compute-ctl writes them before any program starts")
        self.pgdata = self.settings.pgdata
        self.superuser = self.settings.superuser
        self.wake = threading.Event()
        self.stopping = False

    # -- supervisord ------------------------------------------------------------------------
    def supervisor(self):
        return rpc(self.runtime_dir).supervisor

    def postgres_state(self) -> str:
        return self.supervisor().getProcessInfo("postgres")["statename"]

    # -- entry ------------------------------------------------------------------------------
    def view(self) -> DriverView:
        """The snapshot the plan is made from (postgres' state asked only when it matters)."""
        s = self.store.get_many(("status", "startup_done", "configuring_by", "postgres_started"))
        postgres_state = None
        if not s["startup_done"] and s["status"] != "failed":
            # postgres is autostart=false and started only by a driver, after it set
            # postgres_started: before that it is STOPPED without asking supervisord (whose
            # loop is busy spawning the other programs at the first start).
            postgres_state = self.postgres_state() if s["postgres_started"] else "STOPPED"
        return DriverView(status=s["status"], startup_done=bool(s["startup_done"]),
                          postgres_state=postgres_state, configuring_by=s["configuring_by"])

    def run(self) -> None:
        self.execute(plan_run(self.view()))

    def execute(self, steps: tuple[Step, ...]) -> None:
        """Carry out the plan. A failing start-up step fails the compute (reported on /status
        for the grace period, then exit 1) instead of crashing the driver."""
        self.t_start = time.monotonic()
        self.spec: ComputeSpec | None = None
        for step in steps:
            if self.stopping:
                return
            if step not in STARTUP_STEPS:
                self.run_step(step)
                continue
            try:
                self.run_step(step)
            except Exception as e:  # any failure of the start is reported, not crashed on
                if self.stopping:
                    return
                msg = describe(e)
                log.error("start-up failed: %s", msg)
                self.store.set(status="failed", error=msg, failed_at=time.time())
                self.fail_later(msg)
                return

    def run_step(self, step: Step) -> None:
        mark(f"lifecycle: {step.name.lower()}")
        if step is Step.WAIT_FOR_SPEC:
            self.spec = self.wait_for_spec()
        elif step is Step.PREPARE_DATA:
            self.prepare_data(self.spec)
        elif step is Step.START_POSTGRES:
            self.start_postgres()
        elif step is Step.WAIT_READY:
            self.wait_ready()
        elif step is Step.END_STALE_SESSIONS:
            if self.store.get("startup_done"):
                log.warning("the previous driver died while applying a new spec: applying it again")
            else:
                log.info("postgres is already running (driver restarted): applying the spec again")
            self.end_stale_apply_sessions()
        elif step is Step.APPLY:
            t = time.monotonic()
            self.apply(self.spec)
            self.store.record_metrics(config_ms=ms_since(t))
        elif step is Step.MARK_RUNNING:
            self.mark_running()
        elif step is Step.REQUEUE_CONFIGURATION:
            self.store.transition({"configuration"}, "configuration_pending")
        elif step is Step.SERVE:
            self.serve()
        elif step is Step.HAND_OVER:
            # supervisord forks a fresh driver at once (autorestart, startsecs=0): lifecycle_plan.
            log.info("handing over to a fresh driver (pid %d exits)", os.getpid())
            raise SystemExit(0)
        elif step is Step.FAIL_LATER:
            self.fail_later(self.store.get("error") or "start-up failed")
        else:  # pragma: no cover - a step added to the plan without an executor
            raise AssertionError(f"no executor for {step}")

    # -- start-up ---------------------------------------------------------------------------
    def mark_running(self) -> None:
        started_at = self.store.get("start_time") or time.time()
        total_ms = int((time.time() - started_at) * 1000)
        self.store.record_metrics(total_startup_ms=total_ms)
        self.store.set(status="running", error=None, startup_done=True)
        mark("lifecycle: running")
        log.info("compute is running (start-up took %d ms, this driver %d ms)", total_ms,
                 ms_since(getattr(self, "t_start", time.monotonic())))

    def wait_for_spec(self) -> ComputeSpec:
        """The spec from the state file; in pull mode fetched first, and if the control plane
        has none, status `empty` until /configure brings one."""
        raw = self.store.get("spec")
        t0 = time.monotonic()
        if raw is None and self.settings.control_plane_uri:
            from .control_plane import control_plane_token, fetch_spec
            raw = fetch_spec(self.settings.control_plane_uri, self.settings.compute_id,
                             control_plane_token() or self.settings.console_jwt)
            if raw is not None:
                parse_spec(raw, superuser=self.superuser)  # invalid: fail the start with the reason
                self.store.set(spec=raw, spec_generation=1)
        if raw is None:
            if self.store.transition({"init"}, "empty"):
                log.info("no spec yet: waiting for POST /configure")
            while self.store.get("status") != "configuration_pending":
                self.wake.wait(POLL)
                self.wake.clear()
            raw = self.store.get("spec")
            # Neon's rule: the start of an `empty` compute is when its spec arrives, so
            # total_startup_ms (and /status start_time) do not count the wait.
            self.store.set(start_time=time.time())
        self.store.record_metrics(wait_for_spec_ms=ms_since(t0))
        spec = parse_spec(raw, superuser=self.superuser)
        self.store.set(status="init", tenant=spec.tenant_id, timeline=spec.timeline_id)
        return spec

    def prepare_data(self, spec: ComputeSpec) -> None:
        empty_directory(self.pgdata)
        self.store.record_metrics(sync_safekeepers_retries=0, basebackup_retries=0)
        st = spec.storage
        plan = modes.plan_start(spec)
        if plan.source == "clone":
            t = time.monotonic()
            nbytes = replica.clone_primary(self.settings.pgbin_dir, self.pgdata, modes.primary_conninfo(spec),
                                           self.runtime_dir)
            pgconf.write_default_hba(self.pgdata, self.superuser, clone=True)
            self.write_conf(spec)
            self.store.record_metrics(basebackup_ms=ms_since(t), sync_safekeepers_ms=0, basebackup_bytes=nbytes)
            log.info("replica: cloned the primary (%d bytes) in %d ms", nbytes, ms_since(t))
        elif st is None:
            t = time.monotonic()
            self.initdb_with_password()
            self.write_conf(spec)
            self.store.record_metrics(basebackup_ms=ms_since(t), sync_safekeepers_ms=0, basebackup_bytes=0)
            log.info("embedded default: initdb done in %d ms", ms_since(t))
        else:
            # The spec's token, else one given in the environment (a Kubernetes Secret).
            token = spec.storage_auth_token or os.environ.get("NEON_AUTH_TOKEN") or None
            # Written before the sync: --sync-safekeepers reads its settings from it.
            self.write_conf(spec)
            timeout = self.settings.storage_timeout
            t = time.monotonic()
            lsn = plan.basebackup_lsn
            if plan.sync_safekeepers:
                lsn = storage.with_retries(
                    "sync-safekeepers", storage.SYNC_SAFEKEEPERS_RETRY,
                    lambda: storage.sync_safekeepers(self.settings.pgbin, self.pgdata, token, timeout=timeout),
                    on_retry=lambda n: self.store.record_metrics(sync_safekeepers_retries=n))
                log.info("safekeepers synced at LSN %s in %d ms", lsn, ms_since(t))
            else:
                log.info("%s compute: no safekeeper sync; basebackup at %s", spec.mode,
                         "the latest LSN" if lsn == "0/0" else f"LSN {lsn}")
            sync_ms = ms_since(t)
            t = time.monotonic()
            last = [t, 0]

            def progress(nbytes: int) -> None:
                now = time.monotonic()
                if now - last[0] >= 2.0:
                    rate = (nbytes - last[1]) / (now - last[0]) / 2**20
                    log.info("basebackup: %d MiB received (%.1f MiB/s)", nbytes >> 20, rate)
                    last[:] = [now, nbytes]

            def fresh_pgdata() -> None:
                # A failed attempt may have extracted part of the archive: start over, empty.
                empty_directory(self.pgdata)
                self.write_conf(spec)

            nbytes = storage.with_retries(
                "basebackup", storage.BASEBACKUP_RETRY,
                lambda: storage.basebackup(st.pageserver_connstring, st.tenant_id, st.timeline_id, lsn,
                                           self.pgdata, token, progress=progress, timeout=timeout,
                                           compression=self.settings.basebackup_compression,
                                           replica=plan.basebackup_replica),
                before_retry=fresh_pgdata,
                on_retry=lambda n: self.store.record_metrics(basebackup_retries=n))
            bb_ms = ms_since(t)
            log.info("basebackup: %d bytes in %d ms", nbytes, bb_ms)
            self.store.record_metrics(sync_safekeepers_ms=sync_ms, basebackup_ms=bb_ms, basebackup_bytes=nbytes)
        if plan.standby:
            replica.write_standby_signal(self.pgdata)
        pgconf.ensure_hba_line(self.pgdata)

    def write_conf(self, spec: ComputeSpec) -> None:
        """postgresql.conf for the spec and its mode; the replication password (if any) goes to
        the passfile primary_conninfo names, written first so a reload finds it."""
        replica.write_passfile(self.pgdata, modes.replication_password(spec))
        pgconf.write_postgresql_conf(self.pgdata, modes.conf_settings(spec, self.pgdata))

    def initdb_with_password(self) -> None:
        """initdb with a fresh random superuser password, then the pg_hba.conf that makes it
        needed over TCP, and the 0600 passfile our programs find through PGPASSFILE."""
        password = localauth.new_password()
        pwfile = os.path.join(self.runtime_dir, "initdb.pw")
        localauth.write_secret(pwfile, password + "\n")
        try:
            storage.initdb_default(self.settings.pgbin_dir, self.pgdata, self.superuser, pwfile=pwfile)
        finally:
            os.unlink(pwfile)
        pgconf.write_default_hba(self.pgdata, self.superuser)
        localauth.write_secret(localauth.passfile_path(self.runtime_dir),
                               localauth.render_passfile(self.superuser, password))

    def start_postgres(self) -> None:
        self.t_postgres = time.monotonic()
        self.store.set(postgres_started=True)
        self.supervisor().startProcess("postgres", False)

    def wait_ready(self) -> None:
        t0 = getattr(self, "t_postgres", time.monotonic())
        started = time.monotonic()
        next_check = 0.0
        while True:
            now = time.monotonic()
            state = None
            if now >= next_check:  # fail early if postgres died while starting
                state = self.postgres_state()
                next_check = now + 0.25
            verdict = readiness(postmaster_status(self.pgdata), state, now - started, READY_TIMEOUT)
            if verdict is Readiness.READY:
                break
            if verdict is Readiness.TIMED_OUT:
                raise StartupError(f"postgres did not become ready within {READY_TIMEOUT:.0f} s")
            if verdict is Readiness.DIED:
                raise StartupError(f"postgres exited while starting (state {state}); see the postgres log")
            time.sleep(0.01)
        self.store.record_metrics(start_postgres_ms=ms_since(t0))

    def apply(self, spec: ComputeSpec) -> None:
        skipped = modes.no_catalog_sql_reason(spec)
        if skipped:
            log.info("%s", skipped)
            return
        from .reconcile import apply_spec
        apply_spec(self.settings.connstr, spec, superuser=self.superuser,
                   lock_timeout=self.settings.lock_timeout,
                   statement_timeout=self.settings.statement_timeout)

    # -- after start-up ---------------------------------------------------------------------
    def serve(self) -> None:
        """Until a reconfiguration has been applied (then the plan hands over) or we are stopped."""
        while not self.stopping:
            if wants_reconfiguration(self.store.get("status")):
                self.reconfigure()
                return
            self.wake.wait(POLL)
            self.wake.clear()

    def resume_interrupted_reconfiguration(self) -> None:
        """Status `configuration` at our start means the previous driver died applying a new
        spec (only the driver sets it, and it always leaves it): apply that spec again."""
        s = self.store.get_many(("status", "startup_done", "configuring_by"))
        steps = plan_run(DriverView(status=s["status"], startup_done=True, configuring_by=s["configuring_by"]))
        self.execute(tuple(step for step in steps if step not in (Step.SERVE, Step.HAND_OVER)))

    def end_stale_apply_sessions(self) -> None:
        """End the sessions a killed driver left applying the spec. postgres only notices their
        client is gone when it next talks to it: one blocked on a lock would hold the locks it
        already has, and our own apply would wait behind it, or collide with it."""
        name = conninfo_to_dict(self.settings.connstr).get("application_name") or APPLY_APPLICATION_NAME
        try:
            with psycopg.connect(**local_sslmode(conninfo_to_dict(self.settings.connstr)), autocommit=True,
                                 connect_timeout=10) as conn:
                # In the target list, not the WHERE clause: evaluated only for the rows found.
                ended = conn.execute(
                    "SELECT pid, pg_catalog.pg_terminate_backend(pid, %s::pg_catalog.int8)"
                    " FROM pg_catalog.pg_stat_activity"
                    " WHERE application_name = %s AND usename = current_user"
                    " AND backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()",
                    (STALE_SESSION_WAIT_MS, name)).fetchall()
        except psycopg.Error as e:
            log.warning("could not end the previous driver's sessions: %s", str(e).strip())
            return
        if ended:
            log.info("ended %d session(s) of the previous driver (pids %s)", len(ended),
                     ", ".join(str(pid) for pid, _ in ended))

    def reconfigure(self) -> None:
        if not self.store.transition({"configuration_pending"}, "configuration", configuring_by="driver"):
            return
        try:
            spec = parse_spec(self.store.get("spec"), superuser=self.superuser)
            log.info("applying a new spec")
            self.write_conf(spec)
            with psycopg.connect(**session_params(self.settings.connstr, statement_timeout_ms=10_000),
                                 autocommit=True, connect_timeout=10) as conn:
                if not pgconf.reload_and_wait(conn):  # until our session has re-read the files
                    log.warning("postgres did not re-read its configuration within %g s", pgconf.RELOAD_WAIT)
                pending = [r[0] for r in conn.execute(
                    "SELECT name FROM pg_catalog.pg_settings WHERE pending_restart ORDER BY name")]
            self.apply(spec)
            if pending:
                log.warning("settings that take effect only after a restart: %s", ", ".join(pending))
            self.store.set(status="running", error=None, pending_restart=pending,
                           tenant=spec.tenant_id, timeline=spec.timeline_id)
            log.info("new spec applied")
        except Exception as e:
            msg = describe(e)
            log.error("reconfiguration failed: %s", msg)
            self.store.set(status="failed", error=msg)

    def fail_later(self, msg: str) -> None:
        """Keep the API answering with the error for the grace period, then exit 1."""
        grace = self.settings.grace_seconds
        remaining = grace_remaining(self.store.get("failed_at"), grace, time.time())
        if remaining > 0:
            log.info("keeping the error on /status for %.0f s before exiting", remaining)
            self.wake.wait(remaining)
        self.store.set_once("exit_code", 1)
        shutdown_tree(self.runtime_dir)
        while True:  # supervisord stops us
            time.sleep(1)


def wait_for_work(runtime_dir: str) -> bool:
    """Block until this driver has something to do (True) or is told to stop (False).

    The driver forked after each hand-over spends the compute's life waiting for a /configure.
    Loading the settings, planning and polling the state file every POLL touched (so copied)
    the warm image into it (4.8 MiB private; 3.1 MiB now, python -m bench.footprint). So it
    only asks for three state keys (_has_work), and sleeps in sigtimedwait until SIGUSR1
    (blocked first, so a signal sent before we sleep is not lost) or SIGTERM. An interrupted reconfiguration (status
    `configuration`) or a waiting one is work: found by the same first look, at once."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WAKE_SIGNALS)
    path = state_path(runtime_dir)
    # The driver forked before compute-ctl imported the rest of the warm image is the first
    # start's own: it has work, and 3 ms of a child's fork would be on the start-up's path.
    look = _has_work_child if warmfork.fully_warm() else _has_work
    while not look(path):
        info = signal.sigtimedwait(WAKE_SIGNALS, IDLE_RECHECK)
        if info is not None and info.si_signo == signal.SIGTERM:
            return False
    return True


def _has_work(path: str) -> bool:
    store = StateStore(path)
    try:
        s = store.get_many(("status", "startup_done", "configuring_by"))
    finally:
        store.close()
    return not idle(DriverView(status=s["status"], startup_done=bool(s["startup_done"]),
                               configuring_by=s["configuring_by"]))


def _has_work_child(path: str) -> bool:
    """_has_work in a short-lived child: opening SQLite and reading it copied another 0.9 MiB
    of the warm image into the idle driver, and more at every look (its allocations land in
    other shared pages each time). Any failure counts as work: the driver proper then reads
    the state file itself and reports what is wrong with it."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = 1 if _has_work(path) else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0


def main() -> None:
    die_with_parent()
    setup_program_logging()
    runtime_dir = os.environ["COMPUTE_RUNTIME_DIR"]
    if not wait_for_work(runtime_dir):
        return
    driver = Driver(runtime_dir)
    signal.signal(signal.SIGUSR1, lambda *_: driver.wake.set())

    def on_term(*_):
        driver.stopping = True
        driver.wake.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WAKE_SIGNALS)  # a signal that came meanwhile lands now
    driver.run()


if __name__ == "__main__":
    main()
