"""Log relay, as an in-process event handler inside supervisord (subscribed by
compute.tree.supervisord): every PROCESS_LOG chunk becomes formatted lines (text or JSON,
compute/base/logs.py) written to supervisord's stdout, which is compute-ctl's. No listener
process, no FIFO. Records of the in-process handlers themselves (exitwatch) get the same shape.
"""

from __future__ import annotations

import logging
import os

from supervisor import events

from compute.base.logs import format_line

STDOUT = 1


def write_out(text: str) -> None:
    # os.write, not sys.stdout: nothing buffered, nothing to carry into a forked child.
    data = text.encode("utf-8")
    while data:
        try:
            n = os.write(STDOUT, data)
        except BlockingIOError:
            continue
        except OSError:
            return  # stdout closed: nobody reads any more
        data = data[n:]


class LogRelay:
    def __init__(self, fmt: str = "text", out=write_out):
        self.fmt, self.out = fmt, out
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
        if text:
            self.out(text)


class RelayHandler(logging.Handler):
    """supervisord's own `compute.*` records (exitwatch), as lines of the program they name."""

    def __init__(self, fmt: str = "text"):
        super().__init__()
        self.fmt = fmt

    def emit(self, record: logging.LogRecord) -> None:
        try:
            program = record.name.rsplit(".", 1)[-1]
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            write_out("".join(format_line(program, ln, self.fmt, record.created, record.levelname) + "\n"
                              for ln in msg.splitlines() or [""]))
        except Exception:
            self.handleError(record)


def setup_relay_logging(fmt: str, logger: str = "compute.tree.exitwatch") -> None:
    """Only the in-process handlers' logger: compute-ctl's own records keep their handler."""
    lg = logging.getLogger(logger)
    lg.handlers[:] = [RelayHandler(fmt)]
    lg.setLevel(logging.INFO)
    lg.propagate = False
