"""Neon storage steps of the start-up: sync safekeepers, basebackup, and the initdb default.

Pure I/O functions; the caller decides which user they run as (postgres and initdb refuse root).
"""

from __future__ import annotations

import collections
import copy
import io
import logging
import os
import re
import subprocess
import tarfile
import threading
import time
from typing import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .environ import child_environment

log = logging.getLogger("compute.storage")

LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_TAIL = 2048  # bytes of child output kept for error messages
_READ_CHUNK = 1 << 20  # tarfile buffer: big reads/writes, bounded memory
_CONNECT_TIMEOUT = 10
# Python >= 3.11.4 ships the PEP 706 filters; we use data_filter as an extra check when present.
_DATA_FILTER = getattr(tarfile, "data_filter", None)
# We vet members ourselves, so tell tarfile not to second-guess (3.14 would default to "data",
# which drops directory modes).
_EXTRACT_KW = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


class StorageError(Exception):
    """A storage step failed; the message is safe to show (no secrets)."""


def _truncate(text: str, limit: int = _TAIL) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


# ---------------------------------------------------------------- sync safekeepers

def sync_safekeepers(pgbin: str, pgdata: str, auth_token: str | None, *,
                     retries: int = 3, backoff: float = 0.5) -> str:
    """Run `<pgbin> --sync-safekeepers`; returns the LSN it prints. `retries` = attempts in total."""
    env = child_environment(os.environ)  # no control-plane token for a postgres binary
    env["PGDATA"] = pgdata  # the binary reads PGDATA; it is not given -D
    env.pop("NEON_AUTH_TOKEN", None)
    if auth_token:
        env["NEON_AUTH_TOKEN"] = auth_token  # env, not argv: argv is world-readable in /proc
    attempts = max(1, retries)
    failure = ""
    for attempt in range(attempts):
        if attempt:
            delay = backoff * (2 ** (attempt - 1))
            log.warning("sync-safekeepers attempt %d/%d failed (%s); retrying in %.1fs",
                        attempt, attempts, failure, delay)
            time.sleep(delay)
        rc, out, err_tail = _run_logged([pgbin, "--sync-safekeepers"], env)
        lsn = out.strip()
        if rc == 0 and LSN_RE.fullmatch(lsn):
            log.info("sync-safekeepers returned LSN %s", lsn)
            return lsn
        why = f"exit code {rc}" if rc != 0 else "unexpected output (want one LSN)"
        failure = f"{why}; stdout: {_truncate(out)!r}; stderr tail: {_truncate(err_tail)!r}"
    raise StorageError(f"sync-safekeepers failed after {attempts} attempt(s): {failure}")


