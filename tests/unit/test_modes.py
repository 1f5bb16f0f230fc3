"""Modes as data (compute/model/modes.py), the clone command (compute/postgres/replica.py), the mode checks of
the spec, and the API's answers for read-only computes (/promote, /check_writability).

This file: no process; against a pageserver peer and real postgres:
tests/integration/test_modes.py."""

from __future__ import annotations

import json
import os
import time

import falcon.testing
import jwt
import pytest
from psycopg.conninfo import conninfo_to_dict

from compute.model import modes
from compute.postgres import replica
from compute.api.app import create_app
from compute.model.spec import SpecError, parse_spec
from tests.support.api_helpers import (TENANT, TIMELINE, jwks_keys, launch_settings, make_state,
                                       minimal_spec, stored, write_jwks)

CONNINFO = "host=10.0.0.5 port=5432 user=replicator password=hunter2-secret application_name=r1"


def plain_spec(mode="Replica", **settings: str) -> dict:
    return {"format_version": 1.0, "mode": mode,
            "cluster": {"roles": [], "databases": [],
                        "settings": [{"name": k, "value": v, "vartype": "string"} for k, v in settings.items()]}}


def neon_spec(mode, safekeepers: str = "sk-1.local:5454,[::1]:6500,sk-3") -> dict:
    spec = minimal_spec()
    spec["cluster"]["settings"] = [s for s in spec["cluster"]["settings"] if s["name"] != "neon.safekeepers"]
    spec["cluster"]["settings"].append({"name": "neon.safekeepers", "value": safekeepers, "vartype": "string"})
    spec["mode"] = mode
    return spec


def settings_of(spec) -> dict[str, str | None]:
    return {o.name: o.value for o in modes.conf_settings(spec, "/pgdata")}


def test_plan_for_each_mode():
    primary = modes.plan_start(parse_spec(neon_spec("Primary")))
    assert (primary.source, primary.sync_safekeepers, primary.basebackup_lsn, primary.basebackup_replica,
            primary.standby, primary.catalog_sql) == ("pageserver", True, "0/0", False, False, True)
    static = modes.plan_start(parse_spec(neon_spec({"Static": "1/A0"})))
    assert (static.source, static.sync_safekeepers, static.basebackup_lsn, static.basebackup_replica,
            static.standby, static.catalog_sql) == ("pageserver", False, "1/A0", True, True, False)
    rep = modes.plan_start(parse_spec(neon_spec("Replica")))
    assert (rep.source, rep.sync_safekeepers, rep.basebackup_lsn, rep.basebackup_replica,
            rep.standby, rep.catalog_sql) == ("pageserver", False, "0/0", True, True, False)
    clone = modes.plan_start(parse_spec(plain_spec(primary_conninfo=CONNINFO)))
    assert (clone.source, clone.sync_safekeepers, clone.standby, clone.catalog_sql) == ("clone", False, True, False)
    default = modes.plan_start(parse_spec(plain_spec("Primary")))
    assert (default.source, default.standby, default.catalog_sql) == ("initdb", False, True)
    for spec in (neon_spec({"Static": "1/A0"}), neon_spec("Replica"), plain_spec(primary_conninfo=CONNINFO)):
        assert not modes.runs_catalog_sql(parse_spec(spec))
    assert modes.runs_catalog_sql(parse_spec(neon_spec("Primary")))


def test_primary_settings_are_the_specs_own():
    spec = parse_spec(neon_spec("Primary"))
    assert modes.conf_settings(spec, "/pgdata") == spec.cluster.settings


def test_static_settings_pin_the_lsn_and_hot_standby():
    raw = neon_spec({"Static": "0/16B9188"})
    raw["cluster"]["settings"] += [{"name": "Hot_Standby", "value": "off", "vartype": "bool"},
                                   {"name": "recovery_target_lsn", "value": "0/1", "vartype": "string"}]
    s = settings_of(parse_spec(raw))
    assert s["hot_standby"] == "on" and "Hot_Standby" not in s  # the spec cannot switch it off
    assert s["recovery_target_lsn"] == "0/16B9188"
    assert s["neon.compute_mode"] == "static" and s["recovery_prefetch"] == "off"
    assert "primary_conninfo" not in s


