"""Streaming tar extraction into PGDATA that cannot write outside it, whatever the archive holds.

The rule (one rule, not a list of checks):
- Only directories and regular files are ever created. A Neon basebackup holds nothing else
  (pageserver/src/basebackup.rs writes only `new_tar_header` / `new_tar_header_dir` entries), so
  links of every kind, devices, FIFOs and sparse files are refused.
- Every path is resolved component by component from a descriptor of PGDATA: each directory is
  opened with O_NOFOLLOW|O_DIRECTORY relative to its parent's descriptor, and files are created
  with O_CREAT|O_EXCL|O_NOFOLLOW relative to theirs. A symlink or a file anywhere on a path
  (whoever put it there) makes the open fail, and nothing that exists is ever replaced or
  written through: a member that redefines an earlier one is refused. `..` is refused, so is an
  absolute name.
- Modes: no setuid/setgid/sticky bits, no group/other write, the owner can always use what is
  created. PGDATA's own mode is never touched (a `.` member is skipped).
- Bounded memory: pax and GNU long-name payloads are capped (MAX_EXT_HEADER), names at PATH_MAX,
  open directory descriptors at MAX_OPEN_DIRS; file data goes from the caller's buffers straight
  to os.write (no copy, no per-file buffering).

Python 3.11.2 (Debian bookworm) has no tarfile.data_filter; this module does not need it.
Only tarfile.TarInfo.frombuf is borrowed, to decode and checksum one 512-byte header block.
"""

from __future__ import annotations

import os
import tarfile

BLOCK = 512
MAX_EXT_HEADER = 64 * 1024  # one pax / GNU long-name payload; PATH_MAX is 4096
MAX_NAME = 4096  # bytes of a member name (Linux PATH_MAX)
MAX_OPEN_DIRS = 128

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_REGULAR = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE}
_EXTENDED = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE}
_KIND_NAMES = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
               tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
               tarfile.FIFOTYPE: "FIFO", tarfile.GNUTYPE_SPARSE: "sparse file"}

# parser states
_HEADER, _DATA, _PAD, _END = range(4)


class ArchiveError(Exception):
    """The archive is corrupt or holds something we refuse; nothing outside PGDATA was touched."""


def _refuse(name: str, why: str) -> ArchiveError:
    return ArchiveError(f"refusing tar member {name[:200]!r}: {why}")


# ---------------------------------------------------------------- decisions (pure)

