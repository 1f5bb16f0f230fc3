"""Booting the whole tree (`compute-ctl` -> supervisord -> programs) for end-to-end tests.

The tree runs from the installed virtualenv (scripts/install.sh; the compute user cannot read a
checkout under /root), as the unprivileged user, against real postgres 15, real supervisord,
real gunicorn and real HTTP on loopback.
"""

from __future__ import annotations

import copy
import re
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .pgcluster import PGBIN_DIR, free_port, scratch_dir

VENV = os.environ.get("COMPUTE_VENV", "/opt/compute-supervisor/venv")
COMPUTE_CTL = os.path.join(VENV, "bin", "compute-ctl")
SUPERUSER = "cloud_admin"


def base_spec(pg_port: int, sockdir: str, **extra_settings: str) -> dict:
    settings = {"port": (str(pg_port), "integer"), "listen_addresses": ("127.0.0.1", "string"),
                "unix_socket_directories": (sockdir, "string"), "fsync": ("off", "bool"),
                "shared_buffers": ("32MB", "string")}
    settings.update({k: (v, "string") for k, v in extra_settings.items()})
    return {
        "format_version": 1.0,
        "cluster": {
            "cluster_id": "test", "name": "test",
            "roles": [{"name": "app", "encrypted_password": "240aeccb7a1d859a99844d012bfe74cc", "options": None}],
            "databases": [{"name": "appdb", "owner": "app", "options": None}],
            "settings": [{"name": k, "value": v, "vartype": t} for k, (v, t) in settings.items()],
        },
        "delta_operations": None,
    }


def with_neon_storage(spec: dict, pageserver_connstr: str, tenant: str, timeline: str,
                      safekeepers: str, token: str | None) -> dict:
    """`spec` pointed at a pageserver through the `neon.*` settings (the original spec format)."""
    if token is not None:
        spec["storage_auth_token"] = token
    spec["cluster"]["settings"] += [
        {"name": "neon.pageserver_connstring", "value": pageserver_connstr, "vartype": "string"},
        {"name": "neon.tenant_id", "value": tenant, "vartype": "string"},
        {"name": "neon.timeline_id", "value": timeline, "vartype": "string"},
        {"name": "neon.safekeepers", "value": safekeepers, "vartype": "string"},
    ]
    return spec


