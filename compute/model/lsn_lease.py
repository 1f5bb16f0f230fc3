"""LSN leases of a `Static` compute, decided as data (pure): when to ask, what the state file's
`lsn_lease` record says after each answer, what /metrics shows.

As Neon's compute_tools/src/lsn_lease.rs: a Static compute asks every pageserver of every shard
for a lease on its LSN (`lease lsn <tenant_shard_id> <timeline_id> <lsn> `), so garbage
collection keeps the pages it reads. The earliest `valid_until` of all is the lease; it is
renewed after max(validity - 60 s, validity / 2). A failed attempt (any pageserver unreachable,
an error answer) is retried after 0.5 s, x1.5 each time, at most 60 s apart, with no limit. A
NULL `valid_until` from any pageserver is a refusal (the LSN is behind the GC cutoff): leasing
ends there, logged and shown in /metrics (HEAD only logs it). The pageservers are read from
the current spec before each attempt; a spec whose pageservers changed is leased again at once.

The record (state key `lsn_lease`) lets a lifecycle driver that replaced another (after a
hand-over or a crash) go on with the schedule instead of starting it over.
"""

from __future__ import annotations

from typing import Any

RETRY_FIRST = 0.5      # s: HEAD's retry_period_ms starts at 500
RETRY_FACTOR = 1.5
RETRY_CAP = 60.0       # s: MAX_RETRY_PERIOD_MS
RENEW_MARGIN = 60.0    # s: renew this long before the lease ends (or at half of it, if later)

PENDING, HELD, RETRYING, REFUSED = "pending", "held", "retrying", "refused"
STATES = (PENDING, HELD, RETRYING, REFUSED)
Targets = list[list[str]]  # [tenant shard id, libpq URL] for every pageserver of every shard


def retry_delay(failures: int) -> float:
    """Seconds before the next attempt after `failures` failed ones in a row (>= 1)."""
    return min(RETRY_FIRST * RETRY_FACTOR ** max(0, failures - 1), RETRY_CAP)


def renew_delay(valid_until: float, now: float) -> float:
    """HEAD: sleep max(validity - 60 s, validity / 2); an expired lease is renewed at once."""
    validity = max(0.0, valid_until - now)
    return max(validity - RENEW_MARGIN, validity / 2)


def fresh(lsn: str, targets: Targets, now: float, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record asking at once (counters carried over from `previous`)."""
    counts = {k: int((previous or {}).get(k) or 0) for k in ("granted", "refused", "errors")}
    return {"lsn": lsn, "targets": [list(t) for t in targets], "state": PENDING, "valid_until": None,
            "next_at": now, "failures": 0, "error": None, **counts}


def current(record: dict[str, Any] | None, lsn: str, targets: Targets, now: float) -> dict[str, Any]:
    """The record for this LSN and these pageservers: the stored one, or a fresh one when there is
    none or the spec's pageservers (or LSN) are no longer the ones it leased from."""
    if (record is None or record.get("lsn") != lsn
            or [list(t) for t in record.get("targets") or []] != [list(t) for t in targets]):
        return fresh(lsn, targets, now, record)
    return record


def wait_seconds(record: dict[str, Any], now: float) -> float | None:
    """How long until the next attempt (0: now); None: never (refused)."""
    if record["state"] == REFUSED:
        return None
    return max(0.0, float(record["next_at"]) - now)


def granted(record: dict[str, Any], valid_until: float, now: float) -> dict[str, Any]:
    return {**record, "state": HELD, "valid_until": valid_until, "next_at": now + renew_delay(valid_until, now),
            "failures": 0, "error": None, "granted": int(record.get("granted") or 0) + 1}


def refused(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "state": REFUSED, "next_at": None, "valid_until": None,
            "error": "lease could not be obtained, LSN is behind the GC cutoff",
            "refused": int(record.get("refused") or 0) + 1}


def failed(record: dict[str, Any], error: str, now: float) -> dict[str, Any]:
    """An attempt that got no answer from every pageserver: retried. A lease held until now
    stays counted as held until it expires (valid_until), as it does on the pageserver."""
    failures = int(record.get("failures") or 0) + 1
    return {**record, "state": RETRYING, "next_at": now + retry_delay(failures), "failures": failures,
            "error": error, "errors": int(record.get("errors") or 0) + 1}


def keeps_driver_busy(record: Any) -> bool:
    """Whether the lifecycle driver must stay loaded to keep the lease (compute.lifecycle.steps)."""
    return isinstance(record, dict) and record.get("state") in (PENDING, HELD, RETRYING)
