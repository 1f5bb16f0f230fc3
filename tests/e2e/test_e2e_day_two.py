"""End to end, day-two polish (issue 20 item 5): the demo on loopback, `compute-ctl
supervisorctl`, `compute-ctl plan`'s setting changes, each program's own title in ps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import psycopg

from tests.support.pgcluster import free_port, scratch_dir
from tests.support.tree import COMPUTE_CTL, VENV, Compute, booted_compute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_PG_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def listening(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (/proc/net/tcp, tcp6)."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                addr, hexport = fields[1].split(":")
                if fields[3] != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(addr)
                if v6:
                    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                    import ipaddress
                    found.add(str(ipaddress.IPv6Address(b"".join(words))))
                else:
                    found.add(".".join(str(b) for b in raw[::-1]))
    return found


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- 1. the demo binds loopback ----------------------------------------------------------------


def test_the_demo_listens_on_loopback_only():
    """scripts/demo as the README runs it (its install step skipped: the venv is current), with
    conf/demo-spec.json as it is but for its port: the HTTP API and postgres listen on
    127.0.0.1 only (the demo's password is `demo`)."""
    base = scratch_dir("cs-demo-")
    http_port, pg_port = free_port(), free_port()
    with open(os.path.join(REPO, "conf", "demo-spec.json")) as f:
        spec = json.load(f)
    for s in spec["cluster"]["settings"]:
        if s["name"] == "port":
            s["value"] = str(pg_port)
    spec_path = os.path.join(base, "demo-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    os.chmod(spec_path, 0o644)
    out_path = os.path.join(base, "demo.out")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [os.path.join(REPO, "scripts", "demo"), "--http-port", str(http_port), "-S", spec_path,
             "-C", f"postgresql://cloud_admin@127.0.0.1:{pg_port}/postgres"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "SKIP_IF_CURRENT": "1", "COMPUTE_VENV": VENV, "DEMO_DIR": os.path.join(base, "demo")})
    try:
        def status():
            import urllib.request
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=2) as r:
                    return json.loads(r.read())["status"] == "running"
            except OSError:
                assert proc.poll() is None, open(out_path).read()[-4000:]
                return False
        wait_for(status, 60, "the demo running")
        assert listening(http_port) == {"127.0.0.1"}
        assert listening(pg_port) == {"127.0.0.1"}
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="demo", password="demo", dbname="demo") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("demo",)
        text = open(out_path).read()
        assert f"compute-ctl supervisorctl --runtime-dir {base}/demo/run status" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            subprocess.run(["rm", "-rf", base])


# -- 2. compute-ctl supervisorctl ----------------------------------------------------------------


def ctl(*args: str, cwd: str | None = None, user: str | None = None) -> subprocess.CompletedProcess:
    argv = [COMPUTE_CTL, "supervisorctl", *args]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, env=NO_PG_ENV)


def test_supervisorctl_subcommand_status_and_restart():
    with booted_compute() as c:
        c.wait_status("running")
        c.wait_handed_over()
        st = ctl("--runtime-dir", c.runtime_dir, "status")
        assert st.returncode == 0, st.stdout + st.stderr
        lines = {ln.split()[0]: ln for ln in st.stdout.splitlines() if ln.strip()}
        assert {"postgres", "lifecycle", "monitor", "api"} <= set(lines)
        assert all("RUNNING" in lines[n] for n in ("postgres", "lifecycle", "monitor", "api"))
        old = int(lines["monitor"].split("pid ")[1].split(",")[0])
        pm = c.postmaster_pid()

        res = ctl(f"--runtime-dir={c.runtime_dir}", "restart", "monitor")
        assert res.returncode == 0 and "monitor: started" in res.stdout, res.stdout + res.stderr
        new = ctl("--runtime-dir", c.runtime_dir, "pid", "monitor").stdout.strip()
        assert new.isdigit() and int(new) != old
        assert c.postmaster_pid() == pm and c.status()["status"] == "running"
        # supervisorctl's own exit status comes through: a program that is not there
        assert ctl("--runtime-dir", c.runtime_dir, "status", "nosuch").returncode != 0

        # Run where the working directory holds a `supervisor` package: the installed one runs.
        hostile = scratch_dir("cs-cwd-")
        os.makedirs(os.path.join(hostile, "supervisor"))
        for name in ("__init__.py", "supervisorctl.py"):
            with open(os.path.join(hostile, "supervisor", name), "w") as f:
                f.write("print('HIJACKED')\n")
        res = ctl("--runtime-dir", c.runtime_dir, "status", cwd=hostile)
        assert res.returncode == 0 and "HIJACKED" not in res.stdout and "RUNNING" in res.stdout
        subprocess.run(["rm", "-rf", hostile])

        # Another local user cannot see the compute's conf, nor reach its socket through this.
        other = ctl("--runtime-dir", c.runtime_dir, "status", user="nobody")
        assert other.returncode != 0 and "RUNNING" not in other.stdout


