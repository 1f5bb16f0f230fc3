"""PGDATA and the runtime dir on a pod's own volumes, as the kubelet makes them (issue 20, item 3),
booted through the real tree as a hardened pod runs it: compute-ctl started as the unprivileged
compute user (runAsNonRoot, runAsUser), with the pod's fsGroup as a supplementary group.

Each volume form is a real mount with the kubelet's owner and mode (pkg/volume/emptydir and
SetVolumeOwnership: an emptyDir is a directory made 0777, with fsGroup chowned to root:GID and
given g+rwx and setgid; medium Memory is a tmpfs, 1777 as tmpfs makes it; a fresh ext4 PVC's root
is root 0755 with lost+found, 2775 with fsGroup). The disk forms are bind mounts of a directory,
the others tmpfs mounts (a stand-in for ext4: the decisions read only owner, mode and "is a mount
point"). The same shapes as plain directories, which is what a shared host directory looks like,
are refused: compute/boot/paths.py's decision table, docs/security.md "Volumes of a pod".

Mounting needs root with CAP_SYS_ADMIN: without it the mounted forms are skipped (with that
reason); the refusals of plain directories run anyway. No kubelet here: the forms are reproduced,
not obtained from one (docs/operations.md says what was not tested).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile

import psycopg
import pytest

from tests.support.pgcluster import PG_USER
from tests.support.tree import Compute

FSGROUP = 4242  # the pod's fsGroup: a supplementary group of the compute user, no name
APP_PASSWORD = "apppass"  # base_spec's md5 hash is of this password for role "app"


def _can_mount() -> str | None:
    """None when this process can mount (root with CAP_SYS_ADMIN), else why not."""
    if os.geteuid() != 0:
        return "mounting needs root"
    probe = tempfile.mkdtemp(prefix="cs-mount-probe-")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"cannot mount here (no CAP_SYS_ADMIN?): {r.stderr.strip()}"
        subprocess.run(["umount", probe], check=True)
        return None
    finally:
        os.rmdir(probe)


MOUNT_REFUSED = _can_mount()
needs_mount = pytest.mark.skipif(MOUNT_REFUSED is not None, reason=f"volume forms are real mounts: {MOUNT_REFUSED}")

# form -> (how it is mounted, owner uid, group, mode, holds lost+found)
FORMS = {
    "emptyDir": ("bind", 0, 0, 0o777, False),
    "emptyDir, fsGroup": ("bind", 0, FSGROUP, 0o2777, False),
    "emptyDir medium Memory": ("tmpfs", 0, 0, 0o1777, False),
    "emptyDir medium Memory, fsGroup": ("tmpfs", 0, FSGROUP, 0o3777, False),
    "PVC, fsGroup": ("tmpfs", 0, FSGROUP, 0o2775, True),
    "PVC without fsGroup": ("tmpfs", 0, 0, 0o755, True),
}


class Volume:
    """One volume form mounted at `path` (under the compute's scratch dir); `umount()` undoes it."""

    def __init__(self, base: str, name: str, form: str, *, plain: bool = False, read_only: bool = False):
        how, uid, gid, mode, lost_found = FORMS[form]
        self.path = os.path.join(base, name)
        self.mounted = False
        os.mkdir(self.path)
        if plain:  # the same owner and mode on a directory that is no mount point
            root = self.path
        elif how == "bind":
            src = os.path.join(base, f".{name}-src")
            os.mkdir(src)
            root = src
        else:
            opts = f"mode={mode:o},uid={uid},gid={gid},size=256m"
            subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", self.path], check=True)
            self.mounted = True
            root = self.path
        os.chown(root, uid, gid)
        os.chmod(root, mode)
        if lost_found:
            lf = os.path.join(root, "lost+found")
            os.mkdir(lf)
            os.chown(lf, 0, gid)
            os.chmod(lf, 0o2770 if gid else 0o700)
        if how == "bind" and not plain:
            subprocess.run(["mount", "--bind", root, self.path], check=True)
            self.mounted = True
        if read_only and self.mounted:
            subprocess.run(["mount", "-o", "remount,ro,bind", self.path], check=True)

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], check=False)
            self.mounted = False


def pod_compute(run_as_root: bool = False) -> Compute:
    c = Compute()
    c.spec = c.new_spec()
    if not run_as_root:  # runAsUser/runAsGroup: the compute user; fsGroup: supplementary
        c.run_as = (PG_USER.uid, PG_USER.gid, (FSGROUP,))
    return c


def refused(c: Compute, *mentions: str) -> str:
    """compute-ctl exited 1 with one line naming every one of `mentions`, before supervisord."""
    code = c.wait_exit(30)
    out = c.output().strip()
    assert code == 1, out[-3000:]
    assert len(out.splitlines()) == 1 and out.startswith("compute-ctl: "), out[-3000:]
    for m in mentions:
        assert m in out, (m, out)
    assert not os.path.exists(os.path.join(c.runtime_dir, "supervisord.pid"))
    return out


