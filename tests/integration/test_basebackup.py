"""Storage steps against protocol-level peers: the sync-safekeepers stand-in and a pageserver peer.

Functions run as the unprivileged postgres user (forked + demoted, as in production) whenever
the real binaries would refuse root; extracted data dirs are started with real PostgreSQL 15.

This file: with processes (the stand-ins, initdb, postgres); in-process only:
tests/unit/test_basebackup.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from typing import Any, Callable

import psycopg
import pytest

from compute.storage.attempts import RetryPolicy, StorageError, with_retries
from compute.storage.basebackup import basebackup
from compute.storage.initdb import initdb_default
from compute.storage.safekeepers import sync_safekeepers
from tests.peers.pageserver import PageserverPeer
from tests.support.hostile_tar import raw_header
from tests.peers.sync_safekeepers import DEFAULT_LSN, write_fake_postgres
from tests.support.pgcluster import PG_USER, PGBIN_DIR, Cluster, free_port, run_as_pg

TENANT = "9e4c8f36063c6c6e93bc20d65a820f3d"
TIMELINE = "f2bde4e24a3b4e1e8a1e0e8a0c3e2a11"
TOKEN = "s3cr3t-storage-token"


def run_demoted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run fn in a forked child that dropped root to the postgres user; return or re-raise."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(r)
            PG_USER.demote()
            try:
                result: tuple[str, Any] = ("ok", fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - shipped to the parent
                result = ("err", e)
            try:
                data = pickle.dumps(result)
            except Exception as e:  # noqa: BLE001
                data = pickle.dumps(("err", RuntimeError(f"unpicklable result: {e!r}")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"demoted child died (status {status})"
    kind, value = pickle.loads(data)
    if kind == "err":
        raise value
    return value


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _measured(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    import resource
    before = max(_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    try:
        result: Any = fn(*args, **kwargs)
    except StorageError as e:
        result = str(e)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before


def run_measured(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """fn's result (or its StorageError's message) and how much the peak RSS (KiB) of the
    demoted child that ran it grew meanwhile (a fork of pytest: pytest's own RSS is the base)."""
    return run_demoted(_measured, fn, *args, **kwargs)


@pytest.fixture
def fake_pg(scratch: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The stand-in binary, a PGDATA holding postgresql.conf, and the record file."""
    bindir = os.path.join(scratch, "bin")
    os.mkdir(bindir)
    pgdata = os.path.join(scratch, "pgdata")
    os.mkdir(pgdata, 0o700)
    with open(os.path.join(pgdata, "postgresql.conf"), "w") as f:
        f.write("neon.safekeepers = 'sk1:5454,sk2:5454,sk3:5454'\n")
    PG_USER.chown(pgdata)
    record = os.path.join(scratch, "sk-record.json")
    for var in ("FAKE_SK_FAIL", "FAKE_SK_LSN", "FAKE_SK_ALLOW_ROOT", "NEON_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FAKE_SK_RECORD", record)
    monkeypatch.setenv("FAKE_SK_EXPECT_TOKEN", TOKEN)
    return {"pgbin": write_fake_postgres(bindir), "pgdata": pgdata, "record": record}


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def test_sync_safekeepers_returns_lsn_pgdata_in_env_token_in_env(fake_pg: dict[str, str]) -> None:
    lsn = run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN)
    assert lsn == DEFAULT_LSN
    [rec] = _records(fake_pg["record"])
    assert rec["argv"] == [fake_pg["pgbin"], "--sync-safekeepers"]  # no -D, no token in argv
    assert rec["pgdata"] == fake_pg["pgdata"]
    assert rec["token_set"] and rec["token_matches"]
    assert rec["uid"] == PG_USER.uid


def test_sync_safekeepers_without_token_drops_inherited_one(fake_pg: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEON_AUTH_TOKEN", "stale")
    monkeypatch.setenv("FAKE_SK_LSN", "1A/2B3C4D5E")
    assert run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], None) == "1A/2B3C4D5E"
    [rec] = _records(fake_pg["record"])
    assert rec["token_set"] is False


def test_sync_safekeepers_logs_each_stderr_line(fake_pg: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FAKE_SK_ALLOW_ROOT", "1")  # caplog needs us in-process (root)
    with caplog.at_level(logging.INFO, logger="compute.storage"):
        assert sync_safekeepers(fake_pg["pgbin"], fake_pg["pgdata"], TOKEN) == DEFAULT_LSN
    lines = [r.getMessage() for r in caplog.records if r.name == "compute.storage"]
    assert "sync-safekeepers: LOG:  [WP] proposer connected to quorum (3) safekeepers, propTerm=2" in lines
    assert sum("[WP]" in line for line in lines) == 3  # one record per line
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


FAST = RetryPolicy(attempts=3, first_delay=0.01, factor=1.5)


def synced_with_retries(pgbin: str, pgdata: str, token: str | None, policy: RetryPolicy,
                        timeout: float = 60) -> tuple[str, list[int]]:
    retries: list[int] = []
    lsn = with_retries("sync-safekeepers", policy,
                       lambda: sync_safekeepers(pgbin, pgdata, token, timeout=timeout), on_retry=retries.append)
    return lsn, retries


def test_sync_safekeepers_retries_then_succeeds(fake_pg: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SK_FAIL", "2")
    lsn, retries = run_demoted(synced_with_retries, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN, FAST)
    assert lsn == DEFAULT_LSN and retries == [1, 2]
    assert len(_records(fake_pg["record"])) == 3


def test_sync_safekeepers_persistent_failure_carries_output(fake_pg: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SK_FAIL", "10")
    with pytest.raises(StorageError) as ei:
        run_demoted(synced_with_retries, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN, FAST)
    msg = str(ei.value)
    assert "after 3 attempt" in msg and "exit code 1" in msg
    assert "simulated failure 3/10" in msg
    assert TOKEN not in msg
    assert len(_records(fake_pg["record"])) == 3


def test_sync_safekeepers_silent_is_killed_and_retried(fake_pg: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Safekeepers that accept and go quiet: the run is killed after the timeout, then retried."""
    monkeypatch.setenv("FAKE_SK_STALL", "1")
    t = time.monotonic()
    # 3 s: the stand-in (a Python script) must speak within it on the retry, on a loaded machine
    lsn, retries = run_demoted(synced_with_retries, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN, FAST, 3.0)
    assert lsn == DEFAULT_LSN and retries == [1]
    assert time.monotonic() - t < 30  # not hung
    with pytest.raises(StorageError, match=r"no progress for 1 s \(killed\).*will not answer"):
        monkeypatch.setenv("FAKE_SK_STALL", "5")
        os.unlink(fake_pg["record"] + ".count")
        run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN, timeout=1.0)
    # The stalled children were killed, not orphaned.
    out = subprocess.run(["pgrep", "-f", f"{fake_pg['pgbin']} --sync-safekeepers"], capture_output=True, text=True)
    assert out.stdout == ""


def test_sync_safekeepers_rejects_bad_output(fake_pg: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SK_LSN", "0/16B9188 0/1")
    with pytest.raises(StorageError, match="unexpected output.*0/16B9188 0/1"):
        run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], None)


