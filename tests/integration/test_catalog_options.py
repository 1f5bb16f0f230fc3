"""role.options and drop_subscriptions_before_start applied to a real PostgreSQL 15 (issue 18,
items 9 and 10): apply_spec as the lifecycle driver runs it, then the catalog read back."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from compute.model.spec import SpecError, parse_spec
from compute.reconcile import PlanError, apply_spec, dry_run, format_plan
from tests.support.pgcluster import running_cluster

SU = "cloud_admin"
TENANT = "9ef87a5bf0d92544f6fafeeb3239695c"
TIMELINE = "de200bd42b49cc1814412c7e592dd6e9"
OTHER_TIMELINE = "0123456789abcdef0123456789abcdef"
MD5 = "0" * 32


@pytest.fixture(scope="module")
def pg():
    with running_cluster(superuser=SU, wal_level="logical", max_replication_slots="10",
                         max_wal_senders="10") as cluster:
        yield cluster


def su(pg, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(make_conninfo(pg.url(), dbname=dbname), autocommit=True)


def role_spec(name: str, *options, **top) -> dict:
    return {"format_version": 1.0, **top,
            "cluster": {"roles": [{"name": name, "encrypted_password": MD5,
                                   "options": [{"name": n, "value": v, "vartype": "string"} for n, v in options]}]}}


def apply(pg, doc: dict):
    spec = parse_spec(doc, superuser=SU)
    return apply_spec(pg.url(), spec, superuser=SU), spec


def attributes(pg, name: str) -> dict:
    with su(pg) as c:
        row = c.execute("SELECT rolsuper, rolcanlogin, rolcreatedb, rolcreaterole, rolinherit, rolreplication, "
                        "rolbypassrls, rolconnlimit, rolvaliduntil::text FROM pg_authid WHERE rolname = %s",
                        (name,)).fetchone()
    if row is None:
        return {}
    keys = ("super", "login", "createdb", "createrole", "inherit", "replication", "bypassrls", "connlimit", "until")
    return dict(zip(keys, row))


# -- role.options -------------------------------------------------------------------------

def test_options_are_applied_on_create_and_then_nothing_is_planned(pg):
    doc = role_spec("opt_app", ("CREATEDB", None), ("connection_limit", "7"), ("VALID UNTIL", "2030-01-31T12:00:00Z"),
                    ("NOINHERIT", None))
    report, spec = apply(pg, doc)
    a = attributes(pg, "opt_app")
    assert a == {"super": False, "login": True, "createdb": True, "createrole": False, "inherit": False,
                 "replication": False, "bypassrls": False, "connlimit": 7, "until": "2030-01-31 12:00:00+00"}
    assert dry_run(pg.url(), spec, superuser=SU).phase(1).is_empty  # read back: the same values
    report, _ = apply(pg, doc)
    assert report.statements == 0


def test_options_are_applied_on_alter_without_a_password_change(pg):
    apply(pg, role_spec("alter_app"))
    assert attributes(pg, "alter_app")["createdb"] is False
    report, _ = apply(pg, role_spec("alter_app", ("CREATEDB", None), ("NOLOGIN", None), ("CONNECTION LIMIT", "-1"),
                                     ("VALID UNTIL", "infinity")))
    a = attributes(pg, "alter_app")
    assert (a["createdb"], a["login"], a["connlimit"], a["until"]) == (True, False, -1, "infinity")
    assert report.statements == 1
    # Options the spec no longer names are left as they are; LOGIN given back when asked.
    apply(pg, role_spec("alter_app", ("LOGIN", None)))
    a = attributes(pg, "alter_app")
    assert (a["createdb"], a["login"]) == (True, True)


def test_createrole_is_refused_on_this_pg15_and_nothing_is_applied(pg):
    doc = role_spec("cr_app", ("CREATEROLE", None))
    doc["cluster"]["databases"] = [{"name": "cr_db", "owner": "cr_app"}]
    with pytest.raises(PlanError) as info:
        apply(pg, doc)
    assert "role 'cr_app': option CREATEROLE is refused" in str(info.value)
    assert attributes(pg, "cr_app") == {}
    with su(pg) as c:
        assert c.execute("SELECT count(*) FROM pg_database WHERE datname = 'cr_db'").fetchone()[0] == 0


@pytest.mark.parametrize("options", [
    [("SUPERUSER", None)],
    [("LOGIN", None), ("BYPASSRLS", None)],
    [("REPLICATION", None)],
    [("VALID UNTIL", "2030-01-01'; ALTER ROLE hostile_app SUPERUSER; --")],
    [("CONNECTION LIMIT", "1 SUPERUSER")],
    [("IN ROLE", "pg_execute_server_program")],
])
def test_hostile_options_never_reach_postgres(pg, options):
    """Attack: a spec role asking for attributes it may not hold, or smuggling SQL in a value.
    The spec is invalid (a start exits 1, /configure answers 400): nothing is applied."""
    apply(pg, role_spec("hostile_app"))
    before = attributes(pg, "hostile_app")
    with pytest.raises(SpecError) as info:
        apply(pg, role_spec("hostile_app", *options))
    assert "role 'hostile_app'" in str(info.value)
    assert attributes(pg, "hostile_app") == before and before["super"] is False


# -- drop_subscriptions_before_start ----------------------------------------------------------

def make_subscription(pg, dbname: str, name: str, slot: str) -> None:
    """A subscription with a running worker, to this same cluster's database `pub` (its slot
    made first: a subscription to its own cluster cannot create one)."""
    with su(pg, "pub") as c:
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    conninfo = f"host=127.0.0.1 port={pg.port} user={SU} dbname=pub"
    with su(pg, dbname) as c:
        c.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
        c.execute(f"CREATE SUBSCRIPTION \"{name}\" CONNECTION '{conninfo}' PUBLICATION p "
                  f"WITH (create_slot = false, slot_name = '{slot}', copy_data = false)")


def subscriptions(pg) -> list[tuple[str, str]]:
    with su(pg) as c:
        return c.execute("SELECT d.datname, s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                         "ORDER BY 1, 2").fetchall()


def workers(pg) -> int:
    with su(pg) as c:
        return c.execute("SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL").fetchone()[0]


def drop_spec(timeline: str = TIMELINE, flag: bool = True) -> dict:
    return {"format_version": 1.0, "drop_subscriptions_before_start": flag,
            "tenant_id": TENANT, "timeline_id": timeline, "pageserver_connstring": "postgresql://ps:6400",
            "cluster": {"roles": [], "databases": [{"name": "shop", "owner": SU}]}}


@pytest.fixture
def inherited(pg):
    """A branch's inherited subscriptions: one in spec database `shop`, one in `postgres`, each
    with a running apply worker."""
    with su(pg) as c:
        for db in ("pub", "shop"):
            c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        c.execute("DROP SCHEMA IF EXISTS neon CASCADE")
        c.execute("CREATE DATABASE pub")
        c.execute("CREATE DATABASE shop")
    with su(pg, "pub") as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
        c.execute("CREATE PUBLICATION p FOR TABLE t")
    make_subscription(pg, "shop", "inherited one", "slot1")
    make_subscription(pg, "postgres", "inherited_two", "slot2")
    from tests.support.waiting import wait_for
    wait_for(lambda: workers(pg) == 2, 30, "two apply workers")
    yield
    with su(pg) as c:
        for db, name in subscriptions(pg):
            with su(pg, db) as d:
                d.execute(f'ALTER SUBSCRIPTION "{name}" DISABLE')
                d.execute(f'ALTER SUBSCRIPTION "{name}" SET (slot_name = NONE)')
                d.execute(f'DROP SUBSCRIPTION "{name}"')
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
        c.execute("DROP SCHEMA IF EXISTS neon CASCADE")


def test_inherited_subscriptions_are_dropped_once_per_timeline(pg, inherited):
    apply(pg, drop_spec(flag=False))
    assert len(subscriptions(pg)) == 2  # not asked: untouched

    # `compute-ctl plan` shows the drops and runs nothing
    shown = format_plan(dry_run(pg.url(), parse_spec(drop_spec(), superuser=SU), superuser=SU))
    assert 'DROP SUBSCRIPTION "inherited one";' in shown and 'DROP SUBSCRIPTION "inherited_two";' in shown
    assert f"VALUES (1, '{TIMELINE}')" in shown
    assert len(subscriptions(pg)) == 2

    apply(pg, drop_spec())
    assert subscriptions(pg) == [] and workers(pg) == 0
    with su(pg) as c:
        assert c.execute("SELECT id, timeline_id FROM neon.drop_subscriptions_done").fetchall() == [(1, TIMELINE)]
        # the publisher's slots are left alone (slot_name = NONE), as HEAD does
        assert c.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 2

    # A subscription made on this timeline afterwards survives every later apply (restart,
    # /configure) with the same spec: the record says done.
    make_subscription(pg, "shop", "mine", "slot3")
    report, _ = apply(pg, drop_spec())
    assert subscriptions(pg) == [("shop", "mine")] and report.statements == 0

    # A branch of this branch: another timeline drops again and updates the one row.
    apply(pg, drop_spec(OTHER_TIMELINE))
    assert subscriptions(pg) == []
    with su(pg) as c:
        assert c.execute("SELECT id, timeline_id FROM neon.drop_subscriptions_done").fetchall() == [(1, OTHER_TIMELINE)]


def test_a_tenant_made_record_table_is_refused_and_nothing_is_dropped(pg, inherited):
    """Attack: a role of the tenant's makes neon.drop_subscriptions_done first (with a trigger
    that would run as our superuser). The apply fails before any statement; the table is never
    written to."""
    with su(pg) as c:
        c.execute("DROP ROLE IF EXISTS tenant_owner")
        c.execute("CREATE ROLE tenant_owner LOGIN")
        c.execute("CREATE SCHEMA neon AUTHORIZATION tenant_owner")
        c.execute("SET ROLE tenant_owner")
        c.execute("CREATE TABLE neon.drop_subscriptions_done (id int PRIMARY KEY, timeline_id text)")
        c.execute("RESET ROLE")
    with pytest.raises(PlanError) as info:
        apply(pg, drop_spec())
    assert "not a plain table owned by a superuser" in str(info.value)
    assert len(subscriptions(pg)) == 2
    with su(pg) as c:
        assert c.execute("SELECT count(*) FROM neon.drop_subscriptions_done").fetchone()[0] == 0
        c.execute("DROP SCHEMA neon CASCADE")
        c.execute("DROP ROLE tenant_owner")


def test_a_database_being_deleted_loses_its_subscriptions_first(pg, inherited):
    """DROP DATABASE refuses a database with subscriptions; HEAD drops them first (pre-dropdb)."""
    doc = drop_spec(flag=False)
    doc["cluster"]["databases"] = []
    doc["delta_operations"] = [{"action": "delete_db", "name": "shop"}]
    apply(pg, doc)
    assert subscriptions(pg) == [("postgres", "inherited_two")]
    with su(pg) as c:
        assert c.execute("SELECT count(*) FROM pg_database WHERE datname = 'shop'").fetchone()[0] == 0
