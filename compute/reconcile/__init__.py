"""Reconciling a running cluster with a spec (contract §5): snapshot -> plan -> execute.

    from compute.reconcile import apply_spec, plan_spec, format_plan, dry_run
    report = apply_spec("postgresql://cloud_admin@127.0.0.1:5432/postgres", spec, superuser="cloud_admin")
    print(format_plan(dry_run(connstr, spec, superuser="cloud_admin")))

See planner.py for the order of operations and how the two phases work.
"""

from compute.reconcile.apply import ApplyReport, apply_spec, dry_run, plan_spec
from compute.reconcile.errors import ApplyError, CatalogError, PlanError, ReconcileError
from compute.reconcile.catalog import (Catalog, DatabaseInfo, DropMarker, LocalFacts, RoleInfo, Subscription, snapshot,
                                      with_local_facts)
from compute.reconcile.connections import Connections
from compute.reconcile.executor import execute
from compute.reconcile.planner import Plan, Statement, Step, format_plan, plan, stored_password

__all__ = [
    "ApplyError", "ApplyReport", "Catalog", "CatalogError", "Connections", "DatabaseInfo", "DropMarker",
    "LocalFacts", "Subscription", "Plan", "PlanError", "ReconcileError", "RoleInfo", "Statement", "Step", "apply_spec", "dry_run",
    "execute", "format_plan", "plan", "plan_spec", "snapshot", "stored_password", "with_local_facts",
]
