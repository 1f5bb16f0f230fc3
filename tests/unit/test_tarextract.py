"""The extractor alone (compute/storage/tarextract.py), run as root (the worst case: root could create
devices and write anywhere): every hostile-archive class, chunking, limits, modes.

This file: built archives; a real PG15 basebackup: tests/integration/test_tarextract.py."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile

import pytest

from compute.storage.tarextract import MAX_EXT_HEADER, MAX_OPEN_DIRS, ArchiveError, TarExtractor, parse_pax, split_name
from tests.support.hostile_tar import Member, box, build_tar, extract, raw_header, snapshot_tree

__all__ = ["box"]  # the fixture


def hostile_cases(victim: str) -> dict[str, list[Member]]:
    keep = os.path.join(victim, "keep")
    return {
        "absolute": [Member(keep, b"pwned")],
        "dotdot": [Member("PG_VERSION", b"15\n"), Member("../victim/keep", b"pwned")],
        "dotdot-inner": [Member("base", kind="dir"), Member("base/../../victim/keep", b"pwned")],
        "dotdot-dir": [Member("../victim/new", kind="dir")],
        "pax-path-escape": [Member("innocent", b"pwned", pax={"path": "../victim/keep"})],
        "longname-escape": [Member("a/" * 60 + "../" * 61 + "victim/keep", b"pwned")],
        "symlink-abs-then-write": [Member("pg_evil", kind="sym", linkname=victim), Member("pg_evil/keep", b"pwned")],
        "symlink-rel-then-write": [Member("pg_evil", kind="sym", linkname="../victim"),
                                   Member("pg_evil/new", b"pwned")],
        "symlink-chain": [Member("l1", kind="sym", linkname="l2"), Member("l2", kind="sym", linkname="l3"),
                          Member("l3", kind="sym", linkname="../victim"), Member("l1/keep", b"pwned")],
        "symlink-redefines-dir": [Member("base", kind="dir"), Member("base/1", b"x"),
                                  Member("base", kind="sym", linkname=victim), Member("base/keep", b"pwned")],
        "symlink-redefines-file": [Member("PG_VERSION", b"15\n"), Member("PG_VERSION", kind="sym", linkname=keep)],
        "hardlink-out": [Member("pg_evil", kind="hard", linkname=keep)],
        "hardlink-rel-out": [Member("pg_evil", kind="hard", linkname="../victim/keep")],
        "hardlink-redefines": [Member("PG_VERSION", b"15\n"), Member("PG_VERSION", kind="hard", linkname=keep)],
        "file-redefines-file": [Member("PG_VERSION", b"15\n"), Member("PG_VERSION", b"16\n")],
        "file-redefines-dir": [Member("base", kind="dir"), Member("base", b"x")],
        "dir-over-file": [Member("global", b"x"), Member("global", kind="dir"), Member("global/pg_control", b"x")],
        "chardev": [Member("pg_dev", kind="chr", devmajor=1, devminor=3)],
        "blockdev": [Member("pg_dev", kind="blk", devmajor=7, devminor=0)],
        "fifo": [Member("pg_fifo", kind="fifo")],
        "file-as-pgdata": [Member(".", b"x")],
        "nul-in-pax-path": [Member("x", b"x", pax={"path": "a\x00b"})],
    }


CASES = sorted(hostile_cases("/v"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_hostile_archive_is_refused_and_nothing_outside_changes(case: str, fmt: int, box: dict[str, str]) -> None:
    members = hostile_cases(box["victim"])[case]
    if fmt == tarfile.GNU_FORMAT and any(m.pax for m in members):
        pytest.skip("pax records need the pax format")
    data = build_tar(members, fmt)
    before = snapshot_tree(box["base"], skip=("pgdata",))
    with pytest.raises(ArchiveError, match=r"^refusing tar member .+: .+"):
        extract(data, box["pgdata"])
    assert snapshot_tree(box["base"], skip=("pgdata",)) == before
    # Nothing but directories and regular files ever appears in PGDATA.
    for path, (kind, mode, *_rest) in snapshot_tree(box["pgdata"]).items():
        assert kind in (stat.S_IFDIR, stat.S_IFREG), path
        assert not mode & 0o7022, (path, oct(mode))
    assert stat.S_IMODE(os.stat(box["pgdata"]).st_mode) == 0o700


def test_planted_symlink_in_pgdata_is_never_followed(box: dict[str, str]) -> None:
    """Whoever put a symlink into PGDATA, no path through it and no file over it is used."""
    os.symlink(box["victim"], os.path.join(box["pgdata"], "pg_wal"))
    os.symlink(os.path.join(box["victim"], "keep"), os.path.join(box["pgdata"], "PG_VERSION"))
    os.symlink(os.path.join(box["victim"], "gone"), os.path.join(box["pgdata"], "dangling"))
    before = snapshot_tree(box["base"], skip=("pgdata",))
    for members, why in (([Member("pg_wal/keep", b"pwned")], "not a directory"),
                         ([Member("pg_wal", kind="dir")], "not a directory"),
                         ([Member("PG_VERSION", b"pwned")], "already exists"),
                         ([Member("dangling", b"pwned")], "already exists")):
        with pytest.raises(ArchiveError, match=why):
            extract(build_tar(members), box["pgdata"])
    assert snapshot_tree(box["base"], skip=("pgdata",)) == before


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_modes_are_sanitised_and_pgdata_keeps_0700(fmt: int, box: dict[str, str]) -> None:
    members = [Member(".", kind="dir", mode=0o777), Member("./", kind="dir", mode=0o4777),
               Member("base", kind="dir", mode=0o7777), Member("./base/suid", b"#!/bin/sh\n", mode=0o6777),
               Member("base/none", b"x", mode=0o000), Member("base/dir0", kind="dir", mode=0o000),
               Member("base/dir0/f", b"y"), Member("deep/er/file", b"z", mode=0o640)]
    extract(build_tar(members, fmt), box["pgdata"])
    p = box["pgdata"]

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(os.path.join(p, rel)).st_mode)
    assert mode(".") == 0o700
    assert mode("base") == 0o755 and mode("base/suid") == 0o755
    assert mode("base/none") == 0o600 and mode("base/dir0") == 0o700
    assert mode("deep") == 0o700 and mode("deep/er") == 0o700 and mode("deep/er/file") == 0o640  # parents made
    with open(os.path.join(p, "base/dir0/f"), "rb") as f:
        assert f.read() == b"y"
    assert os.stat(os.path.join(p, "base/suid")).st_mtime == 1_700_000_000


def test_limits_on_headers_and_names(box: dict[str, str]) -> None:
    for header, msg in ((raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 1 << 40), "is 1099511627776 bytes"),
                        (raw_header("././@PaxHeader", tarfile.XHDTYPE, MAX_EXT_HEADER + 1), "the limit is 65536"),
                        (raw_header("././@PaxHeader", tarfile.XGLTYPE, 1 << 33), "extended header at byte 0")):
        with TarExtractor(box["pgdata"]) as tx, pytest.raises(ArchiveError, match=msg):
            tx.feed(header)
    with pytest.raises(ArchiveError, match="name longer than 4096"):
        extract(build_tar([Member("d/" * 2100 + "f", b"x")]), box["pgdata"])
    # A long name within the limits is fine (GNU long-name and pax path records).
    long = "/".join(["x" * 200] * 3)
    extract(build_tar([Member(long, b"ok")]), box["pgdata"])
    extract(build_tar([Member(long + "2", b"ok")], tarfile.PAX_FORMAT), box["pgdata"])
    with open(os.path.join(box["pgdata"], long + "2"), "rb") as f:
        assert f.read() == b"ok"


def test_negative_sizes_and_absurd_times(box: dict[str, str]) -> None:
    header = bytearray(raw_header("neg", tarfile.REGTYPE, 0))
    header[124:136] = b"\xff" * 12  # base-256 size -1
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    with TarExtractor(box["pgdata"]) as tx, pytest.raises(ArchiveError, match="negative size"):
        tx.feed(bytes(header))
    extract(build_tar([Member("inf", b"x", pax={"mtime": "inf"}), Member("nan", b"x", pax={"mtime": "nan"}),
                       Member("big", b"x", pax={"mtime": "1" * 19})], tarfile.PAX_FORMAT), box["pgdata"])
    assert os.stat(os.path.join(box["pgdata"], "inf")).st_mtime == 0


def test_directory_descriptors_stay_bounded(box: dict[str, str]) -> None:
    members = [Member(f"d{i}/sub/f", b"x") for i in range(MAX_OPEN_DIRS * 3)]
    root = os.path.realpath(box["pgdata"])

    def fds_inside() -> int:
        """This process' descriptors open on PGDATA or below (other descriptors come and go
        with whatever else the test process runs: they are not the extractor's)."""
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            n += target == root or target.startswith(root + "/")
        return n
    assert fds_inside() == 0
    with TarExtractor(box["pgdata"]) as tx:
        data = build_tar(members)
        for i in range(0, len(data), 4096):
            tx.feed(data[i:i + 4096])
            assert len(tx._dirs) <= MAX_OPEN_DIRS
            assert fds_inside() <= MAX_OPEN_DIRS + 2  # the cached dirs, the root, one file
        tx.finish()
    assert fds_inside() == 0
    assert len(os.listdir(box["pgdata"])) == MAX_OPEN_DIRS * 3