def _run_logged(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run argv; log each stderr line as it comes (the sync can take long); return rc, stdout, stderr tail."""
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise StorageError(f"cannot run {argv[0]}: {e}") from None
    tail: collections.deque[str] = collections.deque()
    tail_len = 0

    def pump_stderr() -> None:
        nonlocal tail_len
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            log.info("sync-safekeepers: %s", line)
            tail.append(line)
            tail_len += len(line) + 1
            while tail_len > _TAIL and len(tail) > 1:
                tail_len -= len(tail.popleft()) + 1

    pump = threading.Thread(target=pump_stderr, name="sync-sk-stderr", daemon=True)
    pump.start()
    assert proc.stdout is not None
    out = proc.stdout.read(1 << 16).decode("utf-8", "replace")  # one LSN; bound it anyway
    while proc.stdout.read(1 << 16):  # drain (discarding) so the child never blocks on a full pipe
        pass
    rc = proc.wait()
    pump.join()
    return rc, out, "\n".join(tail)


# ---------------------------------------------------------------- basebackup

def basebackup(pageserver_connstr: str, tenant_id: str, timeline_id: str, lsn: str, pgdata: str,
               auth_token: str | None, *, progress: Callable[[int], None] | None = None,
               replica: bool = False) -> int:
    """Stream `basebackup` from the pageserver (COPY OUT of one tar) into pgdata; returns bytes received.
    `replica`: for a Static or Replica compute, as Neon asks (`--replica`)."""
    if not _ID_RE.fullmatch(tenant_id) or not _ID_RE.fullmatch(timeline_id):
        raise StorageError("tenant_id and timeline_id must be 32 lowercase hex digits")
    if not LSN_RE.fullmatch(lsn):
        raise StorageError(f"invalid LSN {lsn!r}")
    query = f"basebackup {tenant_id} {timeline_id}"
    hi, lo = lsn.split("/")
    if int(hi, 16) or int(lo, 16):
        query += f" {lsn}"  # 0/0 means "latest": the LSN is left out
    if replica:
        query += " --replica"
    conninfo = _pageserver_conninfo(pageserver_connstr, auth_token)

    os.makedirs(pgdata, mode=0o700, exist_ok=True)
    t0 = time.monotonic()
    try:
        # autocommit: psycopg would otherwise send BEGIN, which the pageserver does not know.
        with psycopg.connect(conninfo, autocommit=True) as conn:
            # No params -> psycopg sends a simple Query message (PQsendQuery), as the pageserver needs.
            with conn.cursor() as cur, cur.copy(query) as cp:
                try:
                    total = _extract_stream(cp, pgdata, progress)
                except BaseException:
                    # Close first so psycopg doesn't cancel and drain a possibly huge stream.
                    conn.close()
                    raise
    except psycopg.Error as e:
        raise StorageError(f"basebackup failed: {_pg_error_text(e)}") from None
    except tarfile.TarError as e:
        raise StorageError(f"basebackup: bad tar archive: {e}") from None
    except OSError as e:
        raise StorageError(f"basebackup: cannot extract into {pgdata}: {e}") from None
    elapsed = time.monotonic() - t0
    log.info("basebackup: %d bytes in %.2fs (%.1f MiB/s)", total, elapsed,
             total / (1 << 20) / elapsed if elapsed > 0 else 0.0)
    return total


def _pageserver_conninfo(connstr: str, auth_token: str | None) -> str:
    try:
        params = conninfo_to_dict(connstr)
    except psycopg.ProgrammingError:
        raise StorageError("invalid pageserver connection string") from None  # may hold a secret
    extra: dict[str, object] = {}
    if auth_token:
        extra["password"] = auth_token  # the storage token is the password; it overrides the connstr's
    if "connect_timeout" not in params:
        extra["connect_timeout"] = _CONNECT_TIMEOUT
    return make_conninfo(connstr, **extra)


def _pg_error_text(e: psycopg.Error) -> str:
    diag = e.diag
    if diag.message_primary:
        return f"{diag.severity or 'ERROR'}: {diag.message_primary} (SQLSTATE {diag.sqlstate})"
    return str(e).strip()


class _CopyReader(io.RawIOBase):
    """File-like view of the COPY OUT stream, for tarfile's stream mode ("r|")."""

    def __init__(self, cp: psycopg.Copy, on_data: Callable[[int], None]) -> None:
        super().__init__()
        self._cp = cp
        self._on_data = on_data
        self._buf = memoryview(b"")
        self.total = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        if not self._buf and not self.eof:
            chunk = self._cp.read()  # one CopyData message; b"" after CopyDone/CommandComplete
            if chunk:
                self._buf = memoryview(chunk)
                self.total += len(chunk)
                self._on_data(self.total)
            else:
                self.eof = True
        return bool(self._buf)

    def read(self, size: int = -1) -> bytes:
        if not self._fill():
            return b""
        n = len(self._buf) if size is None or size < 0 else min(size, len(self._buf))
        data = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self._fill():
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> int:
        """Read the stream to its end (a server error after the archive raises here)."""
        extra = len(self._buf)
        self._buf = memoryview(b"")
        while self._fill():
            extra += len(self._buf)
            self._buf = memoryview(b"")
        return extra


class _OwnTarFile(tarfile.TarFile):
    """Files belong to whoever extracts them (the unprivileged user), never to the archive's uid."""

    def chown(self, tarinfo, targetpath, numeric_owner):  # type: ignore[override]
        pass


def _extract_stream(cp: psycopg.Copy, pgdata: str, progress: Callable[[int], None] | None) -> int:
    last = time.monotonic()

    def on_data(total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if progress is not None and now - last >= 1.0:
            last = now
            progress(total)

    reader = _CopyReader(cp, on_data)
    end_seen = False

    class _TarInfo(tarfile.TarInfo):
        # tarfile treats a garbage or missing header after the first member as a silent end of
        # archive; we note the real end-of-archive (zero) block to tell them apart.
        @classmethod
        def frombuf(cls, buf, encoding, errors):  # type: ignore[override]
            nonlocal end_seen
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.EOFHeaderError:
                end_seen = True
                raise

    dest = os.path.realpath(pgdata)
    with _OwnTarFile.open(fileobj=reader, mode="r|", bufsize=_READ_CHUNK, tarinfo=_TarInfo,
                          errorlevel=2) as tar:
        tar.copybufsize = _READ_CHUNK
        links_seen = False
        while (member := tar.next()) is not None:
            links_seen = links_seen or member.issym() or member.islnk()
            tar.extract(_vet_member(member, dest, links_seen), dest, set_attrs=True, numeric_owner=True,
                        **_EXTRACT_KW)
            tar.members.clear()  # tarfile keeps every TarInfo; keep memory flat
    if not end_seen:
        raise StorageError(f"basebackup: tar archive truncated or corrupt near byte {tar.offset}")
    reader.drain()
    return reader.total


def _vet_member(member: tarfile.TarInfo, dest: str, links_seen: bool = True) -> tarfile.TarInfo:
    """Refuse anything that could write outside dest or create special files; sane modes.

    Until the archive has had a link, everything under dest was created by us from plain files
    and directories, so a lexical check of the name is exact; the realpath checks (a few
    syscalls per path component, a fifth of the extraction time for a ~1,000-file data
    directory) are only needed once a link could redirect a path."""
    def refuse(why: str) -> StorageError:
        return StorageError(f"basebackup: refusing tar member {member.name!r}: {why}")

    if not links_seen:
        name = member.name
        norm = os.path.normpath(name) if name else ""
        if not name or os.path.isabs(name):
            raise refuse("absolute path")
        if norm == ".." or norm.startswith("../") or (norm == "." and not member.isdir()):
            raise refuse("outside the data directory")
        if not (member.isreg() or member.isdir()):
            raise refuse("special file")
        return _sane_mode(member)

    if _DATA_FILTER is not None:
        try:
            _DATA_FILTER(member, dest)  # check only; our own rules below decide the attributes
        except tarfile.FilterError as e:
            raise refuse(str(e)) from None
    name = member.name
    if not name or name.startswith("/") or os.path.isabs(name):
        raise refuse("absolute path")
    target = os.path.realpath(os.path.join(dest, name))
    if os.path.commonpath([target, dest]) != dest or (target == dest and not member.isdir()):
        raise refuse("outside the data directory")
    if member.issym():
        if os.path.isabs(member.linkname):
            raise refuse("absolute symlink")
        link_to = os.path.realpath(os.path.join(os.path.dirname(target), member.linkname))
        if os.path.commonpath([link_to, dest]) != dest:
            raise refuse("symlink outside the data directory")
    elif member.islnk():
        link_to = os.path.realpath(os.path.join(dest, member.linkname))
        if os.path.commonpath([link_to, dest]) != dest:
            raise refuse("hard link outside the data directory")
    elif not (member.isreg() or member.isdir()):
        raise refuse("special file")
    return _sane_mode(member)


def _sane_mode(member: tarfile.TarInfo) -> tarfile.TarInfo:
    safe = copy.copy(member)
    mode = member.mode & 0o755  # no setuid/setgid/sticky, no group/other write
    safe.mode = mode | (0o700 if member.isdir() else 0o600)  # owner can always use it
    return safe


# ---------------------------------------------------------------- embedded default

def initdb_default(pgbin_dir: str, pgdata: str, superuser: str, pwfile: str | None = None) -> None:
    """The embedded default when the spec names no pageserver: a fresh local cluster.
    `pwfile`: a file whose first line becomes the superuser's password (a path on argv, never
    the password)."""
    argv = [os.path.join(pgbin_dir, "initdb"), "-D", pgdata, "-U", superuser, "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
    if pwfile:
        argv.append(f"--pwfile={pwfile}")
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             errors="replace", env=child_environment(os.environ))
    except OSError as e:
        raise StorageError(f"cannot run initdb: {e}") from None
    for line in res.stderr.splitlines():
        log.info("initdb: %s", line)
    if res.returncode != 0:
        raise StorageError(f"initdb failed with exit code {res.returncode}: "
                           f"{_truncate((res.stdout + res.stderr).strip())}")
