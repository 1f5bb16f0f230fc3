"""Building tar archives, hostile ones included, for extraction tests (our own writer on top of
tarfile's header encoder: tarfile's high-level API refuses or normalises some of what we need)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from compute.storage.tarextract import TarExtractor
from tests.support.pgcluster import scratch_dir

KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
         "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


@dataclass
class Member:
    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int | None = None  # default 0600 files, 0700 dirs
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)  # extra pax records (pax format only)
    devmajor: int = 0
    devminor: int = 0


def tarinfo(m: Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(m.name)
    info.type = KINDS[m.kind]
    info.size = len(m.data) if m.kind == "file" else 0
    info.mode = m.mode if m.mode is not None else (0o700 if m.kind == "dir" else 0o600)
    info.linkname = m.linkname
    info.mtime = 1_700_000_000
    info.devmajor, info.devminor = m.devmajor, m.devminor
    info.pax_headers = dict(m.pax)
    return info


def build_tar(members: list[Member], fmt: int = tarfile.GNU_FORMAT, end: bool = True) -> bytes:
    """The archive's bytes, in order, duplicates and all (tarfile.addfile writes what it is given)."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=fmt)
    for m in members:
        tar.addfile(tarinfo(m), io.BytesIO(m.data) if m.kind == "file" else None)
    if end:
        tar.close()
        return buf.getvalue()
    return buf.getvalue()  # no end-of-archive blocks (a cut archive)


def raw_header(name: str, type_: bytes, size: int) -> bytes:
    """One 512-byte GNU header claiming `size` bytes of payload (base-256 for huge sizes)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = type_, size, 0o600, 1_700_000_000
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def with_basebackup(base_tar: str, extra: list[Member], first: bool = False) -> bytes:
    """A real basebackup archive (file path) with `extra` members appended (or put first)."""
    with open(base_tar, "rb") as f:
        base = f.read()
    # Strip the end-of-archive blocks: find the end of the last member.
    with tarfile.open(base_tar) as tar:
        last = tar.getmembers()[-1]
        cut = last.offset_data + ((last.size + 511) // 512) * 512
    body = base[:cut]
    more = build_tar(extra, tarfile.PAX_FORMAT if any(m.pax for m in extra) else tarfile.GNU_FORMAT, end=False)
    if first:
        return more + body + b"\0" * 1024
    return body + more + b"\0" * 1024


def snapshot_tree(root: str, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Everything under root (not following links): type, mode, size, content, link target.
    `skip`: top-level names left out (e.g. PGDATA itself, log files that grow)."""
    import hashlib
    import stat as st

    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            s = os.lstat(path)
            extra: object = None
            if st.S_ISLNK(s.st_mode):
                extra = os.readlink(path)
            elif st.S_ISREG(s.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (st.S_IFMT(s.st_mode), st.S_IMODE(s.st_mode), s.st_size,
                                                s.st_mtime_ns, s.st_nlink, extra)
    return out


# -- extracting into a box ---------------------------------------------------------------------

@pytest.fixture
def box() -> Iterator[dict[str, str]]:
    """A scratch dir holding PGDATA and a victim dir next to it (what an escape would change)."""
    base = scratch_dir("cs-tx-")
    pgdata, victim = os.path.join(base, "pgdata"), os.path.join(base, "victim")
    os.mkdir(pgdata, 0o700)
    os.mkdir(victim, 0o755)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("keep")
    yield {"base": base, "pgdata": pgdata, "victim": victim}
    shutil.rmtree(base, ignore_errors=True)


def extract(data: bytes, dest: str, chunk: int = 1 << 16) -> TarExtractor:
    with TarExtractor(dest) as tx:
        for i in range(0, len(data), chunk):
            tx.feed(data[i:i + chunk])
        tx.finish()
    return tx