def test_supervisorctl_subcommand_without_a_compute_says_what_to_pass():
    res = ctl("--runtime-dir", "/nonexistent/run", "status")
    assert res.returncode == 2
    assert "/nonexistent/run/supervisord.conf does not exist" in res.stderr and "--runtime-dir" in res.stderr
    assert ctl("--runtime-dir").returncode == 2


# -- 3. compute-ctl plan: setting changes ----------------------------------------------------


def test_plan_shows_setting_changes_and_which_need_a_restart():
    """`compute-ctl plan -C (the compute's -C) --runtime-dir` on the embedded default: the
    passfile from the runtime dir; the settings that would change, compared with the running
    postgres' pg_settings in their units, postmaster ones marked; nothing is changed."""
    c = Compute()
    c.spec = c.new_spec(work_mem="4MB")
    with c:
        c.wait_status("running")
        spec = c.new_spec(work_mem="8MB", max_connections="50")
        for s in spec["cluster"]["settings"]:
            if s["name"] == "shared_buffers":
                s["value"] = "32768kB"  # the running 32MB in another unit: no change
        spec["cluster"]["settings"] = [s for s in spec["cluster"]["settings"] if s["name"] != "fsync"]
        path = os.path.join(c.base, "next.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        out = subprocess.run([COMPUTE_CTL, "plan", "-C", c.connstr, "-S", path, "--runtime-dir", c.runtime_dir],
                             capture_output=True, text=True, timeout=60, env=NO_PG_ENV)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert "-- settings: 3 changes, 1 needing a restart" in lines, out.stdout
        setting = {ln.split()[1].rstrip(":"): ln for ln in lines if ln.startswith("--   ")}
        assert set(setting) == {"work_mem", "max_connections", "fsync"}, out.stdout
        assert "'4MB' -> '8MB'; applied by the reload" in setting["work_mem"]
        assert "'100' -> '50'; needs a restart" in setting["max_connections"]
        assert "'off' -> its default 'on'; applied by the reload" in setting["fsync"]
        with psycopg.connect(c.admin_conninfo()) as conn:  # nothing ran
            assert conn.execute("SHOW work_mem").fetchone() == ("4MB",)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)

        same = subprocess.run([COMPUTE_CTL, "plan", "-C", c.connstr, "-S", os.path.join(c.base, "spec.json"),
                               "--runtime-dir", c.runtime_dir], capture_output=True, text=True, timeout=60,
                              env=NO_PG_ENV)
        assert same.returncode == 0 and "-- settings: no change" in same.stdout, same.stdout + same.stderr


# -- 4. process titles -------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def ps_args(pids: list[int]) -> dict[int, tuple[str, str]]:
    res = subprocess.run(["ps", "-ww", "-o", "pid=,comm=,args=", "-p", ",".join(map(str, pids))],
                         capture_output=True, text=True, timeout=30)
    found = {}
    for line in res.stdout.splitlines():
        pid, comm, args = line.strip().split(None, 2)
        found[int(pid)] = (comm, args.strip())
    return found


def test_each_program_has_its_own_title_and_none_shows_a_secret():
    """`ps -o args` of every process of a booted tree: compute-ctl (supervisord), lifecycle,
    monitor, the api master and its worker each show `compute-ctl: NAME (runtime dir DIR)`,
    postgres its own titles; the spec given inline (`-s`, with a role's password hash), the
    superuser's password: in no title."""
    c = Compute()
    spec = c.new_spec()
    c.args = ["-s", json.dumps(spec)]
    with c:
        c.wait_status("running")
        c.wait_handed_over()
        with open(c.passfile) as f:
            password = f.read().strip().rsplit(":", 1)[1]
        suffix = f"(runtime dir {c.runtime_dir})"
        expected = {f"compute-ctl: {name} {suffix}" for name in
                    ("supervisord", "lifecycle", "monitor", "api master", "api worker")}

        last = {}

        def titles():
            last["found"] = found = ps_args(tree_pids(c.proc.pid))
            ours = {args for comm, args in found.values() if args.startswith("compute-ctl:")}
            return found if ours == expected else None
        try:
            found = wait_for(titles, 30, f"titles {expected}")
        except AssertionError as e:
            raise AssertionError(f"{e}; found {last.get('found')}") from None
        by_title = {}
        for pid, (comm, args) in found.items():
            by_title.setdefault(args, []).append((pid, comm))
        for title in expected:
            assert len(by_title[title]) == 1, (title, by_title[title])  # one process each
        assert by_title[f"compute-ctl: supervisord {suffix}"][0] == (c.proc.pid, "compute-ctl")
        comms = {args.split(": ", 1)[1].split(" (")[0]: by_title[args][0][1] for args in expected}
        assert comms == {"supervisord": "compute-ctl", "lifecycle": "lifecycle", "monitor": "monitor",
                         "api master": "api", "api worker": "api"}
        postgres = [args for comm, args in found.values() if not args.startswith("compute-ctl:")]
        assert any(a.endswith(f"postgres -D {c.pgdata}") for a in postgres), postgres
        assert any(a.startswith("postgres: checkpointer") for a in postgres), postgres
        for comm, args in found.values():
            assert password not in args and spec["cluster"]["roles"][0]["encrypted_password"] not in args, args
        # A restarted program gets its title again (forked from compute-ctl, whose title it inherits first).
        old = by_title[f"compute-ctl: monitor {suffix}"][0][0]
        os.kill(old, signal.SIGKILL)

        def new_monitor():
            now = ps_args(tree_pids(c.proc.pid))
            return [pid for pid, (comm, args) in now.items() if args == f"compute-ctl: monitor {suffix}" and pid != old]
        assert wait_for(new_monitor, 30, "a new monitor titled as such")