def test_stand_in_refuses_root_like_postgres(fake_pg: dict[str, str]) -> None:
    with pytest.raises(StorageError, match="root.*not permitted"):
        sync_safekeepers(fake_pg["pgbin"], fake_pg["pgdata"], None)


def test_sync_safekeepers_missing_binary(scratch: str) -> None:
    with pytest.raises(StorageError, match="cannot run"):
        sync_safekeepers(os.path.join(scratch, "nope"), scratch, None)


def test_stand_in_execs_real_postgres_otherwise(fake_pg: dict[str, str]) -> None:
    out = run_as_pg([fake_pg["pgbin"], "--version"]).stdout
    assert out.startswith("postgres (PostgreSQL) 15")
    # -C reads the config: proves the real server binary runs with our argv and finds its files.
    out = run_as_pg([fake_pg["pgbin"], "-D", fake_pg["pgdata"], "-C", "max_connections"]).stdout
    assert out.strip().isdigit()
    assert not os.path.exists(fake_pg["record"])


def test_basebackup_extracts_startable_datadir(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE) as ps:
        n = run_demoted(basebackup, ps.connstr, TENANT, TIMELINE, "0/16B9188", pgdata, TOKEN)
    assert n == os.path.getsize(bb_tar)
    s = ps.last
    assert s.queries == [f"basebackup {TENANT} {TIMELINE} 0/16B9188"]
    assert s.password == TOKEN and s.terminated and not s.other_messages
    # The archive's shape, with modes kept.
    assert not os.path.exists(os.path.join(pgdata, "postgresql.conf"))
    with open(os.path.join(pgdata, "neon.signal")) as f:
        assert "PREV LSN: 0/0" in f.read()
    assert os.path.getsize(os.path.join(pgdata, "postgresql.auto.conf")) == 0
    assert stat.S_IMODE(os.stat(os.path.join(pgdata, "PG_VERSION")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(pgdata, "base")).st_mode) == 0o700
    assert os.stat(os.path.join(pgdata, "global", "pg_control")).st_uid == PG_USER.uid
    # It is a real data directory: PostgreSQL 15 starts on it once postgresql.conf exists.
    cluster = Cluster(datadir=pgdata, port=free_port())
    try:
        cluster.start()
        with psycopg.connect(cluster.conninfo()) as conn:
            assert conn.execute("select current_setting('server_version_num')::int / 10000").fetchone() == (15,)
    finally:
        cluster.stop()


