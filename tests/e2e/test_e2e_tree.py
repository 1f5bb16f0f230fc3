"""End to end: the whole tree (compute-ctl -> supervisord -> programs) on the embedded default,
and every way it can end."""

import json
import os
import signal
import subprocess
import time

import psycopg
import pytest

from tests.support.fault_tree import tree
from tests.support.tree import COMPUTE_CTL, Compute
from tests.support.waiting import wait_for

APP_PASSWORD = "apppass"


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_embedded_default_boots_and_stops_cleanly(compute):
    st = compute.wait_status("running")
    assert st["error"] is None and st["tenant"] is None and st["start_time"]

    # The spec's role logs in with its password over TCP; without one it is refused.
    with psycopg.connect(compute.conninfo("appdb", "app", APP_PASSWORD)) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(compute.conninfo("appdb", "app", "wrong")).close()

    with open(os.path.join(compute.pgdata, "postgresql.conf")) as f:
        conf = f.read()
    assert conf.startswith("# Managed by compute_ctl: begin\n") and f"port = {compute.pg_port}" in conf

    code, body = compute.request("GET", "/metrics.json")
    metrics = json.loads(body)
    assert code == 200 and metrics["total_startup_ms"] > 0 and "config_ms" in metrics

    # Nothing runs as root; the password hash is nowhere in the output.
    pm = compute.postmaster_pid()
    assert uid_of(pm) != 0
    # the driver's lines are relayed by supervisord's loop, a moment after the state it wrote
    wait_for(lambda: "compute is running" in compute.output(), 30, "the driver's lines")
    out = compute.output()
    assert "240aeccb7a1d859a99844d012bfe74cc" not in out
    assert "lifecycle" in out and "postgres" in out and "compute is running" in out

    t = time.monotonic()
    compute.signal(signal.SIGTERM)
    assert compute.wait_exit(10) == 0
    assert time.monotonic() - t < 10
    assert not alive(pm)
    assert "received fast shutdown request" in compute.output()


def test_kill_9_postmaster_fails_the_tree_fast(compute):
    compute.wait_status("running")
    compute.wait_handed_over()  # the whole tree up: not a kill in the middle of the hand-over's forks
    pm = compute.postmaster_pid()
    os.kill(pm, signal.SIGKILL)
    code = compute.wait_exit(30)  # how fast: bench, not a wall-clock assertion here
    assert code != 0
    # logged at ERROR, naming the signal (supervisord itself keeps only "-1")
    assert any(" ERROR " in ln and "postgres was killed by SIGKILL (signal 9)" in ln
               for ln in compute.output().splitlines()), compute.output()[-3000:]


def test_core_dump_is_reported_by_the_in_process_exitwatch(compute):
    """postgres dies leaving a core file: supervisord's own exitwatch runs gdb on it (a child
    whose end it polls), logs the backtrace through its own log relay, then stops the tree
    with postgres' failure."""
    compute.wait_status("running")
    pm = compute.postmaster_pid()
    core = os.path.join(compute.pgdata, f"core.{pm}")
    with open(core, "wb") as f:
        f.write(b"\x7fELF not a real core dump")
    st = os.stat(compute.pgdata)
    os.chown(core, st.st_uid, st.st_gid)
    os.kill(pm, signal.SIGKILL)
    assert compute.wait_exit(60) != 0
    lines = compute.output().splitlines()
    assert any("exitwatch" in ln and f"postgres left a core dump: {core}" in ln for ln in lines)
    assert any("exitwatch" in ln and "backtrace:" in ln for ln in lines), lines[-20:]
    down = next(i for i, ln in enumerate(lines) if "postgres is down" in ln)
    assert down < next(i for i, ln in enumerate(lines) if "backtrace:" in ln)


def sig_caught(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))


