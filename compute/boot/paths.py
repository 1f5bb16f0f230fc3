"""Preparing PGDATA and the runtime dir without being tricked into touching someone else's files.

Started as root, `compute-ctl` creates, chowns and chmods these two directories, and PGDATA is
emptied at every start. A path under a world-writable place (/tmp) can hold a symlink or a
directory another user planted there, and a typo (`-D /var/lib`) names a directory full of
someone's data. So the walk to each directory is decided component by component:

- the decisions are pure functions of what `lstat`/`fstat` showed (`check_*` below), so they can
  be tested on their own;
- the walk itself (`secure_dir`) opens every component relative to its parent with O_NOFOLLOW,
  decides on the `fstat` of the open descriptor, and chowns/chmods that descriptor: what was
  checked is what is changed, whatever another user renames meanwhile.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

MAX_SYMLINKS = 40  # as the kernel's limit for one lookup
# What only a data directory of ours holds: postgres' version file, or (before initdb or the
# basebackup finished) the postgresql.conf we write first, which starts with our marker.
PGDATA_MARKERS = ("PG_VERSION",)


def default_runtime_dir() -> str:
    """--runtime-dir's default (compute-ctl and `compute-ctl plan`)."""
    if os.getuid() == 0:
        return "/run/compute-ctl"
    return f"/tmp/compute-ctl-{os.environ.get('USER') or os.getuid()}"


class PathError(ValueError):
    """A path we refuse to use; one line naming the path and why."""


@dataclass(frozen=True)
class Node:
    """What one path component is (from lstat or fstat)."""

    path: str
    kind: str  # "dir", "symlink" or "other"
    uid: int
    mode: int  # permission bits (st_mode & 0o7777)

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> "Node":
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "other"
        return cls(path, kind, st.st_uid, stat.S_IMODE(st.st_mode))


@dataclass(frozen=True)
class Policy:
    """Who may own what on the way. `owners`: directories we may pass through or use (root and
    the compute user). `link_owners`: symlinks we may follow (root, or ourselves when not root;
    never the compute user on behalf of root: that would let it point root's chown anywhere)."""

    compute_uid: int
    owners: frozenset[int]
    link_owners: frozenset[int]
    as_root: bool  # we can chown: a root-owned empty directory can be made the compute user's

    @classmethod
    def for_process(cls, compute_uid: int, euid: int | None = None) -> "Policy":
        euid = os.geteuid() if euid is None else euid
        return cls(compute_uid, frozenset({0, compute_uid}), frozenset({0, euid}), euid == 0)


