"""What the spec's `mode` means for start-up and reconfiguration, decided as data (pure).

Neon's three modes (`libs/compute_api` ComputeMode):
- `Primary`: read-write; safekeepers synced, basebackup at the LSN they agree on, catalog SQL.
- `Static` (`{"Static": "<lsn>"}`): read-only at that LSN. No safekeeper sync (only a primary
  may sync: a secondary would kick the primary out), basebackup at the LSN with `--replica`,
  hot standby with `recovery_target_lsn`.
- `Replica`: read-only, following the tip. Basebackup at the latest LSN with `--replica`, hot
  standby streaming WAL from the safekeepers (`primary_conninfo` as Neon's control plane writes
  it, unless the spec brings its own).

A `Replica` whose spec names no pageserver is a streaming replica of a plain PostgreSQL primary:
PGDATA is cloned from the `primary_conninfo` setting (compute/postgres/replica.py).

Read-only modes run no catalog SQL (roles, databases and grants are the primary's); their
settings are still written and reloaded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from compute.model.spec import LSN, ComputeSpec, GenericOption

PRIMARY, STATIC, REPLICA = "Primary", "Static", "Replica"
# Settings a read-only mode owns: the spec cannot turn the standby into something that will not start.
STANDBY_OWNED = ("hot_standby", "recovery_target_lsn")
DEFAULT_SAFEKEEPER_PORT = "5454"
# The replication password lives here (0600, in the 0700 PGDATA), never in postgresql.conf:
# postgres logs `parameter "primary_conninfo" changed to "<value>"` on every reload that changes it.
PASSFILE = "replication.pgpass"


@dataclass(frozen=True)
class StartPlan:
    """What the storage step of the start-up does for one spec."""

    source: str                  # "initdb" | "pageserver" | "clone"
    sync_safekeepers: bool       # only a primary syncs
    basebackup_lsn: str          # "0/0" = the latest
    basebackup_replica: bool     # `--replica` on the basebackup command, as Neon asks for non-primaries
    standby: bool                # write standby.signal: postgres starts as a hot standby
    catalog_sql: bool            # reconcile roles/databases/grants after start and on reconfigure


def plan_start(spec: ComputeSpec) -> StartPlan:
    read_only = spec.mode != PRIMARY
    if spec.storage is None:
        return StartPlan(source="clone" if spec.mode == REPLICA else "initdb", sync_safekeepers=False,
                         basebackup_lsn="0/0", basebackup_replica=False, standby=read_only,
                         catalog_sql=not read_only)
    return StartPlan(
        source="pageserver",
        sync_safekeepers=spec.mode == PRIMARY and bool(spec.storage.safekeepers),
        basebackup_lsn=(spec.static_lsn or "0/0") if spec.mode == STATIC else "0/0",
        basebackup_replica=read_only,
        standby=read_only,
        catalog_sql=not read_only,
    )


def no_catalog_sql_reason(spec: ComputeSpec) -> str | None:
    """Why the role/database/grant SQL is skipped for this spec (at start, on reconfigure and
    in `compute-ctl plan`), or None when it runs."""
    if spec.mode != PRIMARY:
        return f"mode {spec.mode}: no catalog SQL (roles, databases and grants are the primary's)"
    if spec.skip_pg_catalog_updates:
        return "skip_pg_catalog_updates: no role, database or grant statement runs"
    return None


def logical_subscribers_disabled(spec: ComputeSpec, catalog_applied: bool) -> bool:
    """`neon.disable_logical_replication_subscribers` for this spec. As HEAD: true while a spec
    with `drop_subscriptions_before_start` starts (the inherited subscriptions must not run
    before they are dropped: config.rs), and back to false once a Primary's catalog apply,
    which drops them, is done (compute.rs configure_as_primary). A compute whose catalog SQL
    never runs (Static, Replica, skip_pg_catalog_updates) keeps true, as HEAD. Unlike HEAD, a
    /configure after the start (`catalog_applied`) never turns it back to true: the drop is
    once per timeline, so true again would stop the subscriptions made since until a restart."""
    if not spec.drop_subscriptions_before_start:
        return False
    return not (catalog_applied and no_catalog_sql_reason(spec) is None)


def _mode_name(spec: ComputeSpec) -> str:
    return f"Static at {spec.static_lsn}" if spec.mode == STATIC else spec.mode


def live_mode_change_refused(running: ComputeSpec, new: ComputeSpec) -> str | None:
    """Why POST /configure may not hand `new` to a compute started from `running`, or None.
    The mode (and a Static compute's LSN) is fixed by how PGDATA was made at start (a primary's
    or a replica's basebackup, standby.signal, the recovery target): a reconfiguration would
    only rewrite the conf and leave postgres as it is. A Replica becomes a Primary through
    POST /promote; anything else is a new compute."""
    if (running.mode, running.static_lsn) == (new.mode, new.static_lsn):
        return None
    how = ("use POST /promote" if (running.mode, new.mode) == (REPLICA, PRIMARY)
           else "start a new compute with it")
    return (f"the mode cannot change on a running compute: it runs as {_mode_name(running)}, the spec "
            f"asks for {_mode_name(new)} ({how})")


def runs_catalog_sql(spec: ComputeSpec) -> bool:
    return no_catalog_sql_reason(spec) is None


def conf_settings(spec: ComputeSpec, pgdata: str) -> tuple[GenericOption, ...]:
    """The settings written to postgresql.conf: the spec's, plus what the mode needs, with the
    password of `primary_conninfo` replaced by our passfile (see replication_password)."""
    passfile = os.path.join(pgdata, PASSFILE)
    return tuple(dataclasses.replace(o, value=conninfo_with_passfile(o.value, passfile))
                 if o.name.lower() == "primary_conninfo" and o.value else o
                 for o in _mode_settings(spec))


def _mode_settings(spec: ComputeSpec) -> tuple[GenericOption, ...]:
    if spec.mode == PRIMARY:
        return spec.cluster.settings
    own = [o for o in spec.cluster.settings if o.name.lower() not in STANDBY_OWNED]
    extra = [GenericOption("hot_standby", "on", "bool")]
    if spec.mode == STATIC:
        extra.append(GenericOption("recovery_target_lsn", spec.static_lsn, "string"))
    if spec.storage is not None:
        names = {o.name.lower() for o in own}
        extra.append(GenericOption("neon.compute_mode", spec.mode.lower(), "string"))
        if spec.mode == REPLICA and "primary_conninfo" not in names and spec.storage.safekeepers:
            extra.append(GenericOption("primary_conninfo", safekeeper_conninfo(spec), "string"))
        if "recovery_prefetch" not in names:
            # Neon's hot standby ignores pages not in shared buffers: prefetching is wasted work.
            extra.append(GenericOption("recovery_prefetch", "off", "enum"))
    return tuple(own) + tuple(o for o in extra if o.name.lower() not in {x.name.lower() for x in own})


def safekeeper_conninfo(spec: ComputeSpec) -> str:
    """WAL from any of the safekeepers, shaped as Neon's control plane writes it for a replica."""
    assert spec.storage is not None
    hosts, ports = [], []
    for sk in spec.storage.safekeepers:
        host, sep, port = sk.rpartition(":")
        if not sep or not port.isdigit():
            host, port = sk, DEFAULT_SAFEKEEPER_PORT
        hosts.append(host.strip("[]"))
        ports.append(port)
    from psycopg.conninfo import make_conninfo  # here: psycopg is ~100 ms to import (issue 22)
    return make_conninfo(
        "", host=",".join(hosts), port=",".join(ports),
        options=f"-c timeline_id={spec.storage.timeline_id} tenant_id={spec.storage.tenant_id}",
        application_name="replica", replication="true")


def split_password(conninfo: str) -> tuple[dict[str, str], str | None]:
    """The conninfo's parameters without the password, and the password."""
    from compute.model.conninfo import parse
    params = parse(conninfo)
    return params, params.pop("password", None)


def conninfo_with_passfile(conninfo: str, passfile: str) -> str:
    """`conninfo` unchanged without a password; else without it, naming `passfile` instead."""
    params, password = split_password(conninfo)
    if password is None:
        return conninfo
    from psycopg.conninfo import make_conninfo
    return make_conninfo("", **{**params, "passfile": passfile})


def primary_conninfo(spec: ComputeSpec) -> str | None:
    """The spec's primary_conninfo setting (GUC names ignore case)."""
    return next((o.value for o in spec.cluster.settings if o.name.lower() == "primary_conninfo" and o.value), None)


def replication_password(spec: ComputeSpec) -> str | None:
    conninfo = primary_conninfo(spec)
    return split_password(conninfo)[1] if conninfo else None


def passfile_line(password: str) -> str:
    """One ~/.pgpass line matching any host, port, database and user (`:` and `\\` escaped)."""
    return "*:*:*:*:" + password.replace("\\", "\\\\").replace(":", "\\:") + "\n"


def lsn_int(lsn: str) -> int:
    """`16/B374D848` as a 64-bit integer, for comparisons."""
    if not LSN.match(lsn):
        raise ValueError(f"invalid LSN {lsn!r}")
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)

