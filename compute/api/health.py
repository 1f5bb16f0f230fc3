"""Kubernetes probes.

GET /healthz (liveness): 200 whenever this process can answer; never touches postgres, so a
slow or restarting postgres never gets the pod killed.
GET /readyz (readiness, and startup): 200 only when the status is `running` and postgres accepts
a connection; 503 otherwise. The postgres check (a connection that must complete, startup and
authentication included, within CONNECT_DEADLINE: 1 s) is cached for about a second per worker,
so probes stay cheap whatever their rate.

The deadline is ours, not libpq's `connect_timeout`: libpq (and psycopg after it) raises any
value under 2 s to 2 s, so a postgres that accepts TCP connections and never answers (stopped,
overloaded) made /readyz take 2 s, a probe's whole timeout. The connection is libpq's
non-blocking one (compute/postgres/libpq.py), polled until the deadline.
"""

from __future__ import annotations

import threading
import time

import falcon
import psycopg

from compute.api.bodies import HEALTHZ
from compute.api.context import HTTP_APPLICATION_NAME, ApiContext
from compute.api.errors import json_body
from compute.postgres.libpq import SessionError, Waiter, connect
from compute.postgres.sessions import session_params

CACHE_SECONDS = 1.0
CONNECT_DEADLINE = 1.0  # seconds for the whole connection (docs/api.md: /readyz)


def connect_within(connstr: str, deadline: float) -> None:
    """A superuser connection to postgres, made and closed within `deadline` seconds (our poll
    of libpq's non-blocking connect); SessionError or psycopg.Error otherwise."""
    params = {**session_params(connstr), "application_name": HTTP_APPLICATION_NAME}
    connect(params, Waiter(deadline)).finish()


class Healthz:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        json_body(resp, HEALTHZ)


class Readyz:
    def __init__(self, ctx: ApiContext, *, cache_seconds: float = CACHE_SECONDS):
        self.ctx = ctx
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._pg_ok: bool = False
        self._pg_reason: str | None = None

    def _postgres_accepts(self) -> tuple[bool, str | None]:
        with self._lock:  # one check at a time; concurrent probes share its result
            if time.monotonic() - self._checked_at >= self.cache_seconds:
                try:
                    connect_within(self.ctx.connstr, CONNECT_DEADLINE)
                    self._pg_ok, self._pg_reason = True, None
                except (SessionError, psycopg.Error, KeyError) as e:
                    self._pg_ok, self._pg_reason = False, f"postgres does not accept connections: {str(e).strip()}"
                self._checked_at = time.monotonic()
            return self._pg_ok, self._pg_reason

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = self.ctx.store.get("status")
        if status != "running":
            json_body(resp, {"ready": False, "status": status, "reason": f"compute status is {status}"},
                      falcon.HTTP_503)
            return
        ok, reason = self._postgres_accepts()
        if not ok:
            json_body(resp, {"ready": False, "status": status, "reason": reason}, falcon.HTTP_503)
            return
        json_body(resp, {"ready": True, "status": status, "reason": None})