def test_neon_replica_streams_from_the_safekeepers_as_neon_configures_it():
    s = settings_of(parse_spec(neon_spec("Replica")))
    params = conninfo_to_dict(s["primary_conninfo"])
    assert params["host"] == "sk-1.local,::1,sk-3" and params["port"] == "5454,6500,5454"
    assert params["options"] == f"-c timeline_id={TIMELINE} tenant_id={TENANT}"
    assert (params["application_name"], params["replication"]) == ("replica", "true")
    assert s["neon.compute_mode"] == "replica" and s["hot_standby"] == "on"
    assert "recovery_target_lsn" not in s


def test_hostile_safekeeper_string_stays_one_quoted_value():
    s = settings_of(parse_spec(neon_spec("Replica", "evil' host=attacker password=x:5454")))
    params = conninfo_to_dict(s["primary_conninfo"])
    assert params["host"] == "evil' host=attacker password=x" and "password" not in params


def test_a_replica_keeps_its_own_primary_conninfo():
    raw = neon_spec("Replica")
    raw["cluster"]["settings"].append({"name": "primary_conninfo", "value": "host=sk port=1", "vartype": "string"})
    assert settings_of(parse_spec(raw))["primary_conninfo"] == "host=sk port=1"
    plain = settings_of(parse_spec(plain_spec(primary_conninfo="host=db1 user=r")))
    assert plain["primary_conninfo"] == "host=db1 user=r" and plain["hot_standby"] == "on"
    assert "neon.compute_mode" not in plain  # vanilla postgres: no neon settings of ours


@pytest.mark.parametrize("conninfo", [CONNINFO, "postgresql://replicator:hunter2-secret@10.0.0.5:5432/?application_name=r1"])
def test_the_replication_password_goes_to_the_passfile(conninfo):
    """postgres logs a changed primary_conninfo's value on reload: it must hold no password."""
    spec = parse_spec(plain_spec(primary_conninfo=conninfo))
    value = settings_of(spec)["primary_conninfo"]
    assert "hunter2" not in value
    params = conninfo_to_dict(value)
    assert params["passfile"] == "/pgdata/replication.pgpass"
    assert (params["host"], params["user"], params["application_name"]) == ("10.0.0.5", "replicator", "r1")
    assert modes.replication_password(spec) == "hunter2-secret"
    assert modes.replication_password(parse_spec(plain_spec(primary_conninfo="host=h"))) is None
    mixed = parse_spec(plain_spec(Primary_ConnInfo=conninfo))  # GUC names ignore case
    assert modes.primary_conninfo(mixed) == conninfo and modes.replication_password(mixed) == "hunter2-secret"
    assert "hunter2" not in settings_of(mixed)["Primary_ConnInfo"]


def test_lsn_order():
    assert modes.lsn_int("0/16B9188") < modes.lsn_int("0/16B9189") < modes.lsn_int("1/0")
    assert modes.lsn_int("FFFFFFFF/FFFFFFFF") == 2**64 - 1
    with pytest.raises(ValueError):
        modes.lsn_int("0/xyz")


def test_invalid_primary_conninfo_in_any_mode():
    raw = neon_spec("Replica")
    raw["cluster"]["settings"].append({"name": "Primary_Conninfo", "value": "host='x password=hunter2-secret",
                                       "vartype": "string"})
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert "not a valid" in str(e.value) and "hunter2" not in str(e.value)


@pytest.mark.parametrize("raw, field, words", [
    (plain_spec({"Static": "0/1"}), "mode", "needs a pageserver"),
    (plain_spec(), "mode", "needs a primary_conninfo"),
    (plain_spec(primary_conninfo="port=5432 user=r password=hunter2-secret"), "primary_conninfo", "host"),
    (plain_spec(primary_conninfo="host='unterminated password=hunter2-secret"), "primary_conninfo", "not a valid"),
])
def test_invalid_read_only_specs(raw, field, words):
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert field in e.value.field and words in str(e.value)
    assert "hunter2" not in str(e.value)


