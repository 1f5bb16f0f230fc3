"""Handing the early responder's held connections over to the api (both ends of it).

compute-ctl answers the plain read-only requests itself until the api serves
(compute/boot/early_responder.py); every other connection it accepts it keeps unread ("held"). When
an api worker starts, before its first accept, it connects to RUNTIME_DIR/handover.sock, says
READY, and receives the held sockets (SCM_RIGHTS) to serve as if it had accepted them; the
responder stops accepting first, so nothing falls between the two. The responder serves one
hand-over and is gone: a second worker, or a restarted api, finds no socket (or a closed one)
and simply serves.

Who may take them: the socket is 0600 in the 0700 runtime dir (only the compute's user and root
reach it), and each end checks the other's uid (SO_PEERCRED) is its own: root's connection is
refused as anyone else's would be. The worker never waits longer than TAKE_TIMEOUT.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

SOCKET_NAME = "handover.sock"  # shorter than supervisord's "supervisor.sock": fits wherever it fits
MAX_HELD = 64  # connections the responder holds at most (then it stops accepting: the backlog queues)
HELLO = b"READY\n"
TAKE_TIMEOUT = 1.0  # the worker serves anyway after this long
_HEADER = b"HELD "


def handover_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid


# -- the responder's end -------------------------------------------------------------------------

def listen(path: str) -> socket.socket:
    """The hand-over socket, 0600, non-blocking (for the responder's poller). A leftover of an
    earlier compute in the same runtime dir is replaced."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


def read_hello(channel: socket.socket, timeout: float = 0.5) -> bool:
    """On a connection accepted on the hand-over socket: whether it comes from our own uid and
    says READY (within `timeout`)."""
    try:
        if peer_uid(channel) != os.geteuid():
            return False
        channel.settimeout(timeout)
        got = b""
        while len(got) < len(HELLO):
            chunk = channel.recv(len(HELLO) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == HELLO
    except OSError:
        return False


def send_held(channel: socket.socket, socks: list[socket.socket], timeout: float = 1.0) -> None:
    """Pass `socks` to the worker at the other end (OSError if it is gone)."""
    channel.settimeout(timeout)
    fds = [s.fileno() for s in socks]
    socket.send_fds(channel, [_HEADER + str(len(fds)).encode() + b"\n"], fds)


# -- the worker's end ----------------------------------------------------------------------------

def take_held(runtime_dir: str | None, timeout: float = TAKE_TIMEOUT) -> list[tuple[socket.socket, Any]]:
    """In an api worker, before it accepts: the connections compute-ctl's responder holds, as
    (connected TCP socket (non-blocking), client address); [] when there is no responder (any
    more) or it does not answer within `timeout`."""
    if not runtime_dir:
        return []
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
            channel.settimeout(timeout)
            channel.connect(handover_path(runtime_dir))
            if peer_uid(channel) != os.geteuid():
                return []
            channel.sendall(HELLO)
            channel.settimeout(max(0.001, deadline - time.monotonic()))
            msg, fds, flags, _addr = socket.recv_fds(channel, 64, MAX_HELD)
    except (OSError, ValueError):  # no responder, refused, gone, timed out
        for fd in fds:
            os.close(fd)
        return []
    if not msg.startswith(_HEADER) or flags & getattr(socket, "MSG_CTRUNC", 0):
        for fd in fds:
            os.close(fd)
        return []
    return [s for s in map(_tcp_socket, fds) if s is not None]


def _tcp_socket(fd: int) -> tuple[socket.socket, Any] | None:
    """The received descriptor as (socket, peer), if it is a connected TCP one; else closed."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    try:
        peer = sock.getpeername()
    except OSError:  # the client went away meanwhile
        sock.close()
        return None
    sock.setblocking(False)
    return sock, peer