def test_basebackup_as_root_owns_nothing_of_the_archive(bb_tar: str, pgdata: str) -> None:
    # Ownership comes from the extracting user, never from the archive's uid/gid.
    with PageserverPeer(bb_tar) as ps:
        basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    assert os.stat(os.path.join(pgdata, "PG_VERSION")).st_uid == 0


def test_zero_lsn_is_left_out(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar) as ps:
        run_demoted(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    assert ps.last.queries == [f"basebackup {TENANT} {TIMELINE}"]
    assert ps.last.password is None  # no token, no password asked


def test_token_overrides_connstring_password(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        connstr = f"postgresql://no_user:wrong-one@127.0.0.1:{ps.port}"
        run_demoted(basebackup, connstr, TENANT, TIMELINE, "0/0", pgdata, TOKEN)
    assert ps.last.password == TOKEN


def test_connstring_password_used_without_token(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, password="from-connstr") as ps:
        connstr = f"host=127.0.0.1 port={ps.port} user=no_user password=from-connstr"
        run_demoted(basebackup, connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    assert ps.last.password == "from-connstr" and ps.last.user == "no_user"


def test_md5_auth(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN, auth="md5") as ps:
        run_demoted(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, TOKEN)
    assert ps.last.authenticated


def test_wrong_password_fails_without_leaking_it(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, password="the-right-one") as ps:
        with pytest.raises(StorageError, match="password authentication failed") as ei:
            run_demoted(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, TOKEN)
    assert TOKEN not in str(ei.value) and "the-right-one" not in str(ei.value)
    assert not ps.last.queries


def test_error_after_archive_fails(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, error_after_archive=True) as ps:
        with pytest.raises(StorageError, match="simulated failure after the archive"):
            run_demoted(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    # The whole archive had been extracted: the error was caught by reading past its end.
    assert ps.last.bytes_sent == os.path.getsize(bb_tar)
    assert os.path.exists(os.path.join(pgdata, "neon.signal"))


def test_server_error_text_is_one_bounded_line(bb_tar: str, pgdata: str) -> None:
    """A pageserver's error message is shown on /status: newlines folded, length capped."""
    with PageserverPeer(bb_tar, tenant_id=TENANT) as ps:
        with pytest.raises(StorageError) as ei:
            basebackup(ps.connstr, "0" * 32, TIMELINE, "0/0", pgdata, None)
    assert "\n" not in str(ei.value)
    from compute.storage.attempts import _one_line
    assert _one_line("a\nb\r\n c") == "a b c" and len(_one_line("x" * 10_000)) == 503


def test_unknown_tenant_fails(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, tenant_id=TENANT) as ps:
        with pytest.raises(StorageError, match=f"Tenant {'0' * 32} not found"):
            run_demoted(basebackup, ps.connstr, "0" * 32, TIMELINE, "0/0", pgdata, None)


@pytest.mark.parametrize("tenant,timeline,lsn", [
    ("9E4C8F36063C6C6E93BC20D65A820F3D", TIMELINE, "0/0"),
    (TENANT, TIMELINE + "; select 1", "0/0"),
    (TENANT, TIMELINE, "0/1 --gzip"),
    (TENANT, TIMELINE, "123456789/0"),
    (TENANT + "\n", TIMELINE, "0/0"),
    (TENANT, TIMELINE, "0/1\n"),
])
def test_bad_ids_and_lsn_are_not_sent(bb_tar: str, pgdata: str, tenant: str, timeline: str, lsn: str) -> None:
    with PageserverPeer(bb_tar) as ps:
        with pytest.raises(StorageError):
            basebackup(ps.connstr, tenant, timeline, lsn, pgdata, None)
    assert ps.sessions == []


def test_huge_header_is_refused_with_bounded_memory(scratch: str, pgdata: str) -> None:
    """A pax header of 256 MiB (really sent) would be read whole by tarfile: we refuse it at its
    512-byte header, and the extracting process never grows."""
    path = os.path.join(scratch, "huge.tar")
    with open(path, "wb") as f:
        f.write(raw_header("././@PaxHeader", tarfile.XHDTYPE, 256 << 20))
        f.truncate(512 + (256 << 20))  # sparse: the peer really streams it
    with PageserverPeer(path, chunk_size=1 << 20) as ps:
        err, maxrss_kib = run_measured(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    assert "extended header at byte 0 is 268435456 bytes (the limit is 65536)" in err
    assert maxrss_kib < 64 * 1024


def test_stall_mid_archive_fails_within_the_timeout(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, faults=["stall"]) as ps:
        t = time.monotonic()
        with pytest.raises(StorageError, match=r"no progress from the pageserver for 2 s \(after \d+ bytes\)") as ei:
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None, timeout=2)
        took = time.monotonic() - t
    assert ei.value.retryable and 2 <= took < 30


def test_stall_at_connect_fails_within_the_timeout(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, faults=["stall-auth"]) as ps:
        t = time.monotonic()
        with pytest.raises(StorageError, match=r"no progress from the pageserver for 2 s \(connecting\)") as ei:
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None, timeout=2)
        took = time.monotonic() - t
    assert ei.value.retryable and 1.5 <= took < 30


def _fresh(pgdata: str) -> Callable[[], None]:
    def empty() -> None:
        for entry in os.listdir(pgdata):
            path = os.path.join(pgdata, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    return empty


def test_transient_failures_are_retried_from_an_empty_pgdata(bb_tar: str, pgdata: str) -> None:
    """Refused at auth, closed, dropped and stalled mid-archive: each retried; a mid-archive
    failure leaves files behind, which the next attempt must not find (it refuses duplicates)."""
    faults = ["close", "fatal", "drop", "stall"]
    retries: list[int] = []
    with PageserverPeer(bb_tar, password=TOKEN, faults=faults) as ps:
        n = with_retries("basebackup", RetryPolicy(10, 0.01),
                         lambda: basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, TOKEN, timeout=2),
                         before_retry=_fresh(pgdata), on_retry=retries.append)
        assert [s.fault for s in ps.startups] == [*faults, None]
    assert n == os.path.getsize(bb_tar) and retries == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(pgdata, "global", "pg_control"))


def test_permanent_server_error_is_not_retried(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, faults=["error"]) as ps:
        with pytest.raises(StorageError, match=r"^basebackup: ERROR: simulated permanent failure \(SQLSTATE XX000\)$"):
            with_retries("basebackup", RetryPolicy(10, 0.01),
                         lambda: basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None))
        assert len(ps.startups) == 1


def test_gzip_basebackup(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        n = run_demoted(basebackup, ps.connstr, TENANT, TIMELINE, "0/16B9188", pgdata, TOKEN, compression="gzip")
    s = ps.last
    assert s.queries == [f"basebackup {TENANT} {TIMELINE} 0/16B9188 --gzip"]
    assert n == s.wire_bytes < os.path.getsize(bb_tar) == s.bytes_sent  # compressed on the wire
    with tarfile.open(bb_tar) as tar:
        for m in tar:
            if m.isreg():
                with open(os.path.join(pgdata, m.name), "rb") as f, tar.extractfile(m) as want:
                    assert f.read() == want.read(), m.name


def test_gzip_to_an_old_pageserver_fails_clearly(bb_tar: str, pgdata: str) -> None:
    with PageserverPeer(bb_tar, gzip=False) as ps:
        with pytest.raises(StorageError, match="invalid LSN --gzip"):
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None, compression="gzip")


def test_gzip_bomb_is_inflated_in_bounded_steps(scratch: str, pgdata: str) -> None:
    """1 GiB of zeros in one file compresses to ~1 MiB; memory must not follow the output."""
    path = os.path.join(scratch, "zeros.tar")
    with open(path, "wb") as f:
        f.write(raw_header("zeros", tarfile.REGTYPE, 1 << 30))
        f.truncate(512 + (1 << 30) + 1024)
    with PageserverPeer(path, chunk_size=1 << 20) as ps:
        n, maxrss_kib = run_measured(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None,
                                     compression="gzip")
    assert isinstance(n, int) and n < 8 << 20
    assert os.path.getsize(os.path.join(pgdata, "zeros")) == 1 << 30
    assert maxrss_kib < 64 * 1024


def test_truncated_archive_is_detected(bb_tar: str, pgdata: str) -> None:
    with tarfile.open(bb_tar) as tar:
        boundary = tar.getmembers()[5].offset  # a header boundary: tarfile alone would say "done"
    for cut in (boundary, boundary + 700):
        _fresh(pgdata)()
        with PageserverPeer(bb_tar, truncate_at=cut) as ps:
            with pytest.raises(StorageError, match="truncated|unexpected end"):
                basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)


