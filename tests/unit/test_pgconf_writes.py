"""Files compute-ctl writes into PGDATA after the basebackup never follow a symlink."""

from __future__ import annotations

import os

import pytest

from compute import pgconf
from compute.spec import GenericOption


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