def test_clone_command_keeps_the_password_out_of_argv():
    argv, password = replica.clone_command("/pg/bin", "/data", CONNINFO + " replication=true dbname=x",
                                           "/run/c/.clone.pgpass")
    assert password == "hunter2-secret"
    assert argv[:8] == ["/pg/bin/pg_basebackup", "-D", "/data", "-X", "stream", "--checkpoint=fast", "--no-sync", "-d"]
    assert not any("hunter2" in a for a in argv)
    params = conninfo_to_dict(argv[-1])
    assert params["passfile"] == "/run/c/.clone.pgpass" and params["user"] == "replicator"
    assert "replication" not in params and "dbname" not in params
    argv, password = replica.clone_command("/b", "/d", "host=h user=r", "/p")
    assert password is None and "passfile" not in conninfo_to_dict(argv[-1])


def test_passfile_line_escapes_separators():
    assert modes.passfile_line("a:b\\c") == "*:*:*:*:a\\:b\\\\c\n"
    assert replica.mask("FATAL: pw hunter2 x", "hunter2") == "FATAL: pw [redacted] x"
    assert replica.mask("text", None) == "text"


def test_passfile_is_private_and_goes_away(tmp_path):
    replica.write_passfile(str(tmp_path), "pw:1")
    path = tmp_path / "replication.pgpass"
    assert path.read_text() == "*:*:*:*:pw\\:1\n" and (path.stat().st_mode & 0o777) == 0o600
    replica.write_passfile(str(tmp_path), None)
    assert not path.exists()
    replica.write_passfile(str(tmp_path), None)  # idempotent


def client(rt: str) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(rt))


