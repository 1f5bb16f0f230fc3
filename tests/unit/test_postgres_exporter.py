"""postgres-exporter: the DSN it gets (pure), its supervisord section, and end to end with
Debian's real prometheus-postgres-exporter scraping a booted compute.

This file: the pure parts; the real exporter: tests/e2e/test_postgres_exporter.py."""

import configparser
import urllib.parse
import urllib.request

import pytest
from supervisor.datatypes import dict_of_key_value_pairs

from compute.programs.postgres_exporter import exporter_dsn
from compute.tree.supervisord_conf import render_supervisord_conf


def dsn_params(dsn: str) -> dict:
    u = urllib.parse.urlsplit(dsn)
    return {"user": urllib.parse.unquote(u.username or ""), "host_in_netloc": u.hostname,
            "password": u.password, "dbname": urllib.parse.unquote(u.path.lstrip("/")),
            **{k: v for k, v in urllib.parse.parse_qsl(u.query)}}


def test_dsn_over_tcp_and_unix_socket_never_carries_a_password():
    p = dsn_params(exporter_dsn("postgresql://cloud_admin:secret@127.0.0.1:55432/postgres"))
    assert p == {"user": "cloud_admin", "host_in_netloc": None, "password": None, "dbname": "postgres",
                 "host": "127.0.0.1", "port": "55432", "sslmode": "disable"}
    p = dsn_params(exporter_dsn("host='/run/compute private' port=5432 user='we ird@x' password=pw dbname=x&y"))
    assert (p["host"], p["port"], p["user"], p["dbname"], p["password"]) == \
        ("/run/compute private", "5432", "we ird@x", "x&y", None)
    assert "pw" not in exporter_dsn("host=/s user=u password=pw")
    with pytest.raises(ValueError):
        exporter_dsn("host=/s dbname=x")  # no user


def render(**over):
    kw = dict(runtime_dir="/run/c", pgdata="/data/pg", pgbin="/usr/bin/postgres", python="/opt/v/bin/python",
              auth_token=None, vm_informant=None, informant_connstr="dbname=postgres user=cloud_admin")
    kw.update(over)
    return render_supervisord_conf(**kw)


def test_section_only_when_asked_and_its_environment_survives_supervisords_parser():
    assert "program:postgres-exporter" not in render()
    dsn = exporter_dsn("host='/run/a b%c' port=5432 user=cloud_admin dbname=postgres")
    cp = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    cp.read_string(render(postgres_exporter="/usr/bin/prom exporter", postgres_exporter_port=9999,
                          exporter_dsn=dsn))
    sec = cp["program:postgres-exporter"]
    # under setpriv: a parent-death signal, so the exporter never outlives supervisord
    assert sec["command"] == ("/usr/bin/setpriv --pdeathsig SIGTERM -- '/usr/bin/prom exporter' "
                              "--web.listen-address=:9999 --log.level=warn")
    assert sec["autorestart"] == "false"  # exitwatch restarts it after 5 s
    env = dict_of_key_value_pairs(sec["environment"].replace("%%", "%"))  # supervisord's own parser
    assert env == {"DATA_SOURCE_NAME": dsn}
    assert dsn_params(env["DATA_SOURCE_NAME"])["host"] == "/run/a b%c"
    with pytest.raises(ValueError):
        render(postgres_exporter="/x", exporter_dsn='x" ,EVIL="1')


def test_bad_exporter_flags_are_refused_before_anything_is_touched(tmp_path):
    from compute.boot.cli import main
    base = ["-D", str(tmp_path / "pg"), "-C", "postgresql://cloud_admin@127.0.0.1:5/postgres", "-s",
            '{"format_version": 1.0, "cluster": {}}', "--runtime-dir", str(tmp_path / "run")]
    assert main(base + ["--postgres-exporter", "/nonexistent/exporter"]) == 1
    assert main(base + ["--postgres-exporter", "/bin/true", "--postgres-exporter-port", "3080"]) == 1
    assert main(base + ["--postgres-exporter-port", "70000"]) == 1
    assert not (tmp_path / "pg").exists() and not (tmp_path / "run").exists()
