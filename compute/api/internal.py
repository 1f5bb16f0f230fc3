"""The internal port (HEAD's `Server::Internal`, compute_tools/src/http/server.rs): the routes
local processes use (postgres' neon extension, local_proxy), no token.

Served by the same gunicorn as the external port: a second listening socket (compute-ctl binds
--internal-http-address:--internal-http-port, default 127.0.0.1, next to the external one, and
the api binds both: compute/api/gunicorn_conf.py). Each request goes to one of two falcon apps
by the port of the listener that accepted it (`ByListener`: the WSGI `SERVER_PORT` gunicorn
takes from the listening socket's own address for TCP, never from the Host header). No extra
process, thread or worker: the second app costs a few objects in the worker.

Routes:
  POST /grants       {"database", "schema", "privileges", "role"} -> 201 echoing them
  POST /extensions   {"extension", "database", "version"} -> 201 {"extension", "version"}
  POST /extension_server/{filename}: 412 `remote storage is not configured` (HEAD's answer
                     without remote extensions, which are not supported here)
  POST /refresh_configuration, POST /failpoints: 501 (Hadron; testing builds): not supported
  anything else: 404 {"error"}, a wrong method 405.
Checked in HEAD's order: the body first (413 over 1 MiB, 415 unless JSON, 400 for JSON that
does not parse, 422 for a body of the wrong shape: compute/model/internal_requests.py), then the
status (412 `invalid compute status: <status>` unless `running`). Then the request goes to the
lifecycle driver, the one process that changes postgres (compute/shared/driver_requests.py), and
the call waits for its answer: 201, or 500 with HEAD's sentence and postgres' reason.

Peers: with a loopback --internal-http-address (the default) only loopback peers are answered
(403 for any other, whatever reached the socket); an operator who binds it elsewhere (HEAD binds
all interfaces) has chosen who reaches it, and compute-ctl warns at start.
"""

from __future__ import annotations

import json
import logging

import falcon

from compute.api.access import is_loopback
from compute.api.context import ApiContext, head_status_name
from compute.api.errors import BodyLimit, JsonOnly, json_body, read_body, serialize_error
from compute.model.internal_requests import RequestShapeError, parse_extension, parse_grants
from compute.shared import driver_requests

log = logging.getLogger("compute.api.internal")

WAIT_TIMEOUT = 600.0  # as /configure: the driver may be applying a spec first
LOOPBACK_ONLY = ("the internal API answers only clients on this machine (loopback); bind it elsewhere with "
                 "--internal-http-address to open it")
NOT_SUPPORTED_ROUTES = {
    "/refresh_configuration": "Hadron's configuration refresh is not supported by this compute",
    "/failpoints": "failpoints are not supported by this compute (HEAD: testing builds only)",
}


def unprocessable(message: str) -> falcon.HTTPError:
    return falcon.HTTPUnprocessableEntity(description=message)


def json_request(req: falcon.Request) -> object:
    raw = read_body(req)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise falcon.HTTPBadRequest(description=f"failed to parse the request body as json: {e}") from None
    except RecursionError:
        raise falcon.HTTPBadRequest(description="request body is nested too deeply") from None


