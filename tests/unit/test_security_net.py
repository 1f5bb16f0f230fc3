"""Issue 9, sections 2 and 3, below the booted tree: the pure decisions (redaction, content
types, the exposure warning, session options) and the attacks that need only a real postgres
(a spec role's objects against our sessions, password statements against the server log, a
held lock against an apply). The same attacks against a booted tree: test_fault_network.py,
test_fault_sessions.py.

This file: the pure decisions; against a real postgres: tests/integration/test_security_net.py.
"""

from __future__ import annotations

import pytest

from compute.api.errors import is_json
from compute.api.redaction import redact_passwords
from compute.boot.cli import UsageError, exposure_warning, http_address, token_warning
from compute.postgres.sessions import session_options, session_params

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("query", [
    f"ALTER ROLE app PASSWORD '{SECRET}'",
    f"alter role app with login password '{SECRET}'",
    f"ALTER ROLE app ENCRYPTED PASSWORD '{SECRET}'",
    f"CREATE USER u WITH PASSWORD E'{SECRET}\\'x'",
    f"create role u password e'{SECRET}'",
    f"ALTER USER app PASSWORD $${SECRET}$$",
    f"ALTER USER app PASSWORD $pw${SECRET}$pw$",
    f"ALTER USER app PASSWORD U&'{SECRET}'",
    f"ALTER ROLE app PASSWORD '{SECRET}''quoted'",
    f"ALTER ROLE app /* it's a comment */ PASSWORD '{SECRET}'",
    f"ALTER ROLE \"o'brien\" PASSWORD '{SECRET}'",
    f"ALTER ROLE app PASSWORD\n  '{SECRET}' VALID UNTIL 'infinity'",
    f"ALTER ROLE app PaSsWoRd '{SECRET}",  # never closed
    f"CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password '{SECRET}')",
    f"CREATE SUBSCRIPTION s CONNECTION 'host=x password={SECRET}' PUBLICATION p",
])
def test_redaction_removes_password_literals(query):
    out = redact_passwords(query)
    assert SECRET not in out, out
    assert "[redacted]" in out


def test_redaction_keeps_the_rest():
    assert redact_passwords("SELECT $1 FROM t WHERE a = $2") == "SELECT $1 FROM t WHERE a = $2"
    assert redact_passwords("SELECT 'not a secret'") == "SELECT 'not a secret'"
    assert (redact_passwords("ALTER ROLE a$b PASSWORD 'x' -- done")
            == "ALTER ROLE a$b PASSWORD '[redacted]' -- done")
    assert redact_passwords(None) is None


def test_json_content_types():
    for ok in ("application/json", "Application/JSON", "application/json; charset=utf-8",
               'application/json;charset="UTF-8"'):
        assert is_json(ok), ok
    for bad in (None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
                "application/json; charset=utf-16", "application/jsonp", "application/json; x=y", "text/json"):
        assert not is_json(bad), bad


def test_http_address_and_the_exposure_warning():
    assert http_address("127.0.0.1") == "127.0.0.1"
    assert http_address("[::1]") == "::1"
    for bad in ("localhost", "0.0.0.0:80", "1.2.3", "127.0.0.1 x"):
        with pytest.raises(UsageError):
            http_address(bad)
    assert "listens on 0.0.0.0 (not loopback) without a JWKS" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("::", None) is not None
    assert exposure_warning("10.1.2.3", None) is not None  # whatever the mode: /configure is allowed in all
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "/etc/jwks.json") is None


def test_a_jwks_without_a_compute_id_warns_that_only_admin_tokens_pass():
    assert "only admin tokens" in token_warning("/etc/jwks.json", None)
    assert token_warning("/etc/jwks.json", "compute-1") is None
    assert token_warning(None, None) is None


def test_session_options_are_appended_after_the_connstr_own():
    params = session_params("postgresql://cloud_admin@127.0.0.1:5/postgres?options=-c%20search_path%3Dpublic",
                            lock_timeout_ms=1500)
    assert params["options"] == ("-c search_path=public -c search_path=pg_catalog,pg_temp -c role=none "
                                 "-c default_transaction_read_only=off -c lock_timeout=1500")
    assert "statement_timeout" not in session_options()


@pytest.mark.parametrize("flag,value", [("--http-address", "localhost"), ("--http-address", "0.0.0.0:3080"),
                                        ("--lock-timeout", "-1"), ("--lock-timeout", "nan"),
                                        ("--statement-timeout", "1e9")])
def test_bad_network_and_timeout_flags_are_one_line_errors(tmp_path, capsys, flag, value):
    from compute.boot.cli import main
    pgdata = tmp_path / "pgdata"
    code = main(["-D", str(pgdata), "-C", "postgresql://cloud_admin@127.0.0.1:1/postgres",
                 "-b", "/usr/lib/postgresql/15/bin/postgres", "-i", "c1", "-p", "http://127.0.0.1:1",
                 "--runtime-dir", str(tmp_path / "run"), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 1 and flag in err and "\n" not in err, err
    assert not pgdata.exists() and not (tmp_path / "run").exists()  # nothing touched
