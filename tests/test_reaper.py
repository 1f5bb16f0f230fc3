"""What compute-ctl does with whatever of the tree outlives supervisord (compute/reaper.py), and
the parent checks that close the window before a parent-death signal is armed
(compute/procutil.py). The e2e side: tests/test_fault_exit.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from compute.reaper import Escalation, Proc, descendants, due_signals
from tests.support.api_helpers import REPO

ROOT = 100
ESC = Escalation(term_after=0.5, quit_postmaster_after=2.0, kill_after=3.0)


def table(*procs: tuple[int, int] | tuple[int, int, str]) -> dict[int, Proc]:
    """(pid, ppid[, state]) -> a process table; start times are all distinct."""
    return {p[0]: Proc(pid=p[0], ppid=p[1], state=p[2] if len(p) > 2 else "S", start=1000 + p[0])
            for p in procs}


# A tree after a SIGKILL of supervisord (201): its programs are re-parented to compute-ctl
# (ROOT); 300 is the postmaster with two backends, 400 a gunicorn master with a worker, 500 a
# zombie not yet reaped; 1 (init), 50 (our parent) and 900 (someone else's) are not ours.
AFTER_SUPERVISORD_KILL = table(
    (1, 0), (50, 1), (ROOT, 50), (900, 1),
    (300, ROOT), (301, 300), (302, 300),
    (400, ROOT), (401, 400),
    (500, ROOT, "Z"),
    (600, ROOT), (601, 600), (602, 601),  # lifecycle -> initdb -> postgres --boot
)


def test_descendants_are_exactly_the_subtree():
    got = [p.pid for p in descendants(AFTER_SUPERVISORD_KILL, ROOT)]
    assert sorted(got) == [300, 301, 302, 400, 401, 500, 600, 601, 602]
    assert got.index(600) < got.index(601) < got.index(602)  # parents first
    assert descendants(AFTER_SUPERVISORD_KILL, 902) == []


def test_first_only_wait_for_what_is_already_stopping():
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=0.1, escalation=ESC)
    assert set(due) == {300, 301, 302, 400, 401, 600, 601, 602}  # alive; the zombie is not
    assert set(due.values()) == {0}


def test_then_postgres_fast_shutdown_and_sigterm_for_the_rest():
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=1.0, escalation=ESC)
    assert due == {300: signal.SIGINT, 301: 0, 302: 0,  # the postmaster stops its backends
                   400: signal.SIGTERM, 401: signal.SIGTERM,
                   600: signal.SIGTERM, 601: signal.SIGTERM, 602: signal.SIGTERM}


def test_then_immediate_shutdown_then_sigkill_for_everything():
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=2.5, escalation=ESC)
    assert due[300] == signal.SIGQUIT and due[301] == 0 and due[400] == signal.SIGTERM
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=3.0, escalation=ESC)
    assert due == {pid: signal.SIGKILL for pid in (300, 301, 302, 400, 401, 600, 601, 602)}


def test_nothing_alive_means_nothing_due():
    only_zombies = table((ROOT, 50), (500, ROOT, "Z"), (900, 1))
    for elapsed in (0.0, 1.0, 5.0):
        assert due_signals(only_zombies, ROOT, postmaster=None, elapsed=elapsed, escalation=ESC) == {}


def test_a_stale_postmaster_pid_names_nobody_outside_the_tree():
    """postmaster.pid left by a killed postgres may name a recycled pid: never signalled unless
    it is one of ours, and ours are not spared because of it."""
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=900, elapsed=1.0, escalation=ESC)
    assert 900 not in due
    assert due[300] == signal.SIGTERM and due[301] == signal.SIGTERM  # no known postmaster: all SIGTERM


def test_orphaned_backends_are_stopped_too():
    """The postmaster died first: its backends were re-parented to us."""
    orphans = table((ROOT, 50), (301, ROOT), (302, ROOT))
    due = due_signals(orphans, ROOT, postmaster=300, elapsed=1.0, escalation=ESC)
    assert due == {301: signal.SIGTERM, 302: signal.SIGTERM}


# -- the thin layer, on real processes ---------------------------------------------------------

STOP_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from compute.procutil import become_subreaper
    from compute.reaper import Escalation, proc_table, descendants, stop_descendants
    assert become_subreaper()
    py = sys.executable
    # One that ignores SIGTERM (needs the SIGKILL), one polite child, and an orphan: a grandchild
    # whose parent exits at once, so that it is re-parented to us.
    stubborn = subprocess.Popen([py, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
                                stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen(["sleep", "600"])
    orphan = int(subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
                                capture_output=True, text=True).stdout)
    assert stubborn.stdout.readline() == "ready\\n"
    before = [p.pid for p in descendants(proc_table(), os.getpid())]
    t0 = time.monotonic()
    left = stop_descendants(escalation=Escalation(term_after=0.2, quit_postmaster_after=0.5,
                                                  kill_after=1.0), give_up_after=20)
    print(json.dumps({"before": before, "orphan": orphan, "left": [p.pid for p in left],
                      "elapsed": time.monotonic() - t0,
                      "after": [p.pid for p in descendants(proc_table(), os.getpid())]}))
""")


