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
- start finished: serve reconfigurations;
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

from . import pgconf, storage
from .procutil import die_with_parent
from .logs import setup_program_logging
from .spec import ComputeSpec, SpecError, parse_spec
from .state import StateStore, state_path
from .supervision import rpc, shutdown_tree

log = logging.getLogger("compute.lifecycle")

READY_TIMEOUT = 60.0
POLL = 0.5


class StartupError(Exception):
    pass


def describe(e: Exception) -> str:
    """Our own errors say what went wrong in one line; anything else also says what it is."""
    from .control_plane import ControlPlaneError
    from .reconcile import ReconcileError
    if isinstance(e, (StartupError, storage.StorageError, SpecError, ReconcileError, ControlPlaneError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def ms_since(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


def empty_directory(path: str) -> None:
    """Remove everything inside `path` and make it 0700. The directory itself stays: its parent
    may belong to root (a volume mount), where we could not recreate it."""
    with os.scandir(path) as it:
        for entry in it:
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
        self.launch = self.store.get("launch")
        self.pgdata = self.launch["pgdata"]
        self.superuser = self.launch["superuser"]
        self.wake = threading.Event()
        self.stopping = False

    # -- supervisord ------------------------------------------------------------------------
    def supervisor(self):
        return rpc(self.runtime_dir).supervisor

    def postgres_state(self) -> str:
        return self.supervisor().getProcessInfo("postgres")["statename"]

    # -- entry ------------------------------------------------------------------------------
    def run(self) -> None:
        status = self.store.get("status")
        if self.store.get("startup_done"):
            self.serve()
        elif status == "failed":
            self.fail_later(self.store.get("error") or "start-up failed")
        else:
            try:
                self.start()
            except Exception as e:  # any failure of the start is reported, not crashed on
                if self.stopping:
                    return
                msg = describe(e)
                log.error("start-up failed: %s", msg)
                self.store.set(status="failed", error=msg, failed_at=time.time())
                self.fail_later(msg)
                return
            self.serve()

    # -- start-up ---------------------------------------------------------------------------
    def start(self) -> None:
        t_start = time.monotonic()
        started_at = self.store.get("start_time") or time.time()
        spec = self.wait_for_spec()
        if self.postgres_state() in ("RUNNING", "STARTING"):
            log.info("postgres is already running (driver restarted): applying the spec again")
        else:
            self.prepare_data(spec)
            self.start_postgres()
        self.wait_ready()
        t = time.monotonic()
        self.apply(spec)
        config_ms = ms_since(t)
        total_ms = int((time.time() - started_at) * 1000)
        self.store.record_metrics(config_ms=config_ms, total_startup_ms=total_ms)
        self.store.set(status="running", error=None, startup_done=True)
        log.info("compute is running (start-up took %d ms, this driver %d ms)", total_ms, ms_since(t_start))

    def wait_for_spec(self) -> ComputeSpec:
        """The spec from the state file; in pull mode fetched first, and if the control plane
        has none, status `empty` until /configure brings one."""
        raw = self.store.get("spec")
        t0 = time.monotonic()
        if raw is None and self.launch.get("control_plane_uri"):
            from .control_plane import fetch_spec
            raw = fetch_spec(self.launch["control_plane_uri"], self.launch["compute_id"],
                             os.environ.get("NEON_CONSOLE_JWT") or self.launch.get("console_jwt"))
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
        self.store.record_metrics(wait_for_spec_ms=ms_since(t0))
        spec = parse_spec(raw, superuser=self.superuser)
        self.store.set(status="init", tenant=spec.tenant_id, timeline=spec.timeline_id)
        return spec

    def prepare_data(self, spec: ComputeSpec) -> None:
        empty_directory(self.pgdata)
        self.store.record_metrics(sync_safekeepers_retries=0, basebackup_retries=0)
        st = spec.storage
        if st is None:
            t = time.monotonic()
            storage.initdb_default(self.launch["pgbin_dir"], self.pgdata, self.superuser)
            pgconf.write_default_hba(self.pgdata, self.superuser)
            pgconf.write_postgresql_conf(self.pgdata, spec.cluster.settings)
            self.store.record_metrics(basebackup_ms=ms_since(t), sync_safekeepers_ms=0, basebackup_bytes=0)
            log.info("embedded default: initdb done in %d ms", ms_since(t))
        else:
            # The spec's token, else one given in the environment (a Kubernetes Secret).
            token = spec.storage_auth_token or os.environ.get("NEON_AUTH_TOKEN") or None
            # Written before the sync: --sync-safekeepers reads its settings from it.
            pgconf.write_postgresql_conf(self.pgdata, spec.cluster.settings)
            timeout = float(self.launch.get("storage_timeout") or storage.DEFAULT_TIMEOUT)
            t = time.monotonic()
            lsn = "0/0"
            if spec.mode == "Static":
                lsn = spec.static_lsn or "0/0"
            elif spec.mode == "Primary" and st.safekeepers:
                lsn = storage.with_retries(
                    "sync-safekeepers", storage.SYNC_SAFEKEEPERS_RETRY,
                    lambda: storage.sync_safekeepers(self.launch["pgbin"], self.pgdata, token, timeout=timeout),
                    on_retry=lambda n: self.store.record_metrics(sync_safekeepers_retries=n))
            sync_ms = ms_since(t)
            log.info("safekeepers synced at LSN %s in %d ms", lsn, sync_ms)
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
                pgconf.write_postgresql_conf(self.pgdata, spec.cluster.settings)

            nbytes = storage.with_retries(
                "basebackup", storage.BASEBACKUP_RETRY,
                lambda: storage.basebackup(st.pageserver_connstring, st.tenant_id, st.timeline_id, lsn,
                                           self.pgdata, token, progress=progress, timeout=timeout,
                                           compression=self.launch.get("basebackup_compression")),
                before_retry=fresh_pgdata,
                on_retry=lambda n: self.store.record_metrics(basebackup_retries=n))
            bb_ms = ms_since(t)
            log.info("basebackup: %d bytes in %d ms", nbytes, bb_ms)
            self.store.record_metrics(sync_safekeepers_ms=sync_ms, basebackup_ms=bb_ms, basebackup_bytes=nbytes)
        pgconf.ensure_hba_line(self.pgdata)

    def start_postgres(self) -> None:
        self.t_postgres = time.monotonic()
        self.store.set(postgres_started=True)
        self.supervisor().startProcess("postgres", False)

    def wait_ready(self) -> None:
        t0 = getattr(self, "t_postgres", time.monotonic())
        deadline = time.monotonic() + READY_TIMEOUT
        next_check = 0.0
        while postmaster_status(self.pgdata) != "ready":
            now = time.monotonic()
            if now > deadline:
                raise StartupError(f"postgres did not become ready within {READY_TIMEOUT:.0f} s")
            if now >= next_check:  # fail early if postgres died while starting
                state = self.postgres_state()
                if state not in ("RUNNING", "STARTING"):
                    raise StartupError(f"postgres exited while starting (state {state}); see the postgres log")
                next_check = now + 0.25
            time.sleep(0.01)
        self.store.record_metrics(start_postgres_ms=ms_since(t0))

    def apply(self, spec: ComputeSpec) -> None:
        from .reconcile import apply_spec
        apply_spec(self.launch["connstr"], spec, superuser=self.superuser)

    # -- after start-up ---------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stopping:
            if self.store.get("status") == "configuration_pending":
                self.reconfigure()
            self.wake.wait(POLL)
            self.wake.clear()

    def reconfigure(self) -> None:
        if not self.store.transition({"configuration_pending"}, "configuration"):
            return
        try:
            spec = parse_spec(self.store.get("spec"), superuser=self.superuser)
            log.info("applying a new spec")
            pgconf.write_postgresql_conf(self.pgdata, spec.cluster.settings)
            with psycopg.connect(self.launch["connstr"], autocommit=True, connect_timeout=10) as conn:
                conn.execute("SELECT pg_reload_conf()")
                time.sleep(0.05)  # postmaster re-reads the file asynchronously
                pending = [r[0] for r in conn.execute(
                    "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name")]
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
        grace = float(self.launch.get("grace_seconds", 30))
        failed_at = self.store.get("failed_at") or time.time()
        remaining = failed_at + grace - time.time()
        if remaining > 0:
            log.info("keeping the error on /status for %.0f s before exiting", remaining)
            self.wake.wait(remaining)
        self.store.set_once("exit_code", 1)
        shutdown_tree(self.runtime_dir)
        while True:  # supervisord stops us
            time.sleep(1)


def main() -> None:
    die_with_parent()
    setup_program_logging()
    driver = Driver(os.environ["COMPUTE_RUNTIME_DIR"])
    signal.signal(signal.SIGUSR1, lambda *_: driver.wake.set())

    def on_term(*_):
        driver.stopping = True
        driver.wake.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    driver.run()


if __name__ == "__main__":
    main()
