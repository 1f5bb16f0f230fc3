"""The lifecycle driver (supervised program `lifecycle`).

Start-up (§4): wait for a spec if there is none, prepare PGDATA (fresh every start), get the
data (sync safekeepers + basebackup, or initdb for the embedded default), have supervisord
start postgres, wait until it is ready, apply the spec. Then it carries out the API's requests
(compute/shared/driver_requests.py: /configure, /promote, /terminate; the API submits one into the
state file and sends us SIGUSR1): it is the one process that changes postgres or storage.

It may be killed and restarted at any moment (supervisord restarts it), so it decides what to do
from the state file and supervisord's view of postgres, never from memory:
- postgres never started: (re)do the start-up from scratch;
- postgres running but the start not finished: wait for ready and apply the spec again
  (applying is idempotent);
- start finished: serve reconfigurations; one that was being applied when the previous driver
  died (status `configuration`) is applied again, after ending that driver's sessions;
- start failed: finish the grace period, then take the tree down with exit code 1;
- a /promote or /terminate under way: carry it out again (each record says how far it got).
A /terminate is carried out at once by a thread of its own, beside whatever step is running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterator

from compute.shared import driver_requests
from compute.shared.log_paths import postgres_log_path
from compute.postgres import localauth, conf as pgconf, conf_check, pglog, replica, shutdown_lsn
from compute.model import modes, launch
from compute.model import lsn_lease as lsn_lease_plan
from compute.model.reach import connstr_mismatch
from compute.model.spec_shape import unknown_keys_line
from compute.storage import attempts, basebackup, initdb, safekeepers
from compute.base import forkinfo, proctitle
from compute.base.procutil import die_with_parent
from compute.base.trace import mark
from compute.base.retry import RetryFailed, RetryPolicy, retry
from compute.lifecycle.early import LAST_REMOVED, EarlyStart, empty_directory  # noqa: F401
from compute.lifecycle.steps import (
    LOCK_RACE_ATTEMPTS,
    LOCK_RACE_FACTOR,
    LOCK_RACE_FIRST_DELAY,
    STARTUP_STEPS,
    DriverView,
    Readiness,
    DriverStep,
    after_failed_reconfiguration,
    catalog_failure_message,
    concurrent_step,
    lost_lock_race,
    grace_remaining,
    idle,
    pending_request,
    plan_run,
    readiness,
)
from compute.base.logs import setup_program_logging
from compute.model.conninfo import parse as conninfo_to_dict  # psycopg's answers, without its import
from compute.postgres.sessions import local_sslmode, session_params
from compute.model.spec import ComputeSpec, SpecError, StoredSpecError, load_stored, parse_spec, to_document
from compute.shared.state import (CPLANE_REQUESTS_KEY, StateFileLost, StateStore, park_without_state,
                                  runtime_dir_from_env, state_path)
from compute.shared.supervisor_rpc import import_client as import_rpc_client, rpc, shutdown_tree, wait_until_serving
from compute.shared.driver_requests import DONE, FAILED, STARTED, Promotion, Termination, termination_phase

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("compute.lifecycle.driver")

READY_TIMEOUT = 60.0
SUPERVISORD_WAIT = 60.0  # s: supervisord's control socket, for the first start's early driver
LOG_WAIT = 3.0  # s: postgres' lines reach its log through supervisord's pipe a moment after it acts
SUPERUSER_CHECK_TIMEOUT = 10.0
# postgres' refusals of a login that no retry will change (a role missing on a replica's primary)
FINAL_LOGIN_ERRORS = ("does not exist", "authentication failed", "no pg_hba.conf entry")
POLL = 0.5
STALE_SESSION_WAIT_MS = 5000  # pg_terminate_backend's wait for each stale apply session to end
# An idle driver is woken by the API's SIGUSR1; this look at the state file only covers a
# signal the API could not send (it ignores that failure: driver_requests.wake_driver).
IDLE_RECHECK = 5.0
WAKE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
VIEW_KEYS = ("status", "startup_done", "promotion", "terminate", "lsn_lease", driver_requests.CATALOG_KEY)
LSN_WAIT_TIMEOUT = 30.0  # /promote: Neon gives up after 20 one-second retries
PROMOTE_APPLICATION_NAME = "compute_ctl:promote"
# The driver's own sessions for /promote and /terminate: bounded, as the API's were.
REQUEST_STATEMENT_TIMEOUT_MS = 10_000
REQUEST_LOCK_TIMEOUT_MS = 5_000
NOT_RUNNING = 70  # supervisord's Faults.NOT_RUNNING: postgres already stopped, which is what we want
IMMEDIATE_WAIT = 30.0  # then a regular stop (SIGINT, SIGKILL after stopwaitsecs)
LOCK_RACE_POLICY = RetryPolicy(LOCK_RACE_ATTEMPTS, LOCK_RACE_FIRST_DELAY, LOCK_RACE_FACTOR)


def count_cplane_request(store: StateStore, rpc_name: str, http_status: str) -> None:
    """One more control-plane request in the state file, for /metrics'
    compute_ctl_cplane_requests_total{rpc, http_status} (compute/api/prometheus.py)."""
    def bump(found: dict) -> dict:
        counts = dict(found.get(CPLANE_REQUESTS_KEY) or {})
        per_rpc = dict(counts.get(rpc_name) or {})
        per_rpc[http_status] = int(per_rpc.get(http_status, 0)) + 1
        counts[rpc_name] = per_rpc
        return {CPLANE_REQUESTS_KEY: counts}
    store.update([CPLANE_REQUESTS_KEY], bump)


class Terminating(Exception):
    """The start-up ends here: a /terminate came before postgres was started."""


class StartupError(Exception):
    pass


def describe(e: Exception) -> str:
    """Our own errors say what went wrong in one line; anything else also says what it is."""
    from compute.storage.control_plane import ControlPlaneError
    # Not imported (or still being imported by preload_psycopg's thread): e is none of its errors.
    reconcile_error = getattr(sys.modules.get("compute.reconcile.errors"), "ReconcileError", None)
    if isinstance(e, (StartupError, attempts.StorageError, SpecError, StoredSpecError, ControlPlaneError,
                      replica.ReplicaError) + ((reconcile_error,) if reconcile_error else ())):
        return str(e)
    return f"{type(e).__name__}: {e}"


def ms_since(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


_psycopg_import = threading.Lock()


def psycopg_module():
    """psycopg, imported by one of this driver's threads at a time: two threads importing its
    modules at once can each see the other's half-initialised (ImportError "partially
    initialized module 'psycopg.conninfo'", seen when the import ran in a thread of its own)."""
    with _psycopg_import:
        import psycopg
    return psycopg