def boots(c: Compute) -> None:
    c.wait_status("running")
    with psycopg.connect(c.conninfo("appdb", "app", APP_PASSWORD)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    st = os.stat(c.pgdata)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (PG_USER.uid, 0o700)
    st = os.stat(c.runtime_dir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (PG_USER.uid, 0o700)


@needs_mount
@pytest.mark.parametrize("form", [f for f in FORMS if f != "PVC without fsGroup"])
def test_pgdata_and_runtime_dir_inside_a_pod_volume_boot_as_the_compute_user(form):
    """Both directories inside the volume (PGDATA its subdirectory, as in deploy/compute.yaml);
    a second start on the same volume (a container restart in the same pod) boots too."""
    c = pod_compute()
    vol = Volume(c.base, "vol", form)
    c.pgdata = os.path.join(vol.path, "pgdata")
    c.runtime_dir = os.path.join(vol.path, "run")
    try:
        c.start()
        boots(c)
        mode_before = stat.S_IMODE(os.stat(vol.path).st_mode)
        c.signal(signal.SIGTERM)
        assert c.wait_exit(30) == 0
        assert stat.S_IMODE(os.stat(vol.path).st_mode) == mode_before  # the mount point is the kubelet's
        if form in ("emptyDir", "PVC, fsGroup"):
            c.out.close()
            c.start()
            boots(c)
    finally:
        c.close()
        vol.umount()


@needs_mount
def test_pvc_without_fsgroup_is_refused_as_the_compute_user_and_works_as_root():
    """root 0755: the compute user cannot create anything in it; the sentence says to set
    fsGroup. Started as root (no runAsNonRoot), the same volume works."""
    c = pod_compute()
    vol = Volume(c.base, "vol", "PVC without fsGroup")
    c.pgdata = os.path.join(vol.path, "pgdata")
    try:
        c.start()
        out = refused(c, c.pgdata, "may not write in", "fsGroup", "owner root (uid 0)", "mode 0755")
        assert "Errno" not in out
        assert os.listdir(vol.path) == ["lost+found"]
    finally:
        c.close()
        vol.umount()
    c = pod_compute(run_as_root=True)
    vol = Volume(c.base, "vol", "PVC without fsGroup")
    c.pgdata = os.path.join(vol.path, "pgdata")
    try:
        c.start()
        boots(c)
    finally:
        c.close()
        vol.umount()


@needs_mount
@pytest.mark.parametrize("form", ["emptyDir", "emptyDir medium Memory, fsGroup", "PVC, fsGroup"])
def test_the_volume_itself_as_pgdata_is_refused_with_the_directory_to_use(form):
    """The mount point stays root's: the compute user cannot make it 0700 and its own, as
    postgres requires; the sentence names the directory inside it to give instead."""
    c = pod_compute()
    vol = Volume(c.base, "vol", form)
    c.pgdata = vol.path
    try:
        c.start()
        out = refused(c, vol.path, "belongs to root", os.path.join(vol.path, "pgdata"), "found: owner root")
        assert "Errno" not in out
    finally:
        c.close()
        vol.umount()


@pytest.mark.parametrize("form", ["emptyDir", "emptyDir, fsGroup", "PVC, fsGroup"])
def test_the_same_modes_on_a_plain_directory_are_refused(form):
    """Writable by group/other without the sticky bit and not a mount point: what a shared host
    directory looks like. Refused, with what was found and what would do."""
    c = pod_compute()
    vol = Volume(c.base, "shared", form, plain=True)
    c.pgdata = os.path.join(vol.path, "pgdata")
    mode = FORMS[form][3]
    try:
        c.start()
        out = refused(c, vol.path, "not a volume's mount point", f"mode {mode:04o}", "Needed:", "Fix:")
        assert "Errno" not in out
        assert os.listdir(vol.path) == (["lost+found"] if FORMS[form][4] else [])
        assert not os.path.exists(c.runtime_dir)
    finally:
        c.close()


@needs_mount
def test_a_read_only_filesystem_is_named():
    """readOnlyRootFilesystem without a volume on the path: a sentence, not [Errno 30]."""
    c = pod_compute()
    vol = Volume(c.base, "ro", "emptyDir medium Memory", read_only=True)
    c.pgdata = os.path.join(vol.path, "pgdata")
    try:
        c.start()
        out = refused(c, c.pgdata, "read-only filesystem", "emptyDir")
        assert "Errno" not in out
    finally:
        c.close()
        vol.umount()


@needs_mount
def test_pgdata_made_group_writable_by_a_recursive_fsgroup_change_is_refused_with_the_fix():
    """fsGroupChangePolicy Always re-chowns a PVC at every pod start: our 0700 PGDATA becomes
    2770. Refused (the group could have put anything in it), naming OnRootMismatch."""
    c = pod_compute()
    vol = Volume(c.base, "vol", "PVC, fsGroup")
    c.pgdata = os.path.join(vol.path, "pgdata")
    c.runtime_dir = os.path.join(vol.path, "run")
    os.mkdir(c.pgdata)
    os.chown(c.pgdata, PG_USER.uid, FSGROUP)
    os.chmod(c.pgdata, 0o2770)
    try:
        c.start()
        refused(c, c.pgdata, "writable by group/other", "mode 2770", "fsGroupChangePolicy: OnRootMismatch")
    finally:
        c.close()
        vol.umount()
