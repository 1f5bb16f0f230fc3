"""HEAD's storage fields (issue 18, item 1): parsing, validation and the attack cases. Every new
field ends up in postgresql.conf (and the URLs in libpq connection strings): hostile values are
refused with one line naming the field, or written quoted on their own line, never more."""

from __future__ import annotations

import copy

import pytest

from compute.model import modes
from compute.model.spec import MAX_POSTGRESQL_CONF, MAX_STORAGE_TEXT, SpecError, parse_spec
from compute.postgres.conf import render_postgresql_conf

TENANT, TIMELINE = "a" * 32, "b" * 32


def doc(**top):
    d = {"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": []},
         "tenant_id": TENANT, "timeline_id": TIMELINE}
    d.update(top)
    return d


def info(count=2, stripe=1024):
    return {"shard_count": count, "stripe_size": stripe,
            "shards": {f"{n:02x}{count:02x}": {"pageservers": [{"id": n, "libpq_url": f"postgres://u@ps{n}:64",
                                                                 "grpc_url": None}]}
                       for n in range(max(count, 1))}}


def refused(d, field, match=None):
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.field == field, str(e.value)
    if match:
        assert match in e.value.message, e.value.message
    assert "\n" not in str(e.value)
    return e.value


def test_connection_info_alone_is_enough_to_find_the_pageserver():
    spec = parse_spec(doc(pageserver_connection_info=info(0, None)))
    assert spec.storage.pageserver_connstring == "postgres://u@ps0:64"
    assert spec.storage.safekeepers == ()
    assert modes.plan_start(spec).source == "pageserver"


def test_settings_only_specs_keep_working():
    settings = [{"name": "neon.pageserver_connstring", "value": "postgres://u@h:1", "vartype": "string"},
                {"name": "neon.stripe_size", "value": "2048", "vartype": "integer"},
                {"name": "neon.tenant_id", "value": TENANT, "vartype": "string"},
                {"name": "neon.timeline_id", "value": TIMELINE, "vartype": "string"}]
    d = {"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": settings}}
    spec = parse_spec(d)
    assert spec.storage.pageserver_connstring == "postgres://u@h:1" and spec.storage.shards.shard_count == 0
    # no top-level field: HEAD writes no storage line of its own (the settings carry them)
    text = render_postgresql_conf(modes.conf_settings(spec, "/d"), spec)
    assert "neon.pageserver_connstring=" not in text and "neon.pageserver_connstring = 'postgres://u@h:1'" in text


def test_the_embedded_default_gets_only_the_managed_block():
    spec = parse_spec({"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": []}})
    assert render_postgresql_conf((), spec) == "# Managed by compute_ctl: begin\n# Managed by compute_ctl: end\n"


def test_sharded_connstring_legacy_needs_and_takes_the_stripe():
    spec = parse_spec(doc(pageserver_connstring="postgres://a:1,postgres://b:2", shard_stripe_size=8))
    assert spec.storage.shards.shard_count == 2 and spec.storage.shards.stripe_size == 8
    assert spec.storage.pageserver_connstring == "postgres://a:1"


def test_duplicate_safekeepers_top_level_and_settings():
    refused(doc(pageserver_connstring="host=h", safekeeper_connstrings=["a:1", "b:1", "a:1"]), "safekeeper_connstrings",
            "duplicate entry in safekeeper_connstrings: a:1!")
    settings = [{"name": "neon.safekeepers", "value": "x:1,x:1", "vartype": "string"}]
    d = doc(pageserver_connstring="host=h")
    d["cluster"]["settings"] = settings
    refused(d, "safekeeper_connstrings", "duplicate entry")


HOSTILE_TEXT = {"newline": "a\nb", "cr": "a\rb", "nul": "a\x00b", "huge": "x" * (MAX_STORAGE_TEXT + 1),
                "surrogate": "a\udc80b"}


@pytest.mark.parametrize("kind", list(HOSTILE_TEXT))
@pytest.mark.parametrize("field", ["project_id", "branch_id", "endpoint_id", "pageserver_connstring"])
def test_hostile_text_in_top_level_fields_is_refused(field, kind):
    refused(doc(**{"pageserver_connstring": "host=h", field: HOSTILE_TEXT[kind]}), field)


# The exact words of the two text checks (spec.py's _check_text serves both).
@pytest.mark.parametrize("kind,message", [
    ("newline", "must not contain a newline or NUL byte"), ("cr", "must not contain a newline or NUL byte"),
    ("nul", "must not contain a newline or NUL byte"), ("surrogate", "is not valid UTF-8"),
    ("huge", f"longer than {MAX_STORAGE_TEXT} bytes")])
