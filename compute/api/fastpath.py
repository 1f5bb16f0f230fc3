"""Which requests the API worker answers inline, on its poller thread (compute/api/worker.py).

A request qualifies when answering it can never wait on anything but a local SQLite read of
the state file (WAL mode: readers do not wait for writers): GET /status, /metrics.json, /info
and /healthz, with no body (no Content-Length, Transfer-Encoding, Expect or Upgrade header),
in the strict grammar of plain_get() (also compute-ctl's early responder's).
Not /readyz (a postgres connection), /metrics (supervisord's XML-RPC), nor anything with a body.
With a JWKS these routes need a token (compute/api/access.py): checked inline too, a stat of the
JWKS file and a signature check, which wait on nothing. The answer still comes from the falcon
app (the same routing, middleware and errors);
only the thread differs, so the classification decides where a request runs, never what it
gets: anything unusual simply goes to the pool.

On the poller thread the state file is read with a short busy timeout (INLINE_BUSY_TIMEOUT_MS).
Should SQLite still say busy (a checkpoint or recovery holding a lock), the app raises
RetryInPool instead of answering 500 and the worker hands the same request to a pool thread,
which waits as long as it takes (the store's normal timeout).
"""

from __future__ import annotations

import re
import threading
from typing import NamedTuple

INLINE_ROUTES = frozenset({b"/status", b"/metrics.json", b"/info", b"/healthz"})
INLINE_BUSY_TIMEOUT_MS = 50
MAX_HEAD = 8192  # a longer head is the pool's business (gunicorn's limit_request_line is 8190)
MAX_HEADER_LINES = 100  # gunicorn's limit_request_fields

# The one grammar of a plain request head, for the worker's fast path and compute-ctl's early
# responder (compute/boot/early_responder.py). Stricter than gunicorn's parser on purpose: a request
# it would refuse, or treat specially, never matches.
_REQUEST_LINE = re.compile(rb"GET (/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)? "
                           rb"(HTTP/1\.[01])\Z")
_HEADER_LINE = re.compile(rb"([A-Za-z0-9-]+):[ \t]*([\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?)?[ \t]*\Z")
# Headers that mean a body, an interim answer, a protocol switch, or a scheme/forwarding
# policy gunicorn applies (and may refuse).
_NOT_PLAIN = (b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"http2-settings",
              b"forwarded", b"x-forwarded-")


class PlainGet(NamedTuple):
    route: bytes  # one of INLINE_ROUTES
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    length: int  # bytes of the head, its empty line included
    authorization: bytes | None = None  # the Authorization field's value, when there is one


def plain_get(data: bytes) -> PlainGet | None:
    """The first request head in `data` if it is complete and plainly a GET of an inline route:
    no body, nothing unusual (one grammar, _REQUEST_LINE and _HEADER_LINE; no repeated field,
    no header of _NOT_PLAIN, at most MAX_HEAD bytes and MAX_HEADER_LINES fields). None otherwise.
    Pure; what follows the head is the caller's business."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > MAX_HEAD:
        return None
    lines = data[:end].split(b"\r\n")
    m = _REQUEST_LINE.match(lines[0])
    if m is None or m.group(1) not in INLINE_ROUTES or len(lines) - 1 > MAX_HEADER_LINES:
        return None
    seen = set()
    authorization = None
    for line in lines[1:]:
        h = _HEADER_LINE.match(line)
        if h is None:
            return None
        name = h.group(1).lower()
        if name in seen or name.startswith(_NOT_PLAIN):
            return None  # a repeated field (gunicorn refuses some), or not plain
        seen.add(name)
        if name == b"authorization":
            authorization = h.group(2) or b""
    return PlainGet(m.group(1), m.group(3), end + 4, authorization)


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
    the poller thread: plain_get() says it is plainly a GET of an inline route without a body.
    Anything else goes to the pool, whose parser decides."""
    return plain_get(head) is not None
