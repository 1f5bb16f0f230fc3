"""The extractor alone (compute/storage/tarextract.py), run as root (the worst case: root could create
devices and write anywhere): every hostile-archive class, chunking, limits, modes.

This file: a real PG15 basebackup (initdb); built archives: tests/unit/test_tarextract.py."""

from __future__ import annotations

import os
import stat
import tarfile

import pytest

from tests.support.hostile_tar import Member, box, build_tar, extract

__all__ = ["box"]  # the fixture


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 65536, 1 << 22])
def test_any_chunking_gives_the_same_tree(chunk: int, box: dict[str, str], bb_tar: str) -> None:
    """A real PG15 basebackup tar: what tarfile would extract, byte for byte, whatever the chunks
    (tiny chunks over its first 300 members only: byte-at-a-time is slow by design)."""
    src = bb_tar
    if chunk < 512:
        with tarfile.open(bb_tar) as tar:
            members = [Member(m.name, tar.extractfile(m).read() if m.isreg() else b"",
                              "file" if m.isreg() else "dir", m.mode)
                       for m in tar.getmembers()[:300] if m.size <= 8192]
        src = os.path.join(box["base"], "small.tar")
        with open(src, "wb") as f:
            f.write(build_tar(members))
    with open(src, "rb") as f:
        data = f.read()
    tx = extract(data, box["pgdata"], chunk)
    with tarfile.open(src) as tar:
        names = tar.getnames()
        assert tx.members == len(names)
        for m in tar:
            path = os.path.join(box["pgdata"], m.name)
            if m.isreg():
                with open(path, "rb") as f, tar.extractfile(m) as want:
                    assert f.read() == want.read(), m.name
                assert stat.S_IMODE(os.stat(path).st_mode) == m.mode & 0o755 | 0o600
            else:
                assert os.path.isdir(path) and not os.path.islink(path)
