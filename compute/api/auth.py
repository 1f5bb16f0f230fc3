"""The falcon middleware of compute/api/access.py: who may call which route (Neon compute_ctl's
`authorize` middleware at HEAD, plus our loopback rule for a compute without a JWKS). It gathers
the decision's inputs (route, TCP peer, Authorization header, the compute's JWKS and id) and
turns a refusal into HEAD's answer: `{"error": ...}` with 400, 401 (and `WWW-Authenticate:
Bearer`) or 403."""

from __future__ import annotations

import logging
from typing import Any

import falcon

from compute.api.access import OPEN, Jwks, JwksFile, decide, route_policy

log = logging.getLogger("compute.api.auth")


class Access:
    """Falcon middleware applying decide() to every routed request. `settings` is a callable
    returning the compute's LaunchSettings, read at request time."""

    def __init__(self, settings):
        self._settings = settings
        self._file: JwksFile | None = None

    def jwks(self, path: str | None) -> Jwks | None:
        if not path:
            return None
        if self._file is None or self._file.path != path:
            self._file = JwksFile(path)
        return self._file.current()

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict) -> None:
        if resource is None:
            return  # falcon answers 404
        if not hasattr(resource, f"on_{req.method.lower()}"):
            return  # falcon answers 405
        if route_policy(req.path) == OPEN:
            return  # without a look at the settings: /healthz never waits on the state file
        settings = self._settings()
        peer = tcp_peer(req.env)
        decision = decide(req.path, peer, req.get_header("Authorization"), self.jwks(settings.jwks_path),
                          settings.compute_id, require_exp=settings.jwt_require_exp)
        if not decision.allowed:
            log.warning("refused %s %s from %s: %d %s", req.method, req.path, peer, decision.status, decision.reason)
            headers = {"WWW-Authenticate": "Bearer"} if decision.status == 401 else None
            raise falcon.HTTPError(decision.status, description=decision.error, headers=headers)
        req.context.claims = decision.claims


def tcp_peer(env: dict) -> str | None:
    """The address at the other end of the request's TCP connection: REMOTE_ADDR, which gunicorn
    sets from accept() (or the early responder's hand-over, getpeername) and nothing a client
    sends changes: no forwarding header is ever read. Only the PROXY protocol would rewrite it
    (off here; were it turned on, e.g. through GUNICORN_CMD_ARGS, gunicorn marks the environ with
    PROXY_PROTOCOL): then the peer is unknown. Unknown is never loopback."""
    if "PROXY_PROTOCOL" in env:
        return None
    return env.get("REMOTE_ADDR")
