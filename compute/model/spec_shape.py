"""The shape of a spec document before its fields are read (pure): how deep it nests, which keys
we do not know, and which of those look like a misspelling of a key we read.

- Depth: a document nested deeper than MAX_SPEC_DEPTH (objects and arrays, the document itself
  being level 1) is refused. Neon's deepest field is about 6 levels; a hostile document 970 deep
  under an unknown key once passed the API and broke the driver's decoder (issue 19).
- Unknown keys (at the levels we read: the document, `cluster`, a role, a database, a setting or
  option, a delta) are reported, to be logged once where the spec comes in; the stored spec is
  re-serialised from the typed one (compute/model/spec.py `to_document`), so none of them is kept.
- A misspelling: an unknown key within MAX_TYPO_EDITS edits (one for keys of five letters or
  fewer) of a key we read that the same object lacks (`"setings"` next to no `"settings"`) is
  refused naming both: silently ignored, it would leave postgres on its defaults.
Keys Neon's spec has and we ignore are known (never reported, never a misspelling).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

MAX_SPEC_DEPTH = 32
MAX_TYPO_EDITS = 2
SHORT_KEY = 5          # keys this long or shorter: one edit only ("name" is not a misspelling of "mode")
MAX_LISTED = 20        # unknown keys named in the log line; the rest are counted
MAX_KEY_SHOWN = 60     # characters of one unknown key shown

TOP_READ = ("format_version", "cluster", "mode", "delta_operations", "skip_pg_catalog_updates",
            "storage_auth_token", "pageserver_connstring", "tenant_id", "timeline_id",
            "safekeeper_connstrings", "operation_uuid", "pageserver_connection_info", "shard_stripe_size",
            "project_id", "branch_id", "endpoint_id", "safekeepers_generation",
            "drop_subscriptions_before_start")
# Neon's ComputeSpec fields we do not read (docs/spec.md, "What we ignore").
TOP_IGNORED = ("timestamp", "startup_tracing_context", "features", "swap_size_bytes", "disk_quota_bytes",
               "disable_lfc_resizing", "remote_extensions", "pgbouncer_settings",
               "local_proxy_config", "reconfigure_concurrency",
               "audit_log_level", "logs_export_host", "endpoint_storage_addr", "endpoint_storage_token",
               "autoprewarm", "offload_lfc_interval_seconds", "suspend_timeout_seconds", "databricks_settings")
CLUSTER_READ = ("cluster_id", "name", "state", "roles", "databases", "settings", "postgresql_conf")
CLUSTER_IGNORED = ()
ROLE_READ = ("name", "encrypted_password", "options")
DATABASE_READ = ("name", "owner", "options")
DATABASE_IGNORED = ("restrict_conn", "invalid")
OPTION_READ = ("name", "value", "vartype")
DELTA_READ = ("action", "name", "new_name")


@dataclass(frozen=True)
class Misspelling:
    path: str    # where the unknown key is, e.g. "cluster.setings"
    key: str     # the unknown key
    known: str   # the absent key it is close to


@dataclass(frozen=True)
class ShapeReport:
    too_deep: bool = False
    unknown: tuple[str, ...] = ()          # paths of unknown keys, e.g. "cluster.roles[].colour"
    misspellings: tuple[Misspelling, ...] = ()


def nesting_depth_exceeds(doc: Any, limit: int = MAX_SPEC_DEPTH) -> bool:
    """Whether objects and arrays nest deeper than `limit` (iterative: no recursion, whatever
    the depth; stops at the first value too deep)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def edits(a: str, b: str, cap: int = MAX_TYPO_EDITS + 1) -> int:
    """Optimal string alignment distance (insert, delete, substitute, swap two neighbours),
    capped at `cap` (keys may be long: nothing beyond the cap is worth computing). Only the band
    |i - j| < cap of the table is computed (a cell outside it is at least |i - j| >= cap), and
    the walk stops at the first row with nothing below the cap: a few cells per character, so a
    spec with many unknown keys is checked in linear time (issue 20 item 2)."""
    if abs(len(a) - len(b)) >= cap:
        return cap
    n, w = len(b), cap - 1
    prev2: list[int] | None = None
    prev = [j if j <= w else cap for j in range(n + 1)]
    for i in range(1, len(a) + 1):
        cur = [cap] * (n + 1)
        if i <= w:
            cur[0] = i
        lo, hi = max(1, i - w), min(n, i + w)
        ai = a[i - 1]
        for j in range(lo, hi + 1):
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ai != b[j - 1]))
            if prev2 is not None and j > 1 and ai == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v if v < cap else cap
        if min(cur[lo - 1:hi + 1]) >= cap:
            return cap
        prev2, prev = prev, cur
    return min(prev[n], cap)


