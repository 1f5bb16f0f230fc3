"""Read-only routes answered from the state file: /status, /metrics.json, /info."""

from __future__ import annotations

import json
import os

import falcon

from compute.api.context import ApiContext

# The original's four, always present; later additions are passed through as recorded.
BASE_METRICS = ("sync_safekeepers_ms", "basebackup_ms", "config_ms", "total_startup_ms")


class Status:
    """GET /status: {"tenant", "timeline", "status", "last_active", "error", "start_time"}."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps(self.ctx.status_body())


class MetricsJson:
    """GET /metrics.json: the startup metrics, integers."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        recorded = self.ctx.store.get("metrics") or {}
        body = {k: 0 for k in BASE_METRICS}
        body.update({k: int(v) for k, v in recorded.items()})
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps(body)


def physical_cores(cpuinfo: str = "/proc/cpuinfo") -> int:
    """Unique (physical id, core id) pairs of /proc/cpuinfo; os.cpu_count() when it has none."""
    cores: set[tuple[str, str]] = set()
    try:
        with open(cpuinfo) as f:
            blocks = f.read().split("\n\n")
    except OSError:
        blocks = []
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "physical id" in fields and "core id" in fields:
            cores.add((fields["physical id"], fields["core id"]))
    return len(cores) or os.cpu_count() or 1


class Info:
    """GET /info: {"num_cpus": <physical cores>}."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self.body = json.dumps({"num_cpus": physical_cores()})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.body
