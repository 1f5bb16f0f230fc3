"""skip_pg_catalog_updates: parsed strictly, and `compute-ctl plan` says nothing would run
(the e2e side is in test_e2e_contract.py)."""

import json

import pytest

from compute.boot.plan_command import main as plan_main
from compute.model.spec import SpecError, parse_spec

BASE = {"format_version": 1.0, "cluster": {"roles": [{"name": "app", "encrypted_password": None, "options": None}],
                                           "databases": []}}


def test_parsed_as_a_boolean():
    assert parse_spec(BASE).skip_pg_catalog_updates is False
    assert parse_spec({**BASE, "skip_pg_catalog_updates": None}).skip_pg_catalog_updates is False
    assert parse_spec({**BASE, "skip_pg_catalog_updates": True}).skip_pg_catalog_updates is True
    for bad in ("true", 1, [True]):
        with pytest.raises(SpecError, match="skip_pg_catalog_updates"):
            parse_spec({**BASE, "skip_pg_catalog_updates": bad})


def test_plan_prints_that_nothing_would_run_without_connecting(capsys):
    # Port 1: a plan that tried to read the catalog would fail to connect.
    rc = plan_main(["-C", "postgresql://cloud_admin@127.0.0.1:1/postgres", "-s",
                    json.dumps({**BASE, "skip_pg_catalog_updates": True})])
    assert rc == 0 and "skip_pg_catalog_updates" in capsys.readouterr().out
    assert plan_main(["-C", "postgresql://cloud_admin@127.0.0.1:1/postgres", "-s", json.dumps(BASE)]) == 1
