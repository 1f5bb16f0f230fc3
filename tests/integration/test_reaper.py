"""What compute-ctl does with whatever of the tree outlives supervisord (compute/tree/reaper.py), and
the parent checks that close the window before a parent-death signal is armed
(compute/base/procutil.py). The e2e side: tests/fault/test_fault_exit.py.

This file: with real processes; the pure decisions: tests/unit/test_reaper.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from compute.tree.reaper import descendants
from tests.support.api_helpers import REPO
from tests.support.waiting import wait_for


STOP_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from compute.base.procutil import become_subreaper
    from compute.tree.reaper import Escalation, proc_table, descendants, stop_descendants
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


def run_module(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env={**os.environ, **env})


def test_a_program_whose_supervisord_is_already_gone_stops_at_once():
    code = "from compute.base.procutil import die_with_parent; die_with_parent(); print('still here')"
    gone = run_module(code, {"COMPUTE_SUPERVISORD_PID": "1"})  # not our parent: it died, we were adopted
    assert gone.returncode == -signal.SIGTERM and "still here" not in gone.stdout
    ours = run_module(code, {"COMPUTE_SUPERVISORD_PID": str(os.getpid())})
    assert ours.returncode == 0 and ours.stdout == "still here\n"


def test_supervisord_whose_compute_ctl_is_already_gone_stops_before_starting_anything(tmp_path):
    code = "import sys; sys.argv[1:] = ['-n', '-c', sys.argv[-1]]; from compute.tree.supervisord import main; main()"
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
    from compute.tree.reaper import proc_table, read_proc
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


def test_a_process_whose_main_thread_exited_is_alive_while_a_thread_runs():
    """/proc/PID/stat says Z as soon as the main thread has exited; the process still holds its
    descriptors (a listening socket) until its last thread is gone. read_proc (and the exit
    watcher's process_alive) read it as alive until then."""
    from compute.tree.exitwatch import process_alive
    from compute.tree.reaper import read_proc, thread_states
    code = ("import ctypes, sys, threading\n"
            "t = threading.Thread(target=sys.stdin.read)\n"
            "t.start()\n"
            "print('ready', flush=True)\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")  # the main thread ends; the process lives on
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        wait_for(lambda: _stat_state(child.pid) == "Z", 10, "the main thread to exit", 0.005)
        states = sorted(thread_states(child.pid), key=lambda st: st == "Z")  # the reader first
        assert len(states) == 2 and states[0] in "RS" and states[1] == "Z", states
        assert read_proc(child.pid).state in "RS" and process_alive(child.pid)
    finally:
        child.stdin.close()  # the thread's read ends: the last thread exits
        child.wait(10)
    assert read_proc(child.pid) is None and not process_alive(child.pid)


def _stat_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_program_sent_sigterm_as_supervisord_forks_it_stops():
    """supervisord's fork of a program (compute.tree.supervisord): until the program installs its
    own handlers the child had supervisord's Python handlers, and a SIGTERM of a shutdown that
    came while it was being spawned was swallowed there (the program ran on until stopwaitsecs
    and a SIGKILL). The child now starts with the stop signals at their default action."""
    code = textwrap.dedent("""
        import os, signal
        from compute.tree.supervisord import _fork_without_open_stores
        received = []
        signal.signal(signal.SIGTERM, lambda *_: received.append("TERM"))  # as supervisord has it
        r, w = os.pipe()
        pid = _fork_without_open_stores(None)
        if pid == 0:  # still supervisord's code in the child: it gets the SIGTERM meanwhile
            os.close(w)
            os.read(r, 1)  # until the parent has sent it
            os._exit(0)
        os.close(r)
        os.kill(pid, signal.SIGTERM)
        os.write(w, b"x")
        _, status = os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGTERM)  # the parent's own handler is as it was
        print(os.waitstatus_to_exitcode(status), received)
    """)
    out = run_module(code, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=1) == [str(-signal.SIGTERM), "['TERM']\n"], out.stdout
