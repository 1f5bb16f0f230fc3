"""Neon's own fixtures and test vectors, run against our parser and our postgresql.conf
rendering (issue 18, "Neon's own fixtures run as conformance tests").

The data files in tests/fixtures/neon/ are copies from neondatabase/neon at commit
6a35a3e9f149798df1b1761ee64099d8d75fbe90 (tests/fixtures/neon/README.md: which file, its blob
id). The expected texts below restate HEAD's cases (the Rust test or source named at each one);
where HEAD has no test of its own (the storage lines of write_postgres_conf), the expected text
is what compute_tools/src/config.rs writes, line by line.
"""

from __future__ import annotations

import copy
import json
import os

import pytest

from compute.model import modes
from compute.model.spec import SpecError, check_postgresql_conf, from_stored, parse_spec, to_document
from compute.postgres.conf import conf_value, neon_head_lines, render_postgresql_conf

NEON_COMMIT = "6a35a3e9f149798df1b1761ee64099d8d75fbe90"
HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "neon")
BLOBS = {  # file here -> (path at NEON_COMMIT, its git blob id)
    "compute_api_cluster_spec.json": ("libs/compute_api/tests/cluster_spec.json",
                                      "86ab8c6e32e9"),
    "compute_tools_cluster_spec_duplicate_sk.json": ("compute_tools/tests/cluster_spec.json", "439d80c057b0"),
    "docker_compose_config.json": ("docker-compose/compute_wrapper/var/db/postgres/configs/config.json",
                                   "60e232425b3d"),
}
TENANT, TIMELINE = "b0554b632bd4d547a63b86c3630317e8", "2414a61ffc94e428f14b5758fe308e13"


def load(name: str):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return json.load(f)


def git_blob_id(path: str) -> str:
    """`git hash-object` of the file, computed here (no git process in the unit tier)."""
    import hashlib
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("name", sorted(BLOBS))
def test_the_fixtures_are_neons_files_unchanged(name):
    assert git_blob_id(os.path.join(HERE, name)).startswith(BLOBS[name][1])
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert NEON_COMMIT in readme and BLOBS[name][0] in readme and name in readme


# -- libs/compute_api/src/spec.rs tests: parse_spec_file, parse_unknown_fields, parse_unknown_features

def test_heads_reference_spec_parses():
    spec = parse_spec(load("compute_api_cluster_spec.json"))
    assert len(spec.cluster.roles) == 6 and len(spec.cluster.databases) == 3
    assert [d.action for d in spec.delta_operations] == ["delete_db", "rename_db", "delete_role", "rename_role"]
    assert len(spec.cluster.settings) == 25 and spec.cluster.settings[-1].name == "test.escaping"
    assert spec.storage is not None and spec.storage.tenant_id == TENANT and spec.storage.timeline_id == TIMELINE
    assert from_stored(json.loads(json.dumps(to_document(spec)))) == spec


@pytest.mark.parametrize("extra", [{"unknown_field": "foo"}, {"features": ["UnknownFeature", "foo"]},
                                   {"features": ["activity_monitor_experimental"]}])
def test_unknown_fields_and_features_still_parse(extra):
    doc = load("compute_api_cluster_spec.json")
    doc.update(extra)
    parse_spec(doc)


# -- compute_tools/tests/pg_helpers_tests.rs settings_serialize: the settings, byte for byte

SETTINGS_SERIALIZE = r"""fsync = off
wal_level = logical
hot_standby = on
autoprewarm = off
offload_lfc_interval_seconds = 20
neon.safekeepers = '127.0.0.1:6502,127.0.0.1:6503,127.0.0.1:6501'
wal_log_hints = on
log_connections = on
shared_buffers = 32768
port = 55432
max_connections = 100
max_wal_senders = 10
listen_addresses = '0.0.0.0'
wal_sender_timeout = 0
password_encryption = md5
maintenance_work_mem = 65536
max_parallel_workers = 8
max_worker_processes = 8
neon.tenant_id = 'b0554b632bd4d547a63b86c3630317e8'
max_replication_slots = 10
neon.timeline_id = '2414a61ffc94e428f14b5758fe308e13'
shared_preload_libraries = 'neon'
synchronous_standby_names = 'walproposer'
neon.pageserver_connstring = 'host=127.0.0.1 port=6400'
test.escaping = 'here''s a backslash \\ and a quote '' and a double-quote " hooray'
"""


