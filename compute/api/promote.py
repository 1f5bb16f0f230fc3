"""POST /promote: turn a Replica compute into the Primary (Neon's route).

Body `{"spec": {...}, "wal_flush_lsn": "<lsn>"}` (the LSN may be left out for a replica of a
plain PostgreSQL primary). The API validates and submits; the lifecycle driver promotes
(compute/shared/driver_requests.py, compute/lifecycle/driver.py):
  1. validate: 400 for a malformed body, an invalid spec, or a spec whose mode is not Primary;
     412 when this compute is not a running Replica;
  2. submit: claim the compute (atomic `running` -> `configuration` with the `promotion` record:
     one promotion at a time, and no /configure meanwhile), wake the driver;
  3. the driver waits until postgres has replayed up to wal_flush_lsn, then pg_promote(): on
     failure the compute stays the replica it was (`running`) and the answer is 500
     {"status": "failed"};
  4. the driver then applies the new spec as a reconfiguration: postgresql.conf for a primary,
     a reload, the catalog SQL;
  5. 200 {"status": "completed", lsn_wait_time_ms, pg_promote_time_ms, reconfigure_time_ms}.
"""

from __future__ import annotations

import logging
import time

import falcon

from compute.shared import driver_requests
from compute.model import modes
from compute.api.context import ApiContext, debug_status_name
from compute.api.errors import json_body, read_body, spec_request
from compute.model.spec_shape import unknown_keys_line
from compute.model.spec import LSN, ComputeSpec, SpecError, StoredSpecError, load_stored, parse_spec, to_document

log = logging.getLogger("compute.api.promote")

LSN_WAIT_TIMEOUT = 30.0      # Neon gives up after 20 one-second retries (the driver's wait)
PROMOTE_TIMEOUT = LSN_WAIT_TIMEOUT + 120.0  # the replay wait, pg_promote() (60 s at most), slack
RECONFIGURE_TIMEOUT = 600.0  # as /configure


def parse_request(raw: bytes, superuser: str | None) -> tuple[ComputeSpec, str | None]:
    """(spec, wal_flush_lsn) or falcon.HTTPBadRequest naming the problem."""
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
    if spec.ignored_keys:
        log.warning("%s", unknown_keys_line(spec.ignored_keys))
    return spec, lsn


class Promote:
    json_body_required = True  # for a Content-Type check on JSON routes, where one is enforced

    def __init__(self, ctx: ApiContext, *, promote_timeout: float = PROMOTE_TIMEOUT,
                 reconfigure_timeout: float = RECONFIGURE_TIMEOUT):
        self.ctx = ctx
        self.promote_timeout = promote_timeout
        self.reconfigure_timeout = reconfigure_timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        settings = self.ctx.settings
        new_spec, lsn = parse_request(read_body(req), settings.superuser or self.ctx.superuser)
        store = self.ctx.store
        try:
            current = load_stored(store)
        except StoredSpecError as e:
            raise falcon.HTTPInternalServerError(description=str(e)) from None
        mode = current.mode if current else modes.PRIMARY
        if mode != modes.REPLICA:
            raise falcon.HTTPPreconditionFailed(description=f'compute mode "{mode.lower()}" is not replica')
        if lsn is None and current.storage is not None:
            raise falcon.HTTPBadRequest(description="wal_flush_lsn is required to promote a replica of Neon storage")
        request = driver_requests.submit_promote(store, to_document(new_spec), lsn)
        if request is None:
            raise falcon.HTTPPreconditionFailed(
                description=f"invalid compute status for promote request: {debug_status_name(store.get('status'))}")
        log.info("promotion (wal_flush_lsn %s) handed to the driver", lsn or "not given")
        driver_requests.wake_driver(self.ctx.runtime_dir)
        promoted, _ = driver_requests.wait_for(
            store, ("promotion",), lambda v: driver_requests.promotion_outcome(v, request.id), self.promote_timeout)
        if promoted is None:
            return self._failed(resp, f"timed out after {self.promote_timeout:.0f} s waiting for the promotion")
        if promoted.phase != driver_requests.DONE:
            return self._failed(resp, promoted.error or "promotion failed")
        applied, _ = driver_requests.wait_for(
            store, driver_requests.CONFIGURE_KEYS,
            lambda v: driver_requests.configure_outcome(v, promoted.generation), self.reconfigure_timeout)
        if applied is None:
            error = f"timed out after {self.reconfigure_timeout:.0f} s waiting for the configuration"
        else:
            error = applied[1]
        if error:
            log.error("promotion: applying the spec failed: %s", error)
            return self._failed(resp, error)
        reconfigure_ms = max(0, int((time.time() - (promoted.promoted_at or time.time())) * 1000))
        json_body(resp, {"status": "completed", "lsn_wait_time_ms": promoted.lsn_wait_ms,
                         "pg_promote_time_ms": promoted.pg_promote_ms, "reconfigure_time_ms": reconfigure_ms})

    @staticmethod
    def _failed(resp: falcon.Response, error: str) -> None:
        json_body(resp, {"status": "failed", "error": error}, falcon.HTTP_500)
