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
        # The TCP peer as gunicorn saw it (PROXY_ADDR: the real peer if the PROXY protocol was
        # ever turned on, whatever the header claimed). Never a forwarding header. Absent: not
        # loopback.
        peer = req.env.get("PROXY_ADDR") or req.env.get("REMOTE_ADDR")
        decision = decide(req.path, peer, req.get_header("Authorization"), self.jwks(settings.jwks_path),
                          settings.compute_id, require_exp=settings.jwt_require_exp)
        if not decision.allowed:
            log.warning("refused %s %s from %s: %d %s", req.method, req.path, peer, decision.status, decision.reason)
            headers = {"WWW-Authenticate": "Bearer"} if decision.status == 401 else None
            raise falcon.HTTPError(decision.status, description=decision.error, headers=headers)
        req.context.claims = decision.claims
