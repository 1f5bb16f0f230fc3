"""POST /configure: hand a new spec to the lifecycle driver and wait for the outcome.

The API's half of the protocol (the driver is the `lifecycle` program):
  1. validate, cheapest first and the body last (nothing is read for a request that will be
     refused): 401/403 without a valid token (--jwks), 415 unless Content-Type is JSON, 412
     when live configuration is not allowed (a -s/-S launch) or the status is not empty/running;
     then read the body: 400 unless it is a JSON object with a "spec" object, 412 when the spec
     is invalid or would change a running compute's mode (compute/model/modes.py);
  2. submit, wake, wait (compute/shared/driver_requests.py): one atomic transition {empty, running} ->
     configuration_pending carrying the spec and a new spec_generation (of concurrent requests
     exactly one wins, the others get 412), then the driver's answer: `running` (200, the
     /status body) or `failed` (500 {"error"}).
The request blocks a single worker thread; other requests keep being served.
"""

from __future__ import annotations

import logging

import falcon

from compute.shared import driver_requests
from compute.model import modes
from compute.api.context import ApiContext, debug_status_name
from compute.api.errors import json_body, read_body, spec_request
from compute.model.spec import SpecError, StoredSpecError, load_stored, parse_spec, to_document

log = logging.getLogger("compute.api.configure")

POLL_INTERVAL = 0.05
DEFAULT_TIMEOUT = 600.0


class Configure:
    auth_required = True
    json_body_required = True

    def __init__(self, ctx: ApiContext, *, timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL):
        self.ctx = ctx
        self.timeout = timeout
        self.poll_interval = poll_interval

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        settings = self.ctx.settings
        if not settings.live_config_allowed:
            raise falcon.HTTPPreconditionFailed(
                description="live configuration is not allowed for this compute node")
        status = self.ctx.store.get("status")
        if status not in ("empty", "running"):  # a hint only: the transition below decides
            raise falcon.HTTPPreconditionFailed(
                description=f"invalid compute status for configuration request: {debug_status_name(status)}")
        spec = spec_request(read_body(req), '{"spec": {...}}')["spec"]
        superuser = settings.superuser or self.ctx.superuser
        try:
            new = parse_spec(spec, superuser=superuser)
        except SpecError as e:
            raise falcon.HTTPPreconditionFailed(description=str(e)) from None
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
            # A spec the validator could not even walk is an invalid spec, not a server error.
            log.warning("spec validation raised %s", type(e).__name__, exc_info=True)
            raise falcon.HTTPPreconditionFailed(
                description=f"invalid spec: {type(e).__name__}: {str(e)[:200]}") from None

        if status == "running":
            self._refuse_a_mode_change(new, superuser)
        store = self.ctx.store
        generation = driver_requests.submit_configure(store, to_document(new))
        if not generation:
            status = store.get("status")
            raise falcon.HTTPPreconditionFailed(
                description=f"invalid compute status for configuration request: {debug_status_name(status)}")
        log.info("new spec (generation %d) handed to the driver", generation)
        driver_requests.wake_driver(self.ctx.runtime_dir)
        outcome, last = driver_requests.wait_for(
            store, driver_requests.CONFIGURE_KEYS, lambda v: driver_requests.configure_outcome(v, generation),
            self.timeout, self.poll_interval)
        if outcome is None:
            json_body(resp, {"error": f"timed out after {self.timeout:.0f} s waiting for the configuration "
                                      f"(status {last['status']})"}, falcon.HTTP_500)
        elif outcome[0]:
            json_body(resp, self.ctx.status_body())
        else:
            json_body(resp, {"error": outcome[1]}, falcon.HTTP_500)

    def _refuse_a_mode_change(self, new, superuser: str) -> None:
        try:
            running = load_stored(self.ctx.store)
        except StoredSpecError as e:
            log.error("%s", e)
            running = None  # nothing to compare to
        reason = running and modes.live_mode_change_refused(running, new)
        if reason:
            raise falcon.HTTPPreconditionFailed(description=reason)
