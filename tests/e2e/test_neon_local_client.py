"""Neon's local client against our real tree: `control_plane/src/endpoint.rs` at HEAD (neondatabase/neon
6a35a3e9f149798df1b1761ee64099d8d75fbe90), replayed step by step as `neon_local endpoint start` /
`endpoint stop` drive compute_ctl.

Covered here:
- the keys: a JWKS made as `create_jwks_from_pem` makes it (one Ed25519 JWK: `use: sig`,
  `key_ops: [verify]`, `alg: EdDSA`, `kid` = base64url of the key's SHA-256, `kty: OKP`, `crv`, `x`);
- `config.json` as `start` writes it: pretty-printed `ComputeConfig`, the spec with every field
  endpoint.rs fills (`format_version` 1.0, the `test` role and `neondb` database of
  `--create-test-user`, the cluster as `start` makes it without `respec()`: `settings` null,
  `postgresql_conf` = the endpoint's postgresql.conf, which names the port and listen address;
  `tenant_id`, `timeline_id`, `endpoint_id`, `mode`,
  `pageserver_connection_info` + `pageserver_connstring` + `shard_stripe_size`,
  `safekeeper_connstrings` as `127.0.0.1:<port>`, `safekeepers_generation`, `storage_auth_token`,
  `suspend_timeout_seconds: -1`, the rest null/false/[]), and `compute_ctl_config` with that JWKS;
- the exact argv (`--external-http-port P --internal-http-port P+1 --pgdata D --connstr
  postgresql://cloud_admin@127.0.0.1:<pg>/postgres --config <dir>/config.json --pgbin <bin>/postgres
  --compute-id <endpoint>`, plus `--dev` and `--privileged-role-name` as `start` adds them), stdin
  null, stdout and stderr to `compute.log`, the pid in `compute_ctl.pid`, PGDATA removed first;
- the wait: `GET http://0.0.0.0:P/status` with the per-compute token (EdDSA, no `exp`, no `kid`)
  every 100 ms, errors retried, `init` waited on, `running` done, anything else (`empty` too) a failure;
- the compute serves: psql connects and queries, the `test` role and `neondb` database exist;
- `postgresql_conf` written verbatim first, then HEAD's storage lines (item 2), which postgres reads;
- `endpoint reconfigure`: config.json read back, `postgresql_conf` refreshed from the endpoint's
  (edited) postgresql.conf, `POST /configure` with the per-compute token (`compute_id` = the
  endpoint, no scope, no aud) and `{spec, compute_ctl_config}`, 120 s; the new value is postgres';
- `endpoint stop` in `fast` mode: `pg_ctl -D D -w -m fast stop` with a cleared environment (but
  `LD_LIBRARY_PATH`), then waiting for the compute_ctl pid to go without signalling it: compute-ctl
  exits by itself with postgres' code, and no process of the tree is left;
- `endpoint stop` in `immediate-terminate` mode: `POST /terminate?mode=immediate` with the admin
  token (no `compute_id`, `scope: compute_ctl:admin`, `aud: ["compute"]`), `{"lsn"}` parsed from
  the answer, then SIGTERM (ignored if the process is gone) and the wait: compute-ctl exits 0,
  no process of the tree left.

Not covered (stock PostgreSQL 15 and out of scope):
- the `postgresql_conf` sent is endpoint.rs's `setup_pg_conf` without the lines a stock PostgreSQL
  15 refuses or hangs on (`shared_preload_libraries = 'neon'`, `max_replication_*_lag`,
  `synchronous_standby_names = 'walproposer'`: no neon extension or walproposer here);
- `reconfigure` with new pageservers or safekeepers (the same body, other spec fields);
- `refresh_configuration` on the internal port (Hadron: answered 501, tests/e2e/test_e2e_internal_port.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import jwt
import psycopg
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.fault_tree import alive, descendants
from tests.support.pgcluster import PGBIN_DIR, free_port, scratch_dir
from tests.support.tree import COMPUTE_CTL

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
ENDPOINT_ID = "ep-main"
COMPUTE_USER = "postgres"
ATTEMPT_INTERVAL = 0.1   # endpoint.rs: ATTEMPT_INTERVAL
START_TIMEOUT = 90.0     # endpoint.rs: args.start_timeout (neon_local's default is 90 s)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks_from_key(public: bytes) -> dict:
    """endpoint.rs `create_jwks_from_pem`, field for field (serde's order)."""
    return {"keys": [{"use": "sig", "key_ops": ["verify"], "alg": "EdDSA",
                      "kid": b64url(hashlib.sha256(public).digest()),
                      "kty": "OKP", "crv": "Ed25519", "x": b64url(public)}]}


def compute_token(private: ed25519.Ed25519PrivateKey) -> str:
    """endpoint.rs `generate_jwt(None)`: EdDSA, no kid, no exp."""
    return jwt.encode({"compute_id": ENDPOINT_ID, "scope": None, "aud": None}, private, algorithm="EdDSA")


def setup_pg_conf(pg_port: int, safekeeper_port: int) -> str:
    """endpoint.rs `setup_pg_conf` for a Primary with safekeepers, less what a stock PG15 refuses
    (see the module docstring)."""
    lines = [("max_wal_senders", "10"), ("wal_log_hints", "off"), ("max_replication_slots", "10"),
             ("hot_standby", "on"), ("shared_buffers", "1MB"), ("effective_io_concurrency", "2"),
             ("fsync", "off"), ("max_connections", "100"), ("wal_level", "logical"),
             ("wal_sender_timeout", "5s"), ("listen_addresses", "127.0.0.1"), ("port", str(pg_port)),
             ("wal_keep_size", "0"), ("restart_after_crash", "off")]
    text = "".join(f"{k}='{v}'\n" for k, v in lines) + "\n"
    return text + f"neon.safekeepers='localhost:{safekeeper_port}'\n"


def endpoint_spec(pg_port: int, postgresql_conf: str, ps_port: int, sk_port: int) -> dict:
    """endpoint.rs `start`'s ComputeSpec with `--create-test-user`: its cluster as `start` makes it
    (no respec(): `settings` null, the port and listen address in `postgresql_conf`)."""
    cluster = {"cluster_id": None, "name": None, "state": None,
               "roles": [{"name": "test", "encrypted_password": None, "options": None}],
               "databases": [{"name": "neondb", "owner": "test", "options": None, "restrict_conn": False,
                              "invalid": False}],
               "settings": None, "postgresql_conf": postgresql_conf}
    libpq_url = f"postgres://no_user@127.0.0.1:{ps_port}"
    return {
        "format_version": 1.0, "operation_uuid": None, "features": [], "swap_size_bytes": None,
        "disk_quota_bytes": None, "disable_lfc_resizing": None, "cluster": cluster, "delta_operations": None,
        "skip_pg_catalog_updates": False, "tenant_id": TENANT, "timeline_id": TIMELINE, "project_id": None,
        "branch_id": None, "endpoint_id": ENDPOINT_ID, "mode": "Primary",
        "pageserver_connection_info": {
            "shard_count": 0, "stripe_size": None, "prefer_protocol": "libpq",
            "shards": {"0000": {"pageservers": [{"id": 1, "libpq_url": libpq_url, "grpc_url": None}]}}},
        "pageserver_connstring": libpq_url, "safekeepers_generation": None,
        "safekeeper_connstrings": [f"127.0.0.1:{sk_port}"], "storage_auth_token": None,
        "remote_extensions": None, "pgbouncer_settings": None, "shard_stripe_size": None,
        "local_proxy_config": None, "reconfigure_concurrency": 1, "drop_subscriptions_before_start": False,
        "audit_log_level": "Disabled", "logs_export_host": None, "endpoint_storage_addr": "127.0.0.1:9993",
        "endpoint_storage_token": "", "autoprewarm": False, "offload_lfc_interval_seconds": None,
        "suspend_timeout_seconds": -1, "databricks_settings": None,
    }


def get_status(port: int, token: str) -> dict:
    """endpoint.rs `get_status`: GET http://0.0.0.0:P/status with the per-compute bearer token;
    a 4xx/5xx is an error."""
    req = urllib.request.Request(f"http://0.0.0.0:{port}/status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def wait_running(port: int, token: str, child: subprocess.Popen, log_path: str) -> list[str]:
    """endpoint.rs `start`'s loop; returns the statuses seen."""
    seen: list[str] = []
    start_at = time.monotonic()
    while True:
        try:
            state = get_status(port, token)
        except (OSError, urllib.error.URLError, ValueError) as e:
            assert time.monotonic() - start_at < START_TIMEOUT, f"timed out connecting to compute_ctl HTTP: {e}"
        else:
            seen.append(state["status"])
            if state["status"] == "running":
                return seen
            assert state["status"] != "failed", f"compute startup failed: {state.get('error')}"
            assert state["status"] == "init", f"unexpected compute status: {state['status']}"
            assert time.monotonic() - start_at < START_TIMEOUT, "compute startup timed out; still in Init state"
        assert child.poll() is None, open(log_path).read()[-4000:]
        time.sleep(ATTEMPT_INTERVAL)


class Endpoint:
    """One `neon_local endpoint start`, as endpoint.rs does it; `stop()` as `endpoint stop`."""

    def __init__(self, ps: PageserverPeer):
        self.private = ed25519.Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.base = scratch_dir("cs-neonlocal-")
        self.dir = os.path.join(self.base, "endpoints", ENDPOINT_ID)
        os.makedirs(self.dir)
        self.pgdata = os.path.join(self.dir, "pgdata")
        os.makedirs(self.pgdata)  # left by an earlier run: `start` removes it
        self.pg_port, self.sk_port = free_port(), free_port()
        self.external_port = free_port()
        self.internal_port = self.external_port + 1  # endpoint.rs: internal = external + 1
        self.pgbin = write_fake_postgres(self.base)  # `postgres` answering --sync-safekeepers
        self.connstr = f"postgresql://cloud_admin@127.0.0.1:{self.pg_port}/postgres"
        self.ps = ps
        self.child: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "compute.log")
        self.config_path = os.path.join(self.dir, "config.json")
        # The endpoint's own postgresql.conf (endpoint.rs `setup_pg_conf`, written at create).
        with open(os.path.join(self.dir, "postgresql.conf"), "w") as f:
            f.write(setup_pg_conf(self.pg_port, self.sk_port))

    def read_postgresql_conf(self) -> str:
        with open(os.path.join(self.dir, "postgresql.conf")) as f:
            return f.read()

    def start(self) -> list[str]:
        config = {"spec": endpoint_spec(self.pg_port, self.read_postgresql_conf(), self.ps.port, self.sk_port),
                  "compute_ctl_config": {"jwks": jwks_from_key(self.public), "tls": None}}
        with open(self.config_path, "w") as f:
            f.write(json.dumps(config, indent=2))  # serde_json::to_string_pretty
        self.config = config
        shutil.rmtree(self.pgdata)  # "We always start the compute node from scratch"
        argv = [COMPUTE_CTL,
                "--external-http-port", str(self.external_port),
                "--internal-http-port", str(self.internal_port),
                "--pgdata", self.pgdata,
                "--connstr", self.connstr,
                "--config", self.config_path,
                "--pgbin", self.pgbin,
                "--compute-id", ENDPOINT_ID,
                "--dev", "--privileged-role-name", "neon_superuser"]
        # The one addition to endpoint.rs's argv: this test's own runtime dir (the default,
        # /run/compute-ctl as root, is one per machine and other tests run beside this one).
        with open(self.log_path, "ab") as log:
            self.child = subprocess.Popen(argv + ["--runtime-dir", os.path.join(self.base, "run")],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        with open(os.path.join(self.dir, "compute_ctl.pid"), "w") as f:
            f.write(str(self.child.pid))
        return wait_running(self.external_port, compute_token(self.private), self.child, self.log_path)

    def session(self) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.pg_port, dbname="postgres", user="cloud_admin",
                               passfile=os.path.join(self.base, "run", "superuser.pgpass"), connect_timeout=5)

    def reconfigure(self) -> int:
        """endpoint.rs `reconfigure(None, None, None)`: config.json read back, a fresh
        `postgresql_conf` from the endpoint's file, POST /configure with the per-compute token
        and `{spec, compute_ctl_config}`, 120 s timeout; anything but 4xx/5xx is success."""
        with open(self.config_path) as f:
            config = json.load(f)
        spec = config["spec"]
        spec["cluster"]["postgresql_conf"] = self.read_postgresql_conf()
        req = urllib.request.Request(
            f"http://0.0.0.0:{self.external_port}/configure", method="POST",
            data=json.dumps({"spec": spec, "compute_ctl_config": config["compute_ctl_config"]}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {compute_token(self.private)}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            raise AssertionError(f"Error: {e.read().decode()}") from None

    def terminate_immediate(self) -> dict:
        """endpoint.rs `stop(ImmediateTerminate)`: POST /terminate?mode=immediate with the admin
        token, the body parsed as `TerminateResponse` ({"lsn"}); then SIGTERM (`kill(...).ok()`:
        the process may be gone already) and wait_until_stopped."""
        req = urllib.request.Request(f"http://0.0.0.0:{self.external_port}/terminate?mode=immediate",
                                     method="POST", headers={"Authorization": f"Bearer {admin_token(self.private)}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        try:
            os.kill(self.child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return answer

    def close(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            self.child.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)


def admin_token(private: ed25519.Ed25519PrivateKey) -> str:
    """endpoint.rs `generate_jwt(Some(Admin))`: no compute_id, scope compute_ctl:admin, aud [compute]."""
    return jwt.encode({"compute_id": None, "scope": "compute_ctl:admin", "aud": ["compute"]}, private,
                      algorithm="EdDSA")


def test_neon_local_start_status_psql_reconfigure_and_fast_stop(bb_tar):
    with PageserverPeer(bb_tar, tenant_id=TENANT, timeline_id=TIMELINE) as ps:
        ep = Endpoint(ps)
        try:
            # -- endpoint start -----------------------------------------------------------------
            seen = ep.start()
            assert set(seen) <= {"init", "running"}, seen  # never `empty`: endpoint.rs would abort
            config, pgdata, child = ep.config, ep.pgdata, ep.child
            assert config["spec"]["cluster"]["settings"] is None  # HEAD's spec: no respec'd settings

            # The config's JWKS is the API's; each ignored flag said so; the session serves.
            with open(os.path.join(ep.base, "run", "jwks.json")) as f:
                assert json.load(f) == config["compute_ctl_config"]["jwks"]
            out = open(ep.log_path).read()
            assert "--dev ignored" in out and "--privileged-role-name ignored" in out
            with ep.session() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'test'").fetchone() == (1,)
                assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                    "WHERE datname = 'neondb'").fetchone() == ("test",)
                # config.json's postgresql_conf first, then HEAD's storage lines (item 2): postgres reads them
                assert conn.execute("SHOW wal_sender_timeout").fetchone() == ("5s",)
                assert conn.execute("SHOW neon.endpoint_id").fetchone() == (ENDPOINT_ID,)
                assert conn.execute("SHOW neon.safekeepers").fetchone() == (f"127.0.0.1:{ep.sk_port}",)
                assert conn.execute("SHOW neon.pageserver_connstring").fetchone() == (
                    f"postgres://no_user@127.0.0.1:{ps.port}",)
            with open(os.path.join(pgdata, "postgresql.conf")) as f:
                assert f.read().startswith(config["spec"]["cluster"]["postgresql_conf"] + "\n# Neon storage settings\n")
            assert ps.last.queries and ps.last.queries[0].startswith(f"basebackup {TENANT} {TIMELINE} ")
            # psql as a neon_local user runs it, over postgres' default socket directory (the
            # endpoint's postgresql.conf names none).
            psql = subprocess.run(
                ["runuser", "-u", COMPUTE_USER, "--", os.path.join(PGBIN_DIR, "psql"), "-X", "-At",
                 "-h", "/var/run/postgresql", "-p", str(ep.pg_port), "-U", "cloud_admin", "-d", "postgres",
                 "-c", "SELECT 42"],
                capture_output=True, text=True, timeout=30)
            assert psql.returncode == 0 and psql.stdout.strip() == "42", psql.stderr

            # -- endpoint reconfigure (the endpoint's postgresql.conf edited first) ---------------
            with open(os.path.join(ep.dir, "postgresql.conf"), "a") as f:
                f.write("wal_sender_timeout='7s'\n")
            assert ep.reconfigure() == 200
            with ep.session() as conn:
                assert conn.execute("SHOW wal_sender_timeout").fetchone() == ("7s",)
            assert get_status(ep.external_port, compute_token(ep.private))["status"] == "running"

            # -- endpoint stop --mode fast ----------------------------------------------------------
            tree = [p.pid for p in descendants(child.pid)]
            assert tree
            stop = subprocess.run(
                ["runuser", "-u", COMPUTE_USER, "--", "env", "-i",
                 f"LD_LIBRARY_PATH={os.path.join(os.path.dirname(PGBIN_DIR), 'lib')}",
                 os.path.join(PGBIN_DIR, "pg_ctl"), "-D", pgdata, "-w", "-m", "fast", "stop"],
                capture_output=True, text=True, timeout=60)
            assert stop.returncode == 0, stop.stdout + stop.stderr
            # wait_for_compute_ctl_to_exit(send_sigterm=false): compute-ctl goes by itself.
            assert child.wait(60) == 0, open(ep.log_path).read()[-4000:]
            assert [pid for pid in tree if alive(pid)] == []  # no orphans
        finally:
            ep.close()


def test_neon_local_stop_immediate_terminate(bb_tar):
    """`endpoint stop --mode immediate-terminate`: /terminate?mode=immediate with the admin
    token answers `{"lsn"}` (sync-safekeepers after the shutdown, the Neon path), then SIGTERM:
    compute-ctl exits, no process of the tree left."""
    with PageserverPeer(bb_tar, tenant_id=TENANT, timeline_id=TIMELINE) as ps:
        ep = Endpoint(ps)
        try:
            ep.start()
            child = ep.child
            tree = [p.pid for p in descendants(child.pid)]
            assert tree
            answer = ep.terminate_immediate()
            assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", answer["lsn"]), answer  # TerminateResponse parses
            assert child.wait(60) == 0, open(ep.log_path).read()[-4000:]
            assert [pid for pid in tree if alive(pid)] == []  # no orphans
        finally:
            ep.close()
