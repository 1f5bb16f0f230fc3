"""Files compute-ctl writes into PGDATA after the basebackup never follow a symlink.

This file: no process; reload_and_wait against a real postgres: tests/integration/test_pgconf_writes.py."""

from __future__ import annotations

import os

import pytest

from compute.postgres import conf as pgconf
from compute.model.spec import GenericOption


@pytest.fixture
def dirs(tmp_path):
    pgdata, outside = tmp_path / "pgdata", tmp_path / "outside"
    pgdata.mkdir(mode=0o700)
    outside.mkdir()
    (outside / "target").write_text("keep\n")
    return str(pgdata), str(outside)


def test_postgresql_conf_replaces_symlinks_never_writes_through(dirs) -> None:
    pgdata, outside = dirs
    target = os.path.join(outside, "target")
    os.symlink(target, os.path.join(pgdata, "postgresql.conf"))
    os.symlink(os.path.join(outside, "tmp-target"), os.path.join(pgdata, "postgresql.conf.tmp"))
    pgconf.write_postgresql_conf(pgdata, [GenericOption("port", "5432", "integer")])
    path = os.path.join(pgdata, "postgresql.conf")
    assert not os.path.islink(path) and "port = 5432" in open(path).read()
    assert open(target).read() == "keep\n"
    assert sorted(os.listdir(outside)) == ["target"]  # the dangling .tmp target was never created


def test_hba_line_refuses_a_symlinked_pg_hba(dirs) -> None:
    pgdata, outside = dirs
    target = os.path.join(outside, "target")
    os.symlink(target, os.path.join(pgdata, "pg_hba.conf"))
    with pytest.raises(OSError):
        pgconf.ensure_hba_line(pgdata)
    assert open(target).read() == "keep\n"


def test_hba_line_appended_once(dirs) -> None:
    pgdata, _ = dirs
    with open(os.path.join(pgdata, "pg_hba.conf"), "w") as f:
        f.write("local all all trust")
    assert pgconf.ensure_hba_line(pgdata) is True
    assert pgconf.ensure_hba_line(pgdata) is False
    assert open(os.path.join(pgdata, "pg_hba.conf")).read() == f"local all all trust\n{pgconf.HBA_LINE}\n"


def test_reload_and_wait_is_bounded() -> None:
    """A session that never re-reads the files (pg_conf_load_time never moves): False at the bound."""
    class Stuck:
        def __init__(self):
            self.sql = []

        def execute(self, sql, params=None):
            self.sql.append(sql)
            return self

        def fetchone(self):
            return (False,) if "> %s" in self.sql[-1] else ("2026-01-01 00:00:00+00",)
    now = [0.0]
    conn = Stuck()
    assert pgconf.reload_and_wait(conn, timeout=1, poll=0.25, clock=lambda: now[0],
                                  sleep=lambda d: now.__setitem__(0, now[0] + d)) is False
    assert conn.sql[1] == "SELECT pg_catalog.pg_reload_conf()" and now[0] == 1.0
