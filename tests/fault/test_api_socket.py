"""The API's listening socket is bound by compute-ctl and inherited by the api alone
(compute/api/listener.py): the api keeps serving across kill -9 of its master or a worker and
across `supervisorctl restart api` (connections wait in the backlog, none is refused), no other
program holds the socket, and a port in use is a one-line error that leaves nothing behind.

This file: kill -9 of the api's master and worker on a booted tree; the rest:
tests/e2e/test_api_socket.py."""

from __future__ import annotations

import os
import signal

from tests.support.fault_tree import (StatusPoller, alive, holders, listening_inode, program_child,
                                      supervisord_pid, tree)
from tests.support.tree import Compute
from tests.support.waiting import wait_for

# How a request in flight in a process killed by SIGKILL ends for the client.
CUT = {"IncompleteRead", "RemoteDisconnected", "ConnectionResetError", "BadStatusLine"}


def test_api_serves_across_kill_9_of_master_and_worker():
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        sup = supervisord_pid(c.runtime_dir)

        def workers_of(master):
            return {p.pid for _, p in tree(c.proc.pid) if p.ppid == master and p.state != "Z"}

        # A generous timeout: a request made while the api restarts waits in the backlog.
        with StatusPoller(c.http_port, period=0.005, timeout=30) as poller:
            for _ in range(3):
                master = wait_for(lambda: (m := program_child(sup, "api")) and workers_of(m) and m,
                                  20, "the api and its worker(s)")
                old_workers = workers_of(master)
                os.kill(master, signal.SIGKILL)
                new = wait_for(lambda: (m := program_child(sup, "api")) and m != master and workers_of(m) and m,
                               20, "a new api master with workers")
                n = len(poller.samples)
                wait_for(lambda: len(poller.samples) > n + 2, 20, "answers from the new api")
                wait_for(lambda: not any(alive(p) for p in old_workers), 20, "the orphaned workers to go")

                victim = min(workers_of(new))
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: workers_of(new) - {victim}, 20, "a replacement worker")
                n = len(poller.samples)
                wait_for(lambda: len(poller.samples) > n + 2, 20, "answers after the worker's replacement")
        assert len(poller.samples) > 20
        # Never refused (the socket stays open) nor timed out. kill -9 may cut the one request the
        # killed process was answering (the poller has one in flight at a time).
        failures = [s.error for s in poller.failures()]
        assert all(e.split(":")[0] in CUT for e in failures), failures
        assert len(failures) <= 2 * 3, failures
        assert all(b["status"] == "running" for b in poller.bodies())
        # The port was never bound again: the same socket, still held by compute-ctl.
        inode = listening_inode(c.http_port)
        assert c.proc.pid in holders(c, inode)
