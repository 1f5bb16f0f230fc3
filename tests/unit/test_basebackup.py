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
