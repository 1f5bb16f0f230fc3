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

A volume's mount point (an emptyDir, a PVC, a tmpfs: the root of a mounted filesystem other than
FUSE) may be writable by group/other: only root mounts, and who may write into a volume is then
the mounter's choice (in a pod: the containers that mount it; docs/security.md, "Volumes of a
pod"). A plain directory that is writable by others without the sticky bit is still refused.

Every refusal is one line: the path, what was found there (owner, group, mode), what is needed
and how to fix it (`refusal`).
"""

from __future__ import annotations

import errno
import os
import re
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
    """A path we refuse to use; one line naming the path, what was found, what is needed and
    how to fix it."""


@dataclass(frozen=True)
class Node:
    """What one path component is (from lstat or fstat)."""

    path: str
    kind: str  # "dir", "symlink" or "other"
    uid: int
    mode: int  # permission bits (st_mode & 0o7777)
    gid: int = -1
    volume: bool = False  # the root of a mounted filesystem (not FUSE): a volume's mount point

    @classmethod
    def of(cls, path: str, st: os.stat_result, *, volume: bool = False) -> "Node":
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "other"
        return cls(path, kind, st.st_uid, stat.S_IMODE(st.st_mode), st.st_gid, volume)


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


def _group(gid: int) -> str:
    import grp
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def found(node: Node) -> str:
    """What was found at a path, for a refusal: owner, group, mode, and whether it is a volume."""
    parts = [f"owner {_who(node.uid)}"]
    if node.gid >= 0:
        parts.append(f"group {_group(node.gid)}")
    parts.append(f"mode {node.mode:04o}")
    text = ", ".join(parts)
    if node.kind == "symlink":
        text = "a symlink, " + text
    elif node.kind == "other":
        text = "not a directory, " + text
    return text + (", a volume's mount point" if node.volume else "")


def refusal(path: str, problem: str, node: Node | None, need: str, fix: str) -> PathError:
    """The one-line refusal: `path: problem (found: ...). Needed: ... Fix: ...`."""
    seen = f" (found: {found(node)})" if node is not None else ""
    return PathError(f"{path} {problem}{seen}. Needed: {need}. Fix: {fix}")


def _writable_by_others(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


# -- decisions (pure) -----------------------------------------------------------------------
#
# An existing directory ON THE WAY to PGDATA or the runtime dir (check_ancestor):
#
#   | what it is                                   | owner                | decision            |
#   |----------------------------------------------|----------------------|---------------------|
#   | not a directory                              | any                  | refuse              |
#   | any directory                                | not root/compute user| refuse              |
#   | not writable by group/other                  | root or compute user | pass                |
#   | writable by group/other, sticky bit (/tmp)   | root or compute user | pass                |
#   | writable by group/other, a volume's root     | root or compute user | pass (the mounter's |
#   |   (emptyDir 0777/2777, tmpfs, PVC 2775)      |                      |  trust: see above)  |
#   | writable by group/other, anything else       | root or compute user | refuse              |
#
# A symlink on the way (check_symlink): followed only if root made it (or we, when not root).
#
# The directory ITSELF, when it exists (check_target):
#
#   | owner         | mode / contents                         | as root        | not as root |
#   |---------------|-----------------------------------------|----------------|-------------|
#   | other user    | any                                     | refuse         | refuse      |
#   | root          | empty                                   | take (chown)   | refuse: use a directory inside it |
#   | root          | not empty (a PVC's lost+found too)      | refuse         | refuse      |
#   | compute user  | writable by group/other                 | refuse         | refuse      |
#   | compute user  | PGDATA not empty and not ours           | refuse         | refuse      |
#   | compute user  | 0700-ish, empty or ours                 | use            | use         |
#
# A missing directory is created (0700; parents 0755) where the compute user (or root) may
# write (check_creatable): never on a read-only filesystem.

_VOLUME_FIX = ("give a path inside a volume of the pod (an emptyDir or a PVC, as deploy/compute.yaml "
               "does), or one through directories of root's not writable by others (e.g. under "
               "/var/lib/postgresql)")


def check_ancestor(node: Node, policy: Policy) -> None:
    """A directory on the way to the target."""
    if node.kind == "other":
        raise refusal(node.path, "is not a directory", node, "a directory on the way",
                      "check the path")
    if node.uid not in policy.owners:
        raise refusal(node.path, f"belongs to {_who(node.uid)}, not root or the compute user "
                      f"{_who(policy.compute_uid)}: another user could redirect the path", node,
                      "every directory on the way belongs to root or the compute user", _VOLUME_FIX)
    # World-writable is fine with the sticky bit (/tmp): others cannot rename or remove our
    # entries there; what they can do, pre-create the next component, is checked next. A
    # volume's root is fine too: whoever may write in it is whoever mounts it (module doc).
    if (node.kind == "dir" and _writable_by_others(node.mode) and not node.mode & stat.S_ISVTX
            and not node.volume):
        raise refusal(node.path, f"is writable by group/other (mode {node.mode:04o}) without the "
                      "sticky bit and is not a volume's mount point: another user could redirect "
                      "the path", node,
                      "directories on the way not writable by group/other, or with the sticky bit "
                      "(as /tmp), or the mount point of a volume",
                      f"chmod go-w {node.path} (or +t), or {_VOLUME_FIX}")


def check_symlink(node: Node, policy: Policy) -> None:
    """A symlink on the way (or the target itself): followed only if we could have made it."""
    if node.uid not in policy.link_owners:
        makers = "root" if policy.as_root else f"root or {_who(min(policy.link_owners - {0}, default=0))}"
        raise refusal(node.path, f"is a symlink owned by {_who(node.uid)}: refusing to follow it", node,
                      f"symlinks on the way made by {makers}",
                      "give the path it points to, after checking it is yours, or remove the symlink")


def check_target(node: Node, policy: Policy, *, what: str, entries: list[str] | None = None,
                 ours: bool = False) -> None:
    """The directory itself, when it already exists. `entries`: its contents (None: not looked
    at); `ours`: whether they are recognisably a data directory of ours (PGDATA only, which is
    emptied at every start; `looks_like_our_pgdata`)."""
    cu = _who(policy.compute_uid)
    inside = os.path.join(node.path, "pgdata" if what == "--pgdata" else "run")
    if node.kind != "dir":
        raise refusal(f"{what} {node.path}", "exists and is not a directory", node,
                      "a directory, or nothing (it is then created)", "remove it or choose another path")
    if node.uid not in (policy.compute_uid, 0):
        raise refusal(f"{what} {node.path}", f"belongs to {_who(node.uid)}, not the compute user {cu}",
                      node, f"a directory of the compute user {cu}, mode 0700",
                      f"remove it (it is created), or chown {policy.compute_uid} {node.path} "
                      f"&& chmod 0700 {node.path} if its contents are yours")
    if node.uid != policy.compute_uid:
        # A root-owned directory (a volume mount point) becomes ours only while it is empty:
        # otherwise a typo (`--runtime-dir /etc`) would hand root's files to the compute user.
        if not policy.as_root:
            raise refusal(f"{what} {node.path}", f"belongs to root: it must belong to the compute user "
                          f"{cu}, and compute-ctl, not running as root, cannot make it so", node,
                          "a directory owned by the compute user, mode 0700 (postgres refuses any other)",
                          f"give a directory inside it, e.g. {inside} (created by compute-ctl; a "
                          "volume's mount point stays root's), or start compute-ctl as root")
        if entries is None or entries:
            held = f"; holds {', '.join(sorted(entries)[:3])}{'...' if len(entries) > 3 else ''}" if entries else ""
            raise refusal(f"{what} {node.path}", f"belongs to root and is not empty{held}: refusing to "
                          "take it over", node, "an empty directory, or one of the compute user's",
                          f"give a new directory inside it, e.g. {inside}")
    elif _writable_by_others(node.mode):
        raise refusal(f"{what} {node.path}", f"is writable by group/other (mode {node.mode:04o}): "
                      "another user could have put anything in it", node,
                      "mode 0700 (not writable by group/other)",
                      f"chmod 0700 {node.path}, or remove it (it is created); under Kubernetes with "
                      "fsGroup, set fsGroupChangePolicy: OnRootMismatch so the kubelet does not make "
                      "it group-writable again at each start")
    if entries and not ours:
        raise refusal(f"{what} {node.path}", "is not empty and is not a data directory "
                      f"(no {' or '.join(PGDATA_MARKERS)}, no postgresql.conf of ours): "
                      "refusing to empty it (a typo?)", node,
                      "an empty directory, or a PGDATA of ours (it is emptied at every start)",
                      f"give an empty or new directory, e.g. {inside}")


def check_creatable(parent: Node, name: str, policy: Policy, *, writable: bool, read_only_fs: bool) -> None:
    """A missing component `name` is to be created in `parent` (already checked as an ancestor).
    `writable`: the process may create entries there (access(W_OK|X_OK)); `read_only_fs`: the
    parent's filesystem is mounted read-only."""
    path = os.path.join(parent.path, name)
    if read_only_fs:
        raise refusal(f"cannot create {path}:", f"{parent.path} is on a read-only filesystem", parent,
                      "PGDATA and the runtime dir on a writable filesystem",
                      f"mount a volume on {parent.path} or on a directory of the path (Kubernetes with "
                      "readOnlyRootFilesystem: an emptyDir), or choose a path on a writable volume")
    if not writable:
        cu = _who(policy.compute_uid)
        raise refusal(f"cannot create {path}:", f"the compute user {cu} may not write in {parent.path}",
                      parent, f"a parent directory the compute user {cu} can write in",
                      "under Kubernetes set the pod's securityContext.fsGroup (the kubelet then makes "
                      f"the volume group-writable for the pod); or create {path} owned by "
                      f"{policy.compute_uid}, mode 0700; or start compute-ctl as root")