def test_initdb_default_creates_cluster(scratch: str) -> None:
    pgdata = os.path.join(scratch, "data")
    run_demoted(initdb_default, PGBIN_DIR, pgdata, "cloud_admin")
    assert os.path.exists(os.path.join(pgdata, "PG_VERSION"))
    out = subprocess.run([f"{PGBIN_DIR}/pg_controldata", pgdata], capture_output=True, text=True).stdout
    assert "Database cluster state:               shut down" in out


def test_initdb_default_failure_carries_output(scratch: str) -> None:
    with pytest.raises(StorageError, match="exit code 1.*root"):
        initdb_default(PGBIN_DIR, os.path.join(scratch, "data"), "cloud_admin")  # initdb refuses root


def test_one_1_gib_copydata_message_keeps_the_storage_path_under_64_mib(bb_tar: str, pgdata: str) -> None:
    """Issue 19, item 5: a pageserver that sends its whole answer as ONE CopyData message
    announced (and really sent) at 1 GiB: the archive, then zeros. libpq holds a message whole
    (~1 GiB); the storage path reads the stream itself from a fixed buffer, so the process that
    runs the basebackup grows by less than the documented 64 MiB, and the archive is extracted."""
    with PageserverPeer(bb_tar, one_message=1 << 30, chunk_size=1 << 20) as ps:
        n, grew_kib = run_measured(basebackup, ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    print(f"peak RSS growth under a 1 GiB CopyData message: {grew_kib / 1024:.1f} MiB")
    assert n == 1 << 30, n
    assert os.path.exists(os.path.join(pgdata, "global", "pg_control"))
    assert grew_kib < 64 * 1024, f"{grew_kib / 1024:.1f} MiB"


def test_an_oversized_non_copy_message_is_refused_before_it_is_read(bb_tar: str, pgdata: str) -> None:
    """Any other message is held whole to be read: one announced beyond MAX_MESSAGE is refused
    at its header (here a NoticeResponse of 1 GiB, announced, never sent)."""
    from compute.storage.basebackup import MAX_MESSAGE
    with PageserverPeer(bb_tar, huge_notice=1 << 30) as ps:
        with pytest.raises(StorageError, match=rf"the pageserver sent a 'N' message of {1 << 30} bytes "
                                               rf"\(the limit is {MAX_MESSAGE}\)") as ei:
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    assert not ei.value.retryable


# ---------------------------------------------------------------- psycopg only where needed (issue 22)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fresh_python(code: str) -> str:
    """What `code` prints, run by a Python that has imported nothing of ours (pytest has psycopg)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_the_basebackup_and_the_driver_import_no_psycopg() -> None:
    assert _fresh_python("import sys, compute.storage.basebackup, compute.lifecycle.driver, "
                         "compute.lifecycle.lease_keeper; print('psycopg' in sys.modules)") == "False"


@pytest.mark.parametrize("suffix,outcome", [
    ("", "ok ssl_requested=False psycopg=False"),  # libpq through ctypes, the stream read by _WireCopy
    ("?sslmode=require", "failed ssl_requested=True psycopg=True"),  # psycopg's path (the peer has no TLS)
])
def test_only_a_connection_string_asking_for_tls_needs_psycopg(bb_tar: str, pgdata: str, suffix: str,
                                                                outcome: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        code = f"""
import sys
from compute.storage.attempts import StorageError
from compute.storage.basebackup import basebackup
try:
    n = basebackup({ps.connstr + suffix!r}, {TENANT!r}, {TIMELINE!r}, "0/0", {pgdata!r}, {TOKEN!r})
    print("ok" if n == {os.path.getsize(bb_tar)} else n, end=" ")
except StorageError as e:
    print("failed" if e.retryable and "SSL was required" in str(e) else e, end=" ")
print("psycopg=" + str("psycopg" in sys.modules))
"""
        said = _fresh_python(code).split()
    sessions = [s for s in ps.sessions if s.startup or s.ssl_requested]
    assert " ".join([said[0], f"ssl_requested={sessions[0].ssl_requested}", said[1]]) == outcome
    if not suffix:
        assert ps.last.password == TOKEN and ps.last.terminated
        assert ps.last.startup.get("application_name") == "compute_ctl"


# -- without a loadable libpq.so.5: psycopg's own libpq -------------------------------------------

_CHILD = """
import json, sys
from compute.postgres import pqconnect
from compute.storage.basebackup import basebackup
n = basebackup(sys.argv[1], sys.argv[2], sys.argv[3], "0/0", sys.argv[4], sys.argv[5])
print(json.dumps({"bytes": n, "libpq_loaded": pqconnect.load() is not None, "psycopg": "psycopg" in sys.modules}))
"""


def _system_libpq() -> str:
    """The file the dynamic loader gives for libpq.so.5 (Debian's libpq5), found as it maps it."""
    out = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libpq.so.5'); "
                          "print(open('/proc/self/maps').read())"], capture_output=True, text=True, check=True)
    paths = {line.split()[-1] for line in out.stdout.splitlines() if "/libpq.so.5" in line}
    assert len(paths) == 1, paths
    return os.path.realpath(paths.pop())


