"""postgres-exporter: the DSN it gets (pure), its supervisord section, and end to end with
Debian's real prometheus-postgres-exporter scraping a booted compute."""

import configparser
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from supervisor.datatypes import dict_of_key_value_pairs

from compute.postgres_exporter import exporter_dsn
from compute.supervision import render_supervisord_conf
from tests.support.pgcluster import free_port
from tests.support.tree import Compute

EXPORTER = shutil.which("prometheus-postgres-exporter") or "/usr/bin/prometheus-postgres-exporter"


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


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def wait_pg_up(port: int, c: Compute, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
            if "\npg_up 1" in last:
                return last
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise AssertionError(f"no pg_up 1 within {timeout} s: {last[-500:]}\n{c.output()[-4000:]}")


def exporter_pid(c: Compute) -> int:
    out = c.supervisorctl("pid", "postgres-exporter").stdout.strip()
    return int(out)


@pytest.mark.e2e
@pytest.mark.skipif(not os.access(EXPORTER, os.X_OK), reason="prometheus-postgres-exporter not installed")
def test_real_exporter_scrapes_the_compute_and_is_supervised():
    c = Compute()
    c.spec = c.new_spec()
    port = free_port()
    c.args = ["--postgres-exporter", EXPORTER, "--postgres-exporter-port", str(port)]
    with c:
        c.wait_status("running")
        text = wait_pg_up(port, c)
        assert "pg_stat_database_" in text  # real per-database metrics from postgres

        # Its access is private: no password anywhere, its environment unreadable by others.
        pid = exporter_pid(c)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert not any(b"postgresql://" in a or b"password" in a for a in argv)
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        assert b"password" not in env[b"DATA_SOURCE_NAME"] and b"@/postgres?" in env[b"DATA_SOURCE_NAME"]
        other = subprocess.run(["runuser", "-u", "nobody", "--", "cat", f"/proc/{pid}/environ"],
                               capture_output=True)
        assert other.returncode != 0 and b"DATA_SOURCE_NAME" not in other.stdout

        # Killed: restarted ~5 s later (exitwatch), postgres untouched, metrics back.
        pm = c.postmaster_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        new = None
        while time.monotonic() < deadline:
            try:
                new = exporter_pid(c)
            except ValueError:
                new = None
            if new and new != pid:
                break
            time.sleep(0.2)
        assert new and new != pid, c.supervisorctl("status").stdout
        wait_pg_up(port, c)
        assert c.postmaster_pid() == pm and c.status()["status"] == "running"

        c.signal(signal.SIGTERM)
        assert c.wait_exit(20) == 0
        # No orphan: the exporter went down with the tree.
        assert not os.path.exists(f"/proc/{new}") or open(f"/proc/{new}/stat").read().split()[2] == "Z"


def test_bad_exporter_flags_are_refused_before_anything_is_touched(tmp_path):
    from compute.cli import main
    base = ["-D", str(tmp_path / "pg"), "-C", "postgresql://cloud_admin@127.0.0.1:5/postgres", "-s",
            '{"format_version": 1.0, "cluster": {}}', "--runtime-dir", str(tmp_path / "run")]
    assert main(base + ["--postgres-exporter", "/nonexistent/exporter"]) == 1
    assert main(base + ["--postgres-exporter", "/bin/true", "--postgres-exporter-port", "3080"]) == 1
    assert main(base + ["--postgres-exporter-port", "70000"]) == 1
    assert not (tmp_path / "pg").exists() and not (tmp_path / "run").exists()
