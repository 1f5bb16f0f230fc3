"""Storage steps against protocol-level peers: the sync-safekeepers stand-in and a pageserver peer.

Functions run as the unprivileged postgres user (forked + demoted, as in production) whenever
the real binaries would refuse root; extracted data dirs are started with real PostgreSQL 15.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import tarfile
import time
from typing import Any, Callable, Iterator

import psycopg
import pytest

from compute import storage
from compute.storage import StorageError, basebackup, initdb_default, sync_safekeepers
from tests.peers.pageserver import PageserverPeer, make_basebackup_tar
from tests.peers.sync_safekeepers import DEFAULT_LSN, write_fake_postgres
from tests.support.pgcluster import PG_USER, PGBIN_DIR, Cluster, free_port, run_as_pg, scratch_dir

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


@pytest.fixture
def scratch() -> Iterator[str]:
    path = scratch_dir("cs-bb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- sync-safekeepers

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


def test_sync_safekeepers_retries_then_succeeds(fake_pg: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SK_FAIL", "2")
    lsn = run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN,
                      retries=3, backoff=0.01)
    assert lsn == DEFAULT_LSN
    assert len(_records(fake_pg["record"])) == 3


def test_sync_safekeepers_persistent_failure_carries_output(fake_pg: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SK_FAIL", "10")
    with pytest.raises(StorageError) as ei:
        run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], TOKEN,
                    retries=3, backoff=0.01)
    msg = str(ei.value)
    assert "after 3 attempt" in msg and "exit code 1" in msg
    assert "simulated failure 3/10" in msg
    assert TOKEN not in msg
    assert len(_records(fake_pg["record"])) == 3


def test_sync_safekeepers_rejects_bad_output(fake_pg: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SK_LSN", "0/16B9188 0/1")
    with pytest.raises(StorageError, match="unexpected output.*0/16B9188 0/1"):
        run_demoted(sync_safekeepers, fake_pg["pgbin"], fake_pg["pgdata"], None, retries=2, backoff=0)


def test_stand_in_refuses_root_like_postgres(fake_pg: dict[str, str]) -> None:
    with pytest.raises(StorageError, match="root.*not permitted"):
        sync_safekeepers(fake_pg["pgbin"], fake_pg["pgdata"], None, retries=1)


def test_sync_safekeepers_missing_binary(scratch: str) -> None:
    with pytest.raises(StorageError, match="cannot run"):
        sync_safekeepers(os.path.join(scratch, "nope"), scratch, None, retries=1)


def test_stand_in_execs_real_postgres_otherwise(fake_pg: dict[str, str]) -> None:
    out = run_as_pg([fake_pg["pgbin"], "--version"]).stdout
    assert out.startswith("postgres (PostgreSQL) 15")
    # -C reads the config: proves the real server binary runs with our argv and finds its files.
    out = run_as_pg([fake_pg["pgbin"], "-D", fake_pg["pgdata"], "-C", "max_connections"]).stdout
    assert out.strip().isdigit()
    assert not os.path.exists(fake_pg["record"])


# ---------------------------------------------------------------- basebackup

@pytest.fixture(scope="session")
def bb_tar() -> Iterator[str]:
    base = scratch_dir("cs-bbtar-")
    yield make_basebackup_tar(os.path.join(base, "basebackup.tar"))
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pgdata(scratch: str) -> str:
    path = os.path.join(scratch, "pgdata")
    os.mkdir(path, 0o700)
    PG_USER.chown(path)
    return path


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


def test_unreachable_pageserver(pgdata: str) -> None:
    with pytest.raises(StorageError, match="basebackup failed"):
        basebackup(f"postgresql://no_user@127.0.0.1:{free_port()}", TENANT, TIMELINE, "0/0", pgdata, None)


def _tar_bytes(build: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        build(tar)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    info.mode = 0o600
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


HOSTILE = {
    "dotdot": lambda t: (_add(t, "PG_VERSION", b"15\n"), _add(t, "../escaped")),
    "absolute": lambda t: _add(t, "/tmp/cs-absolute-escape"),
    "symlink-out": lambda t: _add(t, "pg_evil", type=tarfile.SYMTYPE, linkname="../../.."),
    "symlink-abs": lambda t: _add(t, "pg_evil", type=tarfile.SYMTYPE, linkname="/etc"),
    "hardlink-out": lambda t: _add(t, "pg_evil", type=tarfile.LNKTYPE, linkname="../outside"),
    "device": lambda t: _add(t, "pg_dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
}


@pytest.mark.parametrize("stdlib_filter", [True, False], ids=["data_filter", "fallback"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused(case: str, stdlib_filter: bool, scratch: str, pgdata: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    if not stdlib_filter:  # as on Python < 3.11.4: our own checks alone must hold
        monkeypatch.setattr(storage, "_DATA_FILTER", None)
    path = os.path.join(scratch, "hostile.tar")
    with open(path, "wb") as f:
        f.write(_tar_bytes(HOSTILE[case]))
    with open(os.path.join(scratch, "outside"), "w") as f:
        f.write("keep")
    with PageserverPeer(path) as ps:
        with pytest.raises(StorageError, match="refusing tar member"):
            basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)  # as root: worst case
    assert not os.path.exists(os.path.join(scratch, "escaped"))
    assert not os.path.exists("/tmp/cs-absolute-escape")
    assert not os.path.lexists(os.path.join(pgdata, "pg_evil"))
    assert not os.path.lexists(os.path.join(pgdata, "pg_dev"))


def test_links_inside_the_datadir_are_fine(scratch: str, pgdata: str) -> None:
    def build(t: tarfile.TarFile) -> None:
        _add(t, "base", type=tarfile.DIRTYPE, mode=0o700)
        _add(t, "base/1", b"data")
        _add(t, "pg_link", type=tarfile.SYMTYPE, linkname="base/1")
    path = os.path.join(scratch, "ok.tar")
    with open(path, "wb") as f:
        f.write(_tar_bytes(build))
    with PageserverPeer(path) as ps:
        basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)
    with open(os.path.join(pgdata, "pg_link")) as f:
        assert f.read() == "data"


def test_truncated_archive_is_detected(bb_tar: str, pgdata: str) -> None:
    with tarfile.open(bb_tar) as tar:
        boundary = tar.getmembers()[5].offset  # a header boundary: tarfile alone would say "done"
    for cut in (boundary, boundary + 700):
        with PageserverPeer(bb_tar, truncate_at=cut) as ps:
            with pytest.raises(StorageError, match="truncated|unexpected end"):
                basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None)


def test_progress_is_reported_about_once_a_second(scratch: str, pgdata: str) -> None:
    payload = os.urandom(1 << 20) * 3
    path = os.path.join(scratch, "slow.tar")
    with open(path, "wb") as f:
        f.write(_tar_bytes(lambda t: _add(t, "big", payload)))
    calls: list[tuple[float, int]] = []
    with PageserverPeer(path, chunk_size=64 * 1024, chunk_delay=0.05) as ps:  # ~2.5 s in all
        total = basebackup(ps.connstr, TENANT, TIMELINE, "0/0", pgdata, None,
                           progress=lambda n: calls.append((time.monotonic(), n)))
    assert total == os.path.getsize(path)
    assert calls and calls[-1][1] <= total
    assert all(b[0] - a[0] >= 0.99 and b[1] > a[1] for a, b in zip(calls, calls[1:]))


# ---------------------------------------------------------------- initdb default

def test_initdb_default_creates_cluster(scratch: str) -> None:
    pgdata = os.path.join(scratch, "data")
    run_demoted(initdb_default, PGBIN_DIR, pgdata, "cloud_admin")
    assert os.path.exists(os.path.join(pgdata, "PG_VERSION"))
    out = subprocess.run([f"{PGBIN_DIR}/pg_controldata", pgdata], capture_output=True, text=True).stdout
    assert "Database cluster state:               shut down" in out


def test_initdb_default_failure_carries_output(scratch: str) -> None:
    with pytest.raises(StorageError, match="exit code 1.*root"):
        initdb_default(PGBIN_DIR, os.path.join(scratch, "data"), "cloud_admin")  # initdb refuses root