@pytest.mark.parametrize("libpq", ["loadable", "unloadable"])
def test_the_basebackup_uses_libpq_through_ctypes_or_else_psycopg(bb_tar: str, pgdata: str, libpq: str) -> None:
    """compute/storage/basebackup.py connects through Debian's libpq.so.5 (ctypes) and does not
    import psycopg; when that library cannot be loaded, through psycopg (its own libpq), with
    the same archive extracted. The library is made unloadable for one process, for real: a
    private mount namespace in which /dev/null is bind-mounted over it (unshare, as root)."""
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE) as ps:
        argv = [sys.executable, "-c", _CHILD, ps.connstr, TENANT, TIMELINE, pgdata, TOKEN]
        if libpq == "unloadable":
            mount = f"mount --bind /dev/null {_system_libpq()} && exec \"$@\""
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/",
                             env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bytes"] == os.path.getsize(bb_tar)
    assert got == {"bytes": got["bytes"], "libpq_loaded": libpq == "loadable", "psycopg": libpq == "unloadable"}, got
    assert ps.last.queries == [f"basebackup {TENANT} {TIMELINE}"] and ps.last.password == TOKEN
    with open(os.path.join(pgdata, "PG_VERSION")) as f:
        assert f.read().strip() == "15"
    assert os.path.getsize(os.path.join(pgdata, "global", "pg_control")) > 0
