"""Storage steps against protocol-level peers: the sync-safekeepers stand-in and a pageserver peer.

Functions run as the unprivileged postgres user (forked + demoted, as in production) whenever
the real binaries would refuse root; extracted data dirs are started with real PostgreSQL 15.

This file: retry policies and the pageserver peer's archives in-process, no process; the
stand-ins, real initdb and extracted clusters: tests/integration/test_basebackup.py.
"""

from __future__ import annotations

import os
import time
import pytest

from compute.storage.attempts import (
    BASEBACKUP_RETRY,
    SYNC_SAFEKEEPERS_RETRY,
    RetryPolicy,
    StorageError,
    with_retries,
)
from compute.storage.basebackup import basebackup
from tests.peers.pageserver import PageserverPeer
from tests.support.hostile_tar import Member, build_tar
from tests.support.pgcluster import free_port

TENANT = "9e4c8f36063c6c6e93bc20d65a820f3d"
TIMELINE = "f2bde4e24a3b4e1e8a1e0e8a0c3e2a11"


def test_retry_policy_is_neons() -> None:
    """0.5 s, x1.5; sync-safekeepers 5 attempts, basebackup 10 (Neon's compute_ctl)."""
    assert [SYNC_SAFEKEEPERS_RETRY.delay_after(n) for n in range(1, 6)] == [0.5, 0.75, 1.125, 1.6875, None]
    delays = [BASEBACKUP_RETRY.delay_after(n) for n in range(1, 11)]
    assert delays[:3] == [0.5, 0.75, 1.125] and delays[-1] is None and delays[-2] == pytest.approx(0.5 * 1.5 ** 8)
    assert RetryPolicy(attempts=1).delay_after(1) is None


def test_with_retries_stops_at_a_permanent_failure() -> None:
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        raise StorageError("bad archive" if len(calls) == 2 else "refused", retryable=len(calls) != 2)
    with pytest.raises(StorageError, match=r"^step failed after 2 attempt\(s\): bad archive$"):
        with_retries("step", RetryPolicy(5, 0), attempt, sleep=lambda s: None)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(StorageError, match=r"^refused$"):  # permanent at once: the cause alone
        with_retries("step", RetryPolicy(5, 0), lambda: (_ for _ in ()).throw(StorageError("refused")))


def test_unreachable_pageserver(pgdata: str) -> None:
    with pytest.raises(StorageError, match="^basebackup: connection failed: .*Connection refused") as ei:
        basebackup(f"postgresql://no_user@127.0.0.1:{free_port()}", TENANT, TIMELINE, "0/0", pgdata, None)
    assert ei.value.retryable


def _serve_bytes(scratch: str, data: bytes, name: str = "archive.tar") -> str:
    path = os.path.join(scratch, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_links_are_refused_even_inside_the_datadir(scratch: str, pgdata: str) -> None:
    """A Neon basebackup has only directories and regular files: any link is refused."""
    data = build_tar([Member("base", kind="dir"), Member("base/1", b"data"),
                      Member("pg_link", kind="sym", linkname="base/1")])
    with PageserverPeer(_serve_bytes(scratch, data)) as ps:
        with pytest.raises(StorageError, match="refusing tar member 'pg_link': symbolic link"):
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    assert not os.path.lexists(os.path.join(pgdata, "pg_link"))


def test_retries_are_exhausted_with_the_last_cause(pgdata: str) -> None:
    port = free_port()  # nobody listens: connection refused every time
    with pytest.raises(StorageError) as ei:
        with_retries("basebackup", RetryPolicy(4, 0.01),
                     lambda: basebackup(f"postgresql://no_user@127.0.0.1:{port}", TENANT, TIMELINE, "0/0", pgdata, None))
    assert str(ei.value).startswith("basebackup failed after 4 attempt(s): basebackup: ")
    assert "refused" in str(ei.value)


def test_progress_is_reported_about_once_a_second(scratch: str, pgdata: str) -> None:
    payload = os.urandom(1 << 20) * 3
    path = os.path.join(scratch, "slow.tar")
    with open(path, "wb") as f:
        f.write(build_tar([Member("big", payload)]))
    calls: list[tuple[float, int]] = []
    with PageserverPeer(path, chunk_size=64 * 1024, chunk_delay=0.05) as ps:  # ~2.5 s in all
        total = basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None,
                           progress=lambda n: calls.append((time.monotonic(), n)))
    assert total == os.path.getsize(path)
    assert calls and calls[-1][1] <= total
    assert all(b[0] - a[0] >= 0.99 and b[1] > a[1] for a, b in zip(calls, calls[1:]))


