"""Start-up timeline for the benchmark (bench/startup.py): with `COMPUTE_TRACE=FILE` in
compute-ctl's environment, each process of the tree appends `<CLOCK_MONOTONIC s> <pid> <event>`
lines to FILE (one write each, O_APPEND). CLOCK_MONOTONIC is the same clock in every process,
so the bench puts the lines on its own time axis (exec = its time.monotonic() before Popen).
Off (one environment lookup) when the variable is not set. Imports nothing heavy: the first
mark is taken before compute-ctl's own imports."""

from __future__ import annotations

import os
import time

TRACE_ENV = "COMPUTE_TRACE"


def mark(event: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = f"{time.monotonic():.6f} {os.getpid()} {event}\n".encode()
    try:
        # Never through a symlink: compute-ctl writes this as root, and the file may sit in a
        # directory other users can write to (/tmp).
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(path: str) -> list[tuple[float, int, str]]:
    """The marks of FILE, in time order."""
    out = []
    with open(path) as f:
        for line in f:
            t, pid, event = line.rstrip("\n").split(" ", 2)
            out.append((float(t), int(pid), event))
    return sorted(out)
