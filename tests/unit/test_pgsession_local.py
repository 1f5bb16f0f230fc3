"""How our own sessions reach the local postgres (compute/postgres/sessions.py): no TLS on loopback
unless the connstr (or PGSSLMODE) asks for it, and the monitor on the postmaster's unix socket,
never on a socket whose server is not our OS user.

This file: the pure decisions; against real postgres: tests/integration/test_pgsession_local.py."""

from __future__ import annotations

import pytest

from compute.postgres.sessions import (is_local_host, local_sslmode, named_superuser, session_params, socket_params,
                               superuser_of)


def test_one_reading_of_the_superuser_for_every_program():
    """superuser_of: the monitor's and the api's (None when none is named); named_superuser:
    the -C flag's check of compute-ctl and `compute-ctl plan`, on top of it."""
    assert superuser_of("host=localhost user=zenith_admin") == "zenith_admin"
    assert superuser_of("postgresql://127.0.0.1/postgres") is None
    with pytest.raises(ValueError, match=r"^not a valid connection string"):
        superuser_of("host=localhost user")
    assert named_superuser("postgresql://cloud_admin@127.0.0.1:55432/postgres") == "cloud_admin"
    with pytest.raises(ValueError, match=r"^--connstr must name the superuser"):
        named_superuser("postgresql://127.0.0.1/postgres")
    with pytest.raises(ValueError, match=r"^--connstr: not a valid connection string"):
        named_superuser("host=localhost user")


@pytest.mark.parametrize("host", [None, "", "/run/postgresql", "@abstract", "localhost", "127.0.0.1",
                                  "127.1.2.3", "::1", "localhost,127.0.0.1"])
def test_local_hosts(host):
    assert is_local_host(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "db.example.com", "0.0.0.0", "127.0.0.1,10.0.0.1", "::ffff:1.2.3.4"])
def test_other_hosts(host):
    assert not is_local_host(host)


def test_sslmode_disable_only_for_a_local_server_and_only_when_nobody_named_one():
    assert local_sslmode({"host": "127.0.0.1"}, {})["sslmode"] == "disable"
    assert local_sslmode({"host": "127.0.0.1", "sslmode": "require"}, {})["sslmode"] == "require"
    assert "sslmode" not in local_sslmode({"host": "127.0.0.1"}, {"PGSSLMODE": "verify-full"})
    assert "sslmode" not in local_sslmode({"host": "db.example.com"}, {})
    # libpq connects to hostaddr when it is given: that decides, not the name
    assert "sslmode" not in local_sslmode({"host": "localhost", "hostaddr": "10.1.1.1"}, {})
    assert "sslmode" not in local_sslmode({}, {"PGHOST": "10.1.1.1"})
    params = session_params("postgresql://u@127.0.0.1:5432/postgres?sslmode=verify-ca")
    assert params["sslmode"] == "verify-ca" and "search_path=pg_catalog" in params["options"]


PID_FILE = "4242\n/pgdata\n1700000000\n55432\n/run/pg\n127.0.0.1\n  1234  5678\nready   \n"


def test_socket_params_from_the_postmaster_pid_file():
    params = {"host": "127.0.0.1", "hostaddr": "127.0.0.1", "port": "1", "user": "cloud_admin",
              "sslmode": "require", "options": "-c x=y"}
    got = socket_params(params, PID_FILE, "postgres")
    assert got == {"host": "/run/pg", "port": "55432", "user": "cloud_admin", "options": "-c x=y",
                   "requirepeer": "postgres"}


@pytest.mark.parametrize("pid_file", [None, "", "4242\n/pgdata\n", PID_FILE.replace("/run/pg", ""),
                                      PID_FILE.replace("/run/pg", "relative/dir"),
                                      PID_FILE.replace("55432", "5432; rm -rf /")])
def test_no_socket_without_a_usable_pid_file(pid_file):
    assert socket_params({"host": "127.0.0.1"}, pid_file, "postgres") is None


def test_no_socket_for_a_remote_server():
    assert socket_params({"host": "db.example.com"}, PID_FILE, "postgres") is None
