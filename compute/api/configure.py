"""POST /configure: hand a new spec to the lifecycle driver and wait for the outcome.

The API's half of the protocol (the driver is the `lifecycle` program):
  1. validate, cheapest first and the body last (nothing is read for a request that will be
     refused): the access rules (compute/api/access.py: 400/401/403), 415 unless Content-Type is
     JSON, 412 `invalid compute status: <status>` (HEAD's wording) unless the status is
     empty/running; then read the body, `{"spec": {...}, "compute_ctl_config": {...}}` as HEAD
     (compute_ctl_config optional, as the 2023 contract sends none): 400 unless it is a JSON
     object with a "spec" object, for a malformed compute_ctl_config, and for an invalid spec;
     412 for a spec that would change a running compute's mode (compute/model/modes.py).
     Allowed whatever the launch mode (HEAD). compute_ctl_config is checked, not applied: the
     JWKS is fixed for the life of the process, as at HEAD. 400 also when the spec document is
     malformed (nested too deep, a misspelled key: SpecShapeError);
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
from compute.api.context import ApiContext, head_status_name
from compute.api.errors import json_body, read_body, spec_request
from compute.model.compute_config import ConfigError, parse_compute_ctl_config
from compute.model.spec import SpecError, SpecShapeError, StoredSpecError, load_stored, parse_spec, to_document
from compute.model.spec_shape import unknown_keys_line

log = logging.getLogger("compute.api.configure")

POLL_INTERVAL = 0.05
DEFAULT_TIMEOUT = 600.0


class Configure:
    json_body_required = True

    def __init__(self, ctx: ApiContext, *, timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL):
        self.ctx = ctx
        self.timeout = timeout
        self.poll_interval = poll_interval

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        settings = self.ctx.settings
        status = self.ctx.store.get("status")
        if status not in ("empty", "running"):  # a hint only: the transition below decides
            raise invalid_status(status)
        body = spec_request(read_body(req), '{"spec": {...}, "compute_ctl_config": {...}}')
        if body.get("compute_ctl_config") is not None:
            try:
                parse_compute_ctl_config(body["compute_ctl_config"])
            except ConfigError as e:
                raise falcon.HTTPBadRequest(description=str(e)) from None
            log.info("compute_ctl_config checked, not applied: the JWKS is fixed for the life of the compute")
        superuser = settings.superuser or self.ctx.superuser
        try:
            new = parse_spec(body["spec"], superuser=superuser)
        except SpecShapeError as e:  # nested too deep, a misspelled key: a malformed request
            raise falcon.HTTPBadRequest(description=str(e)) from None
        except SpecError as e:
            raise falcon.HTTPBadRequest(description=str(e)) from None
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
            # A spec the validator could not even walk is an invalid spec, not a server error.
            log.warning("spec validation raised %s", type(e).__name__, exc_info=True)
            raise falcon.HTTPBadRequest(
                description=f"invalid spec: {type(e).__name__}: {str(e)[:200]}") from None

        if new.ignored_keys:
            log.warning("%s", unknown_keys_line(new.ignored_keys))
        if status == "running":
            self._refuse_a_mode_change(new, superuser)
        store = self.ctx.store
        generation = driver_requests.submit_configure(store, to_document(new))
        if not generation:
            raise invalid_status(store.get("status"))
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


def invalid_status(status: str | None) -> falcon.HTTPError:
    """HEAD's 412 for a compute not `empty`/`running` (compute_tools/src/http/mod.rs invalid_status)."""
    return falcon.HTTPPreconditionFailed(description=f"invalid compute status: {head_status_name(status)}")
