"""End to end: read-only modes against real PostgreSQL 15.

- Static and Replica on the Neon path, with the pageserver peer: no safekeeper sync, the
  basebackup asked as Neon asks for non-primaries, a hot standby, no catalog SQL, `running`.
  Our safekeeper stand-in cannot stream WAL: the Replica waits for WAL forever (read-only), and
  the test proves postgres asks the safekeepers for it the way Neon configures it, then
  promotes it at the LSN it has replayed.
- A replica compute of a real primary started here: rows follow, writes fail, /promote makes
  them work; the replication password is never in argv, an environment, or a log.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql
import yaml
from openapi_schema_validator import OAS30Validator

from compute.postgres.replica import ReplicaError, wait_for_replay
from tests.peers.control_plane import ControlPlanePeer
from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.api_helpers import REPO
from tests.support.pgcluster import free_port, running_cluster
from tests.support.tree import Compute, with_neon_storage
from tests.support.waiting import wait_for

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJ0ZW5hbnQiOiJ4In0.c2lnbmF0dXJl"
STATIC_LSN = "0/FF000000"  # beyond the tar's WAL: postgres waits there, read-only
REPL_PASSWORD = "s3cr:et\\pw-Zq81x"  # ':' and '\' exercise the passfile escaping
SECRET_MARK = "pw-Zq81x"  # in the password however it is escaped (conninfo, postgresql.conf)
LOGGED_SQL = re.compile(r"LOG:\s+(statement|execute [^:]*): ")  # simple and extended protocol
CATALOG_SQL = re.compile(r"\b(CREATE|ALTER|DROP|GRANT|REVOKE|COMMENT)\b", re.I)


def neon_mode_spec(c: Compute, ps: PageserverPeer, safekeepers: str, mode) -> dict:
    spec = with_neon_storage(c.new_spec(log_statement="all"), ps.connstr, TENANT, TIMELINE, safekeepers, TOKEN)
    spec["mode"] = mode
    return spec


def user_roles(conn: psycopg.Connection) -> set[str]:
    return {r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_'")}


def assert_read_only(c: Compute) -> None:
    with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        assert conn.execute("SHOW transaction_read_only").fetchone()[0] == "on"
        # Catalog unchanged: the spec's roles and databases were not created.
        assert user_roles(conn) == {"cloud_admin"}
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'appdb'").fetchone()[0] == 0
    code, body = c.request("POST", "/check_writability")
    assert code == 500 and b"read-only" in body


def assert_no_catalog_sql(c: Compute) -> None:
    # postgres' lines reach compute-ctl's stdout through the log relay: once a statement run now
    # is there, so is every line logged before it.
    marker = f"cs-marker-{uuid.uuid4().hex}"
    with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
        conn.execute(f"SELECT '{marker}'")
    out = wait_for(lambda: marker in (o := c.output()) and o, 30,
                   "the marker statement in the output (log_statement=all not in effect?)")
    logged = [line for line in out.splitlines() if LOGGED_SQL.search(line)]
    assert logged, "log_statement=all is not in effect: the check below would prove nothing"
    assert [line for line in logged if CATALOG_SQL.search(line)] == []


def test_static_on_neon_path_is_read_only_at_its_lsn(bb_tar):
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)  # records any --sync-safekeepers; else runs postgres
        record = os.path.join(c.base, "sync.json")
        c.env = {"FAKE_SK_RECORD": record}
        c.spec = neon_mode_spec(c, ps, "127.0.0.1:5454", {"Static": STATIC_LSN})
        with c:
            st = c.wait_status("running", timeout=90)
            assert (st["tenant"], st["timeline"]) == (TENANT, TIMELINE)
            assert not os.path.exists(record), "a Static compute must not sync the safekeepers"
            # a Static compute also leases its LSN (tests/e2e/test_e2e_sharded.py): its own session
            basebackups = [s for s in ps.startups if any(q.startswith("basebackup") for q in s.queries)]
            assert [s.queries for s in basebackups] == [[f"basebackup {TENANT} {TIMELINE} {STATIC_LSN} --replica"]]
            assert basebackups[0].password == TOKEN
            wait_for(lambda: ps.leases, 30, "the LSN lease")
            assert [(x.tenant_shard_id, x.lsn) for x in ps.leases] == [(TENANT, STATIC_LSN)]
            assert os.path.exists(os.path.join(c.pgdata, "standby.signal"))
            with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
                conf = f.read().splitlines()
            assert "hot_standby = on" in conf and f"recovery_target_lsn = '{STATIC_LSN}'" in conf
            with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
                assert conn.execute("SHOW recovery_target_lsn").fetchone()[0] == STATIC_LSN
            assert_read_only(c)
            assert_no_catalog_sql(c)
            with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    conn.execute("CREATE TABLE static_write (x int)")
            assert TOKEN not in c.output()


def test_replica_on_neon_path_asks_the_safekeepers_for_wal(bb_tar):
    # A wire-protocol listener standing in for a safekeeper: it records the walreceiver's
    # start-up packet, then refuses IDENTIFY_SYSTEM (it cannot stream WAL).
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE) as ps, \
            PageserverPeer(bb_tar) as sk:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        record = os.path.join(c.base, "sync.json")
        c.env = {"FAKE_SK_RECORD": record}
        c.spec = neon_mode_spec(c, ps, f"127.0.0.1:{sk.port},localhost:{free_port()}", "Replica")
        with c:
            c.wait_status("running", timeout=90)
            assert not os.path.exists(record), "a Replica must not sync the safekeepers"
            assert ps.last.queries == [f"basebackup {TENANT} {TIMELINE} --replica"]  # the latest LSN
            assert os.path.exists(os.path.join(c.pgdata, "standby.signal"))
            assert_read_only(c)

            def walreceiver_session():
                return [s for s in list(sk.sessions) if s.startup.get("replication") == "true"]
            s = wait_for(walreceiver_session, 60, "the walreceiver to connect to a safekeeper")[0]
            assert s.startup["application_name"] == "replica"
            assert f"timeline_id={TIMELINE}" in s.startup["options"]
            assert f"tenant_id={TENANT}" in s.startup["options"]
            assert_no_catalog_sql(c)
            assert c.status()["status"] == "running"  # still, while it waits for WAL

            # Promotion on the Neon path: the LSN is required, then it is waited for.
            primary_spec = neon_mode_spec(c, ps, f"127.0.0.1:{sk.port}", "Primary")
            hdr = {"Content-Type": "application/json"}
            code, body = c.request("POST", "/promote", {"spec": primary_spec}, hdr)
            assert code == 400 and b"wal_flush_lsn is required" in body
            with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
                lsn = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()[0]
            code, body = c.request("POST", "/promote", {"spec": primary_spec, "wal_flush_lsn": lsn}, hdr, timeout=120)
            assert code == 200 and json.loads(body)["status"] == "completed", body
            with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
                conn.execute("CREATE TABLE written_after_promotion (x int)")
                assert "app" in user_roles(conn)  # the spec applied as a Primary
            with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
                conf = f.read()
            assert "hot_standby" not in conf and "neon.compute_mode" not in conf


@pytest.fixture
def primary():
    with running_cluster(log_statement="'all'") as pg:
        hba = os.path.join(pg.datadir, "pg_hba.conf")
        with open(hba) as f:
            rest = f.read()
        with open(hba, "w") as f:  # the password is checked for replication (initdb trusts everyone)
            f.write("host replication replicator 127.0.0.1/32 scram-sha-256\n"
                    "host all peeker 127.0.0.1/32 scram-sha-256\n" + rest)
        with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("SET log_statement = 'none'")  # the test's own CREATE ROLE ... PASSWORD
            conn.execute(sql.SQL("CREATE ROLE replicator REPLICATION LOGIN PASSWORD {}").format(
                sql.Literal(REPL_PASSWORD)))
            conn.execute("CREATE ROLE peeker LOGIN PASSWORD 'peek'")
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, what text)")
            conn.execute("GRANT SELECT ON items TO peeker")
        yield pg


def replica_spec(c: Compute, primary, password: str = REPL_PASSWORD, name: str = "cs_replica") -> dict:
    spec = c.new_spec(log_statement="all", primary_conninfo=(
        f"host=127.0.0.1 port={primary.port} user=replicator password='{password.replace(chr(92), chr(92) * 2)}' "
        f"application_name={name}"))
    spec["mode"] = "Replica"
    return spec


class SecretWatcher:
    """Samples every process' argv and environment while the test runs."""

    def __init__(self, secret: str):
        self.secret = secret.encode()
        self.hits: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid_dir in glob.glob("/proc/[0-9]*"):
                for part in ("cmdline", "environ"):
                    try:
                        with open(f"{pid_dir}/{part}", "rb") as f:
                            if self.secret in f.read():
                                self.hits.append(f"{pid_dir}/{part}")
                    except OSError:
                        pass
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> "SecretWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_replica_of_a_plain_primary_follows_it_and_promotes(primary):
    c = Compute()
    c.spec = replica_spec(c, primary)
    with SecretWatcher(SECRET_MARK) as watcher, c:
        c.wait_status("running", timeout=90)
        assert os.path.exists(os.path.join(c.pgdata, "standby.signal"))
        assert glob.glob(os.path.join(c.runtime_dir, "*.pgpass")) == []  # the clone's passfile is gone
        with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
            assert SECRET_MARK not in f.read()
        # A replication connection authenticated with the password (scram on the primary).
        with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_replication "
                                          "WHERE usename = 'replicator' AND application_name = 'cs_replica'"
                                          ).fetchone()[0] == 1, 60, "the replica to stream")
        assert_read_only_replica(c)

        # A row inserted on the primary shows up on the replica.
        with psycopg.connect(primary.conninfo(), autocommit=True) as pconn, \
                psycopg.connect(c.admin_conninfo(), autocommit=True) as rconn:
            pconn.execute("INSERT INTO items VALUES (1, 'from the primary')")
            t0 = time.monotonic()
            wait_for(lambda: rconn.execute("SELECT what FROM items WHERE id = 1").fetchone(), 30,
                     "the row on the replica")
            lag = time.monotonic() - t0
            print(f"row visible on the replica after {lag * 1000:.0f} ms")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                rconn.execute("INSERT INTO items VALUES (2, 'on the replica')")
            pconn.execute("INSERT INTO items VALUES (3, 'last before promotion')")
            flush_lsn = pconn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]

        # Other OS users cannot read the password from PGDATA; non-superusers not from SQL.
        res = subprocess.run(["runuser", "-u", "nobody", "--", "cat", os.path.join(c.pgdata, "postgresql.conf")],
                             capture_output=True, text=True)
        assert res.returncode != 0 and SECRET_MARK not in res.stdout
        with psycopg.connect(c.conninfo(user="peeker", password="peek"), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] >= 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SHOW primary_conninfo")

        # A primary spec with another mode, a bad LSN or a wrong body changes nothing.
        promoted = c.new_spec()
        for body in ({"spec": {**promoted, "mode": "Replica"}}, {"spec": promoted, "wal_flush_lsn": "nope"},
                     {"wal_flush_lsn": flush_lsn}):
            code, _ = c.request("POST", "/promote", body, {"Content-Type": "application/json"})
            assert code == 400
        assert c.status()["status"] == "running"

        # Waiting for an LSN the replica never reaches gives up with a clear error.
        with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
            with pytest.raises(ReplicaError, match="did not replay up to FFFFFFFF/0"):
                wait_for_replay(conn, "FFFFFFFF/0", timeout=0.3)

        primary.stop()  # as Neon does: promote once the old primary is gone
        # Two promotions at once: exactly one does it.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: c.request("POST", "/promote", {"spec": promoted, "wal_flush_lsn": flush_lsn},
                                                        {"Content-Type": "application/json"}, timeout=120), range(2)))
        assert sorted(code for code, _ in answers) == [200, 412], answers
        body = next(body for code, body in answers if code == 200)
        answer = json.loads(body)
        assert answer["status"] == "completed"
        print(f"promote timings: {answer}")
        with open(os.path.join(REPO, "docs", "openapi.yaml")) as f:
            doc = yaml.safe_load(f)
        OAS30Validator(doc["components"]["schemas"]["PromoteState"]).validate(answer)

        st = c.wait_status("running", timeout=30)
        assert st["error"] is None
        with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
            assert conn.execute("SELECT what FROM items WHERE id = 3").fetchone()[0] == "last before promotion"
            conn.execute("INSERT INTO items VALUES (4, 'after promotion')")
            # Applied as a primary: the spec's role and database now exist.
            assert "app" in user_roles(conn)
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'appdb'").fetchone()[0] == 1
        code, body = c.request("POST", "/check_writability")
        assert (code, body) == (200, b"true")
        assert not os.path.exists(os.path.join(c.pgdata, "standby.signal"))
        code, body = c.request("POST", "/promote", {"spec": promoted}, {"Content-Type": "application/json"})
        assert code == 412 and b"not replica" in body

        out = c.output()
    assert watcher.samples > 10 and watcher.hits == []
    assert SECRET_MARK not in out and SECRET_MARK not in primary.log()


