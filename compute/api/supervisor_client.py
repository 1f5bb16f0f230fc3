"""supervisord's XML-RPC interface with a socket timeout.

`compute.supervision.rpc()` has no timeout; a wedged supervisord must not wedge a request
thread (/metrics, the /configure wake-up), so the API builds the same proxy with one.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client

from supervisor.xmlrpc import SupervisorTransport

from compute.supervision import socket_path


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


def rpc(runtime_dir: str, timeout: float | None = 5.0) -> xmlrpc.client.ServerProxy:
    """Like compute.supervision.rpc(), with `timeout` seconds per call (None: wait forever)."""
    path = socket_path(runtime_dir)
    transport = SupervisorTransport(None, None, f"unix://{path}")
    transport._get_connection = lambda: _UnixConnection(path, timeout)  # noqa: SLF001
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
