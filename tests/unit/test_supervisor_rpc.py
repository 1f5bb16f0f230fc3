"""The XML-RPC client of supervisord's control socket (compute/shared/supervisor_rpc.py rpc):
xmlrpc.client's own transport over the unix socket. Against an XML-RPC server on a unix socket
in this process (the real supervisord's side is in every e2e test)."""

from __future__ import annotations

import socket
import socketserver
import threading
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

import pytest

from compute.shared.supervisor_rpc import rpc, socket_path


class _UnixXMLRPCServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer, SimpleXMLRPCDispatcher):
    daemon_threads = True
    logRequests = False

    def __init__(self, path: str):
        socketserver.UnixStreamServer.__init__(self, path, _Handler)
        SimpleXMLRPCDispatcher.__init__(self, allow_none=False, encoding=None)
        self.connections: set = set()


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)  # supervisord's path
    protocol_version = "HTTP/1.1"  # keep-alive, as supervisord's medusa server
    disable_nagle_algorithm = False  # TCP_NODELAY: not on a unix socket

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(id(self.request))

    def address_string(self) -> str:  # a unix peer has no (host, port)
        return "unix"

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    srv = _UnixXMLRPCServer(socket_path(str(tmp_path)))

    def start_process(name: str, wait: bool) -> bool:
        if name != "postgres":
            raise xmlrpc.client.Fault(10, f"BAD_NAME: {name}")
        return True
    srv.register_function(start_process, "supervisor.startProcess")
    srv.register_function(lambda: {"statecode": 1}, "supervisor.getState")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_calls_reach_the_server_on_one_connection(tmp_path, server) -> None:
    proxy = rpc(str(tmp_path)).supervisor
    assert proxy.startProcess("postgres", False) is True
    assert proxy.getState() == {"statecode": 1}
    assert len(server.connections) == 1  # persistent: the second call reused the first's


def test_a_fault_is_an_xmlrpc_fault_and_the_next_call_works(tmp_path, server) -> None:
    proxy = rpc(str(tmp_path), timeout=5).supervisor
    with pytest.raises(xmlrpc.client.Fault) as e:
        proxy.startProcess("nope", False)
    assert e.value.faultCode == 10
    assert proxy.startProcess("postgres", False) is True


def test_no_socket_is_an_oserror(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        rpc(str(tmp_path), timeout=1).supervisor.getState()


def test_a_silent_server_times_out(tmp_path) -> None:
    """A wedged supervisord (accepts, never answers) must not wedge the caller: `timeout`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(socket_path(str(tmp_path)))
        listener.listen(1)
        with pytest.raises(TimeoutError):
            rpc(str(tmp_path), timeout=0.05).supervisor.getState()

