"""The API's listening socket is bound by compute-ctl and inherited by the api alone
(compute/api/listener.py): the api keeps serving across kill -9 of its master or a worker and
across `supervisorctl restart api` (connections wait in the backlog, none is refused), no other
program holds the socket, and a port in use is a one-line error that leaves nothing behind.

This file: on a booted tree; kill -9 of the api: tests/fault/test_api_socket.py."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

from tests.support.fault_tree import (StatusPoller, alive, holders, holds, listening_inode, proc_table,
                                      program_child, supervisord_pid, tree)
from tests.support.pgcluster import free_port
from tests.support.tree import Compute
from tests.support.waiting import wait_for

EXPORTER = "/usr/bin/prometheus-postgres-exporter"
INFORMANT = """#!/bin/sh
echo "vm-informant stand-in"
exec sleep 600
"""


def test_only_compute_ctl_and_the_api_hold_the_socket():
    c = Compute()
    c.spec = c.new_spec()
    informant = os.path.join(c.base, "vm-informant")
    with open(informant, "w") as f:
        f.write(INFORMANT)
    os.chmod(informant, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    c.args = ["--vm-informant", informant]
    if os.access(EXPORTER, os.X_OK):
        c.args += ["--postgres-exporter", EXPORTER, "--postgres-exporter-port", str(free_port())]
    with c:
        c.wait_status("running")
        c.wait_handed_over()  # lifecycle is between two drivers for a moment after running
        sup = supervisord_pid(c.runtime_dir)
        wanted = {"monitor", "vm-informant"} | ({"postgres-exporter"} if os.access(EXPORTER, os.X_OK) else set())
        wait_for(lambda: all(c.supervisorctl("pid", p).stdout.strip().isdigit()
                             and c.supervisorctl("pid", p).stdout.strip() != "0" for p in wanted),
                 20, f"{wanted} running")
        inode = listening_inode(c.http_port)
        held = holders(c, inode)
        roles = set(held.values())
        assert roles <= {"compute-ctl", "api master", "api worker"}, held
        assert c.proc.pid in held and program_child(sup, "api") in held and "api worker" in roles
        others = {role for role, p in tree(c.proc.pid) if p.pid not in held}
        assert {"lifecycle", "monitor", "postgres"} <= others, others
        # The exec'd helpers are children of supervisord too and hold nothing either.
        for name in wanted - {"monitor"}:
            pid = int(c.supervisorctl("pid", name).stdout.strip())
            assert pid not in held and alive(pid), name

        # `supervisorctl restart api` serves the same socket again, without a bind.
        old = program_child(sup, "api")
        with StatusPoller(c.http_port, period=0.005, timeout=30) as poller:
            r = c.supervisorctl("restart", "api")
            assert r.returncode == 0 and "api: started" in r.stdout, r.stdout + r.stderr
            new = wait_for(lambda: (m := program_child(sup, "api")) and m != old and m, 20, "a new api master")
            wait_for(lambda: any(p.ppid == new for _, p in tree(c.proc.pid)), 20, "its workers")
            n = len(poller.samples)
            wait_for(lambda: len(poller.samples) > n + 2, 20, "answers from the restarted api")
        assert poller.failures() == [], [s.error for s in poller.failures()][:5]
        assert listening_inode(c.http_port) == inode
        assert new in holders(c, inode)


def test_port_in_use_is_a_clear_error_and_leaves_nothing():
    c = Compute()
    c.spec = c.new_spec()
    try:
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("0.0.0.0", c.http_port))
            taken.listen()
            r = subprocess.run(c.command(), capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1, r.stderr
        assert len(lines) == 1 and lines[0].startswith("compute-ctl: ") and str(c.http_port) in lines[0] \
            and "in use" in lines[0].lower(), r.stderr
        assert r.stdout == ""
        # Nothing was touched or started: no runtime dir, no PGDATA, no process of ours left.
        assert os.path.isdir(c.base)
        assert not os.path.exists(c.runtime_dir) and not os.path.exists(c.pgdata)
        assert not any(c.base in p.cmdline for p in proc_table().values())
    finally:
        c.close()


def holders_anywhere(inode: str) -> set[int]:
    """Every process on the machine (not only the tree's) with the socket `inode` open."""
    return {int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if holds(int(pid), inode)}


def test_restart_api_under_load_refuses_and_cuts_nothing():
    """Eight clients asking /status back to back (new connection each time, the fast path)
    while the api is restarted twice: every request answered (none refused, none cut), and
    no process anywhere on the machine but compute-ctl and the api holds the socket."""
    from contextlib import ExitStack

    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        c.wait_serving()  # the restarts start from the api, not from the responder's hand-over
        sup = supervisord_pid(c.runtime_dir)
        inode = listening_inode(c.http_port)
        with ExitStack() as stack:
            pollers = [stack.enter_context(StatusPoller(c.http_port, period=0.0, timeout=30)) for _ in range(8)]
            for _ in range(2):
                old = wait_for(lambda: program_child(sup, "api"), 20, "the api")
                r = c.supervisorctl("restart", "api")
                assert r.returncode == 0 and "api: started" in r.stdout, r.stdout + r.stderr
                new = wait_for(lambda: (m := program_child(sup, "api")) and m != old and m, 20, "a new api master")
                wait_for(lambda: any(p.ppid == new for _, p in tree(c.proc.pid)), 20, "its workers")
                counts = [len(p.samples) for p in pollers]
                wait_for(lambda: all(len(p.samples) > n + 2 for p, n in zip(pollers, counts)), 30,
                         "answers from the restarted api to every client")
        samples = [s for p in pollers for s in p.samples]
        failures = [s.error for p in pollers for s in p.failures()]
        assert len(samples) > 100 and failures == [], (len(samples), failures[:5])
        held = holders_anywhere(inode)
        tree_roles = {p.pid: role for role, p in tree(c.proc.pid)}
        assert {tree_roles.get(pid) for pid in held} <= {"compute-ctl", "api master", "api worker"}, held
