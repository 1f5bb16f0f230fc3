"""The embedded default: `initdb` for a compute whose spec names no pageserver.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from compute.base.procutil import dies_with_us
from compute.base.trace import mark
from compute.model.environ import child_environment
from compute.storage.attempts import StorageError, _truncate

log = logging.getLogger("compute.storage")


# ---------------------------------------------------------------- embedded default

def initdb_default(pgbin_dir: str, pgdata: str, superuser: str, pwfile: str | None = None, *,
                   started: subprocess.Popen | None = None) -> None:
    """The embedded default when the spec names no pageserver: a fresh local cluster.
    `pwfile`: a file whose first line becomes the superuser's password (a path on argv, never
    the password). `started`: the initdb start_initdb started already (compute/lifecycle/early.py)."""
    proc = started if started is not None else start_initdb(pgbin_dir, pgdata, superuser, pwfile)
    argv = proc.args
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        stop_group(proc)
        raise
    res = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    for line in res.stderr.splitlines():
        log.info("initdb: %s", line)
    if res.returncode != 0:
        raise StorageError(f"initdb failed with exit code {res.returncode}: "
                           f"{_truncate((res.stdout + res.stderr).strip())}")


def start_initdb(pgbin_dir: str, pgdata: str, superuser: str, pwfile: str | None = None) -> subprocess.Popen:
    """initdb started (initdb_default(started=) waits for it)."""
    argv = [os.path.join(pgbin_dir, "initdb"), "-D", pgdata, "-U", superuser, "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
    if pwfile:
        argv.append(f"--pwfile={pwfile}")
    try:
        # Its own process group, so that a driver stopped mid-initdb (SIGTERM from supervisord)
        # ends initdb's bootstrap postgres too, and waits for it, before it exits: nothing of
        # the start is left for compute-ctl's last-resort reaper. SIGKILL if the driver dies.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                env=child_environment(os.environ), start_new_session=True,
                                preexec_fn=dies_with_us_sigkill)
    except OSError as e:
        raise StorageError(f"cannot run initdb: {e}") from None
    mark("lifecycle: storage request: initdb")
    return proc


def dies_with_us_sigkill() -> None:
    dies_with_us(signal.SIGKILL)


def stop_group(proc: subprocess.Popen, wait: float = 2.0) -> None:
    """SIGKILL initdb's whole process group and wait (bounded) until none of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    ends = time.monotonic() + wait
    while time.monotonic() < ends:
        try:
            os.killpg(proc.pid, 0)  # an orphaned member not yet reaped by the subreaper counts
        except ProcessLookupError:
            return
        time.sleep(0.01)
