"""The bodies of the read-only answers (/status, /metrics.json, /info, /healthz), built from
what the state file holds. Standard library only (no falcon, no psycopg): compute-ctl's early
responder (compute/boot/early_responder.py) imports this before anything heavy, and the API's
resources (compute/api/status.py, health.py, context.py) build the same bytes from it.

`encode(body)` is how both serialise: json.dumps, as falcon sends `resp.text`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Mapping

# The state keys /status reads (one indexed read of the state file).
STATUS_KEYS = ("status", "error", "tenant", "timeline", "last_active", "start_time",
               "monitor_tick", "monitor_stall_restarts")
# Neon's ComputeMetrics at HEAD (libs/compute_api/src/responses.rs), always present (0 until
# recorded; the 2023 contract's four are among them); ours (`*_retries`, ...) are passed
# through after them as recorded.
BASE_METRICS = ("wait_for_spec_ms", "sync_sk_check_ms", "sync_safekeepers_ms", "pageserver_connect_micros",
                "basebackup_ms", "basebackup_bytes", "start_postgres_ms", "config_ms", "total_startup_ms",
                "load_ext_ms", "num_ext_downloaded", "largest_ext_size", "total_ext_download_size")
HEALTHZ = {"alive": True}


def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds as an RFC 3339 UTC string with milliseconds: 2026-11-25T10:00:00.123Z."""
    if ts is None:
        return None
    secs, millis = divmod(int(float(ts) * 1000), 1000)
    return f"{_second(secs)}.{millis:03d}Z"


@functools.lru_cache(maxsize=256)
def _second(secs: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def parse_rfc3339(text: str) -> float:
    """The inverse of rfc3339() (tests and tools)."""
    import calendar  # tests and tools only: not in compute-ctl's start (the early responder)
    main, _, frac = text.rstrip("Z").partition(".")
    secs = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return secs + (int(frac) / 10 ** len(frac) if frac else 0.0)


# Below this much free space in the runtime dir, writes of the state file fail (SQLite needs
# room for its WAL pages): said on /status and /metrics (issue 19, item 3).
STATE_WRITE_RESERVE_BYTES = 1024 * 1024
# Statuses in which the monitor records activity (compute/programs/monitor.py).
MONITORED = ("running", "configuration_pending", "configuration")


def activity_unknown_after(monitor_interval: float) -> float:
    """Seconds without a monitor tick after which `last_active` cannot be trusted: twice the
    tree's stall threshold (compute/tree/monitor_watch.py: 10 s + 2 intervals), so a monitor that
    merely stopped has been replaced by then; still no tick means its writes fail."""
    return 2 * (10.0 + 2 * max(0.05, float(monitor_interval)))


def state_health(values: Mapping[str, Any], *, now: float, free_bytes: int | None,
                 monitor_interval: float) -> tuple[bool, bool]:
    """(state writes failing: the runtime dir is full; activity unknown: the monitor's ticks
    stopped reaching the state file while postgres runs). Pure."""
    full = free_bytes is not None and free_bytes < STATE_WRITE_RESERVE_BYTES
    tick = values.get("monitor_tick")
    unknown = (values.get("status") in MONITORED and tick is not None
               and now - float(tick) > activity_unknown_after(monitor_interval))
    return full, unknown


def status_body(values: Mapping[str, Any], *, health: tuple[bool, bool] = (False, False),
                now: float | None = None) -> dict[str, Any]:
    """GET /status from the STATUS_KEYS of the state file (a missing key reads as None).
    Neon's six keys first; ours are only ever added (a client may ignore them): when the monitor
    last ticked (`last_active` is only as fresh as that), how often the tree restarted it
    because it stopped ticking (compute/tree/monitor_watch.py), and whether writes of the state
    file fail. `health` is state_health()'s answer: when activity is unknown, `last_active` is
    `now` (never show an active compute as idle) and `error` says why."""
    full, unknown = health
    body = {
        "tenant": values.get("tenant"),
        "timeline": values.get("timeline"),
        "status": values.get("status"),
        "last_active": rfc3339(values.get("last_active")),
        "error": values.get("error"),
        "start_time": rfc3339(values.get("start_time")),
        "monitor_last_tick": rfc3339(values.get("monitor_tick")),
        "monitor_stall_restarts": int(values.get("monitor_stall_restarts") or 0),
        "state_writes_failing": bool(full),
    }
    if unknown and now is not None:
        body["last_active"] = rfc3339(now)
    if body["error"] is None and (full or unknown):
        body["error"] = ("the runtime dir is full: writes of the state file fail" if full else
                         "activity is not being recorded (no monitor tick reaches the state file): "
                         "last_active shows the time of this answer")
    return body


def metrics_body(recorded: Mapping[str, Any] | None) -> dict[str, int]:
    """GET /metrics.json from the state file's `metrics`: the start-up metrics, integers."""
    body = {k: 0 for k in BASE_METRICS}
    body.update({k: int(v) for k, v in (recorded or {}).items()})
    return body


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


def info_body(cores: int | None = None) -> dict[str, int]:
    """GET /info: {"num_cpus": <physical cores>}."""
    return {"num_cpus": physical_cores() if cores is None else cores}


def encode(body: Any) -> str:
    """The answer's text, as every route of ours serialises it."""
    return json.dumps(body)
