"""Files compute-ctl writes into PGDATA after the basebackup never follow a symlink.

This file: reload_and_wait against a real postgres; the rest: tests/unit/test_pgconf_writes.py."""

from __future__ import annotations

import os

from compute.postgres import conf as pgconf


def test_reload_and_wait_returns_once_the_session_sees_the_new_files() -> None:
    """No fixed sleep after the reload: once reload_and_wait returns True, pending_restart in the
    same session already names a restart-only setting just written (and is empty before)."""
    import psycopg

    from tests.support.pgcluster import running_cluster
    with running_cluster() as cluster, psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        pending = "SELECT name FROM pg_catalog.pg_settings WHERE pending_restart"
        assert conn.execute(pending).fetchall() == []
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("max_connections = 42\n")  # only at a restart: pending_restart once re-read
        for _ in range(3):  # every reload, not only the first
            assert pgconf.reload_and_wait(conn, timeout=30)
            assert conn.execute(pending).fetchall() == [("max_connections",)]