def _who(uid: int) -> str:
    import pwd
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _writable_by_others(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


# -- decisions (pure) -----------------------------------------------------------------------

def check_ancestor(node: Node, policy: Policy) -> None:
    """A directory on the way to the target."""
    if node.kind == "other":
        raise PathError(f"{node.path} is not a directory")
    if node.uid not in policy.owners:
        raise PathError(f"{node.path} belongs to {_who(node.uid)}, not root or the compute user: "
                        "another user could redirect the path")
    # World-writable is fine with the sticky bit (/tmp): others cannot rename or remove our
    # entries there; what they can do, pre-create the next component, is checked next.
    if node.kind == "dir" and _writable_by_others(node.mode) and not node.mode & stat.S_ISVTX:
        raise PathError(f"{node.path} is writable by group/other (mode {node.mode:04o}): "
                        "another user could redirect the path")


def check_symlink(node: Node, policy: Policy) -> None:
    """A symlink on the way (or the target itself): followed only if we could have made it."""
    if node.uid not in policy.link_owners:
        raise PathError(f"{node.path} is a symlink owned by {_who(node.uid)}: refusing to follow it")


def check_target(node: Node, policy: Policy, *, what: str, entries: list[str] | None = None,
                 ours: bool = False) -> None:
    """The directory itself, when it already exists. `entries`: its contents (None: not looked
    at); `ours`: whether they are recognisably a data directory of ours (PGDATA only, which is
    emptied at every start; `looks_like_our_pgdata`)."""
    if node.kind != "dir":
        raise PathError(f"{what} {node.path} exists and is not a directory")
    if node.uid not in (policy.compute_uid, 0):
        raise PathError(f"{what} {node.path} belongs to {_who(node.uid)}, not the compute user")
    if node.uid != policy.compute_uid:
        # A root-owned directory (a volume mount point) becomes ours only while it is empty:
        # otherwise a typo (`--runtime-dir /etc`) would hand root's files to the compute user.
        if not policy.as_root:
            raise PathError(f"{what} {node.path} belongs to root: it must belong to the compute user")
        if entries is None or entries:
            raise PathError(f"{what} {node.path} belongs to root and is not empty: refusing to take it over")
    elif _writable_by_others(node.mode):
        raise PathError(f"{what} {node.path} is writable by group/other (mode {node.mode:04o}): "
                        "another user could have put anything in it")
    if entries and not ours:
        raise PathError(f"{what} {node.path} is not empty and is not a data directory "
                        f"(no {' or '.join(PGDATA_MARKERS)}, no postgresql.conf of ours): "
                        "refusing to empty it (a typo?)")


def looks_like_our_pgdata(entries: list[str], conf_head: str | None, marker: str) -> bool:
    """A data directory (PG_VERSION), or one we began (postgresql.conf starting with our marker)."""
    return any(m in entries for m in PGDATA_MARKERS) or (conf_head or "").startswith(marker)


# -- the walk (thin I/O layer) ---------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def secure_dir(path: str, policy: Policy, *, what: str, uid: int, gid: int,
               pgdata_marker: str | None = None, dry_run: bool = False) -> None:
    """Make `path` (absolute) an existing 0700 directory owned by uid:gid, refusing (PathError,
    nothing changed) whatever the checks above refuse. Missing components are created (the
    target 0700, parents 0755). `pgdata_marker`: the directory is PGDATA (emptied later), so a
    non-empty one must look like ours. `dry_run`: check only, create and change nothing (so
    that one refused directory leaves the other untouched too)."""
    if not os.path.isabs(path):
        raise PathError(f"{what} {path}: must be an absolute path")
    try:
        fd = _walk(path, policy, create=not dry_run)
    except PathError as e:
        raise PathError(f"{what} {path}: {e}") from None
    if fd is None:
        return  # dry run: from some component on, everything would be created by us
    try:
        node = Node.of(path, os.fstat(fd))
        entries, ours = None, False
        if node.uid != policy.compute_uid or pgdata_marker is not None:
            entries = os.listdir(fd)
        if entries and pgdata_marker is not None:
            ours = looks_like_our_pgdata(entries, _read_head(fd, "postgresql.conf", len(pgdata_marker)),
                                         pgdata_marker)
        check_target(node, policy, what=what, entries=entries, ours=ours)
        if dry_run:
            return
        if policy.as_root and (node.uid, os.fstat(fd).st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if node.mode != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _read_head(dir_fd: int, name: str, size: int) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, size).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _walk(path: str, policy: Policy, *, create: bool = True) -> int | None:
    """An O_RDONLY descriptor on the target directory, reached one checked component at a time
    (symlinks followed only when `check_symlink` allows). Creates missing components, or
    without `create` returns None at the first missing one."""
    todo = [c for c in path.split("/") if c]
    stack: list[tuple[str, int]] = [("/", os.open("/", _DIR_FLAGS))]
    hops = 0
    try:
        while todo:
            name = todo.pop(0)
            parent_path, parent_fd = stack[-1]
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[1])
                continue
            here = os.path.join(parent_path, name)
            last = not todo
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(name, 0o700 if last else 0o755, dir_fd=parent_fd)
                except FileExistsError:
                    pass  # someone was faster: whatever it is gets checked below
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            node = Node.of(here, st)
            if node.kind == "symlink":
                check_symlink(node, policy)
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise PathError(f"{path}: too many levels of symbolic links")
                target = os.readlink(name, dir_fd=parent_fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[1])
                todo[:0] = [c for c in target.split("/") if c]
                continue
            if node.kind != "dir":
                raise PathError(f"{here} is not a directory")
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as e:  # swapped for a symlink since the stat: refuse, never follow
                raise PathError(f"{here}: changed while being checked ({e.strerror})") from None
            stack.append((here, fd))
            opened = Node.of(here, os.fstat(fd))
            if not last:
                check_ancestor(opened, policy)
        # The parent of the target must be safe too (it is when the walk got here: every
        # directory pushed but the last was checked as an ancestor).
        if len(stack) == 1:
            raise PathError(f"{path}: refusing to use /")
        return stack.pop()[1]
    finally:
        for _, fd in stack:
            os.close(fd)
