"""How much of a worker's thread pool the data routes may hold, so that the probes and the
control routes always find a thread.

The pool (compute/api/gunicorn_conf.py: COMPUTE_API_THREADS, 16 by default) serves every
request the poller does not answer itself. The data routes (`/database_schema`,
`/dbs_and_roles`, `/check_writability`, `/insights`: resources with `data_route = True`) read
postgres on a client's behalf, and a client that reads its answer slowly holds its thread
while it does. They get at most `data_permits(threads)` threads at once per worker; beyond that
a data request is answered 429 with `Retry-After` at once (the client's concurrency, not a
server failure: 5xx stays for those). The rest of the pool is kept for
/readyz, /metrics, /configure, /terminate, /promote (and the few bodies being read:
compute/api/errors.py MAX_CONCURRENT_BODY_READS); /status, /healthz, /metrics.json and /info
never need a thread (compute/api/fastpath.py).

A permit is held until the answer is sent: for a streamed answer (resp.stream), until the
server closes the stream (gunicorn always does, even when the client went away).
"""

from __future__ import annotations

import os
import threading

import falcon

from compute.api.errors import MAX_CONCURRENT_BODY_READS

# Threads never given to data routes, beyond those body reads may take: the probes and the
# control routes' share.
RESERVED_FOR_CONTROL = 4
RETRY_AFTER_SECONDS = 1


def data_permits(threads: int) -> int:
    """How many pool threads the data routes may hold at once (at least 1)."""
    return max(1, threads - MAX_CONCURRENT_BODY_READS - RESERVED_FOR_CONTROL)


def pool_threads(environ=os.environ) -> int:
    """The worker's pool size, as gunicorn_conf.py sets it."""
    try:
        return max(1, int(environ.get("COMPUTE_API_THREADS", "16")))
    except ValueError:
        return 16


def busy(description: str, retry_after: int = RETRY_AFTER_SECONDS) -> falcon.HTTPError:
    return falcon.HTTPTooManyRequests(description=description, retry_after=retry_after)


class Permits:
    """A non-blocking counting bound: take() or False, never a wait."""

    def __init__(self, limit: int):
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._sem.acquire(blocking=False)

    def give(self) -> None:
        self._sem.release()


class _ReleasingStream:
    """The answer's stream, giving its permit back when the server closes it."""

    def __init__(self, stream, release):
        self._it, self._stream, self._release = iter(stream), stream, release

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class DataRouteShare:
    """Middleware: a data route runs only with a permit of `permits` (429 + Retry-After when
    none is left), given back when its answer is done."""

    def __init__(self, permits: Permits | None = None):
        self.permits = permits or Permits(data_permits(pool_threads()))

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params: dict) -> None:
        if resource is None or not getattr(resource, "data_route", False):
            return
        if not self.permits.take():
            raise busy(f"too many data requests at once (at most {self.permits.limit} per worker); retry later")
        req.context.cs_data_permit = True

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        if not getattr(req.context, "cs_data_permit", False):
            return
        req.context.cs_data_permit = False
        if resp.stream is not None:
            resp.stream = _ReleasingStream(resp.stream, self.permits.give)
        else:
            self.permits.give()
