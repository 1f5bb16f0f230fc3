"""The API's listening socket is bound by compute-ctl and inherited by the api alone
(compute/api/listener.py): the api keeps serving across kill -9 of its master or a worker and
across `supervisorctl restart api` (connections wait in the backlog, none is refused), no other
program holds the socket, and a port in use is a one-line error that leaves nothing behind.

This file: the bind seen from a child process; in-process: tests/unit/test_api_socket.py."""

from __future__ import annotations

import subprocess
import sys


def test_bind_keeps_clear_of_stdio():
    """compute-ctl started with stdin closed: the socket must not be fd 0, which supervisord
    makes every child's stdin pipe."""
    script = ("import os, socket; os.close(0); from compute.api.listener import bind_api_socket; "
              "s = bind_api_socket('127.0.0.1', 0); assert s.fileno() > 2, s.fileno(); "
              "assert not s.get_inheritable() and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN); "
              "print('ok')")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