def assert_read_only_replica(c: Compute) -> None:
    with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        # The catalog is the primary's: the spec's role was not created, and no catalog SQL ran.
        assert "app" not in user_roles(conn)
    code, body = c.request("POST", "/check_writability")
    assert code == 500 and b"read-only" in body
    assert_no_catalog_sql(c)


def test_replica_with_a_wrong_password_fails_clearly(primary):
    wrong = "not-the-password-7Qx"
    c = Compute()
    c.spec = replica_spec(c, primary, wrong)
    with c:
        st = c.wait_status("failed", timeout=90)
        assert "cloning the primary failed" in st["error"]
        assert "password authentication failed" in st["error"]
        assert wrong not in st["error"]
        assert c.wait_exit(30) == 1
        assert wrong not in c.output()


def test_reconfiguring_a_replica_applies_settings_but_no_catalog_sql(primary):
    """Also a password rotation: postgres logs a changed primary_conninfo on reload, so the
    value it sees must hold no password (the passfile does)."""
    rotated = "r0tated:pw-Zq81x"
    with ControlPlanePeer(None) as cp, SecretWatcher(SECRET_MARK) as watcher:
        c = Compute()
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]  # pull mode: /configure is allowed
        cp.spec = replica_spec(c, primary)
        with c:
            c.wait_status("running", timeout=90)
            with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
                conn.execute("SET log_statement = 'none'")
                conn.execute(sql.SQL("ALTER ROLE replicator PASSWORD {}").format(sql.Literal(rotated)))
                # the running walreceiver keeps its session: end it so the new password is needed
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
            spec = replica_spec(c, primary, rotated, "cs_replica_2")
            spec["cluster"]["settings"].append({"name": "work_mem", "value": "7MB", "vartype": "string"})
            spec["cluster"]["roles"].append({"name": "newcomer", "encrypted_password": None, "options": None})
            code, body = c.request("POST", "/configure", {"spec": spec}, {"Content-Type": "application/json"}, 60)
            assert code == 200, body
            with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
                assert conn.execute("SHOW work_mem").fetchone()[0] == "7MB"
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
                assert not {"app", "newcomer"} & user_roles(conn)
            assert_no_catalog_sql(c)
            # Still following the primary.
            with psycopg.connect(primary.conninfo(), autocommit=True) as pconn, \
                    psycopg.connect(c.admin_conninfo(), autocommit=True) as rconn:
                pconn.execute("INSERT INTO items VALUES (10, 'after reconfigure')")
                wait_for(lambda: rconn.execute("SELECT what FROM items WHERE id = 10").fetchone(), 30,
                         "the row on the replica")
            wait_for(lambda: 'parameter "primary_conninfo" changed' in c.output(), 30,
                     "postgres to log the changed primary_conninfo")  # it does log the value...
            with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
                assert SECRET_MARK not in f.read()
            assert SECRET_MARK not in c.output()  # ...without the password
    assert watcher.samples > 10 and watcher.hits == []


