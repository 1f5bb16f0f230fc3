"""The path policy for PGDATA and the runtime dir (compute/boot/paths.py): the pure decisions, then
the walk on a real filesystem (owners faked with chown when the tests run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile

import pytest

from compute.boot.paths import (Node, PathError, Policy, check_ancestor, check_creatable, check_symlink,
                                check_target, is_volume, looks_like_our_pgdata, parse_mountinfo, secure_dir)
from compute.postgres.conf import BEGIN_MARK

COMPUTE, OTHER = 1000, 65534
AS_ROOT = Policy.for_process(COMPUTE, euid=0)
AS_USER = Policy.for_process(COMPUTE, euid=COMPUTE)


def d(uid=0, mode=0o755, path="/x", gid=0, volume=False):
    return Node(path, "dir", uid, mode, gid, volume)


FSGROUP = 2000


def vol(mode, gid=0, uid=0):
    """A volume's mount point as the kubelet leaves it."""
    return d(uid, mode, path="/vol", gid=gid, volume=True)


def link(uid=0):
    return Node("/x", "symlink", uid, 0o777)


# -- decisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("node", [d(0, 0o755), d(COMPUTE, 0o700), d(0, 0o1777), d(COMPUTE, 0o1777)])
def test_ancestors_that_pass(node):
    check_ancestor(node, AS_ROOT)


@pytest.mark.parametrize("node,why", [
    (d(OTHER, 0o755), "belongs to"),
    (d(0, 0o777), "writable by group/other"),        # e.g. a shared dir without the sticky bit
    (d(COMPUTE, 0o775), "writable by group/other"),
    (Node("/x", "other", 0, 0o644), "not a directory"),
])
def test_ancestors_that_are_refused(node, why):
    with pytest.raises(PathError, match=why):
        check_ancestor(node, AS_ROOT)


# The pod's volumes, as the kubelet makes them (compute/boot/paths.py's table): on the way to
# PGDATA or the runtime dir, for the compute user or root alike.
KUBELET_FORMS = {
    "emptyDir": vol(0o777),
    "emptyDir, fsGroup": vol(0o2777, FSGROUP),
    "emptyDir medium Memory (tmpfs)": vol(0o1777),
    "emptyDir medium Memory, fsGroup": vol(0o3777, FSGROUP),
    "PVC, fsGroup": vol(0o2775, FSGROUP),
    "PVC without fsGroup": vol(0o755),
}


@pytest.mark.parametrize("form", sorted(KUBELET_FORMS))
@pytest.mark.parametrize("policy", [AS_ROOT, AS_USER], ids=["as root", "as the compute user"])
def test_volume_mount_points_pass_on_the_way(form, policy):
    check_ancestor(KUBELET_FORMS[form], policy)


@pytest.mark.parametrize("node,why", [
    # the same modes on a plain directory: a shared host directory
    (d(0, 0o777), "not a volume's mount point"),
    (d(0, 0o2777, gid=FSGROUP), "not a volume's mount point"),
    (d(0, 0o2775, gid=FSGROUP), "not a volume's mount point"),
    # a volume does not make another user's directory ours
    (vol(0o777, uid=OTHER), "belongs to"),
    (vol(0o755, uid=OTHER), "belongs to"),
])
def test_what_a_volume_does_not_excuse(node, why):
    for policy in (AS_ROOT, AS_USER):
        with pytest.raises(PathError, match=why):
            check_ancestor(node, policy)


@pytest.mark.parametrize("form", sorted(KUBELET_FORMS))
def test_a_volume_itself_as_the_target(form):
    """Root's mount point: taken (chowned) only by root and only while empty (a PVC holds
    lost+found); the compute user is told to give a directory inside it."""
    node = KUBELET_FORMS[form]
    with pytest.raises(PathError, match="give a directory inside it, e.g. /vol/pgdata"):
        check_target(node, AS_USER, what="--pgdata", entries=[])
    check_target(node, AS_ROOT, what="--pgdata", entries=[])
    with pytest.raises(PathError, match="not empty; holds lost\\+found.*e.g. /vol/pgdata"):
        check_target(node, AS_ROOT, what="--pgdata", entries=["lost+found"])


def test_creating_inside_a_volume():
    check_creatable(vol(0o2775, FSGROUP), "pgdata", AS_USER, writable=True, read_only_fs=False)
    with pytest.raises(PathError, match="may not write in /vol.*fsGroup"):
        check_creatable(vol(0o755), "pgdata", AS_USER, writable=False, read_only_fs=False)
    with pytest.raises(PathError, match="read-only filesystem.*emptyDir"):
        check_creatable(d(0, 0o1777, path="/tmp"), "compute-ctl", AS_USER, writable=False, read_only_fs=True)


