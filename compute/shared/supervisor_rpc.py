"""Talking to supervisord over its unix control socket (XML-RPC), and shutting the tree down.

http.client and xmlrpc.client (ssl, email, decimal: ~30 ms of CPU) are imported where a request
is made: compute-ctl needs only socket_path before its first storage request (issue 22). The
transport is xmlrpc.client's own, over the unix socket (_UnixConnection), not supervisor's
SupervisorTransport: importing that module (supervisor.compat's importlib.metadata, html.parser,
configparser; medusa's HTTP server) cost the start-up's driver ~37 ms of CPU more, just before it
asks supervisord to start postgres (docs/performance.md)."""

from __future__ import annotations

import functools
import os
import socket
import time
from typing import TYPE_CHECKING

SOCKET_NAME = "supervisor.sock"

if TYPE_CHECKING:
    import xmlrpc.client


def socket_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


@functools.cache
def _unix_connection_class():
    import http.client

    class _UnixConnection(http.client.HTTPConnection):
        def __init__(self, path: str, timeout: float | None):
            super().__init__("localhost", timeout=timeout)
            self._path = path

        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._path)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
    return _UnixConnection


@functools.cache
def _unix_transport_class():
    import xmlrpc.client

    class _UnixTransport(xmlrpc.client.Transport):
        """xmlrpc.client's transport (one persistent HTTP/1.1 connection, Fault and
        ProtocolError as usual) to supervisord's control socket at `path`."""

        def __init__(self, path: str, timeout: float | None):
            super().__init__()
            self._path, self._timeout = path, timeout

        def make_connection(self, host):
            if self._connection[1] is None:  # none yet, or closed after an error
                self._connection = host, _unix_connection_class()(self._path, self._timeout)
            return self._connection[1]
    return _UnixTransport


SERVING_POLL = 0.005  # s between two connects to a control socket that is not there yet


def wait_until_serving(runtime_dir: str, timeout: float) -> bool:
    """Until supervisord accepts connections on its control socket (True), at most `timeout`
    seconds (False). For the first start's driver, forked before supervisord's loop: on a busy
    machine its first request can come before supervisord has bound the socket (the file is not
    there yet, or not listening: refused). One connect when it serves."""
    path = socket_path(runtime_dir)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                return False
        finally:
            sock.close()
        time.sleep(SERVING_POLL)


def import_client() -> None:
    """Import the client's modules now (xmlrpc.client, http.client: ~30 ms of CPU): for a
    caller that has time to spare before its first, urgent request (the start-up's driver while
    its storage request runs: the request is startProcess("postgres"))."""
    _unix_transport_class()


def rpc(runtime_dir: str, timeout: float | None = None) -> "xmlrpc.client.ServerProxy":
    """A proxy on supervisord's XML-RPC interface (`.supervisor.getProcessInfo(...)` etc.).
    With `timeout`, each call gives up after that many seconds: a wedged supervisord must not
    wedge an API request thread."""
    import xmlrpc.client
    transport = _unix_transport_class()(socket_path(runtime_dir), timeout)
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


# -- shutting the tree down -----------------------------------------------------------------

def shutdown_tree(runtime_dir: str, timeout: float = 20.0) -> None:
    """Ask supervisord to stop everything, and keep it moving.

    supervisord stops one priority group per turn of its main loop, and a turn without I/O
    waits 1 s in poll(); with seven programs that is seconds of idling. Every request on the
    control socket ends the wait early, so we keep asking for its state until it is gone."""
    import xmlrpc.client
    deadline = time.monotonic() + timeout
    try:
        rpc(runtime_dir).supervisor.shutdown()
    except (OSError, xmlrpc.client.Fault):
        pass  # already shutting down
    while time.monotonic() < deadline:
        try:
            rpc(runtime_dir).supervisor.getState()
        except xmlrpc.client.Fault:
            pass  # SHUTDOWN_STATE: still there
        except OSError:
            return  # socket gone: supervisord has exited
        time.sleep(0.02)
