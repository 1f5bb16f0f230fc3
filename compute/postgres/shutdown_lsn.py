"""The LSN /terminate reports: where a primary's WAL ends once postgres is down.

Decided as data first (`lsn_source`), then found:
- a Neon primary with safekeepers: `postgres --sync-safekeepers` after the shutdown, as Neon's
  compute_ctl does (the safekeepers' agreed end of WAL);
- a plain primary, fast shutdown: the shutdown checkpoint's LSN from `pg_controldata`: the
  checkpoint record starts exactly where the WAL written before the shutdown ends (measured);
- a plain primary, immediate shutdown (SIGQUIT: no shutdown checkpoint): the WAL flush LSN read
  just before the signal;
- anything else (Static, Replica, a standby, an unknown spec): null.
"""

from __future__ import annotations

import logging
import os
import subprocess

from compute.model.spec import ComputeSpec

log = logging.getLogger("compute.postgres.shutdown_lsn")

MODES = ("fast", "immediate")
SYNC_SAFEKEEPERS = "sync_safekeepers"
CONTROLDATA = "controldata"
FLUSH_BEFORE_SIGNAL = "flush_before_signal"

# One query: null on a standby (pg_current_wal_flush_lsn() would raise there).
FLUSH_LSN_QUERY = "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END"


def lsn_source(spec: ComputeSpec | None, mode: str) -> str | None:
    """How the terminate LSN is found for this compute and shutdown mode (None: there is none)."""
    if spec is None or spec.mode != "Primary":
        return None
    if spec.storage is not None and spec.storage.safekeepers:
        return SYNC_SAFEKEEPERS
    return CONTROLDATA if mode == "fast" else FLUSH_BEFORE_SIGNAL


def parse_controldata(text: str) -> dict[str, str]:
    """`pg_controldata` output (run with LC_ALL=C) as {field: value}."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def checkpoint_lsn_after_clean_shutdown(fields: dict[str, str]) -> str | None:
    """The shutdown checkpoint's LSN when the cluster was shut down cleanly as a primary."""
    if fields.get("Database cluster state") != "shut down":
        return None  # crashed, or "shut down in recovery" (a standby): no primary's end of WAL
    return fields.get("Latest checkpoint location")


def controldata_lsn(pgbin_dir: str, pgdata: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(pgbin_dir, "pg_controldata"), "-D", pgdata],
                             capture_output=True, text=True, timeout=30,
                             env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot run pg_controldata: %s", e)
        return None
    if out.returncode != 0:
        log.warning("pg_controldata failed: %s", out.stderr.strip()[:300])
        return None
    return checkpoint_lsn_after_clean_shutdown(parse_controldata(out.stdout))
