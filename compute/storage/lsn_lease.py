"""One LSN lease attempt on every pageserver of every shard (Neon's lsn_lease.rs
`try_acquire_lsn_lease`, libpq): `lease lsn <tenant_shard_id> <timeline_id> <lsn> ` as a simple
query, answered by one row whose `valid_until` is milliseconds since the epoch, or NULL when the
pageserver refuses (the LSN is behind its GC cutoff). The schedule is compute.model.lsn_lease's.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Iterable

from compute.storage.attempts import DEFAULT_TIMEOUT, StorageError, _one_line
from compute.storage.basebackup import LSN_RE, _pageserver_conninfo

if TYPE_CHECKING:
    from compute.postgres import libpq

log = logging.getLogger("compute.storage")

TENANT_SHARD_ID = re.compile(r"^[0-9a-f]{32}(?:-[0-9a-f]{4})?\Z")
TIMELINE_ID = re.compile(r"^[0-9a-f]{32}\Z")
MAX_VALID_UNTIL_MS = 1 << 53


def lease_query(tenant_shard_id: str, timeline_id: str, lsn: str) -> bytes:
    """HEAD's command, trailing space included; every part validated, nothing interpolated
    unchecked."""
    if not TENANT_SHARD_ID.match(tenant_shard_id) or not TIMELINE_ID.match(timeline_id):
        raise StorageError("lease: tenant shard id or timeline id malformed")
    if not LSN_RE.fullmatch(lsn):
        raise StorageError(f"lease: invalid LSN {lsn!r}")
    return f"lease lsn {tenant_shard_id} {timeline_id} {lsn} ".encode()


def lease_one(url: str, auth_token: str | None, tenant_shard_id: str, timeline_id: str, lsn: str, *,
              timeout: float = DEFAULT_TIMEOUT) -> float | None:
    """valid_until (epoch seconds) from one pageserver, None when it refuses; StorageError when
    it cannot be reached or answers anything else."""
    # Here, not at the top: the driver imports this module (its lease keeper's) at its start,
    # where psycopg's import would delay the basebackup (issue 22).
    from psycopg.conninfo import conninfo_to_dict
    from compute.postgres import libpq
    query = lease_query(tenant_shard_id, timeline_id, lsn)
    params = conninfo_to_dict(_pageserver_conninfo(url, auth_token, timeout))
    try:
        session = libpq.LibpqSession(params, timeout, timeout)
    except libpq.SessionError as e:
        raise StorageError(f"lease on {tenant_shard_id}: {_one_line(str(e))}", retryable=True) from None
    try:
        row = session.query_row(query, None)
        fname = session_fname(session)
    except libpq.SessionError as e:
        raise StorageError(f"lease on {tenant_shard_id}: {_one_line(str(e))}", retryable=True) from None
    finally:
        session.close()
    if fname != "valid_until" or len(row) != 1:
        raise StorageError(f"lease on {tenant_shard_id}: unexpected answer (column {fname!r})", retryable=True)
    value = row[0]
    if value is None:
        return None
    text = bytes(value).decode("ascii", "replace")
    if not re.fullmatch(r"[0-9]{1,16}", text) or int(text) > MAX_VALID_UNTIL_MS:
        raise StorageError(f"lease on {tenant_shard_id}: unexpected valid_until {text[:40]!r}", retryable=True)
    return int(text) / 1000


def session_fname(session: libpq.LibpqSession) -> str | None:
    """The name of the answer's first column (LibpqSession keeps the last result)."""
    result = getattr(session, "last_result", None)
    if result is None or result.nfields < 1:
        return None
    name = result.fname(0)
    return None if name is None else bytes(name).decode("utf-8", "replace")


def lease_all(targets: Iterable[tuple[str, str]], auth_token: str | None, timeline_id: str, lsn: str, *,
              timeout: float = DEFAULT_TIMEOUT) -> float | None:
    """The earliest valid_until of all pageservers, None when any refuses (HEAD: the minimum of
    the answers, a refusal being the least). The first failure fails the attempt."""
    earliest: float | None = None
    for tenant_shard_id, url in targets:
        valid_until = lease_one(url, auth_token, tenant_shard_id, timeline_id, lsn, timeout=timeout)
        if valid_until is None:
            return None
        earliest = valid_until if earliest is None else min(earliest, valid_until)
    if earliest is None:
        raise StorageError("lease: no pageserver to ask")
    return earliest