def test_hostile_storage_text_messages(kind, message):
    error = refused(doc(pageserver_connstring="host=h", project_id=HOSTILE_TEXT[kind]), "project_id")
    assert error.message == message


@pytest.mark.parametrize("text,message", [
    ("port=1\x00", "must not contain a NUL byte"), ("a\udc80 = 1", "is not valid UTF-8"),
    ("x" * (MAX_POSTGRESQL_CONF + 1), f"larger than {MAX_POSTGRESQL_CONF} bytes")])
def test_postgresql_conf_text_messages(text, message):
    d = doc(pageserver_connstring="host=h", cluster={"roles": [], "databases": [], "settings": None,
                                                     "postgresql_conf": text})
    assert refused(d, "cluster.postgresql_conf").message == message


@pytest.mark.parametrize("kind", list(HOSTILE_TEXT))
def test_hostile_safekeepers_are_refused(kind):
    refused(doc(pageserver_connstring="host=h", safekeeper_connstrings=["ok:1", HOSTILE_TEXT[kind]]),
            "safekeeper_connstrings[1]")


@pytest.mark.parametrize("kind", list(HOSTILE_TEXT) + ["comma", "not a conninfo", "empty", "number"])
@pytest.mark.parametrize("where", ["libpq_url", "grpc_url"])
def test_hostile_pageserver_urls_are_refused(where, kind):
    value = {**HOSTILE_TEXT, "comma": "postgres://a:1,postgres://b:2", "not a conninfo": "host='unterminated",
             "empty": "", "number": 5}[kind]
    if where == "grpc_url" and kind in ("comma", "not a conninfo", "empty"):
        pytest.skip("a grpc_url is never connected to nor joined: only written out as given")
    i = info(2)
    i["shards"]["0102"]["pageservers"][0][where] = value
    e = refused(doc(pageserver_connection_info=i), f"pageserver_connection_info.shards.0102.pageservers[0].{where}")
    if isinstance(value, str) and value:
        assert value not in str(e)  # a URL may hold a password: never echoed


@pytest.mark.parametrize("mutate,field,words", [
    (lambda i: i["shards"].update({"zz02": i["shards"]["0002"]}), "pageserver_connection_info.shards.'zz02'",
     "4 hex digits"),
    (lambda i: i["shards"].update({"0003": i["shards"]["0002"]}), "pageserver_connection_info.shards.'0003'",
     "not a shard of a tenant with shard_count 2"),
    (lambda i: i["shards"].update({"0202": i["shards"]["0002"]}), "pageserver_connection_info.shards.'0202'",
     "not a shard"),
    (lambda i: i["shards"].update({"0002": {"pageservers": []}}), "pageserver_connection_info.shards.'0002'.pageservers",
     "at least one pageserver"),
    (lambda i: i["shards"]["0002"]["pageservers"][0].pop("libpq_url"),
     "pageserver_connection_info.shards.'0002'.pageservers[0].libpq_url", "libpq"),
    (lambda i: i.update(shard_count=256), "pageserver_connection_info.shard_count", "0 to 255"),
    (lambda i: i.update(shard_count=-1), "pageserver_connection_info.shard_count", "0 to 255"),
    (lambda i: i.update(shard_count=True), "pageserver_connection_info.shard_count", "expected int"),
    (lambda i: i.update(stripe_size=1 << 32), "pageserver_connection_info.stripe_size", "0 to"),
    (lambda i: i.update(stripe_size="big"), "pageserver_connection_info.stripe_size", "expected int"),
    (lambda i: i.update(prefer_protocol="http"), "pageserver_connection_info.prefer_protocol", "libpq, grpc"),
    (lambda i: i.update(shards=[]), "pageserver_connection_info.shards", "expected dict"),
    (lambda i: i.pop("shard_count"), "pageserver_connection_info.shard_count", "required"),
])
def test_malformed_connection_info_is_refused(mutate, field, words):
    i = info(2)
    mutate(i)
    refused(doc(pageserver_connection_info=i), field.replace("'", "") if "zz" not in field else field, words)


@pytest.mark.parametrize("key,value,words", [
    ("safekeepers_generation", -1, "0 to"), ("safekeepers_generation", 1 << 32, "0 to"),
    ("safekeepers_generation", "3", "expected int"), ("shard_stripe_size", True, "expected int"),
    ("drop_subscriptions_before_start", "yes", "expected bool"), ("tenant_id", "A" * 32, "lowercase hex"),
    ("project_id", 5, "expected str"),
])
def test_wrong_types_are_refused(key, value, words):
    refused(doc(pageserver_connstring="host=h", **{key: value}), key, words)


