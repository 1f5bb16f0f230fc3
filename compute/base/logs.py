"""Log formats. Supervised Python programs write `LEVEL: message` lines to stderr; the
in-process log relay (compute/tree/logrelay.py, inside supervisord) adds the time and program name
(text or JSON) on the way to compute-ctl's stdout, so every line of the tree has one shape
whatever wrote it (postgres included)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from compute.base.stdout_buffer import STDOUT

_LEVEL = re.compile(r"\b(DEBUG\d?|INFO|NOTICE|WARNING|ERROR|CRITICAL|LOG|FATAL|PANIC|STATEMENT|DETAIL|HINT|CONTEXT):\s")
_PG_LEVELS = {"LOG": "INFO", "NOTICE": "INFO", "STATEMENT": "INFO", "DETAIL": "INFO", "HINT": "INFO",
              "CONTEXT": "INFO", "FATAL": "ERROR", "PANIC": "CRITICAL"}


def setup_program_logging(level: int = logging.INFO) -> None:
    """For programs under supervisord: plain `LEVEL: message` on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def timestamp(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def format_line(program: str, line: str, fmt: str = "text", t: float | None = None,
                level: str | None = None) -> str:
    """One output line of `program`, in the tree's shape. The level is read from the line
    (`LEVEL: ...` from our programs, postgres' `LOG:`/`ERROR:`) unless given."""
    m = None
    if level is None:
        m = _LEVEL.search(line[:120])
        level = m.group(1) if m else "INFO"
        level = _PG_LEVELS.get(level, "DEBUG" if level.startswith("DEBUG") else level)
        if m and m.start() == 0:
            line = line[m.end():]  # our own `LEVEL: ` prefix: the level column says it
    if fmt == "json":
        msg = line
        return json.dumps({"ts": timestamp(t), "level": level, "program": program, "msg": msg},
                          ensure_ascii=False)
    return f"{timestamp(t)} {level:<8} {program:<12} {line}"


class TreeFormatter(logging.Formatter):
    """compute-ctl's own records, in the same shape as the relayed lines."""

    def __init__(self, program: str, fmt: str):
        super().__init__()
        self.program, self.fmt = program, fmt

    def format(self, record: logging.LogRecord) -> str:
        return format_line(self.program, record.getMessage(), self.fmt, record.created, record.levelname)


class BoundedStdoutHandler(logging.Handler):
    """Records to compute-ctl's stdout without ever waiting for its reader (stdout_buffer)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            STDOUT.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def dropped_notice(fmt: str):
    """How compute-ctl's stdout says it dropped lines: a line of the tree, from `logrelay`."""
    return lambda lines: format_line(
        "logrelay", f"{lines} line{'s' if lines != 1 else ''} dropped: stdout's reader did not keep up "
                    "(counted in /metrics: compute_log_lines_dropped_total)", fmt, level="WARNING") + "\n"


def setup_bootstrap_logging(fmt: str) -> None:
    """compute-ctl's own records, and the shape of the dropped-lines notice, on its stdout."""
    STDOUT.notice = dropped_notice(fmt)
    handler = BoundedStdoutHandler()
    handler.setFormatter(TreeFormatter("compute-ctl", fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
