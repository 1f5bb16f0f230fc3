"""Log relay, as an in-process event handler inside supervisord (subscribed by
compute.tree.supervisord): every PROCESS_LOG chunk becomes formatted lines (text or JSON,
compute/base/logs.py) written to supervisord's stdout, which is compute-ctl's. No listener
process, no FIFO. Records of the in-process handlers themselves (exitwatch) get the same shape.

The relay never waits for stdout's reader (compute/base/stdout_buffer.py: a bounded buffer, lines
dropped and counted when it is full): supervisord's loop keeps draining every program's pipes
and answering signals and RPCs whatever the reader does. The count reaches /metrics through
the state file (`DroppedLines`, a timer of the loop armed by a drop).
"""

from __future__ import annotations

import logging
import sqlite3

from supervisor import events

from compute.base.logs import format_line
from compute.base.stdout_buffer import STDERR, STDOUT

DROPPED_PUBLISH_PERIOD = 1.0


def write_out(text: str) -> bool:
    """To compute-ctl's stdout, never waiting for its reader: text that does not fit in the
    bounded buffer is dropped and counted (compute/base/stdout_buffer.py); False then."""
    return STDOUT.write(text)


class DroppedLines:
    """The count of lines compute-ctl dropped (stdout and stderr) into the state file
    (`log_lines_dropped`, for /metrics), from supervisord's loop: `noticed()` after a drop
    arms one timer, so the count is written at most once per `period` while lines are being
    dropped, and nothing runs otherwise (an idle loop stays idle)."""

    def __init__(self, store, timers, period: float = DROPPED_PUBLISH_PERIOD):
        self.store, self.timers, self.period = store, timers, period
        try:
            self.published = int(store.get("log_lines_dropped") or 0)
        except sqlite3.Error:  # the state file lost: exitwatch stops the tree
            self.published = 0
        self.due = False

    @staticmethod
    def total() -> int:
        return STDOUT.dropped + STDERR.dropped

    def noticed(self) -> None:
        if not self.due:
            self.due = True
            self.timers.call_later(self.period, self.publish)

    def publish(self) -> None:
        self.due = False
        total = self.total()
        if total != self.published:
            self.store.set(log_lines_dropped=total)
            self.published = total


class LogRelay:
    def __init__(self, fmt: str = "text", out=write_out, on_drop=lambda: None):
        self.fmt, self.out, self.on_drop = fmt, out, on_drop
        self.partial: dict[tuple[str, str], bytes] = {}  # a chunk may end mid-line

    def subscribe(self) -> None:
        events.subscribe(events.ProcessLogEvent, self.handle)

    def handle(self, event) -> None:
        try:
            self.relay(event.process.config.name, event.channel or "stdout", event.data)
        except Exception:  # never take supervisord down for a log line
            pass

    def relay(self, program: str, channel: str, data: bytes) -> None:
        key = (program, channel)
        *lines, rest = (self.partial.pop(key, b"") + data).split(b"\n")
        if rest:
            self.partial[key] = rest
        text = "".join(format_line(program, ln.decode("utf-8", "replace"), self.fmt) + "\n"
                       for ln in lines if ln)
        if text and self.out(text) is False:
            self.on_drop()


class RelayHandler(logging.Handler):
    """supervisord's own `compute.*` records (exitwatch), as lines of the program they name."""

    def __init__(self, fmt: str = "text", on_drop=lambda: None):
        super().__init__()
        self.fmt, self.on_drop = fmt, on_drop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            program = record.name.rsplit(".", 1)[-1]
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            if not write_out("".join(format_line(program, ln, self.fmt, record.created, record.levelname) + "\n"
                                     for ln in msg.splitlines() or [""])):
                self.on_drop()
        except Exception:
            self.handleError(record)


def setup_relay_logging(fmt: str, logger: str = "compute.tree.exitwatch", on_drop=lambda: None) -> None:
    """Only the in-process handlers' logger: compute-ctl's own records keep their handler."""
    lg = logging.getLogger(logger)
    lg.handlers[:] = [RelayHandler(fmt, on_drop)]
    lg.setLevel(logging.INFO)
    lg.propagate = False