def os_refusal(path: str, action: str, err: OSError, node: Node | None) -> PathError:
    """An unexpected OSError on the walk, as a sentence (never a bare errno)."""
    need = {errno.EACCES: "read and search permission (r-x) for the compute user on every "
                          "directory on the way",
            errno.EPERM: "permission for the compute user",
            errno.EROFS: "a writable filesystem",
            errno.ENOSPC: "free space", errno.EDQUOT: "free quota"}.get(err.errno, "a usable directory")
    fix = {errno.EACCES: "choose a path whose directories the compute user may enter (e.g. under "
                         "/var/lib/postgresql, or a volume), or give it r-x on them",
           errno.EROFS: "mount a volume there (an emptyDir), or choose a path on a writable volume"
           }.get(err.errno, "remove the cause named above, or choose another path")
    return refusal(path, f"cannot be {action}: {err.strerror}", node, need, fix)


def looks_like_our_pgdata(entries: list[str], conf_head: str | None, marker: str) -> bool:
    """A data directory (PG_VERSION), or one we began (postgresql.conf starting with our marker)."""
    return any(m in entries for m in PGDATA_MARKERS) or (conf_head or "").startswith(marker)


# -- the walk (thin I/O layer) ---------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MOUNTINFO = "/proc/self/mountinfo"