def children_named(ppid: int, name: str) -> list[int]:
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(stat.replace("/stat", "/comm")) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == ppid and comm == name:
            pids.append(int(stat.split("/")[2]))
    return pids


def test_a_killed_driver_leaves_no_clone_behind():
    """A primary that accepts TCP and never answers keeps pg_basebackup waiting; killing the
    lifecycle driver then must take that pg_basebackup with it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        c = Compute()
        c.spec = c.new_spec(primary_conninfo=f"host=127.0.0.1 port={silent.getsockname()[1]} user=r "
                                             "connect_timeout=60")
        c.spec["mode"] = "Replica"
        with c:
            def clone_under_driver():
                res = c.supervisorctl("pid", "lifecycle")
                out = res.stdout.strip()
                pid = int(out) if out.isdigit() else 0
                kids = children_named(pid, "pg_basebackup") if pid else []
                return (pid, kids[0]) if kids else None
            driver, clone = wait_for(clone_under_driver, 60, "pg_basebackup under the lifecycle driver")
            os.kill(driver, signal.SIGKILL)
            wait_for(lambda: not os.path.exists(f"/proc/{clone}") or open(f"/proc/{clone}/stat").read().split()[2] == "Z",
                     30, "the orphaned pg_basebackup to exit")
            c.wait_status("init", timeout=30)  # the restarted driver is cloning again
        # And nothing of the tree is left once compute-ctl is gone.
        assert c.proc.returncode is not None
        # our programs' titles name the runtime dir, postgres' command line PGDATA
        wait_for(lambda: not processes_mentioning(c.pgdata) and not processes_mentioning(c.runtime_dir), 30,
                 "no process of the tree left")


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(cmdline.split("/")[2]))
        except OSError:
            pass
    return pids