@dataclass
class Compute:
    spec: dict | None = None
    args: list[str] = field(default_factory=list)
    pgbin: str = os.path.join(PGBIN_DIR, "postgres")
    env: dict[str, str] = field(default_factory=dict)
    # (uid, gid, supplementary gids): start compute-ctl as this user instead of root, as a
    # Kubernetes pod with runAsUser/runAsGroup/fsGroup does (None: as the tests, root)
    run_as: tuple[int, int, tuple[int, ...]] | None = None

    def __post_init__(self):
        self.base = scratch_dir("cs-tree-")
        self.pgdata = os.path.join(self.base, "pgdata")
        self.runtime_dir = os.path.join(self.base, "run")
        self.http_port = free_port()
        self.pg_port = free_port()
        self.out_path = os.path.join(self.base, "compute-ctl.out")
        self.proc: subprocess.Popen | None = None
        # Sent as `Authorization: Bearer <token>` by request() (and so status(), wait_status()),
        # unless a request names its own Authorization (None: send none).
        self.token: str | None = None

    def use_jwks(self, jwks: dict, token: str | None = None) -> str:
        """--jwks with `jwks` written to a file the compute user can read; its path. `token`: what
        request() sends from then on (with a JWKS every route but /metrics, /healthz, /readyz
        needs one)."""
        self.token = token
        path = os.path.join(self.base, "jwks.json")
        with open(path, "w") as f:
            json.dump(jwks, f)
        os.chmod(path, 0o644)
        self.args += ["--jwks", path]
        return path

    def new_spec(self, **extra_settings: str) -> dict:
        return base_spec(self.pg_port, self.base, **extra_settings)

    @property
    def connstr(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.pg_port}/postgres"

    @property
    def passfile(self) -> str:
        """The superuser's password, as our own programs find it (compute/postgres/localauth.py)."""
        return os.path.join(self.runtime_dir, "superuser.pgpass")

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """The ONE way tests connect to a booted compute as the superuser: the -C connstr (TCP
        loopback) with the password from the runtime dir's passfile, as our programs do."""
        from psycopg.conninfo import make_conninfo
        return make_conninfo("", host="127.0.0.1", port=self.pg_port, dbname=dbname, user=SUPERUSER,
                             connect_timeout=5, passfile=self.passfile)

    @property
    def admin_connstr(self) -> str:
        """`connstr` plus the passfile, for `compute-ctl plan -C` run by a test."""
        return f"{self.connstr}?passfile={self.passfile}"

    def conninfo(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        from psycopg.conninfo import make_conninfo
        if user == SUPERUSER and password is None:
            return self.admin_conninfo(dbname)
        return make_conninfo("", host="127.0.0.1", port=self.pg_port, dbname=dbname, user=user,
                             connect_timeout=5, password=password)

    def metrics(self) -> dict:
        code, body = self.request("GET", "/metrics.json")
        assert code == 200, body
        return json.loads(body)

    def command(self) -> list[str]:
        cmd = [COMPUTE_CTL, "-D", self.pgdata, "-C", self.connstr, "-b", self.pgbin,
               "--http-port", str(self.http_port), "--runtime-dir", self.runtime_dir,
               "--grace-seconds", "2"]
        if self.spec is not None:
            spec_path = os.path.join(self.base, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(self.spec, f)
            cmd += ["-S", spec_path]
        return cmd + self.args

    def start(self) -> "Compute":
        self.out = open(self.out_path, "wb")
        who = {}
        if self.run_as is not None:
            uid, gid, groups = self.run_as
            who = dict(user=uid, group=gid, extra_groups=list(groups))
        self.proc = subprocess.Popen(self.command(), stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **self.env}, **who)
        return self

    def output(self) -> str:
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    # -- HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if isinstance(body, dict):  # POST bodies must say they are JSON (415 otherwise)
            headers = {"Content-Type": "application/json", **(headers or {})}
        headers = {**({"Authorization": f"Bearer {self.token}"} if self.token else {}), **(headers or {})}
        headers = {k: v for k, v in headers.items() if v is not None}
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict | None:
        try:
            code, body = self.request("GET", "/status", timeout=2)
        except (OSError, urllib.error.URLError):
            return None
        return json.loads(body) if code == 200 else None

    def wait_status(self, *wanted: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()
            if last and last["status"] in wanted:
                return last
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"compute-ctl exited ({self.proc.returncode}) waiting for {wanted}; "
                                     f"last status {last}\n{self.output()[-6000:]}")
            time.sleep(0.05)
        raise AssertionError(f"status never became {wanted}; last {last}\n{self.output()[-6000:]}")

    # -- process ----------------------------------------------------------------------------
    def refused_over_precious_pgdata(self) -> str:
        """Start over a PGDATA that holds one file, `precious`; compute-ctl must exit 1 before it
        touches the runtime dir. Returns compute-ctl's output (the caller checks PGDATA)."""
        os.makedirs(self.pgdata)
        open(os.path.join(self.pgdata, "precious"), "w").close()
        self.start()
        assert self.wait_exit(10) == 1
        assert not os.path.exists(self.runtime_dir)
        return self.output().strip()

    def program_pid(self, name: str, timeout: float = 30) -> int:
        """The pid supervisord gives for program `name`, once it answers one: the first storage
        request may run before supervisord's loop (the early driver, compute/tree/early_driver.py),
        so its socket may not exist yet when a test sees the request."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.supervisorctl("pid", name).stdout.strip()
            if out.isdigit() and int(out) > 0:
                return int(out)
            if time.monotonic() > deadline:
                raise AssertionError(f"supervisord gave no pid for {name}: {out!r}\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def wait_handed_over(self, timeout: float = 30) -> int:
        """After `running`: the driver that did the start-up hands over to a fresh one
        (compute/lifecycle/steps.py), and again after each reconfiguration. Waits for the driver
        after the latest hand-over; returns its pid."""
        deadline = time.monotonic() + timeout
        while True:
            handed = re.findall(r"handing over to a fresh driver \(pid (\d+) exits\)", self.output())
            if handed:
                res = self.supervisorctl("pid", "lifecycle")
                pid = int(res.stdout.strip()) if res.stdout.strip().isdigit() else 0
                if pid and pid != int(handed[-1]):
                    self.wait_serving(max(1.0, deadline - time.monotonic()))
                    return pid
            if time.monotonic() > deadline:
                raise AssertionError("the driver did not hand over:\n" + self.output()[-3000:])
            time.sleep(0.05)

    def wait_serving(self, timeout: float = 30) -> None:
        """The api and the monitor run, and the api (gunicorn: a Server header) answers. At the
        first start they come once the start-up is over, not with `running` (supervisord holds
        them back while the early driver runs it: compute/tree/supervisord.py)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = [self.supervisorctl("pid", name).stdout.strip() for name in ("api", "monitor")]
            if all(p.isdigit() and p != "0" for p in pids) and self._api_answers():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the api and the monitor are not up ({pids}):\n" + self.output()[-3000:])
            time.sleep(0.05)

    def _api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as r:
                return r.headers.get("Server") is not None  # the early responder sends none
        except urllib.error.HTTPError as e:
            return e.headers.get("Server") is not None
        except (OSError, urllib.error.URLError):
            return False

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"compute-ctl still running after {timeout} s\n{self.output()[-6000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def postmaster_pid(self) -> int:
        with open(os.path.join(self.pgdata, "postmaster.pid")) as f:
            return int(f.readline())

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(VENV, "bin", "supervisorctl"), "-c",
                               os.path.join(self.runtime_dir, "supervisord.conf"), *args],
                              capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        """SIGTERM compute-ctl if it still runs, SIGKILL after 15 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        if hasattr(self, "out"):
            self.out.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Compute":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def pull_compute(cp, *args: str, compute_id: str = "compute-1", jwt: str = "jwt") -> Compute:
    """A tree in pull mode (-i/-p, HEAD's 2023 protocol) against the control-plane peer `cp`
    (tests/peers/control_plane.py), `args` added to its flags; `cp` serves the tree's base spec
    (a test may change cp.spec before the start)."""
    c = Compute()
    c.args = ["-i", compute_id, "-p", cp.url, "--control-plane-api", "2023", *args]
    c.env = {"NEON_CONSOLE_JWT": jwt}
    cp.spec = c.new_spec()
    return c


@contextmanager
def running_in_pull_mode(**settings: str) -> Iterator[Compute]:
    """A pull-mode tree, running, whose control plane served the base spec plus `settings`."""
    from tests.peers.control_plane import ControlPlanePeer
    with ControlPlanePeer(None) as cp:
        c = pull_compute(cp)
        cp.spec = c.new_spec(**settings)
        with c:
            c.wait_status("running")
            yield c


def configure(c: Compute, spec: dict, timeout: float = 60) -> tuple[int, dict | None]:
    """POST /configure {"spec": spec}: the status code and the JSON answer."""
    code, body = c.request("POST", "/configure", {"spec": spec}, {"Content-Type": "application/json"}, timeout)
    return code, json.loads(body) if body else None


@contextmanager
def booted_compute() -> Iterator[Compute]:
    """A tree started on the embedded default (initdb, base_spec), stopped afterwards."""
    c = Compute()
    c.spec = c.new_spec()
    with c:
        yield c


def spec_copy(spec: dict) -> dict:
    return copy.deepcopy(spec)


def with_initdb_that_waits(c: Compute) -> str:
    """Point `c` at a bin dir whose `initdb` waits, as a long initdb would (its process shows as
    `initdb`), until a line is written into the returned FIFO, then runs the real one: a test
    that acts "while initdb runs" is not raced by a start-up that ends first. The other
    binaries are the real ones (links), so `dirname(-b)` stays a bin dir."""
    from tests.peers.sync_safekeepers import REAL_PGBIN_DIR, link_real_binaries
    bindir = os.path.join(c.base, "bin-initdb-waits")
    os.mkdir(bindir)
    os.chmod(bindir, 0o755)  # the compute user runs what is in it
    link_real_binaries(bindir, but=("initdb",))
    gate = os.path.join(bindir, "initdb.gate")
    os.mkfifo(gate)
    os.chmod(gate, 0o644)  # read (waited on) by the compute user, written by the test
    script = os.path.join(bindir, "initdb")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\nread _ < '{gate}'\nexec '{os.path.join(REAL_PGBIN_DIR, 'initdb')}' \"$@\"\n")
    os.chmod(script, 0o755)
    c.pgbin = os.path.join(bindir, "postgres")
    return gate
