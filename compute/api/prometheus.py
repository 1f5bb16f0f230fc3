"""GET /metrics: Prometheus text exposition (version 0.0.4).

From the state file: start-up phase durations, storage retries, the status (one labeled gauge per
status, and Neon's `compute_ctl_up{build_tag,status}`), last activity, restarts counted by the
exit watcher, Neon's postgres downtime and installed extensions (recorded by the monitor: the
API never queries postgres for this page). From supervisord (XML-RPC, 2 s timeout):
each program's state; when supervisord does not answer, `compute_supervisord_up 0` and the
rest of the page is still served.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import falcon

from compute.api.bodies import state_health
from compute.api.context import ApiContext
from compute.shared.supervisor_rpc import rpc
from compute import __version__
from compute.shared.state import CPLANE_REQUESTS_KEY, STATUSES, hyphenated
from compute.model.lsn_lease import STATES as LEASE_STATES

log = logging.getLogger("compute.api.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Neon's build_tag label (a compile-time BUILD_TAG there, `latest` by default): our version.
BUILD_TAG = __version__


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, float]]) -> None:
        samples = list(samples)
        if not samples:
            return
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_num(value)}")
            else:
                self.lines.append(f"{name} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def extension_samples(recorded: Any) -> list[tuple[dict, int]]:
    """compute_installed_extensions' samples from the monitor's `installed_extensions` record
    (compute/programs/extensions.py); none until it has collected once."""
    found = recorded.get("extensions") if isinstance(recorded, dict) else None
    samples = []
    for e in found if isinstance(found, list) else []:
        if isinstance(e, dict):
            samples.append(({"extension_name": e.get("extname"), "version": e.get("version"),
                             "owned_by_superuser": e.get("owned_by_superuser")}, int(e.get("n_databases") or 0)))
    return sorted(samples, key=lambda x: tuple(str(v) for v in x[0].values()))


class PrometheusMetrics:
    def __init__(self, ctx: ApiContext, *, rpc_timeout: float = 2.0):
        self.ctx = ctx
        self.rpc_timeout = rpc_timeout

    def _programs(self) -> list[dict] | None:
        try:
            return rpc(self.ctx.runtime_dir, timeout=self.rpc_timeout).supervisor.getAllProcessInfo()
        except Exception as e:  # unreachable, timed out, refused: the page is still served
            log.debug("supervisord did not answer: %s", e)
            return None

    def render(self) -> str:
        s = self.ctx.store.get_many(("status", "last_active", "start_time", "metrics", "program_restarts",
                                     "pending_restart", "spec_generation", "monitor_tick",
                                     "monitor_stall_restarts", "log_lines_dropped", CPLANE_REQUESTS_KEY,
                                     "lsn_lease", "pg_downtime", "installed_extensions"))
        now = time.time()
        page = _Page()

        page.family("compute_status", "gauge", "The compute status: 1 for the current one, 0 for the others.",
                    (({"status": st}, int(st == s["status"])) for st in STATUSES))

        # Neon's: one sample, the current status as its Display writes it.
        page.family("compute_ctl_up", "gauge", "Whether compute_ctl is running",
                    [({"build_tag": BUILD_TAG, "status": hyphenated(s["status"] or "empty")}, 1)])
        downtime = s["pg_downtime"] if isinstance(s["pg_downtime"], dict) else {}
        page.family("compute_pg_current_downtime_ms", "gauge",
                    "Non-cumulative duration of Postgres downtime in ms; resets after successful check",
                    [({}, float(downtime.get("current_ms") or 0))])
        page.family("compute_pg_downtime_ms_total", "counter", "Cumulative duration of Postgres downtime in ms",
                    [({}, int(downtime.get("total_ms") or 0))])
        page.family("compute_installed_extensions", "gauge",
                    "Number of databases where the version of extension is installed",
                    extension_samples(s["installed_extensions"]))

        metrics = s["metrics"] or {}
        page.family("compute_startup_phase_seconds", "gauge", "Duration of the start-up phases.",
                    (({"phase": k[:-3]}, int(v) / 1000) for k, v in sorted(metrics.items()) if k.endswith("_ms")))
        page.family("compute_basebackup_bytes", "gauge", "Size of the basebackup received at start-up.",
                    [({}, int(metrics["basebackup_bytes"]))] if "basebackup_bytes" in metrics else [])
        retries = [(k[:-len("_retries")], v) for k, v in sorted(metrics.items()) if k.endswith("_retries")]
        page.family("compute_storage_retries_total", "counter",
                    "Failed attempts of a start-up storage step that were retried (sync_safekeepers, basebackup).",
                    (({"step": k}, int(v)) for k, v in retries))
        other = [(k, v) for k, v in sorted(metrics.items())
                 if not k.endswith(("_ms", "_retries")) and k != "basebackup_bytes"]
        page.family("compute_startup_metric", "gauge", "Other start-up metrics, by name.",
                    (({"name": k}, int(v)) for k, v in other))

        if s["start_time"] is not None:
            page.family("compute_start_time_seconds", "gauge", "When the compute started (epoch seconds).",
                        [({}, float(s["start_time"]))])
        if s["last_active"] is not None:
            page.family("compute_last_active_timestamp_seconds", "gauge",
                        "Last user activity seen by the monitor (epoch seconds).", [({}, float(s["last_active"]))])
            page.family("compute_seconds_since_last_active", "gauge", "Seconds since the last user activity.",
                        [({}, max(0.0, round(now - float(s["last_active"]), 3)))])
        page.family("compute_spec_generation", "gauge", "Number of specs received through /configure.",
                    [({}, int(s["spec_generation"] or 0))])
        page.family("compute_pending_restart_settings", "gauge",
                    "Settings changed by a reconfiguration that wait for a postgres restart.",
                    [({}, len(s["pending_restart"] or []))])
        page.family("compute_program_restarts_total", "counter", "Unexpected exits of supervised programs.",
                    (({"program": name}, int(n)) for name, n in sorted((s["program_restarts"] or {}).items())))
        if s["monitor_tick"] is not None:
            page.family("compute_monitor_last_tick_timestamp_seconds", "gauge",
                        "When the activity monitor last finished a tick (epoch seconds).", [({}, float(s["monitor_tick"]))])
            page.family("compute_monitor_seconds_since_tick", "gauge",
                        "Seconds since the activity monitor last finished a tick (last_active is only as fresh).",
                        [({}, max(0.0, round(now - float(s["monitor_tick"]), 3)))])
        page.family("compute_monitor_stall_restarts_total", "counter",
                    "Times the tree killed and restarted an activity monitor that had stopped ticking.",
                    [({}, int(s["monitor_stall_restarts"] or 0))])
        free = self.ctx.runtime_free_bytes()
        full, unknown = state_health(s, now=now, free_bytes=free, monitor_interval=self.ctx.settings.monitor_interval)
        page.family("compute_state_writes_failing", "gauge",
                    "1 when the runtime dir is too full for writes of the state file.", [({}, int(full))])
        page.family("compute_activity_unknown", "gauge",
                    "1 when no monitor tick reaches the state file while postgres runs (last_active on /status "
                    "is then the time of the answer).", [({}, int(unknown))])
        if free is not None:
            page.family("compute_runtime_dir_free_bytes", "gauge",
                        "Free bytes in the runtime dir (the state file, logs, schema dumps).", [({}, free)])
        page.family("compute_log_lines_dropped_total", "counter",
                    "Log lines compute-ctl dropped because the reader of its stdout (or stderr) did not keep up.",
                    [({}, int(s["log_lines_dropped"] or 0))])

        # HEAD's name, labels and values (compute_tools/src/metrics.rs): one per request the
        # driver made to the control plane; http_status `200 OK` etc., `unknown` without an answer.
        cplane = s[CPLANE_REQUESTS_KEY] or {}
        page.family("compute_ctl_cplane_requests_total", "counter",
                    "Total number of control plane requests made by compute_ctl by status",
                    (({"rpc": rpc_name, "http_status": status}, int(n))
                     for rpc_name, by_status in sorted(cplane.items()) for status, n in sorted(by_status.items())))
        lease = s["lsn_lease"] if isinstance(s["lsn_lease"], dict) else None
        if lease is not None:  # a Static compute (HEAD exports no lease metric: these names are ours)
            page.family("compute_lsn_lease_state", "gauge",
                        "The LSN lease of a Static compute: 1 for its current state, 0 for the others.",
                        (({"state": st}, int(st == lease.get("state"))) for st in LEASE_STATES))
            if lease.get("valid_until") is not None:
                page.family("compute_lsn_lease_valid_until_seconds", "gauge",
                            "When the LSN lease ends (epoch seconds): the earliest of all pageservers'.",
                            [({}, float(lease["valid_until"]))])
            page.family("compute_lsn_lease_requests_total", "counter",
                        "LSN lease attempts on every pageserver of every shard, by result.",
                        (({"result": r}, int(lease.get(k) or 0)) for r, k in
                         (("granted", "granted"), ("refused", "refused"), ("error", "errors"))))
            page.family("compute_lsn_lease_pageservers", "gauge", "Pageservers (all shards) the lease is asked of.",
                        [({}, len(lease.get("targets") or []))])

        programs = self._programs()
        page.family("compute_supervisord_up", "gauge", "Whether supervisord answered the scrape.",
                    [({}, int(programs is not None))])
        if programs:
            programs = sorted(programs, key=lambda p: p.get("name", ""))
            page.family("compute_program_state", "gauge",
                        "supervisord state code of each program (0 STOPPED, 10 STARTING, 20 RUNNING, 30 BACKOFF, "
                        "40 STOPPING, 100 EXITED, 200 FATAL, 1000 UNKNOWN).",
                        (({"program": p.get("name"), "state": p.get("statename")}, int(p.get("state", 1000)))
                         for p in programs))
            page.family("compute_program_up", "gauge", "1 when supervisord reports the program RUNNING.",
                        (({"program": p.get("name")}, int(p.get("statename") == "RUNNING")) for p in programs))
            page.family("compute_program_uptime_seconds", "gauge", "Seconds since the program (re)started.",
                        (({"program": p.get("name")}, max(0, int(p.get("now", 0)) - int(p.get("start", 0))))
                         for p in programs if p.get("statename") == "RUNNING"))
        return page.text()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.text = self.render()