def test_mount_points_from_mountinfo():
    text = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            "90 22 0:50 / /var/lib/postgresql/data rw,nosuid - tmpfs tmpfs rw,mode=1777\n"
            "91 22 8:1 /var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/data /with\\040space rw - ext4 /dev/sda1 rw\n"
            "92 22 0:51 / /home/x/fuse rw,nosuid shared:3 master:2 - fuse.sshfs host: rw\n"
            "garbage\n")
    mounts = parse_mountinfo(text)
    assert mounts["/var/lib/postgresql/data"] == "tmpfs" and mounts["/with space"] == "ext4"
    assert is_volume(mounts, "/var/lib/postgresql/data") and is_volume(mounts, "/with space")
    assert not is_volume(mounts, "/home/x/fuse")  # its daemon says who owns what: not trusted
    assert not is_volume(mounts, "/var/lib/postgresql")


REFUSALS = [  # every refusal, each must name the path, what was found, what is needed, the fix
    lambda: check_ancestor(d(OTHER, 0o755, path="/a"), AS_ROOT),
    lambda: check_ancestor(d(0, 0o777, path="/a"), AS_USER),
    lambda: check_ancestor(Node("/a", "other", 0, 0o644, 0), AS_ROOT),
    lambda: check_symlink(Node("/a", "symlink", OTHER, 0o777, OTHER), AS_ROOT),
    lambda: check_target(Node("/a", "other", COMPUTE, 0o600, 0), AS_ROOT, what="--pgdata"),
    lambda: check_target(d(OTHER, 0o700, path="/a"), AS_ROOT, what="--pgdata", entries=[]),
    lambda: check_target(d(0, 0o755, path="/a"), AS_USER, what="--pgdata", entries=[]),
    lambda: check_target(d(0, 0o755, path="/a"), AS_ROOT, what="--pgdata", entries=["x"]),
    lambda: check_target(d(COMPUTE, 0o2770, path="/a"), AS_ROOT, what="--pgdata", entries=[]),
    lambda: check_target(d(COMPUTE, 0o700, path="/a"), AS_ROOT, what="--pgdata", entries=["lib"]),
    lambda: check_creatable(d(0, 0o755, path="/a"), "b", AS_USER, writable=False, read_only_fs=False),
    lambda: check_creatable(d(0, 0o755, path="/a"), "b", AS_USER, writable=True, read_only_fs=True),
]


@pytest.mark.parametrize("refuse", REFUSALS)
def test_every_refusal_is_a_sentence_with_what_was_found_and_the_fix(refuse):
    with pytest.raises(PathError) as e:
        refuse()
    text = str(e.value)
    assert "\n" not in text and "/a" in text and "Errno" not in text
    assert "found: " in text and "owner " in text and "mode " in text, text
    assert "Needed: " in text and "Fix: " in text, text


def test_symlinks_followed_only_when_we_could_have_made_them():
    check_symlink(link(0), AS_ROOT)
    check_symlink(link(COMPUTE), AS_USER)   # our own, when we are that user
    for policy, uid in ((AS_ROOT, COMPUTE), (AS_ROOT, OTHER), (AS_USER, OTHER)):
        with pytest.raises(PathError, match="symlink owned by"):
            check_symlink(link(uid), policy)


def test_targets():
    check_target(d(COMPUTE, 0o700), AS_ROOT, what="--pgdata", entries=[])
    check_target(d(COMPUTE, 0o700), AS_ROOT, what="--runtime-dir")         # contents not looked at
    check_target(d(0, 0o777), AS_ROOT, what="--pgdata", entries=[])       # an empty mount point
    check_target(d(COMPUTE, 0o700), AS_ROOT, what="--pgdata", entries=["PG_VERSION", "base"], ours=True)
    refused = [
        (dict(node=d(OTHER, 0o700), entries=[]), "belongs to"),
        (dict(node=d(0, 0o755), entries=["passwd"]), "belongs to root and is not empty"),
        (dict(node=d(0, 0o755), entries=None), "belongs to root and is not empty"),
        (dict(node=d(COMPUTE, 0o770), entries=[]), "writable by group/other"),
        (dict(node=d(COMPUTE, 0o700), entries=["lib", "cache"]), "not a data directory"),
        (dict(node=Node("/x", "other", COMPUTE, 0o600), entries=None), "not a directory"),
    ]
    for kw, why in refused:
        with pytest.raises(PathError, match=why):
            check_target(kw["node"], AS_ROOT, what="--pgdata", entries=kw["entries"])
    with pytest.raises(PathError, match="belongs to root"):  # not root: we could not chown it
        check_target(d(0, 0o755), AS_USER, what="--pgdata", entries=[])


