"""End to end on the Neon path: a spec naming a pageserver boots through the stand-in
`--sync-safekeepers` binary and the wire-protocol pageserver peer, with hostile names."""

import hashlib
import json
import os

import psycopg
from psycopg import sql

from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import DEFAULT_LSN, write_fake_postgres
from tests.support.tree import Compute, with_neon_storage

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJ0ZW5hbnQiOiJ4In0.c2lnbmF0dXJl"
HOSTILE = ['we"ird', "new\nline", "semi;colon", "MiXeD Case", "$$dollar$$", "back\\slash",
           "emoji 🐘", "x" * 63]
QUOTED_SETTING = "it's a \\ test; with 'quotes'"


def md5_hash(name: str, password: str) -> str:
    return hashlib.md5((password + name).encode()).hexdigest()


def neon_spec(c: Compute, ps: PageserverPeer) -> dict:
    spec = with_neon_storage(c.new_spec(**{"test.quoted": QUOTED_SETTING}), ps.connstr, TENANT, TIMELINE,
                             "127.0.0.1:5454,127.0.0.1:5455", TOKEN)
    spec["cluster"]["roles"] = [{"name": n, "encrypted_password": md5_hash(n, f"pw-{i}"), "options": None}
                                for i, n in enumerate(HOSTILE)]
    spec["cluster"]["databases"] = [{"name": f"db {n}", "owner": n, "options": None} for n in HOSTILE[:-1]]
    return spec


def test_neon_spec_with_hostile_names_boots(bb_tar):
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        record = os.path.join(c.base, "sync.json")
        c.env = {"FAKE_SK_RECORD": record, "FAKE_SK_EXPECT_TOKEN": TOKEN}
        c.spec = neon_spec(c, ps)
        with c:
            st = c.wait_status("running", timeout=90)
            assert (st["tenant"], st["timeline"]) == (TENANT, TIMELINE)

            # The sync ran with PGDATA in the environment (not -D) and the token passed.
            with open(record) as f:
                calls = json.load(f)
            assert len(calls) == 1
            assert calls[0]["argv"][1:] == ["--sync-safekeepers"]
            assert calls[0]["pgdata"] == c.pgdata and calls[0]["token_matches"] is True

            # The basebackup was asked at that LSN with the token as the password.
            assert ps.last.password == TOKEN
            assert ps.last.queries == [f"basebackup {TENANT} {TIMELINE} {DEFAULT_LSN}"]
            assert os.path.exists(os.path.join(c.pgdata, "neon.signal"))

            with psycopg.connect(c.conninfo()) as conn:
                roles = {r for (r,) in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> current_user")}
                assert roles == set(HOSTILE)
                dbs = dict(conn.execute(
                    "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                    "WHERE datname NOT IN ('postgres', 'template0', 'template1')").fetchall())
                assert dbs == {f"db {n}": n for n in HOSTILE[:-1]}
                assert conn.execute(sql.SQL("SHOW {}").format(sql.Identifier("test.quoted"))).fetchone()[0] \
                    == QUOTED_SETTING

            # Every hostile role logs in with its own password.
            for i, name in enumerate(HOSTILE[:3]):
                with psycopg.connect(c.conninfo(f"db {name}", name, f"pw-{i}")) as conn:
                    assert conn.execute("SELECT current_user").fetchone()[0] == name

            with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
                conf = f.read()
            # HEAD's frame around our block (no top-level storage field: no storage line of its
            # own; docs/spec.md, "The Neon lines of postgresql.conf"), nothing else
            assert conf.startswith("# Neon storage settings\n\n# Managed by compute_ctl: begin\n")
            assert conf.endswith("# Managed by compute_ctl: end\nneon.disable_logical_replication_subscribers=false\n")
            assert "test.quoted = 'it''s a \\\\ test; with ''quotes'''" in conf

            with open(os.path.join(c.pgdata, "pg_hba.conf")) as f:
                assert "host all all 0.0.0.0/0 md5" in f.read().splitlines()

            # Neither the token nor a hash reaches the logs.
            out = c.output()
            assert TOKEN not in out
            assert not any(md5_hash(n, f"pw-{i}") in out for i, n in enumerate(HOSTILE))


def test_error_after_archive_fails_the_start(bb_tar):
    with PageserverPeer(bb_tar, password=TOKEN, error_after_archive=True) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        c.spec = neon_spec(c, ps)
        with c:
            st = c.wait_status("failed", timeout=60)
            assert st["error"] and TOKEN not in st["error"]
            assert c.wait_exit(20) == 1


def test_sync_failure_fails_the_start_with_its_output(bb_tar):
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        c.env = {"FAKE_SK_FAIL": "100", "FAKE_SK_RECORD": os.path.join(c.base, "sync.json")}
        c.spec = neon_spec(c, ps)
        with c:
            st = c.wait_status("failed", timeout=60)
            assert "exit" in st["error"] and ps.sessions == []
            assert c.wait_exit(20) == 1


def test_token_from_environment(bb_tar):
    """Kubernetes passes the storage token from a Secret as NEON_AUTH_TOKEN, not in the spec."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        record = os.path.join(c.base, "sync.json")
        c.env = {"NEON_AUTH_TOKEN": TOKEN, "FAKE_SK_RECORD": record, "FAKE_SK_EXPECT_TOKEN": TOKEN}
        c.spec = neon_spec(c, ps)
        del c.spec["storage_auth_token"]
        with c:
            c.wait_status("running", timeout=90)
            assert ps.last.password == TOKEN
            with open(record) as f:
                assert json.load(f)[0]["token_matches"] is True
