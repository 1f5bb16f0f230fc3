"""Reconciliation benchmark: first apply and no-op re-apply against a real PG15 cluster.

    python -m bench.reconcile [--sizes 10,100,1000]

For N roles the spec has N/10 databases (100 for 1,000 roles), each owned by one of the roles,
every role with an md5 password. Goal: 1,000 roles + 100 databases first apply <= 10 s, no-op <= 1 s.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from compute.reconcile import apply_spec
from compute.model.spec import parse_spec
from tests.support.pgcluster import running_cluster

SUPERUSER = "cloud_admin"


def make_spec(n_roles: int, n_dbs: int) -> dict:
    roles = [{"name": f"user_{i:04d}",
              "encrypted_password": hashlib.md5(f"pw{i}user_{i:04d}".encode()).hexdigest()}
             for i in range(n_roles)]
    dbs = [{"name": f"db_{j:03d}", "owner": f"user_{(j * 7) % n_roles:04d}"} for j in range(n_dbs)]
    return {"format_version": 1.0,
            "cluster": {"cluster_id": "bench", "name": "bench", "roles": roles, "databases": dbs,
                        "settings": []},
            "delta_operations": []}


def run(n_roles: int) -> tuple[float, float, int, int]:
    n_dbs = max(1, n_roles // 10)
    spec = parse_spec(make_spec(n_roles, n_dbs), superuser=SUPERUSER)
    with running_cluster(superuser=SUPERUSER) as cluster:
        first = apply_spec(cluster.url(), spec, superuser=SUPERUSER)
        noop = apply_spec(cluster.url(), spec, superuser=SUPERUSER)
    if noop.statements:
        raise SystemExit(f"no-op apply ran {noop.statements} statements")
    return first.duration, noop.duration, first.statements, noop.connections


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000")
    args = ap.parse_args(argv)
    print(f"{'roles':>6} {'dbs':>4} {'first apply':>12} {'statements':>10} {'no-op':>8} {'no-op conns':>11}")
    for n in (int(x) for x in args.sizes.split(",")):
        first, noop, statements, conns = run(n)
        goal = ""
        if n == 1000:
            goal = f"  goal first <= 10 s: {'ok' if first <= 10 else 'MISSED'}, no-op <= 1 s: {'ok' if noop <= 1 else 'MISSED'}"
        print(f"{n:>6} {max(1, n // 10):>4} {first:>11.2f}s {statements:>10} {noop:>7.3f}s {conns:>11}{goal}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