class LoopbackPeers:
    """403 for a peer that is not loopback, unless the internal address is not loopback."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        address = self.ctx.settings.internal_http_address
        if address is not None and not is_loopback(address):
            return  # the operator opened it (compute-ctl warned at start)
        if not is_loopback(req.remote_addr):
            log.warning("internal API: %s %s from non-loopback peer %s refused", req.method, req.path, req.remote_addr)
            raise falcon.HTTPForbidden(description=LOOPBACK_ONLY)


class CatalogRoute:
    """POST /grants or /extensions: check, queue for the driver, wait, answer."""
    json_body_required = True

    def __init__(self, ctx: ApiContext, kind: str, *, timeout: float = WAIT_TIMEOUT,
                 poll_interval: float = driver_requests.POLL_INTERVAL):
        self.ctx = ctx
        self.kind = kind
        self.timeout = timeout
        self.poll_interval = poll_interval

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        raw = json_request(req)
        try:
            parsed = parse_grants(raw) if self.kind == driver_requests.GRANTS else parse_extension(raw)
        except RequestShapeError as e:
            raise unprocessable(str(e)) from None
        body = parsed.__dict__ if self.kind == driver_requests.EXTENSION else {
            **parsed.__dict__, "privileges": list(parsed.privileges)}
        store = self.ctx.store
        made = driver_requests.submit_catalog_request(store, self.kind, body)
        if made == driver_requests.BUSY:
            raise falcon.HTTPServiceUnavailable(description="too many internal requests under way; retry",
                                                retry_after=1)
        if not isinstance(made, driver_requests.CatalogRequest):
            raise falcon.HTTPPreconditionFailed(description=f"invalid compute status: {head_status_name(made)}")
        log.info("%s request %d handed to the driver", self.kind, made.id)
        driver_requests.wake_driver(self.ctx.runtime_dir)
        answered, last = driver_requests.wait_for(
            store, ("status", driver_requests.CATALOG_KEY), lambda v: self._answered(v, made.id),
            self.timeout, self.poll_interval)
        if answered is None:
            driver_requests.drop_catalog_request(store, made.id)
            json_body(resp, {"error": f"timed out after {self.timeout:.0f} s waiting for the lifecycle driver "
                                      f"(status {last['status']})"}, falcon.HTTP_500)
            return
        if isinstance(answered, str):  # the compute left `running` for good before our turn
            raise falcon.HTTPPreconditionFailed(description=f"invalid compute status: {head_status_name(answered)}")
        if answered.phase != driver_requests.DONE:
            json_body(resp, {"error": answered.error or "the request failed"}, falcon.HTTP_500)
        elif self.kind == driver_requests.GRANTS:
            json_body(resp, parsed.answer(), falcon.HTTP_201)
        else:
            json_body(resp, {"extension": parsed.extension, "version": answered.answer}, falcon.HTTP_201)

    def _answered(self, values: dict, request_id: int):
        """The answered record (taken out of the queue), the status that ends the wait, or None."""
        mine = next((r for r in driver_requests.catalog_queue(values[driver_requests.CATALOG_KEY])
                     if r.id == request_id), None)
        if mine is None or mine.phase not in (driver_requests.REQUESTED, driver_requests.STARTED):
            return driver_requests.take_catalog_answer(self.ctx.store, request_id)  # one write, once
        if values["status"] in ENDED:
            driver_requests.drop_catalog_request(self.ctx.store, request_id)
            return values["status"]
        return None


# The statuses a queued request will never be carried out in (the driver fails what it still
# holds when it sees a terminate; these cover a driver that never looks again).
ENDED = frozenset({"terminated", "failed", "termination_pending_fast", "termination_pending_immediate"})


class NotSupported:
    """HEAD's internal routes for features not implemented here: 501 saying so."""

    def __init__(self, message: str):
        self.message = message

    def on_post(self, req: falcon.Request, resp: falcon.Response, **_) -> None:
        json_body(resp, {"error": self.message}, falcon.HTTP_501)


class RemoteExtensions:
    """HEAD's answer when no remote extension storage is configured (always, here)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, **_) -> None:
        json_body(resp, {"error": "remote storage is not configured"}, falcon.HTTP_412)


def create_internal_app(ctx: ApiContext) -> falcon.App:
    # In this order: 413, 403 (peer), then 415 for a JSON route.
    app = falcon.App(middleware=[BodyLimit(), LoopbackPeers(ctx), JsonOnly()])
    app.set_error_serializer(serialize_error)
    app.add_route("/grants", CatalogRoute(ctx, driver_requests.GRANTS))
    app.add_route("/extensions", CatalogRoute(ctx, driver_requests.EXTENSION))
    app.add_route("/extension_server/{filename:path}", RemoteExtensions())
    for route, message in NOT_SUPPORTED_ROUTES.items():
        app.add_route(route, NotSupported(message))
    return app


WSGI_SERVER_PORT = "SERVER_PORT"  # gunicorn: the listening socket's port (TCP), not the Host header's


class ByListener:
    """The WSGI app gunicorn serves: a request accepted on the internal port goes to the
    internal app, every other to the external one (when the internal API is not served, or
    the settings cannot be read, always the external one, whose checks are the stricter)."""

    def __init__(self, ctx: ApiContext, external: falcon.App, internal: falcon.App):
        self.ctx = ctx
        self.external = external
        self.internal = internal
        self._port: str | None = None

    def internal_port(self) -> str:
        port = self._port
        if port is None:
            try:
                s = self.ctx.settings
            except Exception:  # the external app says what is wrong with the state file
                return ""
            port = self._port = str(s.internal_http_port) if s.internal_http_address is not None else ""
        return port

    def __call__(self, environ, start_response):
        port = self.internal_port()
        app = self.internal if port and environ.get(WSGI_SERVER_PORT) == port else self.external
        return app(environ, start_response)

    def __getattr__(self, name):  # the external app's attributes (tests, gunicorn's checks)
        return getattr(self.external, name)
