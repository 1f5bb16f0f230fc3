"""Attacks from the same host on a real booted tree (issue 9 §1 and §4; docs/security.md):
another OS user (`runuser -u nobody`) plants paths for root to follow, tries the superuser over
the socket and TCP loopback, reads what it can; secrets are looked for in every program's
/proc/<pid>/environ; a spec asks postgres to read other files.

compute-ctl runs as root here, as in a container without USER: the worst case for paths.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
import uuid

import psycopg
import pytest

from tests.peers.control_plane import ControlPlanePeer
from tests.support.fault_tree import tree
from tests.support.pgcluster import PGBIN_DIR, PG_USER
from tests.support.tree import SUPERUSER, Compute

APP_PASSWORD = "apppass"  # base_spec's md5 hash is of this password for role "app"
PSQL = os.path.join(PGBIN_DIR, "psql")
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def as_user(user: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run argv as another OS user, with a clean environment (nothing of ours leaks in)."""
    base_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    return subprocess.run([RUNUSER, "-u", user, "--", *argv], capture_output=True, text=True,
                          timeout=60, env={**base_env, **(env or {})})


def psql(user: str, conninfo: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return as_user(user, PSQL, "-X", "-w", "-At", "-d", conninfo, "-c", "SELECT current_user", env=env)


def snapshot(path: str) -> tuple:
    """Owner, mode and everything below `path` (names, owners, modes, contents)."""
    st = os.lstat(path)
    tree_ = []
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            s = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(s.st_mode) else None
            tree_.append((os.path.relpath(p, path), s.st_uid, stat.S_IMODE(s.st_mode), data))
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), sorted(tree_, key=lambda t: t[0])


def make_victim() -> str:
    """A root-owned directory worth protecting (think /root/.ssh or /etc)."""
    victim = tempfile.mkdtemp(prefix="cs-victim-", dir="/tmp")
    os.chmod(victim, 0o755)
    os.mkdir(os.path.join(victim, "keys"), 0o700)
    for name, text in (("precious", "keep me"), ("keys/id", "secret key")):
        with open(os.path.join(victim, name), "w") as f:
            f.write(text)
    return victim


def assert_refused(c: Compute, *, mentions: str) -> str:
    code = c.wait_exit(30)
    out = c.output().strip()
    assert code == 1, out[-3000:]
    assert len(out.splitlines()) == 1 and out.startswith("compute-ctl: "), out[-3000:]
    assert mentions in out, out
    # refused before supervisord's loop (compute-ctl itself) started: it never wrote its pid
    assert not os.path.exists(os.path.join(c.runtime_dir, "supervisord.pid"))
    return out


# -- 1. paths planted by another user ----------------------------------------------------------

