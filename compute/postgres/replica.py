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
import subprocess
import tempfile
import time

import psycopg
from psycopg.conninfo import make_conninfo

from compute.model import modes
from compute.base.procutil import dies_with_us

log = logging.getLogger("compute.postgres.replica")

CONNECT_TIMEOUT = 10
REDACTED = "[redacted]"


class ReplicaError(Exception):
    """A clone or promotion step failed; the message is safe to show (no secrets)."""


# ---------------------------------------------------------------- clone

def clone_command(pgbin_dir: str, pgdata: str, primary_conninfo: str, passfile: str | None) -> tuple[list[str], str | None]:
    """(argv, password) for pg_basebackup: the password taken out of the conninfo, and the
    passfile named in its place. Pure."""
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


def clone_primary(pgbin_dir: str, pgdata: str, primary_conninfo: str, secret_dir: str) -> int:
    """pg_basebackup of the primary into the (empty) pgdata; returns the bytes now in pgdata."""
    fd, passfile = tempfile.mkstemp(prefix=".clone-", suffix=".pgpass", dir=secret_dir)  # 0600
    try:
        argv, password = clone_command(pgbin_dir, pgdata, primary_conninfo, passfile)
        with os.fdopen(fd, "w") as f:
            if password is not None:
                f.write(modes.passfile_line(password))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGPASSWORD etc.
        try:
            # It dies with us: a lifecycle driver killed mid-clone leaves no pg_basebackup behind.
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                                 preexec_fn=dies_with_us)
        except OSError as e:
            raise ReplicaError(f"cannot run pg_basebackup: {e.strerror}") from None
    finally:
        os.unlink(passfile)
    output = mask(res.stdout.decode("utf-8", "replace") + res.stderr.decode("utf-8", "replace"), password)
    for line in output.splitlines():
        log.info("pg_basebackup: %s", line)
    if res.returncode != 0:
        tail = " ".join(output.split())[-600:]
        raise ReplicaError(f"cloning the primary failed (pg_basebackup exit code {res.returncode}): {tail}")
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


def write_passfile(pgdata: str, password: str | None) -> None:
    """PGDATA/replication.pgpass for the walreceiver (named by primary_conninfo), written
    atomically at 0600; removed when the spec has no replication password."""
    path = os.path.join(pgdata, modes.PASSFILE)
    if password is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(modes.passfile_line(password))
    os.replace(tmp, path)


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
