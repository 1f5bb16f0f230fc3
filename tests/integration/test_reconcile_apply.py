"""Applying specs to a real PostgreSQL 15 cluster (compute_ctl's "apply the spec", contract §5)."""

from __future__ import annotations

import hashlib
import re

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from compute.reconcile import (ApplyError, Connections, PlanError, apply_spec, dry_run, format_plan,
                               plan_spec)
from compute.model.spec import parse_spec
from tests.support.pgcluster import running_cluster

SU = "cloud_admin"
SCRAM = "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$bpSY5Ze9NUH+I35LC3gVq+DpBfK46iXBxvhAKqVu9pE=:VpYlBuxyzeCI1KnctrefdljpB1mk3Gp7sBI/t11+NkQ="  # a real verifier
HOSTILE = [
    'it\'s "quoted"', "semi;colon", "dollar$$quote$$", "back\\slash\\", "new\nline", " spaces  ",
    "emoji 🐘🚀", "MixedCase", "x" * 63, "é" * 31 + "x", "'; DROP TABLE t; --", "tab\there",
]


def md5(name: str, password: str = "secret") -> str:
    return hashlib.md5((password + name).encode()).hexdigest()


def make_spec(roles=(), dbs=(), deltas=(), settings=()) -> dict:
    return {"format_version": 1.0,
            "cluster": {"roles": [{"name": n, "encrypted_password": pw} for n, pw in roles],
                        "databases": [{"name": d[0], "owner": d[1], "options": d[2] if len(d) > 2 else None}
                                      for d in dbs],
                        "settings": [{"name": k, "value": v, "vartype": "string"} for k, v in settings]},
            "delta_operations": [{"action": d[0], "name": d[1], **({"new_name": d[2]} if len(d) > 2 else {})}
                                 for d in deltas]}


def apply(cluster, obj, **kw):
    return apply_spec(cluster.url(), parse_spec(obj, superuser=SU), superuser=SU, **kw)


@pytest.fixture(scope="module")
def pg():
    with running_cluster(superuser=SU, log_statement="'ddl'") as cluster:
        yield cluster


@pytest.fixture
def conn(pg):
    with psycopg.connect(pg.url(), autocommit=True) as c:
        yield c


def roles(conn) -> dict[str, str | None]:
    return dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid").fetchall())


