"""postgresql.conf / pg_hba.conf / supervisord.conf rendering (pure)."""

import configparser
import os

import pytest

from compute.postgres.conf import (BEGIN_MARK, END_MARK, HBA_LINE, ensure_hba_line, quote_value,
                            render_default_hba, render_postgresql_conf)
from compute.model.spec import GenericOption
from compute.tree.supervisord_conf import render_supervisord_conf


def opt(name, value, vartype="string"):
    return GenericOption(name, value, vartype)


@pytest.mark.parametrize("value,expected", [
    ("plain", "'plain'"), ("it's", "'it''s'"), ("back\\slash", "'back\\\\slash'"),
    ("'; DROP", "'''; DROP'"), ("", "''"),
])
def test_string_quoting(value, expected):
    assert quote_value(opt("x", value)) == expected


def test_bare_values_and_null():
    text = render_postgresql_conf([opt("max_connections", "100", "integer"), opt("fsync", "off", "bool"),
                                   opt("neon.flag", None), opt("search_path", "a, b")])
    assert text.splitlines() == [BEGIN_MARK, "max_connections = 100", "fsync = off", "neon.flag",
                                 "search_path = 'a, b'", END_MARK]


@pytest.mark.parametrize("o", [opt("x", "a\nb"), opt("x", "a\rb"), opt("x", "1 2", "integer"),
                               opt("x", "1'", "integer")])
def test_injection_refused(o):
    with pytest.raises(ValueError):
        quote_value(o)


def test_postgres_parses_what_we_write(tmp_path):
    """The round trip through postgres' own parser is in the e2e tests; here: one line each."""
    text = render_postgresql_conf([opt("a.b", "x'y\\z"), opt("c.d", "1", "integer")])
    assert text.count("\n") == 4


def test_hba_line_appended_once(tmp_path):
    (tmp_path / "pg_hba.conf").write_text("local all all trust")
    assert ensure_hba_line(str(tmp_path)) is True
    assert ensure_hba_line(str(tmp_path)) is False
    lines = (tmp_path / "pg_hba.conf").read_text().splitlines()
    assert lines == ["local all all trust", HBA_LINE]


def test_hba_line_detected_with_other_spacing(tmp_path):
    (tmp_path / "pg_hba.conf").write_text("host   all  all 0.0.0.0/0   md5\n")
    assert ensure_hba_line(str(tmp_path)) is False


def test_default_hba_trusts_nobody():
    """Passwordless superuser only over peer (the compute's OS user, via the ident map); every
    other line wants a password; the contract's line is there."""
    text = render_default_hba("cloud_admin")
    lines = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == ["local", "all", '"cloud_admin"', "peer", "map=compute"]
    assert ["host", "all", '"cloud_admin"', "all", "scram-sha-256"] in lines
    assert not [ln for ln in lines if "trust" in ln]
    # The superuser's lines come before any line that could match it with a weaker method.
    first_all = min(i for i, ln in enumerate(lines) if ln[2] == "all")
    assert all(i < first_all for i, ln in enumerate(lines) if ln[2] == '"cloud_admin"')
    assert HBA_LINE in text
    for bad in ('evil" all', "a b", "a,b", "a#b", ""):
        with pytest.raises(ValueError):
            render_default_hba(bad)


def test_ident_maps_only_the_compute_user():
    from compute.postgres.localauth import render_ident
    text = render_ident("postgres", "cloud_admin")
    assert [ln.split() for ln in text.splitlines() if not ln.startswith("#")] == \
        [["compute", '"postgres"', '"cloud_admin"']]
    with pytest.raises(ValueError):
        render_ident("postgres\nx", "cloud_admin")


def test_passfile_escapes_separators():
    from compute.postgres.localauth import render_passfile
    assert render_passfile("cloud_admin", "pw") == "*:*:*:cloud_admin:pw\n"
    assert render_passfile("a:b", "p\\w") == "*:*:*:a\\:b:p\\\\w\n"


def render(**over):
    kw = dict(runtime_dir="/run/c", pgdata="/data/pg data", pgbin="/usr/bin/postgres", python="/opt/v/bin/python",
              auth_token=None, vm_informant=None, informant_connstr="dbname=postgres user=cloud_admin")
    kw.update(over)
    return render_supervisord_conf(**kw)


def parse(text):
    cp = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    cp.read_string(text)
    return cp


def test_supervisord_conf_programs():
    cp = parse(render())
    assert {"program:postgres", "program:lifecycle", "program:monitor", "program:api"} <= set(cp.sections())
    # exit decisions and the log relay run inside supervisord: no listener processes
    assert not [s for s in cp.sections() if s.startswith("eventlistener:")]
    assert "program:vm-informant" not in cp.sections()
    pg = cp["program:postgres"]
    assert pg["autostart"] == "false" and pg["autorestart"] == "false" and pg["stopsignal"] == "INT"
    assert pg["command"].endswith("/usr/bin/postgres -D '/data/pg data'")
    assert "environment" not in pg
    assert cp["unix_http_server"]["chmod"] == "0700"


