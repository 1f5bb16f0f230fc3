"""`postgres --sync-safekeepers`: one attempt, its output watched for progress.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import subprocess
import time


from compute.model.environ import child_environment
from compute.base.procutil import dies_with_us
from compute.base.trace import mark
from compute.model.spec import LSN as LSN_RE
from compute.storage.attempts import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, StorageError, _TAIL, _truncate

log = logging.getLogger("compute.storage")


# ---------------------------------------------------------------- sync safekeepers

class Started:
    """A --sync-safekeepers run already started (start_sync), for sync_safekeepers to finish."""

    def __init__(self, proc: subprocess.Popen, ends: float):
        self.proc, self.ends = proc, ends


def start_sync(pgbin: str, pgdata: str, auth_token: str | None, *,
               deadline: float = DEFAULT_DEADLINE) -> Started:
    """Start `<pgbin> --sync-safekeepers` (one attempt); sync_safekeepers(started=) watches it.
    The driver starts its first attempt before it imports the rest of itself (compute/lifecycle/
    early.py): the request is on its way while the imports run."""
    env = child_environment(os.environ)  # no control-plane token for a postgres binary
    env["PGDATA"] = pgdata  # the binary reads PGDATA; it is not given -D
    env.pop("NEON_AUTH_TOKEN", None)
    if auth_token:
        env["NEON_AUTH_TOKEN"] = auth_token  # env, not argv: argv is world-readable in /proc
    ends = time.monotonic() + deadline
    return Started(_start([pgbin, "--sync-safekeepers"], env), ends)


def sync_safekeepers(pgbin: str, pgdata: str, auth_token: str | None, *,
                     timeout: float = DEFAULT_TIMEOUT, deadline: float = DEFAULT_DEADLINE,
                     started: Started | None = None) -> str:
    """One run of `<pgbin> --sync-safekeepers` (or the one `started` already); returns the LSN
    it prints. A run that prints nothing (stdout or stderr) for `timeout` seconds, or still
    runs after `deadline` seconds (safekeepers that keep it talking without an end), is killed.
    Retries: with_retries()."""
    if started is None:
        started = start_sync(pgbin, pgdata, auth_token, deadline=deadline)
    rc, out, err_tail = _watch(started.proc, timeout, started.ends)
    lsn = out.strip()
    if rc == 0 and LSN_RE.fullmatch(lsn):
        log.info("sync-safekeepers returned LSN %s", lsn)
        return lsn
    if rc == _SILENT:
        why = f"no progress for {timeout:g} s (killed)"
    elif rc == _DEADLINE:
        why = f"not done within the attempt deadline of {deadline:g} s (--attempt-deadline; killed)"
    else:
        why = f"exit code {rc}" if rc != 0 else "unexpected output (want one LSN)"
    raise StorageError(f"sync-safekeepers: {why}; stdout: {_truncate(out)!r}; "
                       f"stderr tail: {_truncate(err_tail)!r}", retryable=True)


def _die_with_us() -> None:
    dies_with_us(signal.SIGKILL)


_SILENT, _DEADLINE = "silent", "deadline"  # why _watch killed the child


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    try:
        # SIGKILL with us: a lifecycle killed mid-sync must not leave the sync behind.
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_die_with_us)
    except OSError as e:
        raise StorageError(f"cannot run {argv[0]}: {e}") from None
    mark("lifecycle: storage request: sync-safekeepers")
    return proc


def _watch(proc: subprocess.Popen, timeout: float, ends: float) -> tuple[int | str, str, str]:
    """Log each stderr line of `proc` as it comes; kill it after `timeout` s without output or
    at `ends` (monotonic). Returns rc (_SILENT or _DEADLINE when killed), stdout (first 64
    KiB), stderr tail."""
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    tail: collections.deque[str] = collections.deque()
    tail_len = 0
    partial = b""
    poller = select.poll()
    fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    for fd in fds:
        poller.register(fd, select.POLLIN)
    killed: str | None = None
    try:
        while fds:
            left = ends - time.monotonic()
            events = poller.poll(max(0.0, min(timeout, left)) * 1000) if left > 0 else []
            if not events:
                killed = _SILENT if left > timeout else _DEADLINE
                break
            for fd, _ in events:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    poller.unregister(fd)
                    del fds[fd]
                elif fds[fd] == "out":
                    if len(out) < 1 << 16:  # one LSN; bound it anyway
                        out += chunk[:(1 << 16) - len(out)]
                else:
                    *lines, partial = (partial + chunk).split(b"\n")
                    if len(partial) > _TAIL:
                        lines.append(partial)
                        partial = b""
                    for raw in lines:
                        line = raw.decode("utf-8", "replace")
                        log.info("sync-safekeepers: %s", line)
                        tail.append(line)
                        tail_len += len(line) + 1
                        while tail_len > _TAIL and len(tail) > 1:
                            tail_len -= len(tail.popleft()) + 1
    finally:
        if killed or fds:  # timed out, or we are being unwound: the child never outlives us
            proc.kill()
        rc = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if partial:
        line = partial.decode("utf-8", "replace")
        log.info("sync-safekeepers: %s", line)
        tail.append(line)
    return (killed or rc), out.decode("utf-8", "replace"), "\n".join(tail)
