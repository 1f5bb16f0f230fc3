"""The spec's stored form (compute/model/spec.py: to_document, from_stored): the state file holds the
validated spec written back, and every program reads it typed without validating it again.
Pure, no processes."""

from __future__ import annotations

import json

import pytest

from compute.model.spec import StoredSpecError, from_stored, load_stored, parse_spec, to_document

TENANT, TIMELINE = "a" * 32, "b" * 32
SCRAM = ("SCRAM-SHA-256$4096:c2FsdHNhbHQ=$" + "A" * 43 + "=:" + "B" * 43 + "=")


def doc(**top) -> dict:
    d = {"format_version": 1.0, "operation_uuid": "op-1",
         "cluster": {"cluster_id": "c", "name": "n", "state": "restarted",
                     "roles": [{"name": "alice", "encrypted_password": "0" * 32, "options": None},
                               {"name": "bob", "encrypted_password": SCRAM,
                                "options": [{"name": "connection_limit", "value": "5", "vartype": "integer"}]},
                               {"name": "carol", "encrypted_password": None}],
                     "databases": [{"name": "app", "owner": "alice", "options": None},
                                   {"name": "ops", "owner": "cloud_admin",
                                    "options": [{"name": "datallowconn", "value": "true", "vartype": "bool"}]}],
                     "settings": [{"name": "work_mem", "value": "4MB", "vartype": "string"},
                                  {"name": "max_connections", "value": "100", "vartype": "integer"},
                                  {"name": "fsync", "value": None, "vartype": "bool"}]},
         "delta_operations": [{"action": "rename_role", "name": "old", "new_name": "alice"},
                              {"action": "delete_db", "name": "gone"}],
         "timestamp": "ignored", "unknown": {"x": 1}}
    d.update(top)
    return d


NEON = {"pageserver_connstring": "postgresql://no_user@127.0.0.1:6400", "tenant_id": TENANT,
        "timeline_id": TIMELINE}
CASES = {
    "embedded default": doc(),
    "skip catalog": doc(skip_pg_catalog_updates=True),
    "neon, top-level": doc(**NEON, safekeeper_connstrings=["sk1:5454", "sk2:5454"], storage_auth_token="tok.en"),
    "neon, settings": doc(),  # filled below: the neon.* settings form
    "neon, no safekeepers": doc(**NEON),
    "static": doc(**NEON, mode={"Static": "0/16B9188"}),
    "replica": doc(**NEON, mode="Replica"),
    "replica of a plain primary": doc(mode="Replica"),
    "format_version as an integer": doc(format_version=1),
}
CASES["neon, settings"]["cluster"]["settings"] += [
    {"name": "neon.pageserver_connstring", "value": NEON["pageserver_connstring"], "vartype": "string"},
    {"name": "neon.tenant_id", "value": TENANT, "vartype": "string"},
    {"name": "neon.timeline_id", "value": TIMELINE, "vartype": "string"},
    {"name": "neon.safekeepers", "value": "sk1:5454,sk2:5454", "vartype": "string"}]
CASES["replica of a plain primary"]["cluster"]["settings"].append(
    {"name": "primary_conninfo", "value": "host=db1 user=r password=secret", "vartype": "string"})


@pytest.mark.parametrize("case", list(CASES))
def test_the_stored_document_is_the_same_spec(case):
    spec = parse_spec(CASES[case], superuser="cloud_admin")
    stored = json.loads(json.dumps(to_document(spec)))  # through the state file's JSON
    assert from_stored(stored) == spec
    assert parse_spec(stored, superuser="cloud_admin") == spec  # and it is still a valid spec
    assert to_document(from_stored(stored)) == stored  # canonical: written back, the same bytes
    assert "timestamp" not in stored and "unknown" not in stored  # only what the typed spec holds


def test_the_stored_mode_is_neons_form():
    for mode in ("Primary", "Replica", {"Static": "0/16B9188"}):
        assert to_document(parse_spec(doc(**NEON, mode=mode), superuser="cloud_admin"))["mode"] == mode


@pytest.mark.parametrize("bad", [[], "spec", {"format_version": 1.0}, {**to_document(parse_spec(doc(), superuser="cloud_admin")), "cluster": 5},
                                 doc()])  # the last: a raw document, not one to_document wrote
def test_a_stored_document_that_cannot_be_read_is_one_clear_error(bad):
    with pytest.raises(StoredSpecError, match="the state file's spec cannot be read"):
        from_stored(bad)


def test_load_stored():
    class Store(dict):
        def get(self, key, default=None):
            return super().get(key, default)
    assert load_stored(Store()) is None
    spec = parse_spec(doc(), superuser="cloud_admin")
    assert load_stored(Store(spec=to_document(spec))) == spec


def test_the_driver_fails_the_start_on_a_stored_spec_it_cannot_read(tmp_path):
    """A failed start with one line on /status (then the grace period, exit 1), not a driver
    crashing and restarting on the same file."""
    from compute.lifecycle.driver import Driver, describe
    from tests.support.api_helpers import make_state
    rt = str(tmp_path)
    store = make_state(rt, status="init")
    store.set(spec={"format_version": 1.0})  # not what to_document writes
    with pytest.raises(StoredSpecError) as e:
        Driver(rt).wait_for_spec()
    assert describe(e.value).startswith("the state file's spec cannot be read (KeyError")


def test_a_reconfiguration_whose_spec_cannot_be_read_changes_nothing(tmp_path):
    """Issue 19: not a final `failed` with postgres still running. The compute stays `running`
    with the spec it had, the reason on /status and in the /configure answer, and /configure
    open for the next spec."""
    from compute.lifecycle.driver import Driver
    from compute.shared import driver_requests as dr
    from tests.support.api_helpers import make_state, minimal_spec
    rt = str(tmp_path)
    store = make_state(rt, status="running", spec=minimal_spec(), spec_generation=1)
    good = store.get("spec")
    generation = dr.submit_configure(store, {"format_version": 1.0})  # not what to_document writes
    Driver(rt).reconfigure()
    v = store.get_many(("status", "error", "spec", *dr.CONFIGURE_KEYS))
    assert v["status"] == "running" and v["spec"] == good
    assert v["error"].startswith("the new spec cannot be read: the state file's spec cannot be read")
    assert dr.configure_outcome(v, generation) == (False, v["error"])
    assert dr.submit_configure(store, good) == generation + 1  # /configure is still open