def arg_env_areas(pid: int) -> tuple[int, ...]:
    """arg_start, arg_end, env_start, env_end (/proc/PID/stat fields 48-51): where the kernel
    put the process' argv and environment; an exec maps new ones (ASLR), a fork keeps them."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return tuple(int(x) for x in fields[45:49])


def title(comm: str, runtime_dir: str) -> str:
    return f"compute-ctl: {'api master' if comm == 'api' else comm} (runtime dir {runtime_dir})"


def test_python_programs_are_forked_from_compute_ctl_with_clean_hygiene(compute):
    """lifecycle, monitor and the api master are compute-ctl's (= supervisord's) forks, not new
    interpreters: compute-ctl's address space (its argv and environment areas, where an exec
    would map new ones), their own title in it (compute/base/proctitle.py), the program's name
    as comm. They carry none of supervisord's signal handlers, files or sockets; a killed one is
    forked again."""
    compute.wait_status("running")
    compute.wait_handed_over()
    ctl = compute.proc.pid
    ctl_areas = arg_env_areas(ctl)
    kids = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == ctl and comm in ("lifecycle", "monitor", "api"):
            kids[comm] = pid
            assert arg_env_areas(pid) == ctl_areas  # no exec: the same image
            assert cmdline.rstrip(b"\0") == title(comm, compute.runtime_dir).encode()
    assert set(kids) == {"lifecycle", "monitor", "api"}, kids
    supervisord_only = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGCHLD - 1)) | (1 << (signal.SIGUSR2 - 1))
    for name, pid in kids.items():
        if name != "api":  # the gunicorn master catches HUP, CHLD and USR2 itself
            assert sig_caught(pid) & supervisord_only == 0, name
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        assert not [t for t in targets if t.endswith(("supervisord.log", "supervisord.conf"))], (name, targets)
    # supervisorctl sees them as usual, and a killed monitor is forked again
    st = compute.supervisorctl("status").stdout
    assert f"pid {kids['monitor']}," in st
    os.kill(kids["monitor"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = compute.supervisorctl("status").stdout
        line = next(ln for ln in st.splitlines() if ln.startswith("monitor"))
        if "RUNNING" in line and f"pid {kids['monitor']}," not in line:
            break
        time.sleep(0.05)
    new = int(line.split("pid ")[1].split(",")[0])
    assert arg_env_areas(new) == ctl_areas
    with open(f"/proc/{new}/cmdline", "rb") as f:
        assert f.read().rstrip(b"\0") == title("monitor", compute.runtime_dir).encode()
    with open(f"/proc/{new}/comm") as f:
        assert f.read().strip() == "monitor"


def test_supervisorctl_operations(compute):
    compute.wait_status("running")
    compute.wait_handed_over()  # the api and the monitor come after the start-up (status != 0 before)
    pm = compute.postmaster_pid()
    st = compute.supervisorctl("status")
    assert st.returncode == 0, st.stdout + st.stderr
    for name in ("postgres", "lifecycle", "monitor", "api"):
        assert name in st.stdout
    assert "exitwatch" not in st.stdout and "logrelay" not in st.stdout  # in-process handlers
    assert compute.supervisorctl("restart", "monitor").returncode == 0
    assert compute.supervisorctl("restart", "api").returncode == 0
    compute.wait_status("running")
    assert compute.postmaster_pid() == pm and alive(pm)
    tail = compute.supervisorctl("tail", "lifecycle")
    assert "compute is running" in tail.stdout

    # status is non-zero while a program is not running.
    assert compute.supervisorctl("stop", "monitor").returncode == 0
    assert compute.supervisorctl("status").returncode != 0
    assert compute.supervisorctl("start", "monitor").returncode == 0
    assert compute.supervisorctl("status").returncode == 0

    # Only the compute's user (and root) can reach the control socket.
    other = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            os.path.join(os.path.dirname(COMPUTE_CTL), "supervisorctl"), "-c",
                            os.path.join(compute.runtime_dir, "supervisord.conf"), "status"],
                           capture_output=True, text=True, timeout=30)
    assert other.returncode != 0 and "RUNNING" not in other.stdout

    # Stopping postgres takes the whole compute down with postgres' exit code (0: fast shutdown).
    compute.supervisorctl("stop", "postgres")
    assert compute.wait_exit(15) == 0
    assert not alive(pm)


def test_sighup_and_reload_never_restart_the_compute_in_place(compute):
    """supervisord would restart every program on SIGHUP or `supervisorctl reload`, postgres
    included (and, in-process, crash on its closed wakeup pipe). A compute only starts fresh: both
    are refused with a message, and nothing restarts. SIGUSR2 still reopens the logs.
    `supervisorctl shutdown` stops the compute like SIGTERM: exit 0, no descendant left."""
    compute.wait_status("running")
    compute.wait_handed_over()  # the start-up driver's own, expected exit
    pm = compute.postmaster_pid()
    before = {r: p.pid for r, p in tree(compute.proc.pid) if r != "postgres"}
    compute.signal(signal.SIGHUP)
    reload = compute.supervisorctl("reload")
    assert reload.returncode != 0 and "does not restart in place" in reload.stdout, reload.stdout
    compute.signal(signal.SIGUSR2)
    # both are handled by the time a later supervisorctl call is answered (one loop)
    deadline = time.monotonic() + 30
    while "received SIGHUP: ignored" not in compute.output():
        assert time.monotonic() < deadline, compute.output()[-3000:]
        time.sleep(0.05)
    assert compute.supervisorctl("status").returncode == 0
    assert compute.status()["status"] == "running"
    assert compute.proc.poll() is None and compute.postmaster_pid() == pm and alive(pm)
    assert {r: p.pid for r, p in tree(compute.proc.pid) if r != "postgres"} == before
    assert "Traceback" not in compute.output()

    descendants = [p.pid for _, p in tree(compute.proc.pid)]
    compute.supervisorctl("shutdown")
    assert compute.wait_exit(30) == 0, compute.output()[-3000:]
    assert not [pid for pid in descendants if alive(pid)]


def test_failed_start_reports_error_then_exits_1():
    c = Compute()
    c.spec = c.new_spec()
    c.spec["cluster"]["settings"].append({"name": "shared_buffers", "value": "lots", "vartype": "string"})
    c.spec["cluster"]["settings"] = [s for s in c.spec["cluster"]["settings"]
                                     if not (s["name"] == "shared_buffers" and s["value"] == "32MB")]
    with c:
        st = c.wait_status("failed")
        assert "postgres exited while starting" in st["error"]
        # postgres' own sentence, not "see the postgres log" (issue 20)
        assert 'invalid value for parameter "shared_buffers": "lots"' in st["error"], st
        t = time.monotonic()
        assert c.wait_exit(15) == 1
        assert 0.5 < time.monotonic() - t < 10  # the grace period (2 s in tests) was honoured


@pytest.mark.parametrize("field,mutate", [
    ("cluster.settings[5].value",
     lambda s: s["cluster"]["settings"].append({"name": "work_mem", "value": "1MB\nfsync = off"})),
    ("cluster.roles[0].name", lambda s: s["cluster"]["roles"][0].update(name="x" * 70)),
])
def test_invalid_spec_exits_1_and_touches_nothing(field, mutate):
    c = Compute()
    c.spec = c.new_spec()
    mutate(c.spec)
    try:
        out = c.refused_over_precious_pgdata()
        assert os.path.exists(os.path.join(c.pgdata, "precious"))
        assert out.startswith(f"compute-ctl: invalid spec: {field}: ") and len(out.splitlines()) == 1
    finally:
        c.close()


def test_secrets_not_in_process_arguments(compute):
    compute.wait_status("running")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "240aeccb7a1d859a99844d012bfe74cc" not in ps
    conf = os.path.join(compute.runtime_dir, "supervisord.conf")
    assert os.stat(conf).st_mode & 0o077 == 0
    assert os.stat(os.path.join(compute.runtime_dir, "state.db")).st_mode & 0o077 == 0


def test_sigkill_of_supervisord_leaves_no_orphans(compute):
    compute.wait_status("running")
    compute.wait_handed_over()  # every program has its pid (the api and the monitor come after the start-up)
    pids = [int(line.split("pid ")[1].split(",")[0])
            for line in compute.supervisorctl("status").stdout.splitlines() if "pid " in line]
    pm = compute.postmaster_pid()
    assert pm in pids and len(pids) >= 4  # postgres, lifecycle, monitor, api
    with open(os.path.join(compute.runtime_dir, "supervisord.pid")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    assert compute.wait_exit(15) != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert [p for p in pids if alive(p)] == []
