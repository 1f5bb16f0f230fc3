"""POST /terminate[?mode=fast|immediate]: stop postgres and return once it is down, with the
primary's last LSN: {"terminated": true, "lsn": "0/16B3748" | null} (Neon's answer is the
`lsn`; `terminated` is kept for our earlier clients).

fast (default): supervisord stops postgres with SIGINT (fast shutdown, a shutdown checkpoint).
immediate: SIGQUIT (immediate shutdown: no checkpoint, crash recovery on a next start).

`shutdown_requested` tells the exit watcher that postgres going away is wanted: it then takes
the whole tree down with exit status 0, once this request has its answer (`terminate_pending`).
When postgres never ran (an `empty` compute, or a start-up before postgres), no postgres will
end: supervisord is asked (`stopAfterTerminate`) to stop the tree after the answer, `lsn` null.
"""

from __future__ import annotations

import logging
import os
import time
import xmlrpc.client

import falcon
import psycopg

from compute import shutdown_lsn, storage
from compute.api.context import ApiContext
from compute.api.errors import json_body
from compute.spec import SpecError, parse_spec
from compute.supervision import rpc

log = logging.getLogger("compute.api.terminate")

# supervisord's Faults.NOT_RUNNING: postgres already stopped, which is what we want.
NOT_RUNNING = 70
IMMEDIATE_WAIT = 30.0  # then a regular stop (SIGINT, SIGKILL after stopwaitsecs)


class Terminate:
    auth_required = True

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        modes = req.get_param_as_list("mode") or ["fast"]
        mode = modes[0]
        if len(modes) != 1 or mode not in shutdown_lsn.MODES:
            raise falcon.HTTPBadRequest(description=f"mode must be fast or immediate, got {','.join(modes)[:40]!r}")
        spec = self._spec()
        source = shutdown_lsn.lsn_source(spec, mode)
        lsn = self._flush_lsn() if source == shutdown_lsn.FLUSH_BEFORE_SIGNAL else None
        self.ctx.store.set(shutdown_requested=True, terminate_pending=True)
        try:
            log.info("terminate requested (%s): stopping postgres", mode)
            error, never_ran = self._stop_postgres(mode)
            if not error and never_ran:
                # No postgres will end, so the exit watcher would never stop the tree: it is
                # asked to, once this answer is out. No WAL was written: no LSN.
                error = self._stop_tree_after_answer()
                lsn = source = None
            if error:
                json_body(resp, {"error": error}, falcon.HTTP_500)
                return
            log.info("postgres is down")
            if source == shutdown_lsn.CONTROLDATA:
                lsn = shutdown_lsn.controldata_lsn(self.ctx.settings.pgbin_dir, self.ctx.settings.pgdata)
            elif source == shutdown_lsn.SYNC_SAFEKEEPERS:
                lsn = self._sync_safekeepers(spec)
            json_body(resp, {"terminated": True, "lsn": lsn})
        finally:
            self.ctx.store.set(terminate_pending=False)

    def _spec(self):
        raw = self.ctx.store.get("spec")
        if raw is None:
            return None
        try:
            return parse_spec(raw, superuser=self.ctx.superuser)
        except SpecError:
            return None

    def _flush_lsn(self) -> str | None:
        try:
            with self.ctx.pg_connect() as conn:
                return conn.execute(shutdown_lsn.FLUSH_LSN_QUERY).fetchone()[0]
        except psycopg.Error as e:
            log.warning("cannot read the WAL flush LSN before the immediate shutdown: %s", e)
            return None

    def _sync_safekeepers(self, spec) -> str | None:
        try:
            token = spec.storage_auth_token or os.environ.get("NEON_AUTH_TOKEN") or None  # as lifecycle
            timeout = self.ctx.settings.storage_timeout
            return storage.sync_safekeepers(self.ctx.settings.pgbin, self.ctx.settings.pgdata, token,
                                            timeout=timeout)
        except storage.StorageError as e:
            log.warning("sync-safekeepers after the shutdown failed: %s", e)
            return None

    def _stop_postgres(self, mode: str) -> tuple[str | None, bool]:
        """(None, never_ran) once postgres is down; else (what went wrong, False). never_ran:
        postgres was not running and had never been started (supervisord's `start` is 0)."""
        # No socket timeout: stopping blocks until supervisord reports postgres stopped.
        supervisor = rpc(self.ctx.runtime_dir, timeout=None).supervisor
        try:
            if mode == "immediate" and self._quit(supervisor):
                return None, False
            supervisor.stopProcess("postgres", True)
        except xmlrpc.client.Fault as e:
            if e.faultCode != NOT_RUNNING:
                return f"supervisord refused to stop postgres: {e.faultString}", False
            try:
                return None, supervisor.getProcessInfo("postgres")["start"] == 0
            except (OSError, xmlrpc.client.Error) as e:
                return f"cannot reach supervisord: {e}", False
        except (OSError, xmlrpc.client.ProtocolError) as e:
            return f"cannot reach supervisord: {e}", False
        return None, False

    def _stop_tree_after_answer(self) -> str | None:
        try:
            rpc(self.ctx.runtime_dir).supervisor.stopAfterTerminate()
        except (OSError, xmlrpc.client.Error) as e:
            return f"postgres never ran, and supervisord could not be asked to stop the compute: {e}"
        log.info("postgres never ran: the compute stops once this answer is out")
        return None

    @staticmethod
    def _quit(supervisor) -> bool:
        """SIGQUIT (immediate shutdown); True once postgres has exited."""
        supervisor.signalProcess("postgres", "QUIT")
        deadline = time.monotonic() + IMMEDIATE_WAIT
        while time.monotonic() < deadline:
            if supervisor.getProcessInfo("postgres")["statename"] not in ("RUNNING", "STARTING", "STOPPING"):
                return True
            time.sleep(0.05)
        log.warning("postgres still up %.0f s after SIGQUIT: stopping it the regular way", IMMEDIATE_WAIT)
        return False