def promote(c, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.simulate_post("/promote", body=data, headers={"Content-Type": "application/json", **(headers or {})})


PRIMARY_SPEC = plain_spec("Primary")


@pytest.mark.parametrize("mode", ["Primary", {"Static": "0/1"}])
def test_promote_is_412_unless_a_replica(tmp_path, mode):
    rt = str(tmp_path)
    store = make_state(rt, spec=neon_spec(mode))
    r = promote(client(rt), {"spec": PRIMARY_SPEC, "wal_flush_lsn": "0/1"})
    assert r.status_code == 412 and "is not replica" in r.json["error"]
    assert store.get("status") == "running" and store.get("spec")["mode"] == mode


@pytest.mark.parametrize("body, words", [
    (b"not json", "not valid JSON"),
    ({"wal_flush_lsn": "0/1"}, '{"spec"'),
    ({"spec": PRIMARY_SPEC, "wal_flush_lsn": "0/1; DROP"}, "wal_flush_lsn"),
    ({"spec": PRIMARY_SPEC, "wal_flush_lsn": 5}, "wal_flush_lsn"),
    ({"spec": {"format_version": 2}}, "format_version"),
    ({"spec": plain_spec(primary_conninfo=CONNINFO)}, "mode"),
    ({"spec": PRIMARY_SPEC}, "wal_flush_lsn is required"),  # a Neon replica needs the LSN
])
def test_promote_bad_requests_change_nothing(tmp_path, body, words):
    rt = str(tmp_path)
    store = make_state(rt, spec=neon_spec("Replica"))
    r = promote(client(rt), body)
    assert r.status_code == 400 and words in r.json["error"], r.json
    assert store.get("status") == "running" and store.get("spec")["mode"] == "Replica"


@pytest.mark.parametrize("status", ["init", "configuration", "configuration_pending", "failed", "empty"])
def test_promote_needs_a_running_compute(tmp_path, status):
    rt = str(tmp_path)
    store = make_state(rt, status=status, spec=plain_spec(primary_conninfo=CONNINFO))
    r = promote(client(rt), {"spec": PRIMARY_SPEC})
    assert r.status_code == 412 and "invalid compute status" in r.json["error"]
    assert store.get("status") == status


def test_promote_needs_a_token_under_jwks(tmp_path):
    rt = str(tmp_path)
    ed, _, jwks = jwks_keys()
    path = write_jwks(os.path.join(rt, "jwks.json"), jwks)
    store = make_state(rt, spec=plain_spec(primary_conninfo=CONNINFO),
                       launch=launch_settings(rt, jwks_path=path, compute_id="compute-1"))
    c = client(rt)
    assert promote(c, {"spec": PRIMARY_SPEC}).status_code == 400  # no token (HEAD: 400)
    forged = jwt.encode({"compute_id": "compute-1"}, "s" * 32, algorithm="HS256")
    assert promote(c, {"spec": PRIMARY_SPEC}, {"Authorization": f"Bearer {forged}"}).status_code == 401
    other = jwt.encode({"compute_id": "compute-2", "exp": time.time() + 300}, ed, algorithm="EdDSA")
    assert promote(c, {"spec": PRIMARY_SPEC}, {"Authorization": f"Bearer {other}"}).status_code == 403
    assert store.get("status") == "running"
    # With this compute's token the request gets past auth (and to the mode check).
    store.set(spec=stored(PRIMARY_SPEC))
    mine = jwt.encode({"compute_id": "compute-1", "exp": time.time() + 300}, ed, algorithm="EdDSA")
    assert promote(c, {"spec": PRIMARY_SPEC}, {"Authorization": f"Bearer {mine}"}).status_code == 412


@pytest.mark.parametrize("mode, shown", [("Replica", "replica"), ({"Static": "0/1"}, "static")])
def test_check_writability_says_read_only_without_writing(tmp_path, mode, shown):
    rt = str(tmp_path)
    # No postgres behind this connstr: the answer comes from the mode alone.
    make_state(rt, spec=neon_spec(mode), launch=launch_settings(rt, connstr="postgresql://cloud_admin@127.0.0.1:1/x"))
    r = client(rt).simulate_post("/check_writability")
    assert r.status_code == 500 and r.text.startswith(f"compute is read-only (mode {shown})")
    assert r.headers["content-type"].startswith("text/plain")


def test_plan_of_a_read_only_spec_is_no_sql(capsys):
    from compute.boot.plan_command import main
    # port 1: nothing listens, so the answer cannot come from a catalog
    rc = main(["-C", "postgresql://cloud_admin@127.0.0.1:1/postgres", "-s", json.dumps(neon_spec("Replica"))])
    assert rc == 0 and capsys.readouterr().out.startswith("-- mode Replica: no catalog SQL")


@pytest.mark.parametrize("running,new,refused,hint", [
    ("Primary", "Primary", False, None),
    ("Replica", "Replica", False, None),
    ({"Static": "1/A0"}, {"Static": "1/A0"}, False, None),
    ("Replica", "Primary", True, "/promote"),
    ("Primary", "Replica", True, "new compute"),
    ("Primary", {"Static": "1/A0"}, True, "new compute"),
    ({"Static": "1/A0"}, {"Static": "1/B0"}, True, "Static at 1/B0"),
    ({"Static": "1/A0"}, "Replica", True, "new compute"),
])
def test_live_mode_change_refused(running, new, refused, hint):
    reason = modes.live_mode_change_refused(parse_spec(neon_spec(running)), parse_spec(neon_spec(new)))
    assert (reason is not None) == refused, reason
    if refused:
        assert "mode cannot change" in reason and hint in reason


@pytest.mark.parametrize("running,new", [("Replica", "Primary"), ("Primary", {"Static": "1/A0"})])
def test_configure_refuses_a_mode_change_and_changes_nothing(tmp_path, running, new):
    rt = str(tmp_path)
    store = make_state(rt, status="running", spec=neon_spec(running), spec_generation=1,
                       launch=launch_settings(rt))
    r = falcon.testing.TestClient(create_app(rt)).simulate_post("/configure", json={"spec": neon_spec(new)})
    assert r.status_code == 412, r.text
    assert "mode cannot change" in r.json["error"]
    assert store.get_many(("status", "spec_generation")) == {"status": "running", "spec_generation": 1}
    assert store.get("spec")["mode"] == running