def test_settings_render_as_heads_settings_serialize():
    spec = parse_spec(load("compute_api_cluster_spec.json"))
    text = render_postgresql_conf(modes.conf_settings(spec, "/pgdata"), spec)
    block = text.split("# Managed by compute_ctl: begin\n", 1)[1].split("# Managed by compute_ctl: end\n", 1)[0]
    assert block == SETTINGS_SERIALIZE


def test_the_whole_file_for_heads_reference_spec():
    """No top-level storage field in it: HEAD writes the storage header, the settings block and
    (config.rs) the explicit subscribers line; what HEAD writes besides (locales,
    neon.compute_mode, neon.privileged_role_name, the extension server port, the temporary
    override include) is not written by us (docs/api.md, the HEAD table)."""
    spec = parse_spec(load("compute_api_cluster_spec.json"))
    text = render_postgresql_conf(modes.conf_settings(spec, "/pgdata"), spec)
    assert text == ("# Neon storage settings\n\n# Managed by compute_ctl: begin\n" + SETTINGS_SERIALIZE
                    + "# Managed by compute_ctl: end\nneon.disable_logical_replication_subscribers=false\n")


# -- compute_tools/src/compute.rs test duplicate_safekeeper_connstring (compute_tools/tests/README.md)

def test_duplicate_safekeepers_are_refused_as_head():
    with pytest.raises(SpecError) as e:
        parse_spec(load("compute_tools_cluster_spec_duplicate_sk.json"))
    assert e.value.message.startswith("duplicate entry in safekeeper_connstrings:")
    assert e.value.message == "duplicate entry in safekeeper_connstrings: 127.0.0.1:6502!"


def test_duplicates_are_a_primarys_concern_only():
    """HEAD's ParsedSpec::validate returns at once for any mode but Primary."""
    doc = load("compute_tools_cluster_spec_duplicate_sk.json")
    doc["mode"] = "Replica"
    assert parse_spec(doc).storage.safekeepers.count("127.0.0.1:6502") == 2


# -- docker-compose/compute_wrapper: config.json's spec, placeholders replaced as compute.sh does

def test_the_docker_compose_spec_parses_with_its_ids_filled_in():
    text = json.dumps(load("docker_compose_config.json"))
    config = json.loads(text.replace("TENANT_ID", "c" * 32).replace("TIMELINE_ID", "d" * 32))
    spec = parse_spec(config["spec"])
    assert spec.storage.pageserver_connstring == "host=pageserver port=6400"
    assert spec.storage.safekeepers == ("safekeeper1:5454", "safekeeper2:5454", "safekeeper3:5454")
    assert (spec.storage.tenant_id, spec.storage.timeline_id) == ("c" * 32, "d" * 32)


# -- write_postgres_conf's storage lines (compute_tools/src/config.rs; HEAD has no test of them)

def neon_doc(**top):
    doc = {"format_version": 1.0, "suspend_timeout_seconds": -1,
           "cluster": {"roles": [], "databases": [], "settings": None}, "tenant_id": TENANT, "timeline_id": TIMELINE}
    doc.update(top)
    return doc


def sharded_info(count=2, stripe=32768, **over):
    shards = {f"{n:02x}{count:02x}": {"pageservers": [{"id": n + 1, "libpq_url": f"postgres://no_user@ps{n}:6400",
                                                        "grpc_url": f"grpc://no_user@ps{n}:6401"}]}
              for n in range(max(count, 1))}
    return {"shard_count": count, "stripe_size": stripe, "shards": shards, "prefer_protocol": "libpq", **over}