def test_stop_descendants_signals_escalates_and_reaps():
    proc = subprocess.Popen([sys.executable, "-c", STOP_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a regression must not leave its children running
        except ProcessLookupError:
            pass
        proc.wait()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["orphan"] in result["before"] and len(result["before"]) >= 3
    assert result["left"] == [] and result["after"] == []  # none alive, none a zombie
    assert result["elapsed"] >= 1.0  # the stubborn one took the SIGKILL
    assert "outlived supervisord: SIGTERM" in out.stderr and "SIGKILL" in out.stderr


# -- parent checks: a parent that died before the parent-death signal was armed -----------------

def run_module(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env={**os.environ, **env})


def test_a_program_whose_supervisord_is_already_gone_stops_at_once():
    code = "from compute.procutil import die_with_parent; die_with_parent(); print('still here')"
    gone = run_module(code, {"COMPUTE_SUPERVISORD_PID": "1"})  # not our parent: it died, we were adopted
    assert gone.returncode == -signal.SIGTERM and "still here" not in gone.stdout
    ours = run_module(code, {"COMPUTE_SUPERVISORD_PID": str(os.getpid())})
    assert ours.returncode == 0 and ours.stdout == "still here\n"


def test_supervisord_whose_compute_ctl_is_already_gone_stops_before_starting_anything(tmp_path):
    code = "import sys; sys.argv[1:] = ['-n', '-c', sys.argv[-1]]; from compute.supervisord_main import main; main()"
    conf = str(tmp_path / "missing.conf")
    gone = subprocess.run([sys.executable, "-c", code, conf], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "COMPUTE_CTL_PID": "1"})
    assert gone.returncode == -signal.SIGTERM, gone.stderr
    # With its real parent it goes on (and stops on the missing config, an ordinary error).
    ours = subprocess.run([sys.executable, "-c", code, conf], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "COMPUTE_CTL_PID": str(os.getpid())})
    assert ours.returncode not in (0, -signal.SIGTERM) and "missing.conf" in ours.stdout + ours.stderr


def test_the_proc_reader_reads_this_process_and_its_group():
    """read_proc / proc_table: the one /proc reader, the reaper's and the tests' (tests/support)."""
    from compute.reaper import proc_table, read_proc
    me = read_proc(os.getpid())
    assert me is not None and me.ppid == os.getppid() and me.state in "RS"
    assert me.pgrp == os.getpgrp() and me.session == os.getsid(0) and me.start > 0
    table = proc_table()
    assert (table[os.getpid()].start, table[os.getpid()].comm) == (me.start, me.comm)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        kids = [p.pid for p in descendants(proc_table(), os.getpid())]
        assert child.pid in kids
        only_child = proc_table(lambda pid: read_proc(pid) if pid == child.pid else None)  # read: any reader
        assert list(only_child) == [child.pid] and only_child[child.pid].ppid == os.getpid()
    finally:
        child.stdin.close()
        child.wait()
    assert read_proc(child.pid) is None
