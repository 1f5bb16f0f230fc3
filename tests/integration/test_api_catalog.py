"""GET /dbs_and_roles and GET /database_schema against a real PG15 (falcon TestClient on a real
state file), their guards, and auth under a JWKS.

This file: against a real PG15; the pure shapes: tests/unit/test_api_catalog.py."""

from __future__ import annotations

import os
import time

import falcon.testing
import psycopg
import pytest
from psycopg import sql

from compute.api.app import create_app
from tests.support.waiting import wait_for
from tests.support.api_helpers import jwks_keys, launch_settings, make_state, pg, write_jwks

__all__ = ['pg']  # the fixture

# Names a careless implementation would parse as a connection string or a shell word.
HOSTILE_DB = "dbname=postgres host=evil"
QUOTED_DB = "it's \"a\" db; $(touch /tmp/pwned)"
PASSWORD_HASH = "md5" + "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def catalog(pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("DROP ROLE IF EXISTS \"cat owner\"")
        su.execute(sql.SQL("CREATE ROLE \"cat owner\" LOGIN PASSWORD {}").format(sql.Literal(PASSWORD_HASH)))
        for db in (HOSTILE_DB, QUOTED_DB):
            su.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
            su.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier("cat owner")))
        su.execute("CREATE TABLE IF NOT EXISTS only_in_postgres (x int)")
    for db, table in ((HOSTILE_DB, "only_in_hostile"), (QUOTED_DB, "only_in_quoted")):
        with psycopg.connect(pg.conninfo(), dbname=db, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLE {} (id int primary key, note text)").format(sql.Identifier(table)))
    return pg


@pytest.fixture
def client(tmp_path, catalog):
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=catalog.url(),
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    return falcon.testing.TestClient(create_app(str(tmp_path)))


def test_dbs_and_roles_neon_shape_without_password_hashes(client):
    r = client.simulate_get("/dbs_and_roles")
    assert r.status_code == 200, r.text
    roles = {x["name"]: x for x in r.json["roles"]}
    assert roles["cat owner"] == {"name": "cat owner", "encrypted_password": None, "options": None}
    assert "cloud_admin" in roles
    dbs = {d["name"]: d for d in r.json["databases"]}
    assert dbs[HOSTILE_DB] == {"name": HOSTILE_DB, "owner": "cat owner", "options": None,
                               "restrict_conn": False, "invalid": False}
    assert dbs["template0"]["restrict_conn"] is True
    assert PASSWORD_HASH not in r.text and "SCRAM-SHA-256$" not in r.text


@pytest.mark.parametrize("db, table", [(HOSTILE_DB, "only_in_hostile"), (QUOTED_DB, "only_in_quoted")])
def test_database_schema_dumps_exactly_that_database(client, db, table):
    r = client.simulate_get("/database_schema", params={"database": db})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/sql")
    assert f"CREATE TABLE public.{table}" in r.text and "only_in_postgres" not in r.text
    assert "PostgreSQL database dump complete" in r.text


def test_database_schema_unknown_database_is_404(client):
    for name in ("nope", "postgres\x01", "' OR 1=1 --"):
        r = client.simulate_get("/database_schema", params={"database": name})
        assert (r.status_code, r.json) == (404, {"error": "database does not exist"}), name


@pytest.mark.parametrize("query", ["", "database=", "database=a&database=b", "database=" + "x" * 64,
                                   "database=a%00b", "other=postgres"])
def test_database_schema_bad_parameter_is_400(client, query):
    r = client.simulate_get("/database_schema", query_string=query)
    assert r.status_code == 400, r.text
    assert "error" in r.json


def test_both_need_a_token_under_jwks(tmp_path, catalog):
    import jwt
    ed, _, jwks = jwks_keys()
    path = write_jwks(str(tmp_path / "jwks.json"), jwks)
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=catalog.url(), jwks_path=path,
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    c = falcon.testing.TestClient(create_app(str(tmp_path)))
    good = {"Authorization": "Bearer " + jwt.encode({"compute_id": "compute-1", "exp": time.time() + 300}, ed, algorithm="EdDSA")}
    other = {"Authorization": "Bearer " + jwt.encode({"compute_id": "other", "exp": time.time() + 300}, ed, algorithm="EdDSA")}
    for path_, params in (("/dbs_and_roles", None), ("/database_schema", {"database": HOSTILE_DB})):
        assert c.simulate_get(path_, params=params).status_code == 400  # no token: HEAD's 400
        assert c.simulate_get(path_, params=params, headers={"Authorization": "Bearer x.y.z"}).status_code == 401
        assert c.simulate_get(path_, params=params, headers=other).status_code == 403
        assert c.simulate_get(path_, params=params, headers=good).status_code == 200


# -- /database_schema: spooled, bounded (issue 21, item 1) ----------------------------------
BIG_DB = "many tables"
BIG_TABLES = 400  # a dump of ~150 KB: more than a pipe (64 KiB) and pg_dump's first chunk hold


@pytest.fixture(scope="module")
def big_db(catalog):
    with psycopg.connect(catalog.conninfo(), autocommit=True) as su:
        su.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(BIG_DB)))
        su.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BIG_DB)))
    with psycopg.connect(catalog.conninfo(), dbname=BIG_DB, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN FOR i IN 1..%d LOOP EXECUTE format("
                     "'CREATE TABLE t%%s (id int primary key, a text, b timestamptz, c jsonb)', i); "
                     "END LOOP; END $$" % BIG_TABLES)
    return catalog


def dump_sessions(pg) -> list:
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        return conn.execute("SELECT pid, state FROM pg_stat_activity WHERE application_name = "
                            "'compute_ctl:database_schema'").fetchall()


def open_dump(app, dbname: str = BIG_DB):
    """The app's answer to GET /database_schema, body not read yet: (status, headers, body iterable)."""
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = status, dict(headers)
    env = falcon.testing.create_environ(path="/database_schema", query_string=f"database={dbname}",
                                        remote_addr="127.0.0.1")  # a loopback peer, as gunicorn sets it
    body = app(env, start_response)
    return got["status"], got["headers"], body


def test_database_schema_is_spooled_before_the_client_reads(tmp_path, big_db):
    """pg_dump has finished (its session, transaction and locks are gone) when the answer
    starts, however slowly the client then reads it: it never waits on the client."""
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=big_db.url(),
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    app = create_app(str(tmp_path))
    status, headers, body = open_dump(app)
    try:
        assert status.startswith("200"), status
        assert dump_sessions(big_db) == []  # nothing read yet, and pg_dump is done
        data = b"".join(body)
        assert len(data) > 100_000 and b"CREATE TABLE public.t400" in data
        assert b"PostgreSQL database dump complete" in data
    finally:
        body.close()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tmp")]


def test_database_schema_concurrent_dumps_are_bounded(tmp_path, big_db):
    from compute.api.catalog import MAX_CONCURRENT_DUMPS
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=big_db.url(),
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    app = create_app(str(tmp_path))
    held = [open_dump(app) for _ in range(MAX_CONCURRENT_DUMPS)]
    try:
        assert all(status.startswith("200") for status, _, _ in held)
        status, headers, body = open_dump(app)
        assert status.startswith("429"), status
        assert int(headers["retry-after"]) > 0
        assert b"too many schema dumps" in b"".join(body)
        held.pop()[2].close()  # a client finished (or went away): its slot is free again
        status, _, body = open_dump(app)
        assert status.startswith("200"), status
        held.append((status, None, body))
    finally:
        for _, _, body in held:
            body.close()


def test_database_schema_over_the_spool_bound_is_refused_and_pg_dump_ends(tmp_path, big_db):
    from compute.api.catalog import DatabaseSchema
    from compute.api.context import ApiContext
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=big_db.url(),
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    app = falcon.App()
    app.add_route("/database_schema", DatabaseSchema(ApiContext(str(tmp_path)), spool_max=20_000))
    r = falcon.testing.TestClient(app).simulate_get("/database_schema", params={"database": BIG_DB})
    assert r.status_code == 500 and "exceeds 20000 bytes" in r.json["error"], r.text
    wait_for(lambda: dump_sessions(big_db) == [], 10, "the killed pg_dump's session to end")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tmp")]