def test_quotes_and_backslashes_are_written_quoted_on_one_line():
    spec = parse_spec(doc(pageserver_connstring="host=h password='x\\'y'", safekeeper_connstrings=["a'b:1"],
                          project_id="p'; include '/etc/passwd", endpoint_id="\\' \\\\", branch_id="#no comment"))
    text = render_postgresql_conf(modes.conf_settings(spec, "/d"), spec)
    lines = text.splitlines()
    assert "neon.project_id='p''; include ''/etc/passwd'" in lines
    assert "neon.endpoint_id='\\\\'' \\\\\\\\'" in lines
    assert "neon.branch_id='#no comment'" in lines
    assert "neon.safekeepers='a''b:1'" in lines
    assert "neon.pageserver_connstring='host=h password=''x\\\\''y'''" in lines
    assert not any(line.startswith("include") for line in lines)


# -- cluster.postgresql_conf: written verbatim, so every line must be one postgres reads

@pytest.mark.parametrize("text", [
    "", "\n", "port=5432\nlisten_addresses='127.0.0.1'\n", "# just a comment", "  shared_buffers 128MB  # c\n",
    "neon.pageserver_connstring='host=x port=1'", "search_path = '\"$user\", public'\r\nwork_mem=4MB",
    "a.b = 'it''s \\'quoted\\''", "log_line_prefix='%m [%p] '",
])
def test_postgresql_conf_lines_postgres_reads_are_accepted(text):
    spec = parse_spec(doc(pageserver_connstring="host=h", cluster={"roles": [], "databases": [], "settings": None,
                                                                   "postgresql_conf": text}))
    assert render_postgresql_conf((), spec).startswith(text + "\n# Neon storage settings\n\n")


@pytest.mark.parametrize("text,words", [
    ("include '/etc/passwd'", "'include' is not allowed"),
    ("port=1\nINCLUDE_IF_EXISTS = 'x'", "line 2: 'INCLUDE_IF_EXISTS' is not allowed"),
    ("include_dir 'conf.d'", "not allowed"), ("data_directory='/'", "not allowed"),
    ("hba_file = '/tmp/hba'", "not allowed"), ("config_file='/x'", "not allowed"), ("ident_file='/x'", "not allowed"),
    ("port=1\x00", "NUL"), ("x = 'unterminated", "line 1 is not a postgresql.conf setting"),
    ("x = 'a' 'b'", "not a postgresql.conf setting"), ("= 5", "not a postgresql.conf setting"),
    ("x = a b", "not a postgresql.conf setting"), ("a\udc80 = 1", "not valid UTF-8"),
    ("x" * (MAX_POSTGRESQL_CONF + 1), "larger than"),
    ("abc" * 300_000 + "!", "not a postgresql.conf setting"),  # a name/value split tried at every
    ("a = " + "b" * 900_000 + "!", "not a postgresql.conf setting"),  # position would never end here
    ("xy", "not a postgresql.conf setting"),  # a name alone
])
def test_postgresql_conf_that_postgres_would_not_read_or_that_loads_files_is_refused(text, words):
    d = doc(pageserver_connstring="host=h", cluster={"roles": [], "databases": [], "settings": None,
                                                     "postgresql_conf": text})
    refused(d, "cluster.postgresql_conf", words)


def test_postgresql_conf_without_storage_is_still_written_first():
    spec = parse_spec({"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": [],
                                                          "postgresql_conf": "port=5433"}})
    assert spec.storage is None
    assert render_postgresql_conf((), spec).startswith("port=5433\n# Neon storage settings\n\n# Managed by")


def test_the_parsed_fields_do_not_share_the_input():
    i = info(2)
    d = doc(pageserver_connection_info=i)
    spec = parse_spec(copy.deepcopy(d))
    i["shards"]["0002"]["pageservers"][0]["libpq_url"] = "postgres://changed:1"
    assert spec.storage.pageserver_connstring == "postgres://u@ps0:64"


@pytest.mark.parametrize("value", ["²", "-1", "1e3", "4294967296", " 8", "0x10"])
def test_a_stripe_size_setting_that_is_not_a_u32_is_one_clear_error(value):
    settings = [{"name": "neon.pageserver_connstring", "value": "postgres://a:1,postgres://b:2", "vartype": "string"},
                {"name": "neon.stripe_size", "value": value, "vartype": "string"},
                {"name": "neon.tenant_id", "value": TENANT, "vartype": "string"},
                {"name": "neon.timeline_id", "value": TIMELINE, "vartype": "string"}]
    refused({"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": settings}},
            "cluster.settings.neon.stripe_size", "0 to 4294967295")