def test_postgres_log_is_where_the_driver_reads_it():
    """One definition of postgres' log path (compute/shared/log_paths.py): supervisord writes
    postgres' output there and the driver reads postgres' sentences from it."""
    from compute.shared.log_paths import logs_dir, postgres_log_path
    cp = parse(render(runtime_dir="/run/my c"))
    assert cp["program:postgres"]["stdout_logfile"] == postgres_log_path("/run/my c") == "/run/my c/logs/postgres.log"
    assert cp["supervisord"]["childlogdir"] == logs_dir("/run/my c")
    assert cp["program:lifecycle"]["stdout_logfile"] == os.path.join(logs_dir("/run/my c"), "lifecycle.log")


def test_supervisord_conf_token_and_informant():
    cp = parse(render(auth_token="eyJ.abc-_", vm_informant="/bin/vm-informant"))
    assert cp["program:postgres"]["environment"] == 'NEON_AUTH_TOKEN="eyJ.abc-_"'
    assert cp["program:vm-informant"]["autorestart"] == "false"
    with pytest.raises(ValueError):
        render(auth_token='x" ,EVIL=1')
    with pytest.raises(ValueError):
        render(pgdata="/data\n[program:evil]")


def test_percent_escaped():
    assert "/data/100%%" in render(pgdata="/data/100%")


def test_secrets_only_in_their_programs_sections():
    """compute/model/environ.py decides; supervisord.conf carries each secret only in its program's
    `environment=` (parsed here with supervisor's own parser), none in [supervisord]'s."""
    from supervisor.datatypes import dict_of_key_value_pairs

    from compute.model.environ import child_environment, program_secrets, supervisord_environment
    environ = {"PATH": "/bin", "NEON_CONSOLE_JWT": "Bearer cp.tok-1", "NEON_CONTROL_PLANE_TOKEN": "cp2",
               "NEON_AUTH_TOKEN": "st.env"}
    assert supervisord_environment(environ) == {"PATH": "/bin"}
    assert child_environment(environ) == {"PATH": "/bin", "NEON_AUTH_TOKEN": "st.env"}
    secrets = program_secrets(environ, "st.spec")
    assert secrets == {"lifecycle": {"NEON_CONSOLE_JWT": "Bearer cp.tok-1", "NEON_CONTROL_PLANE_TOKEN": "cp2",
                                     "NEON_AUTH_TOKEN": "st.env"},
                       "postgres": {"NEON_AUTH_TOKEN": "st.spec"}}  # the spec's token wins for postgres
    assert program_secrets({"PATH": "/bin"}, None) == {"lifecycle": {}, "postgres": {}}

    cp = parse(render(program_env=secrets))
    assert dict_of_key_value_pairs(cp["program:lifecycle"]["environment"]) == secrets["lifecycle"]
    assert dict_of_key_value_pairs(cp["program:postgres"]["environment"]) == secrets["postgres"]
    glob = dict_of_key_value_pairs(cp["supervisord"]["environment"])
    assert glob["PGPASSFILE"] == "/run/c/superuser.pgpass" and not set(glob) & set(environ)
    for section in cp.sections():
        if section not in ("program:lifecycle", "program:postgres"):
            assert "environment" not in cp[section] or section == "supervisord", section
    with pytest.raises(ValueError) as info:
        render(program_env={"lifecycle": {"NEON_CONSOLE_JWT": 'x"\nEVIL'}})
    assert "EVIL" not in str(info.value)


def test_log_files_stay_within_their_budget():
    """A log flood can never fill the runtime dir (issue 19, item 3): every log file supervisord
    writes has a cap and one rotated copy, all of them together under LOG_BUDGET_BYTES."""
    from compute.tree.supervisord_conf import LOG_BUDGET_BYTES, log_bytes
    full = render(vm_informant="/bin/vm-informant", postgres_exporter="/usr/bin/exporter",
                  exporter_dsn="postgresql://cloud_admin@127.0.0.1:5432/postgres")
    total = log_bytes(full)
    assert 0 < total <= LOG_BUDGET_BYTES, total
    assert LOG_BUDGET_BYTES <= 32 * 1024 * 1024
    cp = parse(full)
    for section in cp.sections():
        for key in ("logfile", "stdout_logfile"):
            if cp.has_option(section, key):
                assert cp.has_option(section, key + "_maxbytes"), (section, key)
                assert cp.has_option(section, key + "_backups"), (section, key)