def test_compute_ctl_hides_its_flags_from_other_users_before_its_checks():
    """-C with a password, -S a FIFO nobody writes yet: compute-ctl has parsed its flags (its
    early responder answers) and waits in its spec check. Another user reading its command line
    then finds its title, not its flags: the title is set at its first instruction, not after
    the checks (which a slow spec source, or a slow machine, can make long)."""
    c = Compute()
    fifo = os.path.join(c.base, "spec.json")
    os.mkfifo(fifo, 0o600)
    secret = "pw-" + uuid.uuid4().hex
    c.spec = None
    c.args = ["-C", f"postgresql://cloud_admin:{secret}@127.0.0.1:{c.pg_port}/postgres", "-S", fifo]
    with c:
        wait_for(lambda: c.status() is not None, 30, "compute-ctl's early responder")
        seen = subprocess.run(["runuser", "-u", "nobody", "--", "cat", f"/proc/{c.proc.pid}/cmdline"],
                              capture_output=True, timeout=30).stdout
        assert c.proc.poll() is None  # still waiting for its spec: the command line read is its own
        assert seen.split(b"\0")[0] == b"compute-ctl: bootstrap", seen[:200]
        assert secret.encode() not in seen and b"-C" not in seen.split(b"\0"), seen[:200]


def test_compute_ctl_is_titled_bootstrap_until_it_becomes_supervisord():
    """While compute-ctl bootstraps (held here in reading --jwks, a FIFO nobody writes yet), its
    title is `compute-ctl: bootstrap (runtime dir DIR)`: its flags (an inline `-s` spec with a
    password hash) are gone from ps already; then `compute-ctl: supervisord (...)`."""
    from tests.support.api_helpers import jwks_keys
    c = Compute()
    spec = c.new_spec()
    fifo = os.path.join(c.base, "jwks.json")
    os.mkfifo(fifo, 0o644)
    c.args = ["-s", json.dumps(spec), "--jwks", fifo]
    with c:
        def own_title():
            return ps_args([c.proc.pid]).get(c.proc.pid, ("", ""))[1]
        wait_for(lambda: own_title() == f"compute-ctl: bootstrap (runtime dir {c.runtime_dir})", 30,
                 "the bootstrap title")
        assert spec["cluster"]["roles"][0]["encrypted_password"] not in own_title()
        _, _, jwks = jwks_keys()
        regular = os.path.join(c.base, "jwks.regular")
        with open(regular, "w") as f:
            json.dump(jwks, f)
        os.chmod(regular, 0o644)
        fd = os.open(fifo, os.O_WRONLY)  # compute-ctl's read of the FIFO gets this
        os.rename(regular, fifo)  # every later reader (the api) finds a regular file
        with os.fdopen(fd, "w") as f:
            json.dump(jwks, f)
        wait_for(lambda: own_title() == f"compute-ctl: supervisord (runtime dir {c.runtime_dir})", 30,
                 "the supervisord title")


# -- 5. the documented JWKS and tokens ---------------------------------------------------------


def test_the_documented_tokens_open_a_compute_with_the_documented_jwks():
    """docs/operations.md's script (run as tests/unit/test_docs_tokens.py runs it): a compute
    started with its jwks.json and `-i compute-1` answers both tokens, and no request without one."""
    from tests.unit.test_docs_tokens import doc_script
    c = Compute()
    c.spec = c.new_spec()
    work = scratch_dir("cs-tokens-")
    cwd = os.getcwd()
    try:
        os.chdir(work)
        exec(compile(doc_script(), "make_tokens.py", "exec"), {"__name__": "__main__"})  # noqa: S102
    finally:
        os.chdir(cwd)
    with open(os.path.join(work, "jwks.json")) as f:
        jwks = json.load(f)
    tokens = {}
    for name in ("admin.jwt", "compute.jwt"):
        with open(os.path.join(work, name)) as f:
            tokens[name] = f.read()
    subprocess.run(["rm", "-rf", work])
    c.use_jwks(jwks, token=tokens["admin.jwt"])
    c.args += ["-i", "compute-1"]
    with c:
        c.wait_status("running")
        for token in tokens.values():
            code, body = c.request("GET", "/status", headers={"Authorization": f"Bearer {token}"})
            assert code == 200 and json.loads(body)["status"] == "running", body
        assert c.request("GET", "/status", headers={"Authorization": None})[0] == 400
        head, claims, sig = tokens["admin.jwt"].split(".")
        sig = sig[:10] + ("B" if sig[10] == "A" else "A") + sig[11:]  # one signature byte altered
        assert c.request("GET", "/status", headers={"Authorization": f"Bearer {head}.{claims}.{sig}"})[0] == 401
