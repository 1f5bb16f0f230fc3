"""Spec parsing and validation (pure)."""

import json

import pytest

from compute.model.spec import SpecError, parse_spec, parse_spec_text

TENANT, TIMELINE = "a" * 32, "b" * 32


def spec(**cluster_extra):
    cluster = {"cluster_id": "c", "name": "n", "roles": [], "databases": [], "settings": []}
    cluster.update(cluster_extra)
    return {"format_version": 1.0, "cluster": cluster}


def neon_settings(**over):
    s = {"neon.pageserver_connstring": "postgresql://no_user@127.0.0.1:6400",
         "neon.tenant_id": TENANT, "neon.timeline_id": TIMELINE, "neon.safekeepers": "sk1:5454, sk2:5454"}
    s.update(over)
    return [{"name": k, "value": v, "vartype": "string"} for k, v in s.items() if v is not None]


def test_minimal_spec_is_embedded_default():
    parsed = parse_spec(spec())
    assert parsed.storage is None and parsed.mode == "Primary"
    assert parsed.cluster.roles == () and parsed.delta_operations == ()


def test_neon_settings_give_storage():
    parsed = parse_spec(spec(settings=neon_settings()))
    assert parsed.storage.tenant_id == TENANT and parsed.storage.timeline_id == TIMELINE
    assert parsed.storage.safekeepers == ("sk1:5454", "sk2:5454")


def test_top_level_fields_win_over_settings():
    doc = spec(settings=neon_settings())
    doc.update(tenant_id="c" * 32, timeline_id="d" * 32, pageserver_connstring="postgresql://x@h:1",
               safekeeper_connstrings=["a:1"])
    parsed = parse_spec(doc)
    assert parsed.storage.tenant_id == "c" * 32 and parsed.storage.pageserver_connstring == "postgresql://x@h:1"
    assert parsed.storage.safekeepers == ("a:1",)


def test_unknown_keys_are_accepted():
    doc = spec()
    doc["timestamp"] = "whenever"
    doc["startup_tracing_context"] = {"x": 1}
    doc["cluster"]["whatever"] = [1, 2]
    parse_spec(doc)


@pytest.mark.parametrize("mode,expected", [("Primary", ("Primary", None)), ("Replica", ("Replica", None)),
                                           ({"Static": "0/16B9188"}, ("Static", "0/16B9188"))])
