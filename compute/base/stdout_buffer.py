"""compute-ctl's stdout, which nothing in compute-ctl ever waits for (issue 21, item 4).

Everything compute-ctl writes to its stdout (its own bootstrap records, the in-process log
relay's lines of every program, exitwatch's records) goes through `STDOUT.write`: the text is
queued in a bounded buffer and a writer thread does the blocking write(1). A reader that stops
reading (a stalled log shipper, a blocking container log driver, `compute-ctl | cat` with `cat`
SIGSTOPped) then costs lines, never the compute: once BUFFER_BYTES are waiting, later lines are
dropped and counted (`dropped`, published as `log_lines_dropped` on /metrics by the loop), and a
line `N lines dropped` takes their place in the output, written when the reader is back.
supervisord's loop, signals, /terminate and the programs' own pipes never depend on the reader.
Once the tree runs, `sys.stderr` is the same kind of stream on fd 2 (`STDERR`): supervisord
logs to its file only (`silent`), but a traceback or a warning must not block the loop either.

The descriptor itself is left as it is (blocking): O_NONBLOCK would be set on an open file
description shared with whoever else holds it (a shell's terminal, a container runtime).
Standard library only: compute-ctl uses it before anything heavy is imported.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import select
import threading
import time
from typing import Callable

BUFFER_BYTES = 1 << 20  # what may wait for a slow reader; beyond it lines are dropped
BATCH_BYTES = 64 << 10  # one write(1) at most
# At exit: wait for the reader while it keeps reading (up to DRAIN_LIMIT), give up after
# DRAIN_STALL without progress (a stopped reader delays the exit by that much, no more).
DRAIN_STALL = 1.0
DRAIN_LIMIT = 10.0


def _plain_notice(lines: int) -> str:
    return f"{lines} line{'s' if lines != 1 else ''} dropped: stdout's reader did not keep up\n"


class _Dropped:
    """A place in the output where lines were dropped (how many)."""

    __slots__ = ("lines",)

    def __init__(self, lines: int):
        self.lines = lines


class BoundedStdout:
    def __init__(self, fd: int = 1, limit: int = BUFFER_BYTES):
        self.fd, self.limit = fd, limit
        # How a dropped-lines notice reads (compute.tree.logrelay formats it as a line of the tree).
        self.notice: Callable[[int], str] = _plain_notice
        self._reset()

    def _reset(self) -> None:
        """Also in a forked child (os.register_at_fork below): a fresh lock, nothing queued, no
        thread (a fork copies only the forking thread, and maybe a lock the writer held)."""
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[bytes | _Dropped] = collections.deque()
        self._pending = 0  # bytes queued or being written
        self._closed = False  # the reader is gone for good (EPIPE): nothing will be written
        self._thread: threading.Thread | None = None
        self.dropped = 0  # lines dropped since start

    # -- the callers' side: never blocks ----------------------------------------------------
    def write(self, text: str) -> bool:
        """Queue `text` (whole lines) for stdout; False if it was dropped (buffer full, or
        nobody reads any more). Never waits for the reader."""
        if not text:
            return True
        data = text.encode("utf-8", "replace")
        with self._cond:
            accepted = not self._closed and self._pending + len(data) <= self.limit
            if accepted:
                self._queue.append(data)
                self._pending += len(data)
            else:
                lines = text.count("\n") or 1
                self.dropped += lines
                if self._closed:
                    return False
                last = self._queue[-1] if self._queue else None
                if isinstance(last, _Dropped):
                    last.lines += lines
                else:
                    self._queue.append(_Dropped(lines))
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stdout-writer", daemon=True)
                self._thread.start()
        return accepted

    def drain(self, stall: float = DRAIN_STALL, limit: float = DRAIN_LIMIT) -> bool:
        """Wait until everything queued is written, as long as the reader makes progress: at
        most `stall` seconds without any, `limit` in all. True if all of it went out."""
        end = time.monotonic() + limit
        with self._cond:
            progress_at, seen = time.monotonic(), self._pending
            while self._queue or self._pending:
                now = time.monotonic()
                if self._closed or now >= end or now - progress_at >= stall:
                    return False
                self._cond.wait(min(end, progress_at + stall) - now)
                if self._pending != seen:
                    progress_at, seen = time.monotonic(), self._pending
            return not self._closed

    # -- the writer thread --------------------------------------------------------------------
    def _batch(self) -> bytes:
        """Under the lock: the next bytes to write, notices of dropped lines in their place."""
        parts, size = [], 0
        while self._queue and size < BATCH_BYTES:
            item = self._queue.popleft()
            if isinstance(item, _Dropped):
                data = self.notice(item.lines).encode("utf-8", "replace")
                self._pending += len(data)  # written below like the rest
            else:
                data = item
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data = self._batch()
            written = self._write_all(data)
            with self._cond:
                self._pending -= len(data)
                if not written:
                    self._closed = True
                    self.dropped += data.count(b"\n") + sum(
                        item.count(b"\n") if isinstance(item, bytes) else 0 for item in self._queue)
                    self._queue.clear()
                    self._pending = 0
                self._cond.notify_all()
                if not written:
                    return

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:  # someone else made it non-blocking: wait for room
                select.select([], [self.fd], [])
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return False  # EPIPE, EBADF...: nobody reads any more
            view = view[n:]
        return True


class BoundedTextStream(io.TextIOBase):
    """A text stream on a BoundedStdout: what compute-ctl puts in `sys.stderr` once the tree
    runs, so that a Python-level write there (a traceback of supervisord's logger, a thread's
    exception, a warning) never waits for a stopped reader either."""

    def __init__(self, out: BoundedStdout):
        super().__init__()
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.out.write(text)
        return len(text)

    def fileno(self) -> int:
        return self.out.fd


STDOUT = BoundedStdout(1)
STDERR = BoundedStdout(2)
for _stream in (STDOUT, STDERR):
    os.register_at_fork(after_in_child=_stream._reset)