# ---------------------------------------------------------------- the connection (issue 22)
# A plain connection string connects through libpq via ctypes (compute/postgres/pqconnect.py);
# one asking for TLS goes through psycopg. Same errors either way. Which path ran is visible to
# a process that had not imported psycopg: tests/integration/test_basebackup.py.

SECRET = "hunter2-not-to-be-shown"


@pytest.mark.parametrize("connstr", [
    f"host=127.0.0.1 password={SECRET} port",
    f"host=127.0.0.1 passwrd={SECRET}",
    f"host='127.0.0.1 password={SECRET}",
    f"postgresql://u:{SECRET}@127.0.0.1:5432?nosuch={SECRET}",
    SECRET,
])
def test_an_invalid_connection_string_is_refused_without_echoing_it(connstr: str, pgdata: str) -> None:
    with pytest.raises(StorageError) as ei:
        basebackup(connstr, TENANT, TIMELINE, "0/0", pgdata, "the-token")
    assert str(ei.value) == "invalid pageserver connection string" and not ei.value.retryable


@pytest.mark.parametrize("connstr", [
    "host=h port=1 user=u password='a b\\'c' sslmode=require connect_timeout=7",
    "postgresql://u:p%40ss@h:5/db?application_name=x&gssencmode=disable",
    "postgresql://h1:1,h2:2/db",
    "",
])
def test_pqconnect_reads_a_connection_string_as_psycopg_does(connstr: str) -> None:
    from psycopg.conninfo import conninfo_to_dict
    from compute.postgres import pqconnect
    lib = pqconnect.load()
    assert lib is not None  # Debian's libpq5 comes with postgresql-15
    assert lib.parse(connstr) == conninfo_to_dict(connstr)


def test_a_wrong_token_fails_as_a_connection_failure_without_showing_it(scratch: str, pgdata: str) -> None:
    """No SQLSTATE reaches us from a failed connect (psycopg's path neither): retryable, as before."""
    data = build_tar([Member("PG_VERSION", b"15\n")])
    with PageserverPeer(_serve_bytes(scratch, data), password="the-right-one") as ps:
        with pytest.raises(StorageError, match=r'^basebackup: connection failed: .*password authentication '
                                               r'failed for user "no_user"$') as ei:
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, SECRET)
    assert ei.value.retryable and SECRET not in str(ei.value) and "the-right-one" not in str(ei.value)
    assert ps.last.password == SECRET and not ps.last.queries and not ps.last.ssl_requested


def test_a_listener_that_never_answers_times_out_connecting(pgdata: str) -> None:
    """The TCP connect succeeds (the kernel's backlog), the startup message is never answered."""
    import socket
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with pytest.raises(StorageError, match=r"^basebackup: no progress from the pageserver for 2 s "
                                               r"\(connecting\)$") as ei:
            basebackup(f"postgresql://no_user@127.0.0.1:{port}", TENANT, TIMELINE, "0/0", pgdata, None, timeout=2)
    assert ei.value.retryable


@pytest.mark.parametrize("suffix,ssl_requested", [("", False), ("?sslmode=disable", False),
                                                  ("?sslmode=require", True), ("?sslmode=prefer", True)])
def test_tls_only_when_the_connection_string_asks_for_it(scratch: str, pgdata: str, suffix: str,
                                                         ssl_requested: bool) -> None:
    """The peer refuses TLS: `require` fails, `prefer` goes on without; no SSLRequest otherwise."""
    data = build_tar([Member("PG_VERSION", b"15\n")])
    with PageserverPeer(_serve_bytes(scratch, data)) as ps:
        try:
            basebackup(ps.connstr + suffix, TENANT, TIMELINE, "0/0", pgdata, None)
        except StorageError as e:
            assert suffix == "?sslmode=require" and "server does not support SSL, but SSL was required" in str(e)
            assert e.retryable
        assert [(s.ssl_requested, s.gssenc_requested) for s in ps.sessions] == [(ssl_requested, False)]