def reconcile_module():
    """compute.reconcile (it imports psycopg.sql & co.), under the same one-thread-at-a-time rule."""
    with _psycopg_import:
        import psycopg  # noqa: F401 - first, whole: the reconciler's modules import its submodules
        import compute.reconcile
    return compute.reconcile


def preload_psycopg() -> threading.Thread | None:
    """Start importing psycopg and the reconciler (~80-140 ms of CPU) in a thread, to run while
    this thread waits (initdb; postgres' boot); None when they are imported already (a driver
    forked from compute-ctl's whole warm image). The driver's modules leave psycopg out: its
    first storage steps need none of it (the basebackup connects through libpq itself), the
    SQL once postgres is up does. Not beside the sync and the basebackup: the sync ends first
    (the basebackup would wait for the import), and preparing PGDATA may read a connection
    string with psycopg. Every import of psycopg's modules from here on goes through
    psycopg_module() / reconcile_module(): whoever comes second waits for the first. A failure
    is logged in one line; the SQL's own import raises it again."""
    if "compute.reconcile" in sys.modules:
        return None

    def load() -> None:
        # Signals go to the main thread only (one delivered here would not interrupt its waits).
        signal.pthread_sigmask(signal.SIG_BLOCK, WAKE_SIGNALS)
        try:
            reconcile_module()
        except Exception as e:  # noqa: BLE001 - raised again by the import that needs it
            log.warning("importing psycopg ahead of its use failed: %s: %s", type(e).__name__, e)

    loader = threading.Thread(target=load, name="preload-psycopg", daemon=True)
    loader.start()
    return loader


@contextlib.contextmanager
def psycopg_preloaded_beside() -> Iterator[None]:
    """preload_psycopg() while the body (this thread) only waits, joined on leaving."""
    loader = preload_psycopg()
    try:
        yield
    finally:
        if loader is not None:
            loader.join()


def postmaster_status(pgdata: str) -> str | None:
    """The last line of postmaster.pid: `starting`, `ready`, `stopping` (padded), or None."""
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    return lines[7].strip() if len(lines) >= 8 else None


