"""Entry points: apply a spec to a running cluster, or show what applying it would run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from compute.model.spec import ComputeSpec

from compute.reconcile.catalog import databases_to_inspect, snapshot, with_local_facts
from compute.reconcile.connections import DEFAULT_LOCK_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT, Connections
from compute.reconcile.errors import ApplyError
from compute.reconcile.executor import execute
from compute.reconcile.planner import Plan, plan

log = logging.getLogger("compute.reconcile")

MAX_PHASE1_ROUNDS = 3


@dataclass(frozen=True)
class ApplyReport:
    statements: int  # statements executed
    duration: float  # seconds
    notes: tuple[str, ...] = ()
    connections: int = 0  # connections opened


def apply_spec(connstr: str, spec: ComputeSpec, *, superuser: str,
               connections: Connections | None = None,
               lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
               statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT) -> ApplyReport:
    """Bring the cluster behind `connstr` (a superuser connstr) to `spec` (contract §5).

    Phase 1 (roles, databases) is planned from a cheap snapshot of the shared catalogs (a few
    queries on the maintenance db) and executed; then the shared catalogs are read again and
    phase 1 must now plan nothing. Only then are the per-database facts read (one query per
    spec database, several databases at once), and phase 2 (role deletions, grants, schema
    public, extensions) is planned from that snapshot and executed. An unchanged spec costs one
    snapshot and runs nothing.
    Every statement waits at most `lock_timeout` seconds for a lock and runs at most
    `statement_timeout` seconds (None: no limit), so a spec role holding a lock we need fails
    the apply with a clear error instead of blocking it.
    Raises PlanError (nothing ran), CatalogError or ApplyError.
    """
    started = time.monotonic()
    conns = connections or Connections(connstr, lock_timeout=lock_timeout, statement_timeout=statement_timeout)
    count = 0
    notes: list[str] = []
    try:
        for _ in range(MAX_PHASE1_ROUNDS):
            catalog = snapshot(conns, spec, local=False)
            phase1 = plan(catalog, spec, superuser=superuser, phases=(1,))
            if phase1.is_empty:
                break
            notes.extend(n for n in phase1.notes if n not in notes)
            count += execute(conns, phase1)
        else:
            left = "; ".join(text for _, text in phase1.render()[:5])
            raise ApplyError("applying the spec failed: roles and databases still differ from the spec "
                             f"after {MAX_PHASE1_ROUNDS} rounds (concurrent changes?); still planned: {left}",
                             dbname=conns.maintenance_db)
        catalog = with_local_facts(catalog, conns, databases_to_inspect(spec))
        full = plan(catalog, spec, superuser=superuser)
        notes.extend(n for n in full.notes if n not in notes)
        count += execute(conns, full.phase(2))
    finally:
        opened = conns.opened
        if connections is None:
            conns.close()
    duration = time.monotonic() - started
    for note in notes:
        log.warning("%s", note)
    log.info("spec applied: %d statement(s) in %.3f s", count, duration)
    return ApplyReport(count, duration, tuple(notes), opened)


def dry_run(connstr: str, spec: ComputeSpec, *, superuser: str) -> Plan:
    """The plan an apply would start from (nothing is changed). Per-database steps for
    databases that do not exist yet are planned as if created from template1."""
    with Connections(connstr) as conns:
        catalog = snapshot(conns, spec, local=True, template=True)
        return plan(catalog, spec, superuser=superuser)


def plan_spec(connstr: str, spec: ComputeSpec, *, superuser: str) -> list[tuple[str, str]]:
    """[(dbname, statement text with passwords redacted)] for `compute-ctl plan`."""
    return dry_run(connstr, spec, superuser=superuser).render()
