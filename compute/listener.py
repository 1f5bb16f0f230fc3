"""The supervisord eventlistener protocol, on binary stdin/stdout.

supervisor.childutils.listener reads `len` *characters* from a text stdin; PROCESS_LOG payloads
are measured in bytes, so any non-ASCII log line would desynchronise it. Same protocol, bytes."""

from __future__ import annotations

import sys
from typing import Iterator

from supervisor.childutils import get_headers


def events() -> Iterator[tuple[dict[str, str], dict[str, str], bytes]]:
    """Yield (event headers, payload headers, payload body) and acknowledge each after use."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return  # supervisord went away
        headers = get_headers(line.decode())
        payload = stdin.read(int(headers["len"]))
        head, _, body = payload.partition(b"\n")
        try:
            yield headers, get_headers(head.decode("utf-8", "replace")), body
        finally:
            stdout.write(b"RESULT 2\nOK")
            stdout.flush()