def split_name(name: str) -> tuple[str, ...]:
    """The path components of a member name below PGDATA; () is PGDATA itself."""
    if "\x00" in name:
        raise _refuse(name, "NUL in the name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise _refuse(name, f"name longer than {MAX_NAME} bytes")
    if name.startswith("/"):
        raise _refuse(name, "absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(name, "'..' in the path (outside the data directory)")
    return parts


def safe_mode(mode: int, is_dir: bool) -> int:
    """No setuid/setgid/sticky, no group/other write; the owner can always read/write (and enter)."""
    return (mode & 0o755) | (0o700 if is_dir else 0o600)


def parse_pax(payload: bytes) -> dict[str, str]:
    """`<len> <key>=<value>\\n` records (POSIX.1-2001); raises ArchiveError on malformed ones."""
    out: dict[str, str] = {}
    pos, end = 0, len(payload)
    while pos < end and payload[pos] != 0:
        sp = payload.find(b" ", pos, pos + 21)
        digits = payload[pos:sp] if sp > pos else b""
        if not digits.isdigit():
            raise ArchiveError(f"malformed pax header record at byte {pos}")
        length = int(digits)
        if length < len(digits) + 3 or pos + length > end or payload[pos + length - 1] != 0x0A:
            raise ArchiveError(f"malformed pax header record at byte {pos}")
        key, eq, value = payload[sp + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise ArchiveError(f"malformed pax header record at byte {pos}")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _pax_int(key: str, value: str) -> int:
    if not value.isdigit() or len(value) > 20:
        raise ArchiveError(f"bad pax {key} {value[:40]!r}")
    return int(value)


# ---------------------------------------------------------------- the extractor

class TarExtractor:
    """Feed it the archive's bytes in chunks of any size; call finish() at the end of the stream.

        with TarExtractor(pgdata) as tx:
            for chunk in stream:
                tx.feed(chunk)
            tx.finish()
    """

    def __init__(self, dest: str) -> None:
        # PGDATA itself is the operator's path (it may legitimately be reached through a symlink).
        self._root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[tuple[str, ...], int] = {}
        self._state = _HEADER
        self._hdr = bytearray()  # a header block split across two chunks
        self._remaining = 0  # data bytes left in the current member
        self._pad = 0  # padding bytes after it
        self._fd = -1  # the regular file being written
        self._mtime = 0.0
        self._ext: bytearray | None = None  # payload of a pax / GNU long-name header being read
        self._ext_type = b""
        self._pending: dict[str, object] = {}  # what extended headers say about the next member
        self._name = ""
        self.offset = 0  # archive bytes consumed
        self.members = 0
        self.ended = False  # saw the end-of-archive (zero) block

    def __enter__(self) -> "TarExtractor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._close_dirs()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def _close_dirs(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    # -- the stream -------------------------------------------------------------------------
    def feed(self, data) -> None:
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        base = self.offset
        self.offset += n
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                if self._ext is not None:
                    self._ext += mv[pos:pos + take]
                else:
                    piece = mv[pos:pos + take]
                    while piece:
                        piece = piece[os.write(self._fd, piece):]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._member_done()
            elif state == _PAD:
                take = min(self._pad, n - pos)
                pos += take
                self._pad -= take
                if not self._pad:
                    self._state = _HEADER
            elif state == _HEADER:
                if not self._hdr and n - pos >= BLOCK:
                    block = bytes(mv[pos:pos + BLOCK])
                    pos += BLOCK
                else:
                    take = min(BLOCK - len(self._hdr), n - pos)
                    self._hdr += mv[pos:pos + take]
                    pos += take
                    if len(self._hdr) < BLOCK:
                        continue
                    block = bytes(self._hdr)
                    self._hdr.clear()
                self._header(block, base + pos - BLOCK)
            else:  # _END: whatever follows the end-of-archive block is not extracted
                return

    def finish(self) -> None:
        """The stream ended: the archive must have ended too (a cut at a header boundary would
        otherwise look like a complete archive)."""
        if not self.ended:
            raise ArchiveError(f"tar archive truncated or corrupt near byte {self.offset}")

    # -- one header -------------------------------------------------------------------------
    def _header(self, block: bytes, at: int) -> None:
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.EOFHeaderError:  # a zero block: the end of the archive
            if self._pending:
                raise ArchiveError(f"extended header without a member at byte {at}") from None
            self.ended = True
            self._state = _END
            return
        except tarfile.HeaderError as e:
            raise ArchiveError(f"bad tar header at byte {at}: {e}") from None
        kind = info.type
        pending = self._pending
        if info.size < 0:  # base-256 fields can be negative
            raise ArchiveError(f"bad tar header at byte {at}: negative size")
        if kind in _EXTENDED:
            if info.size > MAX_EXT_HEADER:
                raise ArchiveError(f"tar extended header at byte {at} is {info.size} bytes "
                                   f"(the limit is {MAX_EXT_HEADER})")
            self._ext, self._ext_type = bytearray(), kind
            self._start_data(info.size)
            return
        name = str(pending.get("path", info.name))
        self._pending = {}
        self.members += 1
        if kind in _REGULAR:
            size = int(pending.get("size", info.size))  # type: ignore[arg-type]
            self._name = name
            parts = split_name(name)
            if not parts:
                raise _refuse(name, "a file in place of the data directory")
            parent = self._walk(parts[:-1], name)
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
            except FileExistsError:
                raise _refuse(name, "already exists (a member may not replace another)") from None
            except OSError as e:
                raise _refuse(name, f"cannot create: {e.strerror}") from None
            self._fd = fd
            mode = safe_mode(info.mode, False)
            if mode != 0o600:
                os.fchmod(fd, mode)
            mtime = float(pending.get("mtime", info.mtime))  # type: ignore[arg-type]
            self._mtime = mtime if 0 <= mtime < 1 << 34 else 0.0  # no nan/inf/overflow for utime
            self._start_data(size)
        elif kind == tarfile.DIRTYPE:
            if info.size:
                raise _refuse(name, "directory with data")
            parts = split_name(name)
            if parts:  # `.` is PGDATA: its mode is ours, never the archive's
                fd = self._walk(parts, name)
                os.fchmod(fd, safe_mode(info.mode, True))
        else:
            what = _KIND_NAMES.get(kind, f"unsupported member type {kind!r}")
            raise _refuse(name, f"{what} (only directories and regular files are extracted)")

    def _start_data(self, size: int) -> None:
        self._remaining = size
        self._pad = -size % BLOCK
        self._state = _DATA
        if not size:
            self._member_done()

    def _member_done(self) -> None:
        if self._ext is not None:
            payload, kind = bytes(self._ext), self._ext_type
            self._ext = None
            self._extended(payload, kind)
        elif self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.utime(fd, (self._mtime, self._mtime))
            finally:
                os.close(fd)
        self._state = _PAD if self._pad else _HEADER

    def _extended(self, payload: bytes, kind: bytes) -> None:
        if kind == tarfile.GNUTYPE_LONGNAME:
            self._pending["path"] = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == tarfile.GNUTYPE_LONGLINK:
            self._pending["linkpath"] = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == tarfile.XGLTYPE:
            pass  # global pax headers: nothing in them changes what we create
        else:
            for key, value in parse_pax(payload).items():
                if key == "path":
                    self._pending["path"] = value
                elif key == "linkpath":
                    self._pending["linkpath"] = value
                elif key == "size":
                    self._pending["size"] = _pax_int(key, value)
                elif key == "mtime":
                    try:
                        self._pending["mtime"] = float(value)
                    except ValueError:
                        raise ArchiveError(f"bad pax mtime {value[:40]!r}") from None
                elif key.startswith("GNU.sparse."):
                    raise ArchiveError("sparse files are not extracted")

    # -- directories ------------------------------------------------------------------------
    def _walk(self, parts: tuple[str, ...], name: str) -> int:
        """A descriptor of PGDATA/parts, creating missing directories (0700), never following a
        symlink. Only the final directory's descriptor is kept (bounded: MAX_OPEN_DIRS)."""
        if not parts:
            return self._root
        fd = self._dirs.get(parts)
        if fd is not None:
            return fd
        i = len(parts) - 1
        while i and parts[:i] not in self._dirs:
            i -= 1
        fd = self._dirs[parts[:i]] if i else self._root
        if len(self._dirs) >= MAX_OPEN_DIRS:
            fd = os.dup(fd)  # survives the cache being emptied just below
            self._close_dirs()
            owned = fd
        else:
            owned = -1
        try:
            for j in range(i, len(parts)):
                child = self._open_dir(fd, parts[j], name)
                if owned >= 0:
                    os.close(owned)
                fd = owned = child
        except BaseException:
            if owned >= 0:
                os.close(owned)
            raise
        self._dirs[parts] = fd
        return fd

    @staticmethod
    def _open_dir(parent: int, part: str, name: str) -> int:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError as e:  # ELOOP (a symlink) or ENOTDIR (a file): never followed, never replaced
            raise _refuse(name, f"{part!r} on its path is not a directory ({e.strerror})") from None
        try:
            os.mkdir(part, 0o700, dir_fd=parent)
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            raise _refuse(name, f"cannot create directory {part!r}: {e.strerror}") from None

