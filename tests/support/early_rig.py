"""compute-ctl's early responder on a loopback port, in this process, with raw client sockets
(tests/unit/test_early_responder.py, tests/integration/test_early_responder.py)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile

import pytest

from compute.api.handover import handover_path
from compute.api.listener import bind_api_socket
from compute.boot.early_responder import EarlyResponder

STARTED = 1795600800.25


class Rig:
    """A responder on a loopback port, its runtime dir (0700) and hand-over socket."""

    def __init__(self, handover: bool = True, jwks: bool | None = False):
        self.dir = tempfile.mkdtemp(prefix="cs-early-")
        os.chmod(self.dir, 0o700)
        self.sock = bind_api_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.responder = EarlyResponder(self.sock, started=STARTED, cores=3, jwks=jwks).start()
        if handover:
            self.responder.offer_handover(handover_path(self.dir))
        self.clients: list[socket.socket] = []

    def connect(self, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if data:
            s.sendall(data)
        self.clients.append(s)
        return s

    def ask(self, path: str) -> bytes:
        """A plain GET, answered and closed by the responder: the whole answer."""
        s = self.connect(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return read_to_eof(s)

    def close(self):
        self.responder.stop()
        for s in self.clients:
            s.close()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def read_to_eof(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def body_of(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 200 OK\r\n", head), answer
    assert b"\r\nConnection: close\r\n" in head and b"\r\nContent-Type: application/json\r\n" in head
    assert f"\r\nContent-Length: {len(body)}".encode() in head
    return body