class Driver:
    def __init__(self, runtime_dir: str, early: EarlyStart | None = None):
        self.runtime_dir = runtime_dir
        # The storage request compute/lifecycle/early.py started before this module was
        # imported: prepare_data finishes it as its first attempt.
        self.early = early
        self.store = StateStore(state_path(runtime_dir))
        self.settings = launch.require(self.store)
        self.pgdata = self.settings.pgdata
        self.superuser = self.settings.superuser
        self.wake = threading.Event()
        self.requests_wake = threading.Event()  # the thread that runs a /terminate at once
        self.terminate_lock = threading.Lock()
        self.stopping = False
        self.lease_keeper = None  # compute.lifecycle.lease_keeper, for a Static compute

    # -- supervisord ------------------------------------------------------------------------
    def supervisor(self):
        return rpc(self.runtime_dir).supervisor

    def postgres_state(self) -> str:
        return self.supervisor().getProcessInfo("postgres")["statename"]

    # -- entry ------------------------------------------------------------------------------
    def view(self) -> DriverView:
        """The snapshot the plan is made from (postgres' state asked only when it matters)."""
        s = self.store.get_many((*VIEW_KEYS, "postgres_started"))
        postgres_state = None
        if not s["startup_done"] and s["status"] != "failed" and s["terminate"] is None:
            # postgres is autostart=false and started only by a driver, after it set
            # postgres_started: before that it is STOPPED without asking supervisord (whose
            # loop is busy spawning the other programs at the first start).
            postgres_state = self.postgres_state() if s["postgres_started"] else "STOPPED"
        return view_of(s, postgres_state)

    def request_view(self) -> DriverView:
        return view_of(self.store.get_many(VIEW_KEYS))

    def run(self) -> None:
        steps = plan_run(self.view())
        if DriverStep.TERMINATE not in steps:
            threading.Thread(target=self.watch_requests, name="requests", daemon=True).start()
        if DriverStep.WAIT_FOR_SPEC not in steps and DriverStep.TERMINATE not in steps:
            self.keep_lease(self.stored_spec())
        self.execute(steps)

    def keep_lease(self, spec: ComputeSpec | None) -> None:
        """A Static compute holds an LSN lease on every pageserver of every shard, from the
        moment its spec is known (before postgres starts, as HEAD): a thread of this driver
        (compute/lifecycle/lease_keeper.py; docs/architecture.md, "LSN leases")."""
        from compute.lifecycle.lease_keeper import LeaseKeeper, wants_lease
        if not wants_lease(spec) or self.lease_keeper is not None:
            return
        psycopg_module()  # the lease thread's sessions use psycopg's pq: imported here, by one thread
        assert spec is not None
        self.lease_keeper = LeaseKeeper(self.store, timeout=self.settings.storage_timeout, token=self.storage_token)
        self.lease_keeper.start(spec)

    def watch_requests(self) -> None:
        """Beside the plan: a /terminate is carried out at once, whatever step is in progress
        (a basebackup, the catalog SQL, a reconfiguration)."""
        # Signals go to the main thread only: one delivered to this thread would not interrupt
        # the main thread's blocking call (initdb's pipes), and SIGTERM would wait for its end.
        signal.pthread_sigmask(signal.SIG_BLOCK, WAKE_SIGNALS)
        while not self.stopping:
            self.requests_wake.wait(POLL)
            self.requests_wake.clear()
            try:
                if concurrent_step(self.request_view()) is DriverStep.TERMINATE:
                    self.terminate()
            except StateFileLost:
                return  # no request can come any more; the main thread says so, once
            except Exception:  # the plan goes on; a restarted driver would resume the terminate
                log.exception("carrying out /terminate")

    def execute(self, steps: tuple[DriverStep, ...]) -> None:
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
            except Terminating:
                log.info("terminate requested before postgres started: the start-up ends here")
                self.wait_for_stop()
                return
            except Exception as e:  # any failure of the start is reported, not crashed on
                self.discard_early()
                if self.stopping:
                    return
                msg = describe(e)
                log.error("start-up failed: %s", msg)
                self.store.set(status="failed", error=msg, failed_at=time.time())
                self.fail_later(msg)
                return

    def discard_early(self) -> None:
        """An early request the failed start-up never got to: stopped and waited for here, not
        left to its parent-death signal."""
        early, self.early = self.early, None
        if early is None:
            return
        proc = early.process
        try:
            os.killpg(proc.pid, signal.SIGKILL) if early.request.value == "initdb" else proc.kill()
        except ProcessLookupError:
            pass
        proc.wait()
        if early.pwfile:
            try:
                os.unlink(early.pwfile)
            except FileNotFoundError:
                pass

    def run_step(self, step: DriverStep) -> None:
        mark(f"lifecycle: {step.name.lower()}")
        if step is DriverStep.WAIT_FOR_SPEC:
            self.spec = self.wait_for_spec()
            self.keep_lease(self.spec)
        elif step is DriverStep.PREPARE_DATA:
            self.prepare_data(self.spec)
        elif step is DriverStep.START_POSTGRES:
            self.start_postgres()
        elif step is DriverStep.WAIT_READY:
            self.wait_ready()
        elif step is DriverStep.END_STALE_SESSIONS:
            if self.store.get("startup_done"):
                log.warning("the previous driver died while applying a new spec: applying it again")
            else:
                log.info("postgres is already running (driver restarted): applying the spec again")
            self.end_stale_apply_sessions()
        elif step is DriverStep.APPLY:
            t = time.monotonic()
            self.apply(self.spec, at_start=True)
            self.enable_logical_subscribers(self.spec)
            self.store.record_metrics(config_ms=ms_since(t))
        elif step is DriverStep.MARK_RUNNING:
            self.mark_running()
        elif step is DriverStep.REQUEUE_CONFIGURATION:
            self.store.transition({"configuration"}, "configuration_pending")
        elif step is DriverStep.PROMOTE:
            self.promote()
        elif step is DriverStep.TERMINATE:
            self.terminate()
        elif step is DriverStep.WAIT_FOR_STOP:
            self.wait_for_stop()
        elif step is DriverStep.SERVE:
            self.serve()
        elif step is DriverStep.HAND_OVER:
            with self.terminate_lock:  # not in the middle of the request thread's /terminate
                terminating = self.request_view().termination is not None
            if terminating:  # (one that comes after this look is resumed by the next driver)
                self.terminate()  # a no-op once answered, or for the tree's
                self.wait_for_stop()
                return
            # supervisord forks a fresh driver at once (autorestart, startsecs=0): compute/lifecycle/steps.py.
            log.info("handing over to a fresh driver (pid %d exits)", os.getpid())
            raise SystemExit(0)
        elif step is DriverStep.FAIL_LATER:
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
        spec = load_stored(self.store)
        t0 = time.monotonic()
        if spec is None and self.settings.control_plane_uri:
            from compute.storage.control_plane import RPC_GET_CONFIG, control_plane_token, fetch_config
            config = fetch_config(self.settings.control_plane_uri, self.settings.compute_id,
                                  control_plane_token() or self.settings.console_jwt,
                                  api=self.settings.control_plane_api, deadline=self.settings.attempt_deadline,
                                  on_request=lambda label: count_cplane_request(self.store, RPC_GET_CONFIG, label))
            self.take_jwks(config.compute_ctl_config)
            raw = config.spec
            if raw is not None:
                spec = parse_spec(raw, superuser=self.superuser)  # invalid: fail the start with the reason
                if spec.ignored_keys:
                    log.warning("%s", unknown_keys_line(spec.ignored_keys))
                self.store.set(spec=to_document(spec), spec_generation=1)
        if spec is None:
            if self.store.transition({"init"}, "empty"):
                log.info("no spec yet: waiting for POST /configure")
            while self.store.get("status") != "configuration_pending":
                self.wake.wait(POLL)
                self.wake.clear()
            spec = load_stored(self.store)
            # Neon's rule: the start of an `empty` compute is when its spec arrives, so
            # total_startup_ms (and /status start_time) do not count the wait.
            self.store.set(start_time=time.time())
        self.store.record_metrics(wait_for_spec_ms=ms_since(t0))
        self.store.set(status="init", tenant=spec.tenant_id, timeline=spec.timeline_id)
        mismatch = connstr_mismatch(self.settings.connstr, spec)
        if mismatch:  # before PGDATA is touched: postgres would start where -C cannot reach it
            raise SpecError("cluster.settings", mismatch)
        return spec

    def take_jwks(self, ctl_config) -> None:
        """The pull answer's JWKS, to where compute-ctl pointed the API's auth (jwks_path is
        RUNTIME_DIR/jwks.json in v2 pull mode; an operator's --jwks file is never overwritten)."""
        from compute.shared.jwks_file import jwks_path, write_jwks
        if ctl_config is None:  # a 2023 answer
            return
        if ctl_config.tls is not None:
            log.info("compute_ctl_config.tls ignored: TLS is not supported")
        target = jwks_path(self.runtime_dir)
        if self.settings.jwks_path != target:
            log.info("the control plane's compute_ctl_config.jwks is not used: --jwks %s was given",
                     self.settings.jwks_path)
            return
        write_jwks(target, ctl_config.jwks)
        log.info("JWKS from the control plane (%d key(s)) written to %s", len(ctl_config.jwks["keys"]), target)

    def prepare_data(self, spec: ComputeSpec) -> None:
        early, self.early = self.early, None
        if early is not None and early.running():  # this thread would only wait for it
            # startProcess("postgres"), the first request, then needs no import. Not once the
            # request is over: the import would delay the basebackup; it then comes with
            # startProcess, after the basebackup, when the other processes' own start-up no
            # longer competes for the CPU.
            import_rpc_client()
        if early is None:  # else emptied before the early request (compute/lifecycle/early.py)
            empty_directory(self.pgdata)
        self.store.record_metrics(sync_safekeepers_retries=0, basebackup_retries=0)
        st = spec.storage
        plan = modes.plan_start(spec)
        if plan.source == "clone":
            t = time.monotonic()
            nbytes = replica.clone_primary(self.settings.pgbin_dir, self.pgdata, modes.primary_conninfo(spec),
                                           self.runtime_dir, deadline=self.settings.attempt_deadline,
                                           before_retry=lambda: empty_directory(self.pgdata))
            pgconf.write_default_hba(self.pgdata, self.superuser, clone=True)
            self.write_conf(spec)
            self.store.record_metrics(basebackup_ms=ms_since(t), sync_safekeepers_ms=0, basebackup_bytes=nbytes)
            log.info("replica: cloned the primary (%d bytes) in %d ms", nbytes, ms_since(t))
        elif st is None:
            t = early.t0 if early else time.monotonic()
            self.initdb_with_password(early)
            self.write_conf(spec)
            self.store.record_metrics(basebackup_ms=ms_since(t), sync_safekeepers_ms=0, basebackup_bytes=0)
            log.info("embedded default: initdb done in %d ms", ms_since(t))
        else:
            token = self.storage_token(spec)
            # Written before the sync: --sync-safekeepers reads its settings from it.
            if early is None:  # (an early sync's was written before it)
                self.write_conf(spec)
            timeout, deadline = self.settings.storage_timeout, self.settings.attempt_deadline
            t = early.t0 if early else time.monotonic()
            lsn = plan.basebackup_lsn
            if plan.sync_safekeepers:
                first = [early.started if early else None]  # the first attempt: the early one

                def sync_attempt() -> str:
                    started, first[0] = first[0], None
                    return safekeepers.sync_safekeepers(self.settings.pgbin, self.pgdata, token, timeout=timeout,
                                                        deadline=deadline, started=started)
                lsn = attempts.with_retries(
                    "sync-safekeepers", attempts.SYNC_SAFEKEEPERS_RETRY, sync_attempt,
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

            nbytes = attempts.with_retries(
                "basebackup", attempts.BASEBACKUP_RETRY,
                lambda: basebackup.basebackup(st.pageserver_connstring, st.tenant_id, st.timeline_id, lsn,
                                           self.pgdata, token, progress=progress, timeout=timeout,
                                           compression=self.settings.basebackup_compression,
                                           replica=plan.basebackup_replica, deadline=deadline),
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
        pgconf.write_postgresql_conf(self.pgdata, modes.conf_settings(spec, self.pgdata), spec,
                                     subscribers_disabled=self.subscribers_disabled(spec))

    def subscribers_disabled(self, spec: ComputeSpec, catalog_applied: bool | None = None) -> bool:
        if catalog_applied is None:  # a reconfiguration: the start's apply dropped them already
            catalog_applied = bool(self.store.get("startup_done"))
        return modes.logical_subscribers_disabled(spec, catalog_applied)

    def enable_logical_subscribers(self, spec: ComputeSpec) -> None:
        """After the start's catalog apply dropped the inherited subscriptions: HEAD's
        `neon.disable_logical_replication_subscribers=false` (configure_as_primary), the file
        rewritten and postgres reloaded. Nothing for a spec that never set it true, or whose
        catalog SQL does not run (it stays true, as HEAD)."""
        if not spec.drop_subscriptions_before_start or self.subscribers_disabled(spec, catalog_applied=True):
            return
        psycopg = psycopg_module()
        pgconf.write_postgresql_conf(self.pgdata, modes.conf_settings(spec, self.pgdata), spec,
                                     subscribers_disabled=False)
        with psycopg.connect(**session_params(self.settings.connstr, statement_timeout_ms=10_000),
                             autocommit=True, connect_timeout=10) as conn:
            if not pgconf.reload_and_wait(conn):
                log.warning("postgres did not re-read its configuration within %g s", pgconf.RELOAD_WAIT)
        log.info("updated postgresql.conf to set neon.disable_logical_replication_subscribers=false")

    def initdb_with_password(self, early: EarlyStart | None = None) -> None:
        """initdb with a fresh random superuser password, then the pg_hba.conf that makes it
        needed over TCP, and the 0600 passfile our programs find through PGPASSFILE. `early`:
        the initdb compute/lifecycle/early.py started, with its password and file."""
        if early is not None:
            password, pwfile = early.password, early.pwfile
        else:
            password = localauth.new_password()
            pwfile = os.path.join(self.runtime_dir, "initdb.pw")
            localauth.write_secret(pwfile, password + "\n")
        try:
            with psycopg_preloaded_beside():
                initdb.initdb_default(self.settings.pgbin_dir, self.pgdata, self.superuser, pwfile=pwfile,
                                      started=early.started if early else None)
        finally:
            os.unlink(pwfile)
        pgconf.write_default_hba(self.pgdata, self.superuser)
        localauth.write_secret(localauth.passfile_path(self.runtime_dir),
                               localauth.render_passfile(self.superuser, password))

    def start_postgres(self) -> None:
        self.t_postgres = time.monotonic()
        # In one transaction with the check: a /terminate that found postgres never started
        # stops the tree itself (driver_requests), so postgres must then never start.
        if not self.store.update(("terminate",), lambda v: None if v["terminate"] else {"postgres_started": True}):
            raise Terminating()
        self.log_offset = pglog.size(postgres_log_path(self.runtime_dir))  # postgres' lines from here on
        # The first start's driver runs before supervisord's loop: on a busy machine its
        # control socket may not be there yet when the data is.
        if not wait_until_serving(self.runtime_dir, SUPERVISORD_WAIT):
            raise StartupError(f"supervisord did not open its control socket within {SUPERVISORD_WAIT:.0f} s")
        self.supervisor().startProcess("postgres", False)
        # psycopg and the reconciler are imported while postgres boots (wait_ready polls a
        # file); apply() waits for the import if it is not done. After the request: a thread
        # importing beside it made its round trip ~10-40 ms slower (the GIL).
        preload_psycopg()

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
                said = pglog.failure_summary(self.postgres_said(wait=False))
                raise StartupError(f"postgres did not become ready within {READY_TIMEOUT:.0f} s"
                                   + (f": {said}" if said else ""))
            if verdict is Readiness.DIED:
                said = pglog.failure_summary(self.postgres_said(wait=True))
                raise StartupError(f"postgres exited while starting: {said}" if said else
                                   f"postgres exited while starting (state {state}); see the postgres log "
                                   f"({postgres_log_path(self.runtime_dir)})")
            time.sleep(0.01)
        self.store.record_metrics(start_postgres_ms=ms_since(t0))

    def postgres_said(self, *, wait: bool) -> str:
        """postgres' log since this driver started it (the whole tail for a restarted driver);
        with `wait`, until a FATAL or PANIC line is in (at most LOG_WAIT s: postgres has exited,
        its last lines are on their way through supervisord's pipe)."""
        path = postgres_log_path(self.runtime_dir)
        offset = getattr(self, "log_offset", 0)
        deadline = time.monotonic() + (LOG_WAIT if wait else 0)
        while True:
            text = pglog.read_since(path, offset)
            if not wait or pglog.has_failure(text) or time.monotonic() >= deadline:
                return text
            time.sleep(0.05)

    def check_superuser_session(self, spec: ComputeSpec) -> None:
        """When no catalog SQL runs (a read-only mode, skip_pg_catalog_updates), nothing else
        would notice at start that our programs cannot log in as -C's superuser (a replica's
        catalog is its primary's): /readyz would answer 503 for ever. One session proves it."""
        psycopg = psycopg_module()
        deadline = time.monotonic() + SUPERUSER_CHECK_TIMEOUT
        while True:
            try:
                with psycopg.connect(**local_sslmode(conninfo_to_dict(self.settings.connstr)), autocommit=True,
                                     connect_timeout=10) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                said = " ".join(str(e).split())
                if any(m in said for m in FINAL_LOGIN_ERRORS) or time.monotonic() >= deadline:
                    hint = (f": create role {self.superuser!r} (a superuser) on the primary, or give -C "
                            "a superuser the primary has" if modes.plan_start(spec).source == "clone" else "")
                    raise StartupError(f"cannot log in as the -C superuser {self.superuser!r}: {said}"
                                       + (f" (a replica's roles are its primary's{hint})" if hint else "")) from None
                time.sleep(0.2)

    def apply(self, spec: ComputeSpec, *, at_start: bool = False) -> None:
        skipped = modes.no_catalog_sql_reason(spec)
        if skipped:
            log.info("%s", skipped)
            if at_start:
                self.check_superuser_session(spec)
            return
        reconcile = reconcile_module()  # waits for preload_psycopg's import, if it runs
        ApplyError, apply_spec = reconcile.ApplyError, reconcile.apply_spec

        def attempt() -> None:
            apply_spec(self.settings.connstr, spec, superuser=self.superuser,
                       lock_timeout=self.settings.lock_timeout,
                       statement_timeout=self.settings.statement_timeout)

        def on_retry(n: int, e: BaseException, delay: float) -> None:
            log.warning("applying the spec lost a lock race (attempt %d of %d): %s; again in %.1f s",
                        n, LOCK_RACE_POLICY.attempts, e, delay)
        try:
            retry(LOCK_RACE_POLICY, attempt, catch=(ApplyError,),
                  retryable=lambda e: lost_lock_race(getattr(e, "sqlstate", None)), on_retry=on_retry)
        except RetryFailed as failed:
            raise failed.error from None

    # -- after start-up ---------------------------------------------------------------------
    def serve(self) -> None:
        """Until a reconfiguration has been applied (then the plan hands over) or we are stopped."""
        while not self.stopping:
            if self.handle_pending() in (DriverStep.RECONFIGURE, DriverStep.TERMINATE, DriverStep.WAIT_FOR_STOP,
                                         DriverStep.CATALOG_REQUESTS):
                return
            self.wake.wait(POLL)
            self.wake.clear()

    def handle_pending(self) -> DriverStep | None:
        """One look at the state file: carry out the request waiting there, if any; which."""
        step = pending_request(self.request_view())
        if step is DriverStep.TERMINATE:
            self.terminate()
            self.wait_for_stop()
        elif step is DriverStep.WAIT_FOR_STOP:
            self.wait_for_stop()
        elif step is DriverStep.PROMOTE:
            self.promote()
        elif step is DriverStep.RECONFIGURE:
            self.reconfigure()
        elif step is DriverStep.CATALOG_REQUESTS:
            self.serve_catalog_requests()
        return step

    def serve_catalog_requests(self) -> None:
        """The internal port's /grants and /extensions waiting in the state file, in order, each
        answered in its record (compute/lifecycle/catalog_requests.py). The status stays
        `running`; a /terminate meanwhile fails the rest (the API answers them 412)."""
        from compute.lifecycle.catalog_requests import CatalogRequestError, carry_out
        lock_ms = int(self.settings.lock_timeout * 1000)  # 0: no limit, as for the spec's apply
        statement_ms = int(self.settings.statement_timeout * 1000)
        for request in driver_requests.pending_catalog_requests(self.store.get(driver_requests.CATALOG_KEY)):
            if self.stopping or self.request_view().termination is not None:
                driver_requests.fail_catalog_requests(self.store, "the compute is being terminated")
                return
            try:
                answer = carry_out(self.settings.connstr, request, lock_timeout_ms=lock_ms,
                                   statement_timeout_ms=statement_ms)
            except CatalogRequestError as e:
                log.error("internal request %d (%s) failed: %s", request.id, request.kind, e)
                driver_requests.finish_catalog_request(self.store, request.id, error=str(e))
            else:
                driver_requests.finish_catalog_request(self.store, request.id, answer=answer)

    def wait_for_stop(self) -> None:
        """The tree is being stopped (a /terminate): start nothing more, wait for SIGTERM."""
        while not self.stopping:
            self.wake.wait(POLL)
            self.wake.clear()

    def resume_interrupted_reconfiguration(self) -> None:
        """Status `configuration` at our start, with no promotion under way, means the previous
        driver died applying a new spec (the driver always leaves it): apply that spec again."""
        view = self.request_view()
        steps = plan_run(DriverView(status=view.status, startup_done=True, promotion=view.promotion))
        self.execute(tuple(step for step in steps if step not in (DriverStep.SERVE, DriverStep.HAND_OVER, DriverStep.PROMOTE)))

    def end_stale_apply_sessions(self) -> None:
        """End the sessions a killed driver left applying the spec. postgres only notices their
        client is gone when it next talks to it: one blocked on a lock would hold the locks it
        already has, and our own apply would wait behind it, or collide with it."""
        psycopg = psycopg_module()
        # The apply's modules (compute.reconcile) are imported when it runs, not at the start.
        APPLY_APPLICATION_NAME = reconcile_module().connections.APPLICATION_NAME
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
        if not self.store.transition({"configuration_pending"}, "configuration"):
            return
        v = self.store.get_many(("spec_generation", "previous_spec"))
        generation = int(v["spec_generation"] or 0)
        previous = v["previous_spec"] if isinstance(v["previous_spec"], dict) else {}
        # The spec this one replaces, when /configure recorded it for this very generation.
        previous_doc = previous.get("spec") if previous.get("generation") == generation else None
        try:
            spec = load_stored(self.store)
        except StoredSpecError as e:  # nothing applied yet: the compute stays as it was
            self.refuse_reconfiguration(generation, previous_doc, f"the new spec cannot be read: {e}")
            return
        try:
            log.info("applying a new spec")
            pending = self.apply_settings(spec, generation, previous_doc)
        except Exception as e:  # the settings could not be written or checked
            self.fail_reconfiguration(generation, describe(e), in_catalog=False)
            return
        if pending is None:  # refused: nothing changed
            return
        # The new settings are in force (and kept, whatever the catalog SQL does: the stored
        # spec is the new one, and /status reports them: after_failed_reconfiguration).
        if pending:
            log.warning("settings that take effect only after a restart: %s", ", ".join(pending))
        self.store.set(pending_restart=pending, tenant=spec.tenant_id, timeline=spec.timeline_id)
        if self.lease_keeper is not None:  # the pageservers may have changed: HEAD leases again at once
            self.lease_keeper.wake.set()
        try:
            self.apply(spec)
        except Exception as e:
            msg = catalog_failure_message(describe(e), lost_lock_race(getattr(e, "sqlstate", None)))
            self.fail_reconfiguration(generation, msg, in_catalog=True)
            return
        self.store.set(status="running", error=None, **driver_requests.configure_answer(generation))
        log.info("new spec applied")

    def fail_reconfiguration(self, generation: int, msg: str, *, in_catalog: bool) -> None:
        """The answer to a failed reconfiguration: the status steps.after_failed_reconfiguration
        decides, the reason on /status and in /configure's 500."""
        status = after_failed_reconfiguration(in_catalog)
        log.error("reconfiguration failed: %s", msg)
        self.store.set(status=status, error=msg, **driver_requests.configure_answer(generation, msg))

    def apply_settings(self, spec: ComputeSpec, generation: int, previous_doc) -> list[str] | None:
        """The new spec's postgresql.conf, checked by postgres before and after the reload: the
        settings that wait for a restart; None when postgres rejected some (the reconfiguration
        is then refused, nothing changed: undo_settings)."""
        psycopg = psycopg_module()
        files = pgconf.snapshot_files([os.path.join(self.pgdata, "postgresql.conf"),
                                       os.path.join(self.pgdata, modes.PASSFILE)])
        written = [o.name for o in modes.conf_settings(spec, self.pgdata)]
        self.write_conf(spec)
        with psycopg.connect(**session_params(self.settings.connstr, statement_timeout_ms=10_000),
                             autocommit=True, connect_timeout=10) as conn:
            # An unknown name or a syntax error is known before postgres is told: then the
            # file goes back and postgres never reads the rejected one.
            rejected = conf_check.rejections(*conf_check.ask_postgres(conn, written), written, before_reload=True)
            if rejected:
                self.undo_settings(files, generation, previous_doc, conf_check.describe(rejected))
                return None
            offset = pglog.size(postgres_log_path(self.runtime_dir))
            if not pgconf.reload_and_wait(conn):  # until our session has re-read the files
                log.warning("postgres did not re-read its configuration within %g s", pgconf.RELOAD_WAIT)
            rejected = conf_check.rejections(*conf_check.ask_postgres(conn, written), written)
            if rejected:  # a bad value: postgres applied the rest of the file; all of it goes back
                msg = conf_check.describe(rejected, self.rejection_reasons(offset, rejected))
                self.undo_settings(files, generation, previous_doc, msg, reload=conn)
                return None
            return [r[0] for r in conn.execute(
                "SELECT name FROM pg_catalog.pg_settings WHERE pending_restart ORDER BY name")]

    def undo_settings(self, files, generation: int, previous_doc, msg: str,
                      reload: psycopg.Connection | None = None) -> None:
        """postgres rejected settings of the new spec: the previous files go back (re-read by
        postgres through `reload` when it had read the new ones), and the reconfiguration is
        refused with nothing changed."""
        pgconf.restore_files(files)
        if reload is not None and not pgconf.reload_and_wait(reload):
            log.warning("postgres did not re-read its restored configuration within %g s", pgconf.RELOAD_WAIT)
        self.refuse_reconfiguration(generation, previous_doc, msg)

    def rejection_reasons(self, offset: int, rejected) -> dict[str, str]:
        """postgres' own sentence for each rejected setting, from its log (waiting up to LOG_WAIT
        s for the postmaster's lines to get through supervisord); the view's words otherwise."""
        names = [r.name for r in rejected if r.name]
        path = postgres_log_path(self.runtime_dir)
        deadline = time.monotonic() + LOG_WAIT
        while True:
            found = pglog.reasons(pglog.read_since(path, offset), names)
            if len(found) >= len(set(n.lower() for n in names)) or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def refuse_reconfiguration(self, generation: int, previous_doc, msg: str) -> None:
        """A reconfiguration that changed nothing: the compute stays `running` with what it had
        (the previous spec back in the state file), the reason on /status and in /configure's
        answer (driver_requests.configure_outcome)."""
        log.error("reconfiguration refused, nothing changed: %s", msg)
        fields = {"status": "running", "error": msg, **driver_requests.configure_answer(generation, msg)}
        if previous_doc is not None:
            fields["spec"] = previous_doc
        self.store.set(**fields)

    # -- requests of the API (compute/shared/driver_requests.py) ---------------------------------------
    def request_session(self) -> psycopg.Connection:
        psycopg = psycopg_module()
        return psycopg.connect(**session_params(self.settings.connstr, lock_timeout_ms=REQUEST_LOCK_TIMEOUT_MS,
                                                statement_timeout_ms=REQUEST_STATEMENT_TIMEOUT_MS),
                               autocommit=True, connect_timeout=10, application_name=PROMOTE_APPLICATION_NAME)

    def promote(self) -> None:
        """/promote: wait for replay up to the LSN, pg_promote(), then hand the new spec over as
        a reconfiguration (SERVE applies it). A failure leaves the replica it was, `running`.
        Resumable: a promotion STARTED whose postgres is out of recovery was done by the dead
        driver."""
        psycopg = psycopg_module()
        p = Promotion.from_json(self.store.get("promotion"))
        if p is None or not p.pending:
            return
        log.info("promoting this replica (wal_flush_lsn %s)", p.wal_flush_lsn or "not given")
        t0 = time.monotonic()
        try:
            with self.request_session() as conn:
                in_recovery = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()[0]
                if p.phase == STARTED and not in_recovery:
                    log.info("the previous driver promoted postgres already")
                    t1 = t2 = time.monotonic()
                else:
                    replica.wait_for_replay(conn, p.wal_flush_lsn, LSN_WAIT_TIMEOUT)
                    t1 = time.monotonic()
                    self.store.set(promotion={**p.to_json(), "phase": STARTED})
                    replica.promote(conn)
                    t2 = time.monotonic()
        except Exception as e:  # any failure: still the replica it was
            msg = str(e).strip() if isinstance(e, (replica.ReplicaError, psycopg.Error, ValueError)) else describe(e)
            msg = msg or type(e).__name__
            log.error("promotion failed: %s", msg)
            self.store.transition({"configuration"}, "running",
                                  promotion={**p.to_json(), "phase": FAILED, "error": msg})
            return
        log.info("postgres promoted; applying the spec as a primary")

        def hand_over(v):
            done = {**p.to_json(), "phase": DONE, "lsn_wait_ms": int((t1 - t0) * 1000),
                    "pg_promote_ms": int((t2 - t1) * 1000), "promoted_at": time.time()}
            if v["status"] != "configuration":
                return {"promotion": {**done, "phase": FAILED,
                                      "error": f"status changed during promotion: {v['status']}"}}
            generation = int(v["spec_generation"] or 0) + 1
            return {"status": "configuration_pending", "spec": p.spec, "spec_generation": generation,
                    "error": None, "promotion": {**done, "generation": generation}}

        self.store.update(("status", "spec_generation"), hand_over)

    def terminate(self) -> None:
        """/terminate: stop postgres (fast: SIGINT through supervisord; immediate: SIGQUIT),
        then find the LSN (compute/postgres/shutdown_lsn.py) and answer: the record DONE and the
        status `terminated` in one transaction. Resumable: the flush LSN an immediate shutdown
        needs is recorded before the signal (STARTED). A stop that fails (supervisord refuses)
        leaves the compute `failed`, which ends as every failure does: the grace period, exit 1."""
        error = self.stop_and_answer()
        if error:
            self.store.set(failed_at=time.time())
            self.fail_later(error)

    def stop_and_answer(self) -> str | None:
        with self.terminate_lock:
            t = Termination.from_json(self.store.get("terminate"))
            if t is None or t.by != driver_requests.DRIVER or t.phase == DONE:
                return None
            log.info("terminate requested (%s): stopping postgres", t.mode)
            spec = self.stored_spec()
            source = shutdown_lsn.lsn_source(spec, t.mode)
            if t.phase != STARTED:
                flush = self.flush_lsn() if source == shutdown_lsn.FLUSH_BEFORE_SIGNAL else None
                t = Termination(**{**t.to_json(), "phase": STARTED, "flush_lsn": flush})
                self.store.set(terminate=t.to_json())
            error, never_ran = self.stop_postgres(t.mode)
            lsn = None
            if error is None and not never_ran:
                log.info("postgres is down")
                if source == shutdown_lsn.FLUSH_BEFORE_SIGNAL:
                    lsn = t.flush_lsn
                elif source == shutdown_lsn.CONTROLDATA:
                    lsn = shutdown_lsn.controldata_lsn(self.settings.pgbin_dir, self.pgdata)
                elif source == shutdown_lsn.SYNC_SAFEKEEPERS:
                    lsn = self.sync_safekeepers_after_stop(spec)
            driver_requests.finish_terminate(self.store, t, lsn=lsn, error=error)
            return error

    def stored_spec(self) -> ComputeSpec | None:
        try:
            return load_stored(self.store)
        except StoredSpecError as e:
            log.error("%s", e)
            return None

    def flush_lsn(self) -> str | None:
        psycopg = psycopg_module()
        try:
            with self.request_session() as conn:
                return conn.execute(shutdown_lsn.FLUSH_LSN_QUERY).fetchone()[0]
        except psycopg.Error as e:
            log.warning("cannot read the WAL flush LSN before the immediate shutdown: %s", e)
            return None

    def sync_safekeepers_after_stop(self, spec: ComputeSpec) -> str | None:
        try:
            return safekeepers.sync_safekeepers(self.settings.pgbin, self.pgdata, self.storage_token(spec),
                                            timeout=self.settings.storage_timeout)
        except attempts.StorageError as e:
            log.warning("sync-safekeepers after the shutdown failed: %s", e)
            return None

    @staticmethod
    def storage_token(spec: ComputeSpec) -> str | None:
        """The spec's token, else one given in the environment (a Kubernetes Secret): only the
        driver and postgres get it (compute/model/environ.py)."""
        return spec.storage_auth_token or os.environ.get("NEON_AUTH_TOKEN") or None

    def stop_postgres(self, mode: str) -> tuple[str | None, bool]:
        """(None, never_ran) once postgres is down; else (what went wrong, False)."""
        # No socket timeout: stopping blocks until supervisord reports postgres stopped.
        import xmlrpc.client  # not at the top: ~15 ms the first start's basebackup would wait for
        supervisor = rpc(self.runtime_dir, timeout=None).supervisor
        try:
            if mode == "immediate" and self.quit_postgres(supervisor):
                return None, False
            supervisor.stopProcess("postgres", True)
        except xmlrpc.client.Fault as e:
            if e.faultCode != NOT_RUNNING:
                return f"supervisord refused to stop postgres: {e.faultString}", False
            try:
                if supervisor.getProcessInfo("postgres")["start"] == 0:
                    # A driver died between `postgres_started` and asking supervisord: no
                    # postgres will end, so the tree is stopped after the answer, as the API does.
                    return driver_requests.stop_tree_after_answer(self.runtime_dir), True
            except (OSError, xmlrpc.client.Error) as e:
                return f"cannot reach supervisord: {e}", False
        except (OSError, xmlrpc.client.ProtocolError) as e:
            return f"cannot reach supervisord: {e}", False
        return None, False

    @staticmethod
    def quit_postgres(supervisor) -> bool:
        """SIGQUIT (immediate shutdown); True once postgres has exited."""
        supervisor.signalProcess("postgres", "QUIT")
        deadline = time.monotonic() + IMMEDIATE_WAIT
        while time.monotonic() < deadline:
            if supervisor.getProcessInfo("postgres")["statename"] not in ("RUNNING", "STARTING", "STOPPING"):
                return True
            time.sleep(0.05)
        log.warning("postgres still up %.0f s after SIGQUIT: stopping it the regular way", IMMEDIATE_WAIT)
        return False

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
    look = _has_work_child if forkinfo.fully_warm else _has_work
    while not look(path):
        info = signal.sigtimedwait(WAKE_SIGNALS, IDLE_RECHECK)
        if info is not None and info.si_signo == signal.SIGTERM:
            return False
    return True


def view_of(s: dict, postgres_state: str | None = None) -> DriverView:
    """The plan's view of the state keys VIEW_KEYS (and postgres' supervisord state)."""
    promotion = s["promotion"]
    return DriverView(status=s["status"], startup_done=bool(s["startup_done"]), postgres_state=postgres_state,
                      promotion=promotion.get("phase") if isinstance(promotion, dict) else None,
                      termination=termination_phase(s["terminate"]),
                      lease=lsn_lease_plan.keeps_driver_busy(s.get("lsn_lease")),
                      catalog_requests=bool(driver_requests.pending_catalog_requests(s.get(driver_requests.CATALOG_KEY))))


def _has_work(path: str) -> bool:
    store = StateStore(path)
    try:
        s = store.get_many(VIEW_KEYS)
    finally:
        store.close()
    return not idle(view_of(s))


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


def main(early: EarlyStart | None = None, parent_checked: bool = False) -> None:
    """`early`: the storage request compute/lifecycle/early.py (the program's entry point when
    forked before supervisord runs) already started."""
    if not parent_checked:
        die_with_parent()
    setup_program_logging()
    runtime_dir = runtime_dir_from_env()
    proctitle.set_title("lifecycle", runtime_dir)
    if early is None and not wait_for_work(runtime_dir):
        return
    try:
        run_driver(runtime_dir, early)
    except StateFileLost as e:
        # Until SIGTERM (SystemExit(0) from on_term, or its default action if the driver never
        # got that far); a wake-up from the API is no reason to exit (a restart would follow).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WAKE_SIGNALS)
        park_without_state(e, "lifecycle")


def run_driver(runtime_dir: str, early: EarlyStart | None = None) -> None:
    driver = Driver(runtime_dir, early)

    def on_usr1(*_):
        driver.wake.set()
        driver.requests_wake.set()

    signal.signal(signal.SIGUSR1, on_usr1)

    def on_term(*_):
        driver.stopping = True
        driver.wake.set()
        driver.requests_wake.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WAKE_SIGNALS)  # a signal that came meanwhile lands now
    driver.run()


if __name__ == "__main__":
    main()
