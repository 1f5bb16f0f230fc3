"""The HTTP API's listening socket, bound by compute-ctl itself and held for the life of the tree.

compute-ctl binds --http-address:--http-port before it touches anything (a port in use is a
one-line usage error, nothing left behind), and keeps the socket open until it exits. The api
program (gunicorn, forked from compute-ctl: compute/tree/warmfork.py) gets that one descriptor and
serves it (`bind = fd://N`, compute/api/gunicorn_conf.py). The internal port's socket
(--internal-http-port, when given: compute/api/internal.py) is bound and held the same way
(`COMPUTE_API_INTERNAL_FD`), and served by the same gunicorn. So:
- the kernel queues connections from compute-ctl's first milliseconds: an early /status waits
  for the api instead of being refused;
- an api restart (kill -9 of its master, `supervisorctl restart api`) never binds again: no
  EADDRINUSE while the old workers still hold the port, no gunicorn bind retry (1 s apart);
  connections made meanwhile wait in the backlog and are answered by the new workers.

Nobody else holds it: the socket is close-on-exec (postgres, vm-informant, the exporter and gdb
are exec'd), supervisord's fd cleanup in its children skips it (compute/tree/supervisord.py) and
warmfork closes it in every forked program but the api (`keeps_api_socket`).
"""

from __future__ import annotations

import fcntl
import os
import socket

API_FD_ENV = "COMPUTE_API_FD"  # the descriptor number, in supervisord's (so every program's) environment
INTERNAL_FD_ENV = "COMPUTE_API_INTERNAL_FD"  # the internal port's socket (compute/api/internal.py), when served
BACKLOG = 2048  # gunicorn's default


class BindError(Exception):
    pass


def bind_api_socket(address: str, port: int, flags: str = "--http-address/--http-port") -> socket.socket:
    """A listening TCP socket on address:port (an IP literal), close-on-exec; BindError (one
    line, naming `flags`) if the address cannot be had."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no obstacle
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
        raise BindError(f"the HTTP API cannot listen on {where} ({flags}): "
                        f"{e.strerror or e}") from None
    if sock.fileno() <= 2:  # started with stdio closed: fds 0-2 become each child's pipes
        fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
        sock.close()
        sock = socket.socket(fileno=fd)
    return sock


def inherited_fd(environ=os.environ, name: str = API_FD_ENV) -> int | None:
    """The API socket's descriptor number, as compute-ctl exported it, or None."""
    value = environ.get(name, "")
    return int(value) if value.isdigit() else None


def inherited_internal_fd(environ=os.environ) -> int | None:
    """The internal port's socket, when compute-ctl bound one."""
    return inherited_fd(environ, INTERNAL_FD_ENV)


def api_fds(environ=os.environ) -> tuple[int, ...]:
    """Every socket the api serves (the external first): what only the api keeps."""
    return tuple(fd for fd in (inherited_fd(environ), inherited_internal_fd(environ)) if fd is not None)


def keeps_api_socket(module: str | None) -> bool:
    """Whether the program that runs `python -m module` (None: an exec'd one) keeps the API
    socket: only the api (gunicorn)."""
    return module == "gunicorn"
