"""POST /promote: turn a Replica compute into the Primary (Neon's route).

Body `{"spec": {...}, "wal_flush_lsn": "<lsn>"}` (the LSN may be left out for a replica of a
plain PostgreSQL primary). Steps:
  1. validate: 400 for a malformed body, an invalid spec, or a spec whose mode is not Primary;
     412 when this compute is not a running Replica;
  2. claim the compute (atomic `running` -> `configuration`: one promotion at a time, and no
     /configure meanwhile);
  3. wait until postgres has replayed up to wal_flush_lsn, then pg_promote(): on failure the
     compute stays the replica it was (`running`) and the answer is 500 {"status": "failed"};
  4. hand the new spec to the lifecycle driver as a reconfiguration (the /configure protocol):
     it writes postgresql.conf for a primary, reloads, and runs the catalog SQL;
  5. 200 {"status": "completed", lsn_wait_time_ms, pg_promote_time_ms, reconfigure_time_ms}.
"""

from __future__ import annotations

import logging
import time

import falcon
import psycopg

from compute import modes
from compute.api.context import ApiContext, debug_status_name
from compute.api.errors import json_body, read_body, spec_request
from compute.replica import ReplicaError, promote, wait_for_replay
from compute.spec import LSN, SpecError, parse_spec
from compute.supervision import rpc

log = logging.getLogger("compute.api.promote")

LSN_WAIT_TIMEOUT = 30.0      # Neon gives up after 20 one-second retries
RECONFIGURE_TIMEOUT = 600.0  # as /configure
POLL_INTERVAL = 0.05


def parse_request(raw: bytes, superuser: str | None) -> tuple[dict, str | None]:
    """(spec document, wal_flush_lsn) or falcon.HTTPBadRequest naming the problem."""
    body = spec_request(raw, '{"spec": {...}, "wal_flush_lsn": "<lsn>"}')
    lsn = body.get("wal_flush_lsn")
    if lsn is not None and not (isinstance(lsn, str) and LSN.match(lsn)):
        raise falcon.HTTPBadRequest(description='wal_flush_lsn must be an LSN such as "0/16B9188"')
    try:
        spec = parse_spec(body["spec"], superuser=superuser)
    except SpecError as e:
        raise falcon.HTTPBadRequest(description=str(e)) from None
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
        raise falcon.HTTPBadRequest(description=f"invalid spec: {type(e).__name__}") from None
    if spec.mode != modes.PRIMARY:
        raise falcon.HTTPBadRequest(description=f"invalid spec: mode: a promoted compute is Primary, not {spec.mode}")
    return body["spec"], lsn


class Promote:
    auth_required = True
    json_body_required = True  # for a Content-Type check on JSON routes, where one is enforced

    def __init__(self, ctx: ApiContext, *, lsn_timeout: float = LSN_WAIT_TIMEOUT,
                 reconfigure_timeout: float = RECONFIGURE_TIMEOUT):
        self.ctx = ctx
        self.lsn_timeout = lsn_timeout
        self.reconfigure_timeout = reconfigure_timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        settings = self.ctx.settings
        new_spec, lsn = parse_request(read_body(req), (settings and settings.superuser) or self.ctx.superuser)
        store = self.ctx.store
        current = store.get("spec")
        mode = modes.mode_of(current)
        if mode != modes.REPLICA:
            raise falcon.HTTPPreconditionFailed(description=f'compute mode "{mode.lower()}" is not replica')
        on_neon = isinstance(current, dict) and parse_spec(current, superuser=self.ctx.superuser).storage is not None
        if lsn is None and on_neon:
            raise falcon.HTTPBadRequest(description="wal_flush_lsn is required to promote a replica of Neon storage")
        # marked, so a lifecycle driver restarted meanwhile leaves it to us (compute.lifecycle_plan)
        if not store.transition({"running"}, "configuration", configuring_by="promote"):
            raise falcon.HTTPPreconditionFailed(
                description=f"invalid compute status for promote request: {debug_status_name(store.get('status'))}")

        log.info("promoting this replica (wal_flush_lsn %s)", lsn or "not given")
        t0 = time.monotonic()
        try:
            with self.ctx.pg_connect(timeout=10) as conn:
                wait_for_replay(conn, lsn, self.lsn_timeout)
                t1 = time.monotonic()
                promote(conn)
            t2 = time.monotonic()
        except (ReplicaError, psycopg.Error, ValueError) as e:
            msg = str(e).strip() or type(e).__name__
            log.error("promotion failed: %s", msg)
            store.transition({"configuration"}, "running")  # still the replica it was
            json_body(resp, {"status": "failed", "error": msg}, falcon.HTTP_500)
            return
        log.info("postgres promoted; applying the spec as a primary")

        generation = store.transition({"configuration"}, "configuration_pending", bump="spec_generation",
                                      spec=new_spec, error=None)
        error = None
        if not generation:
            error = f"status changed during promotion: {store.get('status')}"
        else:
            self._wake_driver()
            error = self._wait_applied(generation)
        if error:
            log.error("promotion: applying the spec failed: %s", error)
            json_body(resp, {"status": "failed", "error": error}, falcon.HTTP_500)
            return
        json_body(resp, {"status": "completed", "lsn_wait_time_ms": int((t1 - t0) * 1000),
                         "pg_promote_time_ms": int((t2 - t1) * 1000),
                         "reconfigure_time_ms": int((time.monotonic() - t2) * 1000)})

    def _wait_applied(self, generation: int) -> str | None:
        deadline = time.monotonic() + self.reconfigure_timeout
        store = self.ctx.store
        while True:
            s = store.get_many(("status", "spec_generation", "error"))
            if s["status"] == "running" or (s["spec_generation"] or 0) > generation:
                return None
            if s["status"] == "failed":
                return s["error"] or "configuration failed"
            if time.monotonic() >= deadline:
                return f"timed out after {self.reconfigure_timeout:.0f} s waiting for the configuration"
            time.sleep(POLL_INTERVAL)

    def _wake_driver(self) -> None:
        try:
            rpc(self.ctx.runtime_dir, timeout=2).supervisor.signalProcess("lifecycle", "USR1")
        except Exception as e:  # the driver polls the state anyway
            log.debug("could not signal the lifecycle driver: %s", e)