def test_modes(mode, expected):
    doc = spec()
    doc["mode"] = mode
    # read-only modes need somewhere to read from (tests/unit/test_modes.py covers the refusals)
    doc.update(pageserver_connstring="postgresql://no_user@127.0.0.1:6400", tenant_id="0" * 32, timeline_id="1" * 32)
    parsed = parse_spec(doc)
    assert (parsed.mode, parsed.static_lsn) == expected


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("format_version"), "format_version"),
    (lambda d: d.update(format_version=2.0), "format_version"),
    (lambda d: d.update(format_version=10 ** 5000), "format_version"),
    (lambda d: d.update(format_version=True), "format_version"),
    (lambda d: d.pop("cluster"), "cluster"),
    (lambda d: d.update(cluster=[]), "cluster"),
    (lambda d: d["cluster"].update(roles={}), "cluster.roles"),
    (lambda d: d["cluster"].update(roles=[{"name": ""}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(roles=[{"name": "a\x00b"}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(roles=[{"name": "x" * 64}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(roles=[{"name": "é" * 32}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(roles=[{"name": 5}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(roles=[{"name": "a", "encrypted_password": "hunter2"}]),
     "cluster.roles[0].encrypted_password"),
    (lambda d: d["cluster"].update(roles=[{"name": "a"}, {"name": "a"}]), "cluster.roles"),
    # Postgres would take a malformed verifier for a plain password and hash it.
    (lambda d: d["cluster"].update(roles=[{"name": "a", "encrypted_password":
                                           "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"}]),
     "cluster.roles[0].encrypted_password"),
    (lambda d: d["cluster"].update(roles=[{"name": "pg_monitor"}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(roles=[{"name": "public"}]), "cluster.roles[0].name"),
    (lambda d: d["cluster"].update(databases=[{"name": "db", "owner": "nobody"}]), "cluster.databases[0].owner"),
    (lambda d: d["cluster"].update(databases=[{"name": "db"}]), "cluster.databases[0].owner"),
    (lambda d: d["cluster"].update(settings=[{"name": "work_mem", "value": "1\nfsync=off"}]),
     "cluster.settings[0].value"),
    (lambda d: d["cluster"].update(settings=[{"name": "x\ny", "value": "1"}]), "cluster.settings[0].name"),
    (lambda d: d["cluster"].update(settings=[{"name": "port", "value": "1 2", "vartype": "integer"}]),
     "cluster.settings[0].value"),
    (lambda d: d["cluster"].update(settings=[{"name": "port", "value": 5432, "vartype": "integer"}]),
     "cluster.settings[0].value"),
    (lambda d: d["cluster"].update(settings=neon_settings(**{"neon.tenant_id": "xyz"})), "tenant_id"),
    (lambda d: d["cluster"].update(settings=neon_settings(**{"neon.tenant_id": "A" * 32})), "tenant_id"),
    (lambda d: d["cluster"].update(settings=neon_settings(**{"neon.timeline_id": None})), "timeline_id"),
    (lambda d: d["cluster"].update(settings=neon_settings(**{"neon.pageserver_connstring": None})),
     "pageserver_connstring"),
    (lambda d: d.update(delta_operations=[{"action": "drop_everything", "name": "x"}]), "delta_operations[0].action"),
    (lambda d: d.update(delta_operations=[{"action": "rename_role", "name": "x"}]), "delta_operations[0].new_name"),
    (lambda d: d.update(delta_operations=[{"action": "delete_role", "name": "pg_read_all_data"}]),
     "delta_operations[0].name"),
    (lambda d: d.update(delta_operations=[{"action": "rename_role", "name": "x", "new_name": "pg_x"}]),
     "delta_operations[0].new_name"),
    (lambda d: d.update(mode="Sideways"), "mode"),
    (lambda d: d.update(mode={"Static": "not-an-lsn"}), "mode"),
    (lambda d: d.update(storage_auth_token="a b"), "storage_auth_token"),
])
def test_invalid_specs_name_the_field(mutate, field):
    doc = spec()
    mutate(doc)
    with pytest.raises(SpecError) as e:
        parse_spec(doc)
    assert e.value.field == field
    assert str(e.value).startswith(f"invalid spec: {field}: ")
    assert "\n" not in str(e.value)


def test_password_never_echoed():
    doc = spec(roles=[{"name": "a", "encrypted_password": "my secret password"}])
    with pytest.raises(SpecError) as e:
        parse_spec(doc)
    assert "secret" not in str(e.value)


def test_superuser_may_own_databases():
    doc = spec(databases=[{"name": "db", "owner": "cloud_admin"}])
    with pytest.raises(SpecError):
        parse_spec(doc)
    assert parse_spec(doc, superuser="cloud_admin").cluster.databases[0].owner == "cloud_admin"


def test_hostile_names_are_kept_verbatim():
    names = ['we"ird', "new\nline", "semi;colon", "MiXeD", "$$dollar$$", "back\\slash", "emoji 🐘", "x" * 63]
    doc = spec(roles=[{"name": n} for n in names], databases=[{"name": n, "owner": n} for n in names])
    parsed = parse_spec(doc)
    assert [r.name for r in parsed.cluster.roles] == names


def test_text_errors():
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec_text("{")
    with pytest.raises(SpecError, match="larger than"):
        parse_spec_text(" " * (16 * 1024 * 1024 + 1))
    assert parse_spec_text(json.dumps(spec())).format_version == 1.0


@pytest.mark.parametrize("value,vartype", [
    ("on", "bool"), ("OFF", "bool"), ("true", "bool"), ("0", "bool"), ("128MB", "integer"),
    ("-1", "integer"), ("0x1F", "integer"), ("0.9", "real"), (".5", "real"), ("2ms", "real"),
    ("replica", "enum"), ("debug5", "enum"), ("neon.x", "enum"), ("a-b:c", "enum"), ("42", "enum"),
])
def test_plain_bare_values_are_accepted(value, vartype):
    from compute.postgres.conf import render_postgresql_conf
    spec = parse_spec({"format_version": 1.0, "cluster": {"settings": [{"name": "x.y", "value": value,
                                                                         "vartype": vartype}]}})
    assert f"x.y = {value}\n" in render_postgresql_conf(spec.cluster.settings)


@pytest.mark.parametrize("name", ["include", "INCLUDE_DIR", "Include_If_Exists", "config_file", "hba_file",
                                  "ident_file", "data_directory"])
def test_settings_that_move_files_are_refused(name):
    with pytest.raises(SpecError) as info:
        parse_spec({"format_version": 1.0, "cluster": {"settings": [
            {"name": "work_mem", "value": "4MB", "vartype": "string"},
            {"name": name, "value": "/tmp/x", "vartype": "string"}]}})
    assert info.value.field == "cluster.settings[1].name" and "not allowed" in str(info.value)
    assert "\n" not in str(info.value)
