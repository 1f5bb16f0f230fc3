"""Installed extensions, as Neon's compute_ctl counts them for `compute_installed_extensions`
(its installed_extensions.rs): in every database that accepts connections and is not invalid
(at most 500), each `pg_extension` row; one entry per (name, version, owned by the bootstrap
superuser: owner oid 10), counting the databases that have it.

The monitor collects (compute/programs/monitor.py: when the compute is first `running`, after
each reconfiguration, then hourly) and records the list in the state file; /metrics only reads
it (the API never queries postgres for a scrape). Pure parts here; the monitor does the I/O
through the one-row sessions it already uses (each query returns its rows as one JSON text).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

COLLECT_INTERVAL = 3600.0  # seconds between collections (Neon: its --installed-extensions-collection-interval)
MAX_DATABASES = 500        # Neon's limit: no excessive load
APPLICATION_NAME = "compute_ctl:get_installed_extensions"
SUPERUSER_OID = 10

# `datconnlimit = -2`: a database left invalid by an interrupted DROP DATABASE.
DATABASES_QUERY = b"""
SELECT coalesce(json_agg(d.datname ORDER BY d.datname), '[]'::json)::text
  FROM (SELECT datname FROM pg_catalog.pg_database
         WHERE datallowconn AND datconnlimit OPERATOR(pg_catalog.<>) -2
         ORDER BY datname LIMIT 500) d
"""
EXTENSIONS_QUERY = b"""
SELECT coalesce(json_agg(json_build_array(extname, extversion, extowner::pg_catalog.int4)), '[]'::json)::text
  FROM pg_catalog.pg_extension
"""


def parse_rows(text: bytes | str | None) -> list:
    """One query's JSON array (as text) -> a list; anything else -> []."""
    if text is None:
        return []
    try:
        found = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return []
    return found if isinstance(found, list) else []


def aggregate(per_database: Iterable[list]) -> list[dict[str, Any]]:
    """Neon's InstalledExtension entries from each database's [extname, version, owner oid] rows."""
    counts: dict[tuple[str, str, str], int] = {}
    for rows in per_database:
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3):
                continue
            name, version, owner = row
            key = (str(name), str(version), "1" if owner == SUPERUSER_OID else "0")
            counts[key] = counts.get(key, 0) + 1
    return [{"extname": n, "version": v, "owned_by_superuser": o, "n_databases": c}
            for (n, v, o), c in sorted(counts.items())]


def collect(query_in: Callable[[str | None, bytes], bytes | None],
            progress: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """`query_in(database, query)`: the one value `query` returns in that database (None: the
    connection's own). Errors propagate: a partial count is not recorded. `progress()` after
    each database: the monitor records a tick there, so a long collection (many databases) is
    never taken for a stalled monitor (each step is one bounded connect and query)."""
    databases = [str(d) for d in parse_rows(query_in(None, DATABASES_QUERY))][:MAX_DATABASES]
    per_database = []
    for db in databases:
        progress()
        per_database.append(parse_rows(query_in(db, EXTENSIONS_QUERY)))
    return aggregate(per_database)


def due(last: dict[str, Any] | None, generation: int, now: float, interval: float = COLLECT_INTERVAL) -> bool:
    """Collect now? Never collected, a new spec applied since (its catalog SQL may have added
    or updated extensions), or `interval` seconds passed."""
    if not isinstance(last, dict) or last.get("collected_at") is None:
        return True
    if int(last.get("generation") or 0) != generation:
        return True
    return now - float(last["collected_at"]) >= interval
