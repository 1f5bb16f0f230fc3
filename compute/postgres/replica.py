"""Streaming replicas: cloning a plain PostgreSQL primary, the standby files, and promotion.

The replication password (in the spec's `primary_conninfo` setting) never reaches argv, an
environment or a log: pg_basebackup gets it through a 0600 passfile in the private runtime dir,
removed as soon as the clone is done, and every line we log from it has the password masked.
postgres reads `primary_conninfo` from postgresql.conf with the password replaced by
`passfile=PGDATA/replication.pgpass` (0600 inside the 0700 PGDATA): postgres logs a changed
primary_conninfo's value on reload, so the value must hold no secret.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Callable

from compute.model import modes
from compute.base.procutil import dies_with_us
from compute.base.retry import RetryFailed, RetryPolicy, retry
from compute.model.launch import default
from compute.postgres.conf import write_passfile  # noqa: F401 - its home was here

if TYPE_CHECKING:  # psycopg is imported where used: the driver imports this module at its start
    import psycopg

log = logging.getLogger("compute.postgres.replica")

CONNECT_TIMEOUT = 10
REDACTED = "[redacted]"


class ReplicaError(Exception):
    """A clone or promotion step failed; the message is safe to show (no secrets). `retryable`:
    a passing fault (the clone's attempt deadline passed), worth another attempt."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


# A clone that outlives its deadline (a primary that trickles) is tried again from an empty
# PGDATA; pg_basebackup's other failures (refused, bad password) are reported at once, as before.
CLONE_RETRY = RetryPolicy(attempts=3)


# ---------------------------------------------------------------- clone

def clone_command(pgbin_dir: str, pgdata: str, primary_conninfo: str, passfile: str | None) -> tuple[list[str], str | None]:
    """(argv, password) for pg_basebackup: the password taken out of the conninfo, and the
    passfile named in its place. Pure."""
    from psycopg.conninfo import make_conninfo  # a clone's start only (this module is in the driver's)
    params, password = modes.split_password(primary_conninfo)
    params.pop("replication", None)  # pg_basebackup asks for a replication connection itself
    params.pop("dbname", None)
    if password is not None and passfile is not None:
        params["passfile"] = passfile
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
    params.setdefault("application_name", "compute_ctl:clone")
    # -X stream: the WAL written during the copy comes along, so the clone is consistent on its
    # own; fast checkpoint: don't wait for a spread one; no fsync: a failed compute is re-cloned.
    argv = [os.path.join(pgbin_dir, "pg_basebackup"), "-D", pgdata, "-X", "stream", "--checkpoint=fast",
            "--no-sync", "-d", make_conninfo("", **params)]
    return argv, password


def clone_primary(pgbin_dir: str, pgdata: str, primary_conninfo: str, secret_dir: str, *,
                  deadline: float = default("attempt_deadline"),
                  before_retry: Callable[[], None] | None = None) -> int:
    """pg_basebackup of the primary into the (empty) pgdata; returns the bytes now in pgdata.
    An attempt still running after `deadline` seconds is killed and retried (CLONE_RETRY);
    before_retry() empties pgdata."""
    def retrying(n: int, e: BaseException, delay: float) -> None:
        log.warning("clone attempt %d/%d failed: %s; retrying in %.2f s", n, CLONE_RETRY.attempts, e, delay)
        if before_retry is not None:
            before_retry()
    try:
        return retry(CLONE_RETRY, lambda: clone_once(pgbin_dir, pgdata, primary_conninfo, secret_dir, deadline),
                     catch=(ReplicaError,), retryable=lambda e: e.retryable, on_retry=retrying)
    except RetryFailed as failed:
        if failed.attempts == 1 and not failed.gave_up:
            raise failed.error from None
        log.error("clone attempt %d/%d failed: %s", failed.attempts, CLONE_RETRY.attempts, failed.error)
        raise ReplicaError(f"cloning the primary failed after {failed.attempts} attempt(s): "
                           f"{failed.error}") from None


def clone_once(pgbin_dir: str, pgdata: str, primary_conninfo: str, secret_dir: str,
               deadline: float = default("attempt_deadline")) -> int:
    """One attempt of clone_primary()."""
    fd, passfile = tempfile.mkstemp(prefix=".clone-", suffix=".pgpass", dir=secret_dir)  # 0600
    try:
        argv, password = clone_command(pgbin_dir, pgdata, primary_conninfo, passfile)
        with os.fdopen(fd, "w") as f:
            if password is not None:
                f.write(modes.passfile_line(password))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGPASSWORD etc.
        try:
            # It dies with us: a lifecycle driver killed mid-clone leaves no pg_basebackup behind.
            # Its own group: at the deadline, its WAL-streaming child is killed with it.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, preexec_fn=dies_with_us,
                                    process_group=0)
        except OSError as e:
            raise ReplicaError(f"cannot run pg_basebackup: {e.strerror}") from None
        late = False
        try:
            stdout, stderr = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            late = True
        finally:
            if late or proc.returncode is None:  # late, or we are being unwound
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if late:
            stdout, stderr = proc.communicate()
    finally:
        os.unlink(passfile)
    output = mask(stdout.decode("utf-8", "replace") + stderr.decode("utf-8", "replace"), password)
    for line in output.splitlines():
        log.info("pg_basebackup: %s", line)
    if late:
        raise ReplicaError(f"cloning the primary: not done within the attempt deadline of {deadline:g} s "
                           "(--attempt-deadline; pg_basebackup killed)", retryable=True)
    if proc.returncode != 0:
        tail = " ".join(output.split())[-600:]
        raise ReplicaError(f"cloning the primary failed (pg_basebackup exit code {proc.returncode}): {tail}")
    # The primary's ALTER SYSTEM settings are not this compute's: the spec is.
    with open(os.path.join(pgdata, "postgresql.auto.conf"), "w") as f:
        f.write("")
    return directory_bytes(pgdata)


