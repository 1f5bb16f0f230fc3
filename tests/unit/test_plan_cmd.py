"""`compute-ctl plan` on its own (compute/boot/plan_command.py): where it finds the superuser's password,
and that it stands on low-level modules (no import circle with compute/boot/cli.py).

This file: in-process; the import check in a fresh interpreter: tests/integration/test_plan_cmd.py."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from compute.boot.paths import default_runtime_dir
from compute.boot.plan_command import with_runtime_passfile

CONNSTR = "postgresql://cloud_admin@127.0.0.1:55432/postgres"


def test_the_runtime_dirs_passfile_is_used_when_nothing_else_names_a_password():
    out = with_runtime_passfile(CONNSTR, "/run/compute-ctl", {}, lambda p: True)
    assert conninfo_to_dict(out) == {**conninfo_to_dict(CONNSTR), "passfile": "/run/compute-ctl/superuser.pgpass"}


def test_what_the_operator_named_wins_and_a_missing_passfile_changes_nothing():
    readable = lambda p: True  # noqa: E731
    for connstr, environ in [(CONNSTR + "?passfile=/elsewhere", {}), (CONNSTR.replace("admin@", "admin:pw@"), {}),
                             (CONNSTR, {"PGPASSFILE": "/elsewhere"})]:
        assert with_runtime_passfile(connstr, "/run/compute-ctl", environ, readable) == connstr
    assert with_runtime_passfile(CONNSTR, "/run/compute-ctl", {}, lambda p: False) == CONNSTR


def test_the_default_runtime_dir_is_compute_ctls():
    import compute.boot.cli  # noqa: F401 - the default compute-ctl uses is the same function
    assert compute.boot.cli.default_runtime_dir is default_runtime_dir