def test_our_pgdata_is_recognised():
    assert looks_like_our_pgdata(["PG_VERSION", "global"], None, BEGIN_MARK)
    assert looks_like_our_pgdata(["postgresql.conf"], BEGIN_MARK + "\nport = 1\n", BEGIN_MARK)
    assert not looks_like_our_pgdata(["postgresql.conf"], "# someone else's\n", BEGIN_MARK)
    assert not looks_like_our_pgdata(["lib", "log"], None, BEGIN_MARK)


# -- the walk on a real filesystem -------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="fakes other owners with chown")


@pytest.fixture
def base():
    path = tempfile.mkdtemp(prefix="cs-paths-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user():
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def nobody():
    return pwd.getpwnam("nobody").pw_uid


def prepare(path, **kw):
    uid, gid = user()
    secure_dir(path, Policy.for_process(uid), what="--pgdata", uid=uid, gid=gid, **kw)


def snapshot(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), sorted(os.listdir(path)) if os.path.isdir(path) else None


@needs_root
def test_creates_missing_directories_for_the_user(base):
    target = os.path.join(base, "a", "b", "pgdata")
    prepare(target, pgdata_marker=BEGIN_MARK)
    st = os.stat(target)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user()[0], 0o700)
    assert os.stat(os.path.join(base, "a")).st_uid == 0  # parents: root's, as makedirs made them


@needs_root
def test_dry_run_creates_nothing(base):
    target = os.path.join(base, "a", "pgdata")
    prepare(target, dry_run=True, pgdata_marker=BEGIN_MARK)
    assert os.listdir(base) == []


@needs_root
@pytest.mark.parametrize("layout", ["symlink as target", "symlink as parent", "dir of another user",
                                    "world-writable parent"])
def test_planted_paths_are_refused_and_the_victim_untouched(base, layout):
    victim = os.path.join(base, "victim")
    os.mkdir(victim, 0o755)
    with open(os.path.join(victim, "precious"), "w") as f:
        f.write("keep")
    before = snapshot(victim)
    if layout == "symlink as target":
        target = os.path.join(base, "pgdata")
        os.symlink(victim, target)
        os.lchown(target, nobody(), nobody())
    elif layout == "symlink as parent":
        os.symlink(base, os.path.join(base, "up"))
        os.lchown(os.path.join(base, "up"), nobody(), nobody())
        target = os.path.join(base, "up", "victim")
    elif layout == "dir of another user":
        planted = os.path.join(base, "planted")
        os.mkdir(planted)
        os.chown(planted, nobody(), nobody())
        os.symlink(victim, os.path.join(planted, "pgdata"))  # even a root-made link inside: refused
        target = os.path.join(planted, "pgdata")
    else:
        shared = os.path.join(base, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        os.symlink(victim, os.path.join(shared, "pgdata"))
        target = os.path.join(shared, "pgdata")
    for dry_run in (True, False):
        with pytest.raises(PathError):
            prepare(target, dry_run=dry_run, pgdata_marker=BEGIN_MARK)
    assert snapshot(victim) == before


@needs_root
def test_root_symlink_is_followed(base):
    real = os.path.join(base, "real")
    os.symlink(real, os.path.join(base, "alias"))  # root made it: like /var/run -> /run
    prepare(os.path.join(base, "alias"), pgdata_marker=BEGIN_MARK)
    assert os.stat(real).st_uid == user()[0]


@needs_root
def test_typo_pgdata_is_not_taken(base):
    uid, gid = user()
    lib = os.path.join(base, "lib")  # like `-D /var/lib`: full of someone's data
    os.makedirs(os.path.join(lib, "dpkg"))
    before = snapshot(lib)
    with pytest.raises(PathError, match="belongs to root and is not empty"):
        prepare(lib, pgdata_marker=BEGIN_MARK)
    os.chown(lib, uid, gid)  # even the compute user's own directory, when it is not a data directory
    os.chmod(lib, 0o700)
    with pytest.raises(PathError, match="not a data directory"):
        prepare(lib, pgdata_marker=BEGIN_MARK)
    assert sorted(os.listdir(lib)) == before[3]
    # ...but a PGDATA of ours is, including one a killed driver left half-emptied.
    with open(os.path.join(lib, "postgresql.conf"), "w") as f:
        f.write(BEGIN_MARK + "\n")
    prepare(lib, pgdata_marker=BEGIN_MARK)


def test_a_uid_without_a_passwd_entry_is_a_sentence(monkeypatch):
    """A pod's runAsUser the image does not know: initdb and postgres need a user name."""
    from compute.boot.users import RunAs
    monkeypatch.setattr(os, "getuid", lambda: 1000650000)
    with pytest.raises(ValueError, match="uid 1000650000, which has no entry in /etc/passwd.*runAsUser: 999"):
        RunAs.current()
