"""The falcon application: `create_app()` is what gunicorn loads in each worker.

    python -m gunicorn -c python:compute.api.gunicorn_conf "compute.api.app:create_app()"
"""

from __future__ import annotations

import logging
import sqlite3
import traceback

import falcon

from compute.api.auth import Access
from compute.api.capacity import DataRouteShare
from compute.api.catalog import DatabaseSchema, DbsAndRoles
from compute.api.configure import Configure
from compute.api.context import ApiContext, runtime_dir_from_env
from compute.api.errors import BodyLimit, JsonOnly, serialize_error
from compute.api.fastpath import RetryInPool, answering_inline
from compute.api.health import Healthz, Readyz
from compute.api.insights import Insights
from compute.api.internal import ByListener, create_internal_app
from compute.api.openapi_doc import OpenApiDocument
from compute.api.prometheus import PrometheusMetrics
from compute.api.promote import Promote
from compute.api.status import Info, MetricsJson, Status
from compute.api.terminate import Terminate
from compute.api.writability import CheckWritability
from compute.shared.state import StateFileLost

log = logging.getLogger("compute.api.app")


def create_app(runtime_dir: str | None = None) -> ByListener:
    """The external app, and the internal port's (compute/api/internal.py), split by the port
    of the listener a request came through."""
    ctx = ApiContext(runtime_dir or runtime_dir_from_env())
    internal = create_internal_app(ctx)
    internal.add_error_handler(sqlite3.OperationalError, state_file_error)
    internal.add_error_handler(StateFileLost, state_file_lost)
    return ByListener(ctx, create_external_app(ctx), internal)


def create_external_app(ctx: ApiContext) -> falcon.App:
    access = Access(settings=lambda: ctx.settings)

    # In this order: 413, 400/401/403, 415, then a data route's share of the pool (429).
    app = falcon.App(middleware=[BodyLimit(), access, JsonOnly(), DataRouteShare()])
    app.set_error_serializer(serialize_error)
    app.add_error_handler(sqlite3.OperationalError, state_file_error)
    app.add_error_handler(StateFileLost, state_file_lost)

    app.add_route("/status", Status(ctx))
    app.add_route("/metrics.json", MetricsJson(ctx))
    app.add_route("/metrics", PrometheusMetrics(ctx))
    app.add_route("/insights", Insights(ctx))
    app.add_route("/info", Info(ctx))
    app.add_route("/check_writability", CheckWritability(ctx))
    app.add_route("/configure", Configure(ctx))
    app.add_route("/terminate", Terminate(ctx))
    app.add_route("/promote", Promote(ctx))
    app.add_route("/healthz", Healthz(ctx))
    app.add_route("/readyz", Readyz(ctx))
    app.add_route("/dbs_and_roles", DbsAndRoles(ctx))
    app.add_route("/database_schema", DatabaseSchema(ctx))
    app.add_route("/openapi.yaml", OpenApiDocument())
    return app


_lost_logged = False


def state_file_lost(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    """The state file compute-ctl created is gone (compute.shared.state.StateFileLost): every
    route answers 503 with the reason (never a stale `running`, never a traceback per request);
    logged once per worker. The tree stops itself meanwhile (compute/tree/exitwatch.py)."""
    global _lost_logged
    if not _lost_logged:
        _lost_logged = True
        log.error("%s: answering 503 until the compute is stopped", ex)
    raise falcon.HTTPServiceUnavailable(description=str(ex))


def state_file_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    """A state file SQLite could not read (busy past the timeout, I/O error). Inline, on the
    worker's poller (compute/api/fastpath.py): retry the request in a pool thread, which waits
    longer. Elsewhere exactly what falcon does with any unexpected error: log it, 500."""
    if answering_inline():
        raise RetryInPool() from ex
    req.log_error(traceback.format_exc())
    raise falcon.HTTPInternalServerError()