def parse_mountinfo(text: str) -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo (the last mount on a path is the
    one seen there). Fields: id parent major:minor root MOUNT_POINT options [optional...] - TYPE ..."""
    mounts: dict[str, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts[point] = right.split()[0]
    return mounts


def is_volume(mounts: dict[str, str], path: str) -> bool:
    """A volume's mount point: the root of a mounted filesystem, which only root can mount. Not
    FUSE: its daemon, possibly another user, describes its files as it likes."""
    fstype = mounts.get(path)
    return fstype is not None and not fstype.startswith("fuse")


def _mounts() -> dict[str, str]:
    try:
        with open(MOUNTINFO) as f:
            return parse_mountinfo(f.read())
    except OSError:
        return {}  # no /proc: nothing counts as a volume (the stricter rules apply)


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
    node = None
    try:
        node = Node.of(path, os.fstat(fd), volume=is_volume(_mounts(), path))
        entries, ours = None, False
        if node.uid != policy.compute_uid or pgdata_marker is not None:
            entries = os.listdir(fd)
        if entries and pgdata_marker is not None:
            ours = looks_like_our_pgdata(entries, _read_head(fd, "postgresql.conf", len(pgdata_marker)),
                                         pgdata_marker)
        check_target(node, policy, what=what, entries=entries, ours=ours)
        if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
            raise refusal(f"{what} {path}", "is on a read-only filesystem", node,
                          "PGDATA and the runtime dir on a writable filesystem",
                          "mount a volume there or on a parent (Kubernetes with readOnlyRootFilesystem: "
                          "an emptyDir), or choose a path on a writable volume")
        if dry_run:
            return
        if policy.as_root and (node.uid, os.fstat(fd).st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if node.mode != 0o700:
            os.fchmod(fd, 0o700)
    except OSError as e:
        raise os_refusal(f"{what} {path}", "used", e, node) from None
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


def _creatable(parent: Node, parent_fd: int, name: str, policy: Policy) -> None:
    """check_creatable with what the kernel says about the parent (its filesystem, our access)."""
    read_only = bool(os.fstatvfs(parent_fd).f_flag & os.ST_RDONLY)
    writable = os.access(".", os.W_OK | os.X_OK, dir_fd=parent_fd, effective_ids=True)
    check_creatable(parent, name, policy, writable=writable, read_only_fs=read_only)


def _walk(path: str, policy: Policy, *, create: bool = True) -> int | None:
    """An O_RDONLY descriptor on the target directory, reached one checked component at a time
    (symlinks followed only when `check_symlink` allows). Creates missing components, or
    without `create` returns None at the first missing one (once it is known that it could be
    created)."""
    todo = [c for c in path.split("/") if c]
    stack: list[tuple[str, int]] = [("/", os.open("/", _DIR_FLAGS))]
    nodes: dict[str, Node] = {"/": Node.of("/", os.fstat(stack[0][1]))}
    mounts = _mounts()
    hops = 0
    here = "/"
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
                _creatable(nodes[parent_path], parent_fd, name, policy)
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
                raise refusal(here, "is not a directory", node, "a directory on the way", "check the path")
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    # swapped for a symlink or a file since the stat: refuse, never follow
                    raise PathError(f"{here}: changed while being checked ({e.strerror}): refusing "
                                    "it; if nobody else writes there, start again") from None
                if node.uid not in policy.owners:
                    check_ancestor(node, policy)  # it is someone else's: say that, not EACCES
                raise os_refusal(here, "opened", e, node) from None
            stack.append((here, fd))
            opened = Node.of(here, os.fstat(fd), volume=is_volume(mounts, here))
            nodes[here] = opened
            if not last:
                check_ancestor(opened, policy)
        # The parent of the target must be safe too (it is when the walk got here: every
        # directory pushed but the last was checked as an ancestor).
        if len(stack) == 1:
            raise PathError(f"{path}: refusing to use /")
        return stack.pop()[1]
    except OSError as e:  # mkdir, stat, readlink: a sentence, never a bare errno
        raise os_refusal(here, "created or looked up" if e.errno != errno.EACCES else "reached", e,
                         nodes.get(os.path.dirname(here))) from None
    finally:
        for _, fd in stack:
            os.close(fd)
