"""Which requests the API worker answers inline, on its poller thread (compute/api/worker.py).

A request qualifies when answering it can never wait on anything but a local SQLite read of
the state file (WAL mode: readers do not wait for writers): GET /status, /metrics.json, /info
and /healthz, with no body (no Content-Length, Transfer-Encoding, Expect or Upgrade header).
Not /readyz (a postgres connection), /metrics (supervisord's XML-RPC), nor anything with a body
or auth. The answer still comes from the falcon app (the same routing, middleware and errors);
only the thread differs, so the classification decides where a request runs, never what it
gets: anything unusual simply goes to the pool.

On the poller thread the state file is read with a short busy timeout (INLINE_BUSY_TIMEOUT_MS).
Should SQLite still say busy (a checkpoint or recovery holding a lock), the app raises
RetryInPool instead of answering 500 and the worker hands the same request to a pool thread,
which waits as long as it takes (the store's normal timeout).
"""

from __future__ import annotations

import threading

INLINE_ROUTES = frozenset({b"/status", b"/metrics.json", b"/info", b"/healthz"})
INLINE_BUSY_TIMEOUT_MS = 50
# Headers that mean a body, a protocol switch or an interim answer: the pool's business.
_NOT_INLINE_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                                 b"http2-settings"})
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


class RetryInPool(Exception):
    """Raised by the app while answering inline when it would have to wait (a busy state file)."""


_inline = threading.local()


def answering_inline() -> bool:
    """True on the poller thread while it runs the app for an inline request."""
    return getattr(_inline, "active", False)


class inline:
    """Context manager: the current thread is answering a request inline."""

    def __enter__(self):
        _inline.active = True

    def __exit__(self, *exc):
        _inline.active = False


def inline_candidate(head: bytes) -> bool:
    """Whether the first request in `head` (complete up to its empty line) can be answered on
    the poller thread. Conservative: False for anything that is not plainly a GET of an inline
    route without a body."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return False
    lines = head[:end].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        return False  # bare CR or LF: let the pool's parser reject it
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] not in _VERSIONS:
        return False
    if parts[1].partition(b"?")[0] not in INLINE_ROUTES:
        return False
    for line in lines[1:]:
        name, sep, _ = line.partition(b":")
        if not sep or name.strip().lower() in _NOT_INLINE_HEADERS:
            return False
    return True
