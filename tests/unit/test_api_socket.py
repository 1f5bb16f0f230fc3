"""The API's listening socket is bound by compute-ctl and inherited by the api alone
(compute/api/listener.py): the api keeps serving across kill -9 of its master or a worker and
across `supervisorctl restart api` (connections wait in the backlog, none is refused), no other
program holds the socket, and a port in use is a one-line error that leaves nothing behind.

This file: binding and inheriting the socket in-process; the rest: tests/integration/,
tests/e2e/ and tests/fault/test_api_socket.py."""

from __future__ import annotations

import socket

import pytest

from compute.api.listener import BindError, bind_api_socket, inherited_fd, keeps_api_socket


def test_only_gunicorn_keeps_it():
    assert keeps_api_socket("gunicorn")
    assert not any(keeps_api_socket(m) for m in ("compute.lifecycle.driver", "compute.programs.monitor", None))


def test_inherited_fd_reads_only_a_number():
    assert inherited_fd({"COMPUTE_API_FD": "7"}) == 7
    assert inherited_fd({}) is None
    assert inherited_fd({"COMPUTE_API_FD": "-1"}) is None
    assert inherited_fd({"COMPUTE_API_FD": "3; rm"}) is None


def test_bind_is_close_on_exec_and_listening():
    sock = bind_api_socket("127.0.0.1", 0)
    try:
        assert not sock.get_inheritable()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.close()


def test_bind_error_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as e:
            bind_api_socket("127.0.0.1", port)
    msg = str(e.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "in use" in msg.lower()