HEAD_CASES = {
    # neon_local's spec (control_plane/src/endpoint.rs): connection info, legacy connstring and stripe, ids
    "neon_local, unsharded": (
        dict(pageserver_connection_info=sharded_info(0, None), pageserver_connstring="postgres://no_user@ps0:6400",
             safekeeper_connstrings=["127.0.0.1:5454"], safekeepers_generation=None,
             endpoint_id="ep-main", cluster={"roles": [], "databases": [], "settings": None,
                                              "postgresql_conf": "port=55432\nlisten_addresses='127.0.0.1'\n"}),
        ["port=55432", "listen_addresses='127.0.0.1'", "", "# Neon storage settings", "",
         "# derived from compute spec's pageserver_connection_info field",
         "neon.pageserver_connstring='postgres://no_user@ps0:6400'",
         "neon.safekeepers='127.0.0.1:5454'",
         f"neon.tenant_id='{TENANT}'", f"neon.timeline_id='{TIMELINE}'", "neon.endpoint_id='ep-main'"]),
    "sharded, stripe first, every shard's first pageserver": (
        dict(pageserver_connection_info=sharded_info(4), safekeeper_connstrings=["sk1:5454", "sk2:5454"],
             safekeepers_generation=7, project_id="p", branch_id="b"),
        ["# Neon storage settings", "",
         "# from compute spec's pageserver_connection_info.stripe_size field", "neon.stripe_size=32768",
         "# derived from compute spec's pageserver_connection_info field",
         "neon.pageserver_connstring='postgres://no_user@ps0:6400,postgres://no_user@ps1:6400,"
         "postgres://no_user@ps2:6400,postgres://no_user@ps3:6400'",
         "neon.safekeepers='g#7:sk1:5454,sk2:5454'",
         f"neon.tenant_id='{TENANT}'", f"neon.timeline_id='{TIMELINE}'",
         "neon.project_id='p'", "neon.branch_id='b'"]),
    "legacy fields: shard_stripe_size before pageserver_connstring": (
        dict(pageserver_connstring="postgres://a:1,postgres://b:2", shard_stripe_size=2048),
        ["# Neon storage settings", "",
         "# from compute spec's shard_stripe_size field", "neon.stripe_size=2048",
         "# from compute spec's pageserver_connstring field",
         "neon.pageserver_connstring='postgres://a:1,postgres://b:2'",
         f"neon.tenant_id='{TENANT}'", f"neon.timeline_id='{TIMELINE}'"]),
    "escaping: quote and backslash doubled (escape_conf_value)": (
        dict(pageserver_connstring="host=ps port=6400", project_id="it's \\ a \"test\"",
             endpoint_id="ep-'\\'", branch_id="é ☃"),
        ["# Neon storage settings", "",
         "# from compute spec's pageserver_connstring field", "neon.pageserver_connstring='host=ps port=6400'",
         f"neon.tenant_id='{TENANT}'", f"neon.timeline_id='{TIMELINE}'",
         "neon.project_id='it''s \\\\ a \"test\"'", "neon.branch_id='é ☃'", "neon.endpoint_id='ep-''\\\\'''"]),
    "generation 0 is still written": (
        dict(pageserver_connstring="host=ps", safekeeper_connstrings=["a:1"], safekeepers_generation=0),
        ["# Neon storage settings", "", "# from compute spec's pageserver_connstring field",
         "neon.pageserver_connstring='host=ps'", "neon.safekeepers='g#0:a:1'",
         f"neon.tenant_id='{TENANT}'", f"neon.timeline_id='{TIMELINE}'"]),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_storage_lines_as_write_postgres_conf(case):
    top, expected = HEAD_CASES[case]
    spec = parse_spec(neon_doc(**copy.deepcopy(top)))
    assert "\n".join(neon_head_lines(spec)) == "\n".join(expected)
    text = render_postgresql_conf(modes.conf_settings(spec, "/pgdata"), spec)
    assert text.startswith("\n".join(expected) + "\n# Managed by compute_ctl: begin\n")
    assert text.endswith("# Managed by compute_ctl: end\nneon.disable_logical_replication_subscribers=false\n")
    assert from_stored(json.loads(json.dumps(to_document(spec)))) == spec


def test_drop_subscriptions_before_start_is_the_last_line():
    spec = parse_spec(neon_doc(pageserver_connstring="host=ps", drop_subscriptions_before_start=True))
    assert render_postgresql_conf((), spec).endswith(
        "# Managed by compute_ctl: end\nneon.disable_logical_replication_subscribers=true\n")


@pytest.mark.parametrize("text,quoted", [
    ("plain", "'plain'"), ("it's", "'it''s'"), ("a\\b", "'a\\\\b'"), ("'\\'", "'''\\\\'''"), ("", "''"),
    ('"', "'\"'"),
])
def test_escape_conf_value(text, quoted):
    """pg_helpers.rs escape_conf_value: `'` -> `''`, `\\` -> `\\\\`, always quoted."""
    assert conf_value(text) == quoted


# -- libs/compute_api/src/spec.rs PageserverConnectionInfo::from_connstr and shard_url

def test_n_shards_without_a_stripe_size_are_refused_as_head():
    with pytest.raises(SpecError, match="pageserver_connstring: 3 shards but no stripe_size"):
        parse_spec(neon_doc(pageserver_connstring="postgres://a:1,postgres://b:2,postgres://c:3"))
    with pytest.raises(SpecError, match=r"pageserver_connection_info.stripe_size: 2 shards but no stripe_size"):
        parse_spec(neon_doc(pageserver_connection_info=sharded_info(2, None)))
    settings = [{"name": "neon.pageserver_connstring", "value": "postgres://a:1,postgres://b:2", "vartype": "string"}]
    with pytest.raises(SpecError, match="2 shards but no stripe_size"):
        parse_spec(neon_doc(cluster={"roles": [], "databases": [], "settings": settings}))


def test_a_shard_missing_from_the_map_is_refused_with_heads_words():
    info = sharded_info(2)
    del info["shards"]["0102"]
    with pytest.raises(SpecError, match="shard 0102 missing from pageserver_connection_info shard map"):
        parse_spec(neon_doc(pageserver_connection_info=info))


def test_the_connection_info_wins_and_finds_the_basebackup_source():
    """HEAD's source order: pageserver_connection_info, then pageserver_connstring, then the
    settings; the basebackup comes from shard 0's first pageserver."""
    settings = [{"name": "neon.pageserver_connstring", "value": "postgres://setting:1", "vartype": "string"}]
    spec = parse_spec(neon_doc(pageserver_connection_info=sharded_info(2), pageserver_connstring="postgres://legacy:1",
                               cluster={"roles": [], "databases": [], "settings": settings}))
    assert spec.storage.pageserver_connstring == "postgres://no_user@ps0:6400"
    assert spec.storage.shards.shard_count == 2
    spec = parse_spec(neon_doc(pageserver_connstring="postgres://legacy:1",
                               cluster={"roles": [], "databases": [], "settings": settings}))
    assert spec.storage.pageserver_connstring == "postgres://legacy:1"


def test_lease_targets_are_heads_tenant_shard_ids():
    """lsn_lease.rs: every pageserver of every shard; `<tenant>` unsharded, else
    `<tenant>-<NN><CC>` (libs/utils/src/shard.rs TenantShardId's Display)."""
    spec = parse_spec(neon_doc(pageserver_connection_info=sharded_info(2), mode={"Static": "0/16B9188"}))
    assert spec.storage.tenant_shard_ids() == [(f"{TENANT}-0002", "postgres://no_user@ps0:6400"),
                                               (f"{TENANT}-0102", "postgres://no_user@ps1:6400")]
    spec = parse_spec(neon_doc(pageserver_connstring="postgres://only:1", mode={"Static": "0/16B9188"}))
    assert spec.storage.tenant_shard_ids() == [(TENANT, "postgres://only:1")]


# -- control_plane/src/postgresql_conf.rs (blob a824af9490c1): neon_local's postgresql.conf, which it
# sends as `cluster.postgresql_conf`; test_postgresql_conf_escapes' outputs, and setup_pg_conf's
# lines (control_plane/src/endpoint.rs) as PostgresConf::append writes them (`name=value`)

NEON_LOCAL_ESCAPES = [("foo bar", "'foo bar'"), ("foo", "foo"), ("123", "123"), ("+123", "+123"), ("-10", "-10"),
                      ("1foo", "1foo"), ("foo1", "foo1"), ("10MB", "10MB"), ("-10kB", "-10kB"),
                      ("fo'o", "'fo''o'"), ("fo\no", "'fo\\no'"), ("fo\\o", "'fo\\\\o'"), ("10 cats", "'10 cats'")]
NEON_LOCAL_CONF = """max_wal_senders=10
wal_log_hints=off
max_replication_slots=10
hot_standby=on
shared_buffers=1MB
effective_io_concurrency=2
fsync=off
max_connections=100
wal_level=logical
wal_sender_timeout=5s
listen_addresses='127.0.0.1'
port=55432
wal_keep_size=0
restart_after_crash=off
shared_preload_libraries=neon

max_replication_write_lag=15MB
max_replication_flush_lag=10GB
synchronous_standby_names=walproposer
neon.safekeepers='localhost:5454,localhost:5455'
"""


@pytest.mark.parametrize("value,escaped", NEON_LOCAL_ESCAPES)
def test_neon_locals_escaped_values_are_lines_we_accept(value, escaped):
    check_postgresql_conf(f"some.setting={escaped}", "cluster.postgresql_conf")
    check_postgresql_conf(f"some.setting = {escaped}  # comment", "cluster.postgresql_conf")


def test_neon_locals_postgresql_conf_is_written_first_verbatim():
    spec = parse_spec(neon_doc(pageserver_connstring="postgres://no_user@127.0.0.1:64000",
                               cluster={"roles": [], "databases": [], "settings": None,
                                        "postgresql_conf": NEON_LOCAL_CONF}))
    assert render_postgresql_conf((), spec).startswith(NEON_LOCAL_CONF + "\n# Neon storage settings\n\n")