def mask(text: str, secret: str | None) -> str:
    return text.replace(secret, REDACTED) if secret else text


def directory_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def write_standby_signal(pgdata: str) -> None:
    """postgres starts in standby mode (hot standby: read-only connections once consistent)."""
    fd = os.open(os.path.join(pgdata, "standby.signal"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)


# ---------------------------------------------------------------- promotion

def wait_for_replay(conn: psycopg.Connection, lsn: str | None, timeout: float, poll: float = 0.1) -> None:
    """Until postgres has replayed WAL up to `lsn` (None: nothing to wait for)."""
    check_in_recovery(conn)  # a primary has no replay LSN: fail now rather than at the deadline
    if lsn is None:
        return
    want = modes.lsn_int(lsn)
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT pg_catalog.pg_last_wal_replay_lsn()::text").fetchone()
        replayed = row[0] if row else None
        if replayed is not None and modes.lsn_int(replayed) >= want:
            return
        if time.monotonic() >= deadline:
            raise ReplicaError(f"replica did not replay up to {lsn} within {timeout:.0f} s "
                               f"(replayed up to {replayed or 'nothing'})")
        time.sleep(poll)


def check_in_recovery(conn: psycopg.Connection) -> None:
    if not conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()[0]:
        raise ReplicaError("postgres is not in recovery: nothing to promote")


def promote(conn: psycopg.Connection, wait_seconds: int = 60) -> None:
    """pg_promote() and check that the compute now accepts writes."""
    check_in_recovery(conn)
    conn.execute(f"SET statement_timeout = '{int(wait_seconds) + 30}s'")
    if not conn.execute("SELECT pg_catalog.pg_promote(true, %s)", (int(wait_seconds),)).fetchone()[0]:
        raise ReplicaError(f"pg_promote() did not finish within {wait_seconds} s")
    if conn.execute("SHOW transaction_read_only").fetchone()[0] == "on":
        raise ReplicaError("replica is still read-only after promotion")