PLANTS = {
    # nobody makes a directory in /tmp (as scripts/demo uses) with PGDATA inside as a symlink
    "pgdata symlink in nobody's dir": ("pgdata", "mkdir -m 777 {d} && ln -s {victim} {d}/pgdata", "{d}/pgdata"),
    # nobody's symlink straight in sticky /tmp (fs.protected_symlinks may be off, as here)
    "pgdata symlink in /tmp": ("pgdata", "ln -s {victim} {d}", "{d}"),
    # the runtime dir (chmod 0700 + chown by root) pointed at the victim
    "runtime dir symlink in /tmp": ("runtime", "ln -s {victim} {d}", "{d}"),
    # a symlinked parent: /tmp/x -> victim's parent, PGDATA = /tmp/x/<victim name>
    "parent symlink": ("pgdata", "ln -s {victim_parent} {d}", "{d}/{victim_name}"),
    # nobody's own directory, no symlink at all: it could swap its contents at any moment
    "nobody's directory as PGDATA": ("pgdata", "mkdir -m 700 {d}", "{d}"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_paths_planted_by_another_user_are_refused_and_nothing_is_touched(plant):
    which, script, target = PLANTS[plant]
    victim = make_victim()
    d = f"/tmp/cs-plant-{uuid.uuid4().hex[:12]}"
    fmt = dict(d=d, victim=victim, victim_parent=os.path.dirname(victim), victim_name=os.path.basename(victim))
    planted = as_user("nobody", "sh", "-c", script.format(**fmt))
    assert planted.returncode == 0, planted.stderr
    before = snapshot(victim)
    c = Compute()
    c.spec = c.new_spec()
    if which == "pgdata":
        c.pgdata = target.format(**fmt)
    else:
        c.runtime_dir = target.format(**fmt)
    try:
        c.start()
        assert_refused(c, mentions=d)
        assert snapshot(victim) == before
        # Nothing else was made either: the other directory does not exist.
        assert not os.path.exists(c.runtime_dir if which == "pgdata" else c.pgdata)
        assert os.lstat(d).st_uid == pwd.getpwnam("nobody").pw_uid  # not chowned either
    finally:
        c.close()
        subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)
        shutil.rmtree(victim, ignore_errors=True)


# The trust a volume's mount point gets (writable by group/other, because only the pod mounts
# it) reaches the mount point only: what someone plants INSIDE it is checked as anywhere else,
# and the same mode on a plain directory (a shared host directory) is refused.
VOLUME_PLANTS = {
    # nobody's symlink inside a pod volume (an emptyDir: root 0777)
    "symlink in a volume": (True, "ln -s {victim} {d}/pgdata"),
    # nobody's directory inside a pod volume, where PGDATA would be created
    "nobody's directory in a volume": (True, "mkdir -m 700 {d}/pgdata"),
    # root's shared directory without the sticky bit, not a mount point, with nobody's symlink
    "symlink in a shared host directory": (False, "ln -s {victim} {d}/pgdata"),
}


def _can_mount_tmpfs(path: str) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0777,size=16m", "tmpfs", path],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("as_compute_user", [False, True], ids=["as root", "as the compute user"])
@pytest.mark.parametrize("plant", sorted(VOLUME_PLANTS))
def test_paths_planted_inside_a_volume_are_refused_and_nothing_is_touched(plant, as_compute_user):
    mounted, script = VOLUME_PLANTS[plant]
    victim = make_victim()
    d = f"/tmp/cs-vol-{uuid.uuid4().hex[:12]}"
    os.mkdir(d)
    os.chmod(d, 0o777)
    if mounted and not _can_mount_tmpfs(d):
        os.rmdir(d)
        pytest.skip("a volume is a real mount: this process cannot mount (no CAP_SYS_ADMIN)")
    try:
        planted = as_user("nobody", "sh", "-c", script.format(d=d, victim=victim))
        assert planted.returncode == 0, planted.stderr
        before = snapshot(victim)
        c = Compute()
        c.spec = c.new_spec()
        if as_compute_user:
            c.run_as = (PG_USER.uid, PG_USER.gid, ())
        c.pgdata = f"{d}/pgdata"
        try:
            c.start()
            out = assert_refused(c, mentions=d)
            assert ("owned by nobody" in out or "belongs to nobody" in out
                    or "not a volume's mount point" in out), out
            assert snapshot(victim) == before
            assert not os.path.exists(c.runtime_dir)
            assert os.lstat(f"{d}/pgdata").st_uid == pwd.getpwnam("nobody").pw_uid  # not chowned
        finally:
            c.close()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", d], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)
        shutil.rmtree(victim, ignore_errors=True)


@pytest.mark.parametrize("owner", ["root", "postgres"])
def test_a_typo_pgdata_is_refused_untouched(owner):
    """`-D /var/lib` (a copy of its shape): root's, or even the compute user's, full of data that
    is not a data directory of ours: refused, not one file removed."""
    c = Compute()
    c.spec = c.new_spec()
    lib = os.path.join(c.base, "var-lib")
    for sub in ("dpkg/info", "apt/lists", "postgresql"):
        os.makedirs(os.path.join(lib, sub))
    with open(os.path.join(lib, "dpkg", "status"), "w") as f:
        f.write("Package: everything\n")
    if owner == "postgres":
        for root, dirs, files in os.walk(lib):
            for name in [root, *(os.path.join(root, x) for x in dirs + files)]:
                os.chown(name, PG_USER.uid, PG_USER.gid)
        os.chmod(lib, 0o700)
    before = snapshot(lib)
    c.pgdata = lib
    try:
        c.start()
        out = assert_refused(c, mentions=lib)
        assert "not empty" in out
        assert snapshot(lib) == before
        assert not os.path.exists(c.runtime_dir)
    finally:
        c.close()


def test_restart_on_the_same_pgdata_is_recognised():
    """The refusal above must not hit our own PGDATA: a second start on the same directories
    works, also when a driver killed half-way through emptying left only our postgresql.conf."""
    c = Compute()
    c.spec = c.new_spec()
    try:
        c.start()
        c.wait_status("running")
        c.signal()
        assert c.wait_exit(30) == 0
        for name in os.listdir(c.pgdata):  # what a driver killed mid-empty leaves (markers go last)
            if name != "postgresql.conf":
                p = os.path.join(c.pgdata, name)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        c.out.close()
        c.start()
        c.wait_status("running")
        with psycopg.connect(c.conninfo("appdb", "app", APP_PASSWORD)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        c.close()


# -- 2. the superuser belongs to the compute's OS user ------------------------------------------

@pytest.fixture(scope="module")
def booted():
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        yield c


def test_another_user_cannot_be_the_superuser(booted):
    c = booted
    sock = f"host={c.base} port={c.pg_port} dbname=postgres connect_timeout=5"
    tcp = f"host=127.0.0.1 port={c.pg_port} dbname=postgres connect_timeout=5"
    attempts = {
        "socket": psql("nobody", f"{sock} user={SUPERUSER}"),
        "socket, other database": psql("nobody", f"{sock} user={SUPERUSER} dbname=appdb"),
        "tcp loopback": psql("nobody", f"{tcp} user={SUPERUSER}"),
        "tcp, guessed password": psql("nobody", f"{tcp} user={SUPERUSER}", env={"PGPASSWORD": "postgres"}),
        "tcp, the app's password": psql("nobody", f"{tcp} user={SUPERUSER}", env={"PGPASSWORD": APP_PASSWORD}),
        "socket, the passfile": psql("nobody", f"{sock} user={SUPERUSER}", env={"PGPASSFILE": c.passfile}),
    }
    for what, r in attempts.items():
        assert r.returncode != 0 and SUPERUSER not in r.stdout, (what, r.stdout, r.stderr)
        assert "authentication failed" in r.stderr or "no password supplied" in r.stderr, (what, r.stderr)
    # Nor can it read the password our programs use.
    r = as_user("nobody", "cat", c.passfile)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert stat.S_IMODE(os.stat(c.passfile).st_mode) == 0o600


def test_spec_roles_and_the_compute_user_still_get_in(booted):
    c = booted
    sock = f"host={c.base} port={c.pg_port} dbname=appdb connect_timeout=5"
    tcp = f"host=127.0.0.1 port={c.pg_port} dbname=appdb connect_timeout=5"
    # A spec role, from any OS user, with its password, over both; never without it.
    for conninfo in (sock, tcp):
        ok = psql("nobody", f"{conninfo} user=app", env={"PGPASSWORD": APP_PASSWORD})
        assert ok.returncode == 0 and ok.stdout.strip() == "app", ok.stderr
        bad = psql("nobody", f"{conninfo} user=app")
        assert bad.returncode != 0 and "no password supplied" in bad.stderr, bad.stderr
    # The compute's own OS user is the superuser over the socket without a password (peer)...
    me = psql(PG_USER.name, f"host={c.base} port={c.pg_port} dbname=postgres user={SUPERUSER}")
    assert me.returncode == 0 and me.stdout.strip() == SUPERUSER, me.stderr
    # ...and our programs' TCP connstr works with the passfile: the monitor and the API.
    code, body = c.request("POST", "/check_writability")
    assert code == 200 and body.strip() == b"true", body
    with psycopg.connect(c.admin_conninfo()) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)
    before = c.status()["last_active"]
    time.sleep(0.01)  # the next activity's timestamp must differ at millisecond resolution
    with psycopg.connect(c.conninfo("appdb", "app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute("SELECT 1")
        # Left idle, the session is what the monitor sees (its state_change is after `before`).
        deadline = time.monotonic() + 20
        while c.status()["last_active"] == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.status()["last_active"] > before, "the monitor no longer sees activity"


# -- 3. secrets reach only the programs that need them ------------------------------------------

CP_TOKEN = "cp-" + uuid.uuid4().hex            # NEON_CONSOLE_JWT / NEON_CONTROL_PLANE_TOKEN
STORAGE_TOKEN = "st-" + uuid.uuid4().hex       # NEON_AUTH_TOKEN


def environ_of(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def secrets_by_role(c: Compute) -> dict[str, set[str]]:
    """token -> the roles of the tree's processes whose environment holds it (compute-ctl
    itself left out: its caller gave it the tokens)."""
    found: dict[str, set[str]] = {}
    for role, p in tree(c.proc.pid):
        if role == "compute-ctl":
            continue
        env = environ_of(p.pid)
        # The stand-in sync binary's own knob carries the expected token: not a leak of ours.
        seen = b"\0".join(e for e in env.split(b"\0") if not e.startswith(b"FAKE_SK_EXPECT_TOKEN="))
        for token in (CP_TOKEN, STORAGE_TOKEN):
            if token.encode() in seen:
                found.setdefault(token, set()).add(role)
        for name in (b"NEON_CONSOLE_JWT=", b"NEON_CONTROL_PLANE_TOKEN="):
            assert not (env.startswith(name) or b"\0" + name in env) or role == "lifecycle", (role, name)
    return found


def test_tokens_only_in_the_programs_that_use_them():
    c = Compute()
    spec = c.new_spec()
    informant = os.path.join(c.base, "vm-informant")
    with open(informant, "w") as f:
        f.write("#!/bin/sh\nexec sleep 600\n")
    os.chmod(informant, 0o755)
    with ControlPlanePeer(spec=spec, compute_id="compute-1", jwt=CP_TOKEN) as cp:
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023", "--vm-informant", informant]
        # Both names of the control-plane token, same value: either one left anywhere shows.
        c.env = {"NEON_CONSOLE_JWT": CP_TOKEN, "NEON_CONTROL_PLANE_TOKEN": CP_TOKEN,
                 "NEON_AUTH_TOKEN": STORAGE_TOKEN}
        with c:
            c.wait_status("running")
            assert cp.requests and cp.requests[-1].headers.get("Authorization") == CP_TOKEN
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # vm-informant and every API worker are up
                roles = {role for role, _ in tree(c.proc.pid)}
                if {"sleep", "api worker", "monitor"} <= roles:
                    break
                time.sleep(0.1)
            found = secrets_by_role(c)
            assert roles >= {"sleep", "api worker", "monitor", "compute-ctl", "postgres"}, roles
            # lifecycle is forked (compute/tree/warmfork.py): its token is in its memory only, not in
            # an environment block (/proc shows compute-ctl's, scrubbed); postgres is exec'd.
            assert found.get(CP_TOKEN, set()) <= {"lifecycle"}, found
            assert "postgres" in found.get(STORAGE_TOKEN, set()) <= {"lifecycle", "postgres"}, found
            # compute-ctl itself was given them, but once it dropped root it is not dumpable:
            # the compute user (postgres runs as it) cannot read its environment.
            leak = as_user(PG_USER.name, "cat", f"/proc/{c.proc.pid}/environ")
            assert leak.returncode != 0 and CP_TOKEN not in leak.stdout, leak.stderr
            # and before it forks anything it scrubs their values from that block (root sees it)
            assert CP_TOKEN.encode() not in environ_of(c.proc.pid)
            assert STORAGE_TOKEN.encode() not in environ_of(c.proc.pid)

            # §4 through the live path: a spec asking postgres to read another file is refused
            # by POST /configure, and nothing changes.
            conf = os.path.join(c.pgdata, "postgresql.conf")
            with open(conf) as f:
                conf_before = f.read()
            for name, value in (("include_if_exists", "/tmp/evil.conf"), ("HBA_FILE", "/tmp/trust_all"),
                                ("jit", "on # comment")):
                hostile = {**spec, "cluster": {**spec["cluster"], "settings": [
                    *spec["cluster"]["settings"], {"name": name, "value": value,
                                                   "vartype": "bool" if name == "jit" else "string"}]}}
                code, body = c.request("POST", "/configure", {"spec": hostile},
                                       {"Content-Type": "application/json"})
                assert code == 400 and b"cluster.settings[5]" in body, (code, body)
            with open(conf) as f:
                assert f.read() == conf_before
            assert c.status()["status"] == "running"


def test_neon_path_storage_token_reaches_sync_and_postgres_only():
    """The Neon path: the storage token from the environment (a Kubernetes Secret) reaches
    --sync-safekeepers, the pageserver (as the password) and postgres; the control-plane token,
    also in the environment, reaches none of them."""
    from tests.peers.pageserver import PageserverPeer, make_basebackup_tar
    from tests.peers.sync_safekeepers import write_fake_postgres
    from tests.support.tree import with_neon_storage

    tenant, timeline = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
    c = Compute()
    tar = make_basebackup_tar(os.path.join(c.base, "basebackup.tar"))
    with PageserverPeer(tar, password=STORAGE_TOKEN, tenant_id=tenant, timeline_id=timeline) as ps:
        c.pgbin = write_fake_postgres(c.base)
        record = os.path.join(c.base, "sync.json")
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, tenant, timeline, "127.0.0.1:5454", token=None)
        c.env = {"FAKE_SK_RECORD": record, "FAKE_SK_EXPECT_TOKEN": STORAGE_TOKEN,
                 "NEON_CONSOLE_JWT": CP_TOKEN, "NEON_AUTH_TOKEN": STORAGE_TOKEN}
        with c:
            c.wait_status("running", timeout=90)
            with open(record) as f:
                calls = json.load(f)
            assert [(x["token_matches"], x["control_plane_token_set"]) for x in calls] == [(True, False)]
            assert ps.last.password == STORAGE_TOKEN
            found = secrets_by_role(c)
            assert CP_TOKEN not in found or found[CP_TOKEN] == {"lifecycle"}, found
            # lifecycle is forked (compute/tree/warmfork.py): the token is in its memory, not in an
            # environment block; postgres is exec'd with it
            assert "postgres" in found.get(STORAGE_TOKEN, set()) <= {"lifecycle", "postgres"}, found
