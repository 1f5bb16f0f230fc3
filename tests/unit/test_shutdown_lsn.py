"""Which LSN /terminate reports (pure decisions, pg_controldata parsing)."""

from compute.postgres.shutdown_lsn import (CONTROLDATA, FLUSH_BEFORE_SIGNAL, SYNC_SAFEKEEPERS,
                                  checkpoint_lsn_after_clean_shutdown, lsn_source, parse_controldata)
from compute.model.spec import parse_spec

BASE = {"format_version": 1.0, "cluster": {"roles": [], "databases": []}}
NEON = {"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": [
    {"name": "neon.pageserver_connstring", "value": "postgresql://ps:6400", "vartype": "string"},
    {"name": "neon.tenant_id", "value": "3aa8fcc61f6d357410b7de754b1d9001", "vartype": "string"},
    {"name": "neon.timeline_id", "value": "de200bd42b49cc1814412c7e592dd6e9", "vartype": "string"},
    {"name": "neon.safekeepers", "value": "sk1:5454", "vartype": "string"}]}}


def test_lsn_source():
    plain, neon = parse_spec(BASE), parse_spec(NEON)
    assert lsn_source(None, "fast") is None
    assert lsn_source(plain, "fast") == CONTROLDATA
    assert lsn_source(plain, "immediate") == FLUSH_BEFORE_SIGNAL
    assert lsn_source(neon, "fast") == lsn_source(neon, "immediate") == SYNC_SAFEKEEPERS
    assert lsn_source(parse_spec({**NEON, "mode": "Replica"}), "fast") is None
    assert lsn_source(parse_spec({**NEON, "mode": {"Static": "0/16B3748"}}), "immediate") is None


def test_controldata_only_a_clean_primary_shutdown_counts():
    text = ("pg_control version number:            1300\n"
            "Database cluster state:               shut down\n"
            "Latest checkpoint location:           0/1A2B3C8\n"
            "Latest checkpoint's REDO location:    0/1A2B3C8\n")
    fields = parse_controldata(text)
    assert checkpoint_lsn_after_clean_shutdown(fields) == "0/1A2B3C8"
    for state in ("in production", "shut down in recovery", "in crash recovery"):
        assert checkpoint_lsn_after_clean_shutdown({**fields, "Database cluster state": state}) is None