def test_corrupt_and_cut_archives(box: dict[str, str]) -> None:
    good = build_tar([Member("a", b"1" * 1000), Member("b", b"2")])
    bad = bytearray(good)
    bad[1536 + 100] ^= 0xFF  # inside the second header: its checksum no longer matches
    with pytest.raises(ArchiveError, match="bad tar header at byte 1536"):
        extract(bytes(bad), box["pgdata"])
    shutil.rmtree(box["pgdata"]); os.mkdir(box["pgdata"], 0o700)
    for cut in (1536, 1536 + 100, 1000, 0):  # at a header boundary, mid-header, mid-data, nothing
        with pytest.raises(ArchiveError, match="truncated"):
            extract(good[:cut], box["pgdata"])
        shutil.rmtree(box["pgdata"]); os.mkdir(box["pgdata"], 0o700)
    # Whatever follows the end-of-archive block is not extracted (and no error).
    tx = extract(good + build_tar([Member("after", b"x")]), box["pgdata"])
    assert tx.members == 2 and not os.path.exists(os.path.join(box["pgdata"], "after"))


@pytest.mark.parametrize("members,msg", [
    ([Member("sparse", b"x", pax={"GNU.sparse.major": "1"})], "sparse"),
    ([Member("x", b"x", pax={"size": "-1"})], "bad pax size"),
    ([Member("x", b"x", pax={"mtime": "soon"})], "bad pax mtime"),
])
def test_bad_pax_records(members: list[Member], msg: str, box: dict[str, str]) -> None:
    with pytest.raises(ArchiveError, match=msg):
        extract(build_tar(members, tarfile.PAX_FORMAT), box["pgdata"])


def test_pure_helpers() -> None:
    assert split_name("./base/1") == ("base", "1") and split_name(".") == () and split_name("a//b/") == ("a", "b")
    for name in ("/etc", "..", "a/../b", "a\x00b"):
        with pytest.raises(ArchiveError):
            split_name(name)
    assert parse_pax(b"11 path=ab\n15 mtime=1.5e9\n\0\0") == {"path": "ab", "mtime": "1.5e9"}
    for bad in (b"x path=a\n", b"99 path=a\n", b"10 path=ab", b"9 patha\n", b"1" * 30 + b" p=1\n"):
        with pytest.raises(ArchiveError, match="malformed pax"):
            parse_pax(bad)
