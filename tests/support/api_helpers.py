"""Helpers for the API and monitor tests: state files, a fake lifecycle driver, real gunicorn."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from compute.shared.state import StateStore, state_path
from tests.support.pgcluster import free_port, running_cluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUNICORN_ARGV = [sys.executable, "-m", "gunicorn", "-c", "python:compute.api.gunicorn_conf",
                 "compute.api.app:create_app()"]

TENANT = "9ef87a5bf0d92544f6fafeeb3239695c"
TIMELINE = "de200bd42b49cc1814412c7e592dd6e9"


def launch_settings(runtime_dir: str, connstr: str = "postgresql://cloud_admin@127.0.0.1:1/postgres",
                    **overrides: Any) -> dict[str, Any]:
    launch = {
        "pgdata": os.path.join(runtime_dir, "pgdata"),
        "connstr": connstr,
        "pgbin": "/usr/lib/postgresql/15/bin/postgres",
        "superuser": "cloud_admin",
        "http_port": 3080,
        "runtime_dir": runtime_dir,
        "compute_id": "compute-1",
        "control_plane_uri": "http://127.0.0.1:1",
        "monitor_interval": 0.1,
        "jwks_path": None,
        "log_format": "text",
    }
    launch.update(overrides)
    return launch


def stored(spec: Any) -> Any:
    """A spec document as the programs store it (compute/model/spec.py to_document: validated, then
    written back); a document that does not validate is kept as it is (a damaged state file)."""
    from compute.model.spec import SpecError, parse_spec, to_document
    if spec is None:
        return None
    try:
        return to_document(parse_spec(spec, superuser="cloud_admin"))
    except SpecError:
        return spec


def make_state(runtime_dir: str, *, status: str = "running", launch: dict | None = None,
               **fields: Any) -> StateStore:
    os.makedirs(runtime_dir, exist_ok=True)
    if "spec" in fields:
        fields["spec"] = stored(fields["spec"])
    initial = {
        "launch": launch or launch_settings(runtime_dir),
        "status": status,
        "error": None,
        "start_time": time.time(),
        "last_active": None,
        "tenant": TENANT,
        "timeline": TIMELINE,
        "spec": None,
        "spec_generation": 0,
        "metrics": {},
        "pending_restart": [],
        "program_restarts": {},
        "shutdown_requested": False,
    }
    initial.update(fields)
    return StateStore.create(state_path(runtime_dir), initial)


def stage_status(store: StateStore, status: str) -> None:
    """Put a test scene's status in place regardless of the transitions table (which the store
    enforces for every program): written into the file as bytes, as nothing in compute/ can."""
    import sqlite3
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE kv SET value = ? WHERE key = 'status'", (json.dumps(status),))


def minimal_spec(**cluster_overrides: Any) -> dict[str, Any]:
    cluster = {
        "cluster_id": "c1", "name": "c1",
        "roles": [{"name": "alice", "encrypted_password": "0" * 32, "options": None}],
        "databases": [{"name": "app", "owner": "alice", "options": None}],
        "settings": [
            {"name": "neon.pageserver_connstring", "value": "postgresql://no@127.0.0.1:1", "vartype": "string"},
            {"name": "neon.tenant_id", "value": TENANT, "vartype": "string"},
            {"name": "neon.timeline_id", "value": TIMELINE, "vartype": "string"},
            {"name": "neon.safekeepers", "value": "127.0.0.1:1", "vartype": "string"},
        ],
    }
    cluster.update(cluster_overrides)
    return {"format_version": 1.0, "operation_uuid": str(uuid.uuid4()), "cluster": cluster,
            "delta_operations": None}


class FakeDriver(threading.Thread):
    """Plays the lead's lifecycle driver: configuration_pending -> configuration -> running
    (or failed with `fail`), after `hold` seconds."""

    def __init__(self, runtime_dir: str, *, hold: float = 0.2, fail: str | None = None):
        super().__init__(daemon=True)
        self.store = StateStore(state_path(runtime_dir))
        self.hold = hold
        self.fail = fail
        self.stop = threading.Event()
        self.applied: list[dict] = []

    def run(self) -> None:
        while not self.stop.wait(0.02):
            if self.store.transition({"configuration_pending"}, "configuration"):
                time.sleep(self.hold)
                self.applied.append(self.store.get("spec"))
                if self.fail:
                    self.store.transition({"configuration"}, "failed", error=self.fail)
                else:
                    self.store.transition({"configuration"}, "running")

    def close(self) -> None:
        self.stop.set()
        self.join(5)


@contextmanager
def fake_driver(runtime_dir: str, **kwargs: Any) -> Iterator[FakeDriver]:
    driver = FakeDriver(runtime_dir, **kwargs)
    driver.start()
    try:
        yield driver
    finally:
        driver.close()


class RequestDriver(threading.Thread):
    """The real lifecycle driver's half of /promote and /terminate (compute.lifecycle.driver.Driver
    carries out what compute.shared.driver_requests submits), in a thread: for the API tests that run
    no driver program. Configure requests too, unless `configure=False` (FakeDriver's job)."""

    def __init__(self, runtime_dir: str, *, configure: bool = True):
        super().__init__(daemon=True)
        from compute.lifecycle.driver import Driver
        self.driver = Driver(runtime_dir)
        self.configure = configure
        self.stop = threading.Event()

    def run(self) -> None:
        from compute.lifecycle.steps import DriverStep, pending_request
        while not self.stop.wait(0.02):
            step = pending_request(self.driver.request_view())
            if step is DriverStep.TERMINATE:
                self.driver.terminate()
            elif step is DriverStep.PROMOTE:
                self.driver.promote()
            elif step is DriverStep.RECONFIGURE and self.configure:
                self.driver.reconfigure()

    def close(self) -> None:
        self.stop.set()
        self.join(30)


@contextmanager
def request_driver(runtime_dir: str, **kwargs: Any) -> Iterator[RequestDriver]:
    driver = RequestDriver(runtime_dir, **kwargs)
    driver.start()
    try:
        yield driver
    finally:
        driver.close()


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


@contextmanager
def gunicorn(runtime_dir: str, *, env: dict[str, str] | None = None, stderr_path: str | None = None
             ) -> Iterator[subprocess.Popen]:
    """Run exactly the lead's supervisord command line on the state file of `runtime_dir`."""
    full_env = dict(os.environ, COMPUTE_RUNTIME_DIR=runtime_dir, PYTHONPATH=REPO, **(env or {}))
    store = StateStore(state_path(runtime_dir))
    port = store.get("launch")["http_port"]
    store.close()  # hold no handle on the state file while the server runs
    err = open(stderr_path or os.path.join(runtime_dir, "gunicorn.log"), "ab")
    proc = subprocess.Popen(GUNICORN_ARGV, cwd=REPO, env=full_env, stdout=err, stderr=err)
    try:
        wait_port(port, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.close()


def gunicorn_state(runtime_dir: str, connstr: str | None = None, **fields: Any) -> tuple[StateStore, int]:
    port = free_port()
    launch = launch_settings(runtime_dir, http_port=port, **({"connstr": connstr} if connstr else {}))
    return make_state(runtime_dir, launch=launch, **fields), port


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the host's primary one): a client
    bound to it and connecting to it is a real non-loopback peer of a server on 0.0.0.0. None
    when the machine has none."""
    import fcntl
    import ipaddress
    import struct
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            probe.connect(("192.0.2.255", 9))  # no packet is sent: only the route is looked up
            addr = probe.getsockname()[0]
            if not ipaddress.ip_address(addr).is_loopback and addr != "0.0.0.0":
                return addr
        except OSError:
            pass
        for _index, name in socket.if_nameindex():  # no default route: any interface's address
            try:
                raw = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            addr = socket.inet_ntoa(raw[20:24])
            if not ipaddress.ip_address(addr).is_loopback:
                return addr
    finally:
        probe.close()
    return None


def call_from(source: str, port: int, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request from `source` (an address of this machine) to `source`:port, so the server's
    peer is `source`: (status, lower-case headers, body)."""
    import http.client
    conn = http.client.HTTPConnection(source, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- JWT ---------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks_keys():
    """(ed25519 private key, rsa private key, JWKS dict of their public halves)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ed = ed25519.Ed25519PrivateKey.generate()
    rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_pub = ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    nums = rs.public_key().public_numbers()
    to_bytes = lambda n: n.to_bytes((n.bit_length() + 7) // 8, "big")  # noqa: E731
    jwks = {"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": _b64(ed_pub), "kid": "ed", "use": "sig", "alg": "EdDSA"},
        {"kty": "RSA", "n": _b64(to_bytes(nums.n)), "e": _b64(to_bytes(nums.e)), "kid": "rs", "alg": "RS256"},
    ]}
    return ed, rs, jwks


def forged_token(header: dict, claims: dict, secret: bytes | None) -> str:
    """A JWT made by hand, as an attacker would: `header` and `claims` as given, signed with
    HMAC-SHA256 keyed with `secret`, or with an empty signature when `secret` is None."""
    import hashlib
    import hmac
    signing_input = (_b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())).encode()
    sig = b"" if secret is None else hmac.new(secret, signing_input, hashlib.sha256).digest()
    return signing_input.decode() + "." + _b64(sig)


def token_for(key, compute_id: str | None = None, *, algorithm: str = "EdDSA", **claims: Any) -> str:
    """A token as Neon's clients make them (cp/endpoint.rs generate_jwt): for one compute
    (`compute_id`), or, without one, an admin token (scope compute_ctl:admin, aud ["compute"]).
    No `exp` unless given, as neon_local."""
    import jwt
    if compute_id is None:
        base = {"compute_id": None, "scope": "compute_ctl:admin", "aud": ["compute"]}
    else:
        base = {"compute_id": compute_id, "scope": None, "aud": None}
    return jwt.encode({**base, **claims}, key, algorithm=algorithm)


def write_jwks(path: str, jwks: dict) -> str:
    with open(path, "w") as f:
        json.dump(jwks, f)
    return path


# -- the app in-process, and plain HTTP to a real server -------------------------------------

@pytest.fixture
def rt(tmp_path) -> str:
    """A runtime dir: pytest's tmp_path as a str."""
    return str(tmp_path)


@pytest.fixture
def keys():
    return jwks_keys()


def client_for(runtime_dir: str):
    """A falcon TestClient on the app of `runtime_dir` (its state file)."""
    import falcon.testing
    from compute.api.app import create_app
    return falcon.testing.TestClient(create_app(runtime_dir))


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request on a fresh connection to 127.0.0.1:port: (status, lower-case headers, body)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


# -- a shared postgres ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg():
    """One real PG15 per test module, with pg_stat_statements preloaded."""
    with running_cluster(shared_preload_libraries="'pg_stat_statements'") as cluster:
        yield cluster


# -- a real supervisord for /terminate, /metrics and the /configure wake-up -----------------

_USR1_RECORDER = """\
import signal, sys, time
out = sys.argv[1]
def on_usr1(*_):
    with open(out, "a") as f:
        f.write("usr1\\n")
signal.signal(signal.SIGUSR1, on_usr1)
open(out + ".ready", "w").close()
while True:
    time.sleep(1)
"""

_FAKE_POSTGRES = """\
import signal, sys, time
out = sys.argv[1]
def on_signal(signum, _):
    with open(out, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    sys.exit(0)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
    signal.signal(s, on_signal)
open(out + ".ready", "w").close()
while True:
    time.sleep(1)
"""


@contextmanager
def supervisord(runtime_dir: str) -> Iterator[str]:
    """supervisord on <runtime_dir>/supervisor.sock with two programs: `postgres` (stopped with
    SIGINT like the real one; writes the signal it got to <runtime_dir>/postgres.signals) and
    `lifecycle` (appends a line to <runtime_dir>/usr1.log on every SIGUSR1). Yields the path
    of that log."""
    from compute.shared.supervisor_rpc import socket_path
    from compute.shared.supervisor_rpc import rpc

    recorder = os.path.join(runtime_dir, "usr1_recorder.py")
    usr1_log = os.path.join(runtime_dir, "usr1.log")
    with open(recorder, "w") as f:
        f.write(_USR1_RECORDER)
    fake_pg = os.path.join(runtime_dir, "fake_postgres.py")
    with open(fake_pg, "w") as f:
        f.write(_FAKE_POSTGRES)
    conf = os.path.join(runtime_dir, "test-supervisord.conf")
    with open(conf, "w") as f:
        f.write(f"""\
[unix_http_server]
file={socket_path(runtime_dir)}
chmod=0700

[supervisord]
nodaemon=true
logfile={runtime_dir}/supervisord.log
pidfile={runtime_dir}/supervisord.pid
childlogdir={runtime_dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:postgres]
command={sys.executable} {fake_pg} {runtime_dir}/postgres.signals
stopsignal=INT
startsecs=0
autorestart=false

[program:lifecycle]
command={sys.executable} {recorder} {usr1_log}
startsecs=0
autorestart=false
""")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                infos = rpc(runtime_dir, timeout=1).supervisor.getAllProcessInfo()
                ready = all(os.path.exists(p + ".ready") for p in (usr1_log, f"{runtime_dir}/postgres.signals"))
                if ready and len(infos) == 2 and all(i["statename"] == "RUNNING" for i in infos):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("supervisord did not come up")
            time.sleep(0.05)
        yield usr1_log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def short_runtime_dir() -> str:
    """A runtime dir with a short path (unix socket paths are limited to ~107 bytes)."""
    import tempfile

    from tests.support.pgcluster import SCRATCH_ROOT
    return tempfile.mkdtemp(prefix="cs-api-", dir=SCRATCH_ROOT)


# -- raw HTTP on loopback: exactly the bytes a client sends, exactly the bytes it gets -------------

def send_get(port: int, path: str, token: str | None = None, timeout: float = 30) -> socket.socket:
    """A plain GET (with `Authorization: Bearer token`), sent; the socket, to read its answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    header = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n".encode())
    return s


def read_to_eof(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status code, headers with lower-case names, body) of a raw HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body
