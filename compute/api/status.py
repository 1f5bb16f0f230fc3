"""Read-only routes answered from the state file: /status, /metrics.json, /info."""

from __future__ import annotations

import falcon

from compute.api.bodies import encode, info_body, metrics_body
from compute.api.context import ApiContext


class Status:
    """GET /status: {"tenant", "timeline", "status", "last_active", "error", "start_time"}."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = encode(self.ctx.status_body())


class MetricsJson:
    """GET /metrics.json: the startup metrics, integers."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = encode(metrics_body(self.ctx.store.get("metrics")))


class Info:
    """GET /info: {"num_cpus": <physical cores>}."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self.body = encode(info_body())

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.body