def databases(conn) -> dict[str, str]:
    return dict(conn.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database").fetchall())


def in_db(pg, dbname: str, query, params=None):
    with psycopg.connect(make_conninfo(pg.url(), dbname=dbname), autocommit=True) as c:
        cur = c.execute(query, params)
        return cur.fetchall() if cur.description else None


class LogWatch:
    """Statements the server logged (log_statement = 'ddl') since creation."""

    def __init__(self, pg):
        self.pg, self.start = pg, len(pg.log())

    def statements(self) -> list[str]:
        return re.findall(r"LOG:  statement: (.*)", self.pg.log()[self.start:])


# -- first apply --------------------------------------------------------------------------

def test_first_apply_creates_exactly_the_spec(pg, conn):
    obj = make_spec(roles=[("fa_alice", md5("fa_alice")), ("fa_bob", SCRAM), ("fa_carol", None)],
                    dbs=[("fa_shop", "fa_alice"), ("fa_admin", SU)])
    before_roles, before_dbs = roles(conn), databases(conn)
    report = apply(pg, obj)
    assert report.statements == 6 + 2 + 2  # 3 x (CREATE ROLE, GRANT); 2 CREATE DATABASE; 2 GRANT CREATE
    after = roles(conn)
    assert set(after) - set(before_roles) == {"fa_alice", "fa_bob", "fa_carol"}
    assert after["fa_alice"] == "md5" + md5("fa_alice")
    assert after["fa_bob"] == SCRAM
    assert after["fa_carol"] is None
    assert {k: v for k, v in databases(conn).items() if k not in before_dbs} == {
        "fa_shop": "fa_alice", "fa_admin": SU}
    # LOGIN, membership of pg_read_all_data / pg_write_all_data
    assert conn.execute("SELECT bool_and(rolcanlogin) FROM pg_roles WHERE rolname LIKE 'fa\\_%'").fetchone()[0]
    members = conn.execute("""SELECT r.rolname, array_agg(g.rolname ORDER BY g.rolname)
                                FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
                                JOIN pg_roles g ON g.oid = m.roleid
                               WHERE r.rolname LIKE 'fa\\_%' GROUP BY 1""").fetchall()
    assert dict(members) == {n: ["pg_read_all_data", "pg_write_all_data"] for n in ("fa_alice", "fa_bob", "fa_carol")}
    # CREATE on every spec database for every spec role
    for db in ("fa_shop", "fa_admin"):
        for role in ("fa_alice", "fa_bob", "fa_carol"):
            assert conn.execute("SELECT has_database_privilege(%s, %s, 'CREATE')", (role, db)).fetchone()[0]
    # PG15: the new database's schema public belongs to pg_database_owner: left alone
    assert in_db(pg, "fa_shop", "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'") == [
        ("pg_database_owner",)]
    assert apply(pg, obj).statements == 0


def test_hostile_names(pg, conn):
    names = HOSTILE
    obj = make_spec(roles=[(n, md5(n)) for n in names], dbs=[(n, n) for n in names])
    report = apply(pg, obj)
    assert report.statements == 2 * len(names) + len(names) + len(names)
    r, d = roles(conn), databases(conn)
    for n in names:
        assert r[n] == "md5" + md5(n), n
        assert d[n] == n, n
    # every role can create in every database; per-database steps reached every database
    rows = conn.execute("SELECT count(*) FROM pg_roles r, pg_database d WHERE r.rolname = ANY(%s) "
                        "AND d.datname = ANY(%s) AND has_database_privilege(r.oid, d.oid, 'CREATE')",
                        (names, names)).fetchone()
    assert rows == (len(names) ** 2,)
    # and the plan for the same spec is now empty
    assert plan_spec(pg.url(), parse_spec(obj, superuser=SU), superuser=SU) == []
    assert apply(pg, obj).statements == 0


def test_hostile_names_in_every_delta(pg, conn):
    a, b = 'del"ta $$ \\ ;\n 🐘 A', "Δ renamed 'x'"
    apply(pg, make_spec(roles=[(a, md5(a)), ("hd_keep", None), (a + " gone", None)],
                        dbs=[(a, a), (a + " db2", "hd_keep")]))
    obj = make_spec(roles=[(b, md5(b)), ("hd_keep", None)], dbs=[(b, b)],
                    deltas=[("rename_role", a, b), ("delete_role", a + " gone"), ("rename_db", a, b),
                            ("delete_db", a + " db2")])
    apply(pg, obj)
    r, d = roles(conn), databases(conn)
    assert a not in r and a + " gone" not in r and r[b] == "md5" + md5(b)
    assert a not in d and a + " db2" not in d and d[b] == b
    assert apply(pg, obj).statements == 0


# -- deltas -------------------------------------------------------------------------------

def test_rename_role_resets_the_md5_password(pg, conn):
    apply(pg, make_spec(roles=[("rr_old", md5("rr_old"))], dbs=[("rr_db", "rr_old")]))
    conn.execute("CREATE TABLE rr_t (i int)")
    conn.execute("ALTER TABLE rr_t OWNER TO rr_old")
    obj = make_spec(roles=[("rr_new", md5("rr_new"))], dbs=[("rr_db", "rr_new")],
                    deltas=[("rename_role", "rr_old", "rr_new")])
    watch = LogWatch(pg)
    report = apply(pg, obj)
    assert report.statements == 2  # RENAME, then the password the rename cleared
    r = roles(conn)
    assert "rr_old" not in r and r["rr_new"] == "md5" + md5("rr_new")
    assert databases(conn)["rr_db"] == "rr_new"
    assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'rr_t'").fetchone() == ("rr_new",)
    # the roles step carries a password hash: none of it reaches the log (executor.QUIET_SQL)
    logged = "\n".join(watch.statements())
    assert "RENAME TO" not in logged and md5("rr_new") not in logged  # log_statement = ddl here
    assert apply(pg, obj).statements == 0  # old gone: the delta is skipped


def test_rename_role_skipped_when_new_name_exists(pg, conn):
    apply(pg, make_spec(roles=[("rs_a", None), ("rs_b", None)]))
    report = apply(pg, make_spec(roles=[("rs_b", None)], deltas=[("rename_role", "rs_a", "rs_b")]))
    assert report.statements == 0 and any("already exists" in n for n in report.notes)
    assert {"rs_a", "rs_b"} <= set(roles(conn))


def test_delete_role_owning_objects_in_several_databases(pg, conn):
    apply(pg, make_spec(roles=[("dr_owner1", None), ("dr_owner2", None), ("dr_doomed", None)],
                        dbs=[("dr_db1", "dr_owner1"), ("dr_db2", "dr_owner2")]))
    for db in ("dr_db1", "dr_db2"):
        with psycopg.connect(pg.conninfo(db), autocommit=True) as c:
            c.execute("CREATE TABLE t (i int)")
            c.execute("ALTER TABLE t OWNER TO dr_doomed")
            c.execute("CREATE TABLE other (i int)")
            c.execute("GRANT SELECT ON other TO dr_doomed")
    obj = make_spec(roles=[("dr_owner1", None), ("dr_owner2", None)],
                    dbs=[("dr_db1", "dr_owner1"), ("dr_db2", "dr_owner2")],
                    deltas=[("delete_role", "dr_doomed")])
    report = apply(pg, obj)
    assert report.statements == 2 + 2 + 1
    assert "dr_doomed" not in roles(conn)
    assert in_db(pg, "dr_db1", "SELECT tableowner FROM pg_tables WHERE tablename = 't'") == [("dr_owner1",)]
    assert in_db(pg, "dr_db2", "SELECT tableowner FROM pg_tables WHERE tablename = 't'") == [("dr_owner2",)]
    assert apply(pg, obj).statements == 0


def test_failed_role_deletion_rolls_back_all_drops(pg, conn):
    apply(pg, make_spec(roles=[("fd_a", None), ("fd_b", None)]))
    # fd_b owns a database the spec does not list: DROP ROLE must fail, and fd_a must survive
    conn.execute("CREATE DATABASE fd_elsewhere OWNER fd_b")
    obj = make_spec(deltas=[("delete_role", "fd_a"), ("delete_role", "fd_b")])
    with pytest.raises(ApplyError) as err:
        apply(pg, obj)
    msg = str(err.value)
    assert 'DROP ROLE IF EXISTS "fd_b"' in msg and "cannot be dropped" in msg and err.value.sqlstate
    assert {"fd_a", "fd_b"} <= set(roles(conn))
    conn.execute("DROP DATABASE fd_elsewhere")
    apply(pg, obj)
    assert not {"fd_a", "fd_b"} & set(roles(conn))


def test_rename_and_delete_database(pg, conn):
    apply(pg, make_spec(roles=[("db_o", None)], dbs=[("db_old", "db_o"), ("db_doomed", "db_o")]))
    in_db(pg, "db_old", "CREATE TABLE kept AS SELECT 42 AS answer")
    # someone is connected to the doomed database: WITH (FORCE) still drops it
    other = psycopg.connect(pg.conninfo("db_doomed"), autocommit=True)
    obj = make_spec(roles=[("db_o", None)], dbs=[("db_new", "db_o")],
                    deltas=[("rename_db", "db_old", "db_new"), ("delete_db", "db_doomed")])
    report = apply(pg, obj)
    assert report.statements == 2
    d = databases(conn)
    assert "db_old" not in d and "db_doomed" not in d and d["db_new"] == "db_o"
    assert in_db(pg, "db_new", "SELECT answer FROM kept") == [(42,)]
    assert other.broken or other.closed or _dead(other)
    assert apply(pg, obj).statements == 0


def _dead(c) -> bool:
    try:
        c.execute("SELECT 1")
        return False
    except psycopg.Error:
        return True


def test_owner_change_and_schema_public_rule(pg, conn):
    apply(pg, make_spec(roles=[("oc_a", None), ("oc_b", None)], dbs=[("oc_db", "oc_a")]))
    # a database whose schema public the admin owns (as on PG14 or a restored dump)
    in_db(pg, "oc_db", f"ALTER SCHEMA public OWNER TO {SU}")
    obj = make_spec(roles=[("oc_a", None), ("oc_b", None)], dbs=[("oc_db", "oc_b")])
    report = apply(pg, obj)
    assert databases(conn)["oc_db"] == "oc_b"
    assert in_db(pg, "oc_db", "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'") == [
        ("oc_b",)]
    assert report.statements == 3  # owner change, GRANT CREATE to the old owner, schema owner
    assert apply(pg, obj).statements == 0


def test_password_changes_md5_scram_null(pg, conn):
    name = "pw_user"
    apply(pg, make_spec(roles=[(name, md5(name))]))
    assert roles(conn)[name] == "md5" + md5(name)
    apply(pg, make_spec(roles=[(name, md5(name, "other"))]))
    assert roles(conn)[name] == "md5" + md5(name, "other")
    apply(pg, make_spec(roles=[(name, SCRAM)]))
    assert roles(conn)[name] == SCRAM
    apply(pg, make_spec(roles=[(name, "md5" + md5(name))]))  # prefixed md5 in the spec
    assert roles(conn)[name] == "md5" + md5(name)
    apply(pg, make_spec(roles=[(name, None)]))
    assert roles(conn)[name] is None
    assert apply(pg, make_spec(roles=[(name, None)])).statements == 0


# -- idempotency --------------------------------------------------------------------------

def test_second_apply_is_quiet(pg, conn):
    names = ["iq_" + n for n in HOSTILE[:8]]
    apply(pg, make_spec(roles=[("iq_gone", None), ("iq_old", None)], dbs=[("iq_olddb", "iq_old")]))
    obj = make_spec(
        roles=[(n, md5(n)) for n in names] + [("web_access", None), ("iq_new", md5("iq_new"))],
        dbs=[(n, names[i % len(names)]) for i, n in enumerate(names)] + [("iq_newdb", "iq_new")],
        deltas=[("delete_role", "iq_gone"), ("rename_role", "iq_old", "iq_new"),
                ("rename_db", "iq_olddb", "iq_newdb"), ("delete_db", "iq_never_existed")],
        settings=[("shared_preload_libraries", "pg_stat_statements")])
    watch = LogWatch(pg)
    first = apply(pg, obj)
    logged = watch.statements()
    assert first.statements > 0 and logged
    assert any("GRANT CREATE ON SCHEMA public TO" in s for s in logged)
    assert any("CREATE EXTENSION" in s for s in logged)
    watch = LogWatch(pg)
    second = apply(pg, obj)
    assert second.statements == 0
    assert watch.statements() == []  # no DDL, no GRANT: nothing at all
    assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
    for n in names:
        assert in_db(pg, n, "SELECT has_schema_privilege('web_access', 'public', 'CREATE')") == [(True,)]


# -- failures -----------------------------------------------------------------------------

def test_rejected_database_option_raises_a_clear_error(pg, conn):
    obj = make_spec(roles=[("bo_user", None)],
                    dbs=[("bo_ok", "bo_user"),
                         ("bo_bad", "bo_user", [{"name": "lc_collate", "value": "no_such_locale",
                                                 "vartype": "string"}])])
    with pytest.raises(ApplyError) as err:
        apply(pg, obj)
    msg = str(err.value)
    assert "bo_bad" in msg and "no_such_locale" in msg and "CREATE DATABASE" in msg
    assert err.value.dbname == "postgres"
    assert "bo_bad" not in databases(conn)


def test_plan_errors_run_nothing(pg, conn):
    watch = LogWatch(pg)
    with pytest.raises(PlanError, match="connstr superuser"):
        apply(pg, make_spec(roles=[("pe_new", None)], deltas=[("delete_role", SU)]))
    with pytest.raises(PlanError, match="two rename operations"):
        apply(pg, make_spec(deltas=[("rename_role", "x1", "pe_y"), ("rename_role", "x2", "pe_y")]))
    assert watch.statements() == [] and "pe_new" not in roles(conn)


def test_dry_run_shows_redacted_statements_and_changes_nothing(pg, conn):
    obj = make_spec(roles=[("dry_user", md5("dry_user"))], dbs=[("dry_db", "dry_user")],
                    settings=[("shared_preload_libraries", "pg_stat_statements")])
    spec = parse_spec(obj, superuser=SU)
    watch = LogWatch(pg)
    rows = plan_spec(pg.url(), spec, superuser=SU)
    assert rows[:3] == [
        ("postgres", 'CREATE ROLE "dry_user" LOGIN PASSWORD [redacted]'),
        ("postgres", 'GRANT pg_read_all_data, pg_write_all_data TO "dry_user"'),
        ("postgres", 'CREATE DATABASE "dry_db" OWNER "dry_user"'),
    ]
    text = format_plan(dry_run(pg.url(), spec, superuser=SU))
    assert md5("dry_user") not in text and "[redacted]" in text
    assert watch.statements() == [] and "dry_user" not in roles(conn)


def test_connections_are_reused(pg):
    names = [f"cr_db{i}" for i in range(12)]
    obj = make_spec(roles=[("cr_o", None), ("cr_p", None)], dbs=[(n, "cr_o") for n in names])
    with Connections(pg.url(), max_open=20) as conns:
        apply(pg, obj, connections=conns)
        # maintenance + parallel CREATE DATABASE workers (3) + one per database
        assert conns.opened <= 1 + 3 + len(names)
    with Connections(pg.url(), max_open=20) as conns:
        assert apply(pg, obj, connections=conns).statements == 0
        assert conns.opened == 1 + len(names)


def test_connstr_user_must_be_superuser(pg, conn):
    conn.execute("CREATE ROLE nosu LOGIN")
    with pytest.raises(Exception, match="not a superuser"):
        apply_spec(pg.url().replace(f"{SU}@", "nosu@"), parse_spec(make_spec()), superuser="nosu")


def test_large_transaction_in_several_batches_is_still_atomic(pg, conn, monkeypatch):
    from compute.reconcile import execute, executor, plan, snapshot
    monkeypatch.setattr(executor, "MAX_BATCH_STATEMENTS", 3)
    names = [f"bt_{i}" for i in range(10)]
    # make the 15th of 20 statements fail: create the role behind the planner's back
    spec = parse_spec(make_spec(roles=[(n, md5(n)) for n in names]), superuser=SU)
    with Connections(pg.url()) as conns:
        p = plan(snapshot(conns, spec, local=False), spec, superuser=SU, phases=(1,))
        conn.execute("CREATE ROLE bt_7")
        with pytest.raises(ApplyError, match='role "bt_7" already exists') as err:
            execute(conns, p)
        assert err.value.statement == 'CREATE ROLE "bt_7" LOGIN PASSWORD [redacted]'
        assert md5("bt_7") not in str(err.value)
        assert not set(names[:7]) & set(roles(conn))  # earlier batches rolled back too
        conn.execute("DROP ROLE bt_7")
        assert execute(conns, p) == 20
    assert all(roles(conn)[n] == "md5" + md5(n) for n in names)
