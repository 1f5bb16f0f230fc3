"""The first start's driver waits for supervisord's control socket (compute/shared/supervisor_rpc.py
wait_until_serving): it is forked before supervisord's loop, and on a busy machine its data can
be ready before the socket is (seen in CI: startProcess failed with FileNotFoundError)."""

from __future__ import annotations

import os
import socket

from compute.shared.supervisor_rpc import socket_path, wait_until_serving


def test_no_socket_yet_is_not_serving(tmp_path) -> None:
    assert wait_until_serving(str(tmp_path), timeout=0) is False
    assert not os.path.exists(socket_path(str(tmp_path)))  # nothing created in its place


def test_a_bound_socket_that_does_not_listen_yet_is_not_serving(tmp_path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(socket_path(str(tmp_path)))  # supervisord between its bind and its listen
        assert wait_until_serving(str(tmp_path), timeout=0) is False


def test_a_listening_socket_is_serving(tmp_path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(socket_path(str(tmp_path)))
        s.listen(1)
        assert wait_until_serving(str(tmp_path), timeout=0) is True
