"""Throwaway PostgreSQL 15 clusters for tests, run as an unprivileged user even when tests run as root."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from compute.boot.users import effective_user

PGBIN_DIR = os.environ.get("PGBIN_DIR", "/usr/lib/postgresql/15/bin")
PG_USER = effective_user(os.environ.get("COMPUTE_TEST_USER", "postgres"))


# free_port's ports: below the kernel's ephemeral range (32768-60999 here), which hands ports to
# every outgoing connection, so none can take a port between free_port() and the server's bind;
# each pytest-xdist worker draws from a slice of its own, so parallel workers never pick the same.
PORT_BASE, PORT_SLICE, PORT_SLICES = 10000, 2500, 8
_port_rng = random.Random()
_ports_given: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nobody listens on now, not handed out by this process lately."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    low = PORT_BASE + (int(worker) % PORT_SLICES if worker.isdigit() else 0) * PORT_SLICE
    if len(_ports_given) > PORT_SLICE // 2:
        _ports_given.clear()
    for _ in range(1000):
        port = _port_rng.randrange(low, low + PORT_SLICE)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_SLICE - 1}")


def _scratch_root() -> str:
    """Where the tests put their files: COMPUTE_TEST_TMP if set; else /dev/shm when it is a tmpfs
    with room (the tests write and fsync many small files: PGDATAs, state files, tars; on the
    shared disk of the VM they were measured on, waiting for those was ~40% of the unit tier and
    ~25-50% of the other tiers: docs/performance.md, "Test suite"); else /tmp."""
    if root := os.environ.get("COMPUTE_TEST_TMP"):
        return root
    try:
        fs = os.statvfs("/dev/shm")
        with open("/proc/self/mounts") as f:
            tmpfs = any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in f)
    except OSError:
        return "/tmp"
    return "/dev/shm" if tmpfs and fs.f_bavail * fs.f_frsize >= 4 << 30 else "/tmp"


# tests/conftest.py makes it tempfile's directory too (pytest's tmp_path), in the tests' process only
SCRATCH_ROOT = _scratch_root()


_made: list[tuple[int, str]] = []  # (creating pid, path) of every scratch_dir: see _remove_scratch_dirs


def scratch_dir(prefix: str = "cs-") -> str:
    """A fresh directory under SCRATCH_ROOT owned by the postgres user (pytest's tmp_path is root-only).
    Removed when the process that made it exits, if its user did not remove it first."""
    path = tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_ROOT)
    os.chmod(path, 0o755)
    PG_USER.chown(path)
    _made.append((os.getpid(), path))
    return path


@atexit.register
def _remove_scratch_dirs() -> None:
    """What a test, a fixture or a failed test's tree left (archives, templates, PGDATAs): gone
    with the process that made it (each xdist worker, the bench), not left in SCRATCH_ROOT,
    which is /dev/shm here (memory: a whole suite run used to leave ~450 MB). A forked child
    that exits normally leaves its parent's alone."""
    for pid, path in _made:
        if pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def run_as_pg(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if os.getuid() == 0:
        kwargs["user"], kwargs["group"], kwargs["extra_groups"] = PG_USER.uid, PG_USER.gid, []
    env = dict(kwargs.pop("env", os.environ))
    env["HOME"] = PG_USER.home
    return subprocess.run(argv, env=env, **kwargs)


@dataclass
class Cluster:
    datadir: str
    port: int
    superuser: str = "cloud_admin"
    started: bool = field(default=False)

    def conninfo(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user or self.superuser}"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def initdb(self) -> None:
        run_as_pg([f"{PGBIN_DIR}/initdb", "-D", self.datadir, "-U", self.superuser,
                   "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"])

    def start(self, **settings: str) -> None:
        opts = {"port": str(self.port), "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.datadir}'", "fsync": "off", **settings}
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in opts.items())
        run_as_pg([f"{PGBIN_DIR}/pg_ctl", "-D", self.datadir, "-w", "-l",
                   os.path.join(self.datadir, "server.log"), "start"])
        self.started = True

    def stop(self) -> None:
        if self.started:
            run_as_pg([f"{PGBIN_DIR}/pg_ctl", "-D", self.datadir, "-m", "immediate", "stop"], check=False)
            self.started = False

    def log(self) -> str:
        try:
            with open(os.path.join(self.datadir, "server.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""


@contextmanager
def running_cluster(superuser: str = "cloud_admin", **settings: str) -> Iterator[Cluster]:
    """initdb + start a cluster on a free loopback port; removed afterwards."""
    base = scratch_dir("cs-pg-")
    cluster = Cluster(datadir=os.path.join(base, "data"), port=free_port(), superuser=superuser)
    try:
        cluster.initdb()
        cluster.start(**settings)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