@functools.lru_cache(maxsize=256)
def _without(known: str) -> dict[int, None]:
    """A str.translate table deleting the letters of `known`: what is left of a key are letters
    `known` lacks, each needing an edit of its own (a swap moves only letters both share), so more
    of them than the edits allowed rules `known` out without the distance table."""
    return dict.fromkeys(map(ord, known))


def misspelling_of(key: str, candidates: tuple[str, ...]) -> str | None:
    """The absent key `key` is most likely a misspelling of, if any is close enough."""
    best: tuple[int, str] | None = None
    for known in candidates:
        allowed = 1 if len(known) <= SHORT_KEY else MAX_TYPO_EDITS
        if abs(len(key) - len(known)) > allowed or len(key.translate(_without(known))) > allowed:
            continue
        d = edits(key, known, allowed + 1)
        if d <= allowed and (best is None or d < best[0]):
            best = (d, known)
    return best[1] if best else None


def shape_report(doc: Any) -> ShapeReport:
    """Depth, unknown keys and misspellings of a decoded document (levels that are not objects
    are left to the parser, which names their wrong type)."""
    if nesting_depth_exceeds(doc):
        return ShapeReport(too_deep=True)
    unknown: list[str] = []
    seen: set[str] = set()      # `unknown` as a set: a list's `in` made 30,000 keys quadratic
    misspelled: list[Misspelling] = []

    def look(obj: Any, path: str, read: tuple[str, ...], ignored: tuple[str, ...] = (), generic: str | None = None):
        if not isinstance(obj, dict):
            return
        absent = tuple(k for k in read if k not in obj)
        for key in obj:
            if not isinstance(key, str) or key in read or key in ignored:
                continue
            where = f"{path}.{key}" if path else key
            close = misspelling_of(key, absent)
            if close is not None:
                misspelled.append(Misspelling(where, key, close))
            shown = f"{generic}.{key}" if generic else where
            if shown not in seen:
                seen.add(shown)
                unknown.append(shown)

    def items(obj: Any, key: str) -> list:
        value = obj.get(key) if isinstance(obj, dict) else None
        return value if isinstance(value, list) else []

    look(doc, "", TOP_READ, TOP_IGNORED)
    cluster = doc.get("cluster") if isinstance(doc, dict) else None
    look(cluster, "cluster", CLUSTER_READ, CLUSTER_IGNORED)
    for i, role in enumerate(items(cluster, "roles")):
        look(role, f"cluster.roles[{i}]", ROLE_READ, generic="cluster.roles[]")
        for j, opt in enumerate(items(role, "options")):
            look(opt, f"cluster.roles[{i}].options[{j}]", OPTION_READ, generic="cluster.roles[].options[]")
    for i, db in enumerate(items(cluster, "databases")):
        look(db, f"cluster.databases[{i}]", DATABASE_READ, DATABASE_IGNORED, generic="cluster.databases[]")
        for j, opt in enumerate(items(db, "options")):
            look(opt, f"cluster.databases[{i}].options[{j}]", OPTION_READ, generic="cluster.databases[].options[]")
    for i, opt in enumerate(items(cluster, "settings")):
        look(opt, f"cluster.settings[{i}]", OPTION_READ, generic="cluster.settings[]")
    for i, delta in enumerate(items(doc, "delta_operations")):
        look(delta, f"delta_operations[{i}]", DELTA_READ, generic="delta_operations[]")
    return ShapeReport(unknown=tuple(unknown), misspellings=tuple(misspelled))


def unknown_keys_line(unknown: tuple[str, ...]) -> str:
    """The one log line naming the unknown keys of a spec (bounded, whatever the document holds)."""
    shown = [k if len(k) <= MAX_KEY_SHOWN else k[:MAX_KEY_SHOWN] + "..." for k in unknown[:MAX_LISTED]]
    more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
    return f"spec keys ignored (not known to this version): {', '.join(repr(k) for k in shown)}{more}"
