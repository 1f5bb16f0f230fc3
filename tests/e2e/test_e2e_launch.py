"""End to end, launching as Neon's compute_ctl at HEAD (issue 18, items 1 and 4): the `-c` config
file (with a spec, with a null one, invalid ones), HEAD's port flags and ignored flags,
POSTGRES_PATH, `-i` without pull mode, the JWKS hand-off (RUNTIME_DIR/jwks.json, 0600, the
compute user's), v2 pull mode against the control-plane peer (Bearer, HEAD's answer, the JWKS
it carries, `compute_ctl_cplane_requests_total`), and the attacks: a wrong or missing token at
the peer, INSTANCE_ID, the control-plane token in no argv, log or other program's environment.
Flag parsing and the pull protocol without a process: tests/unit/test_launch_head.py."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import time
import uuid

import jwt
import psycopg
import pytest

from compute.shared.state import StateStore, state_path
from tests.peers.control_plane import ControlPlanePeer
from tests.support.api_helpers import jwks_keys
from tests.support.fault_tree import descendants
from tests.support.pgcluster import free_port
from tests.support.tree import COMPUTE_CTL, Compute
from tests.support.waiting import wait_for

JSON = {"Content-Type": "application/json"}
COMPUTE_USER = "postgres"  # compute-ctl's --user default: the tree runs as it
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


@pytest.fixture(scope="module")
def keys():
    return jwks_keys()


@pytest.fixture(autouse=True)
def status_polled_with_a_token(keys, monkeypatch):
    """The JWKS these launches hand the API guards /status too (HEAD's rule): /status is polled
    with an admin token, as Neon's control plane would; the other requests name their own."""
    admin = jwt.encode({"scope": "compute_ctl:admin", "aud": ["compute"], "exp": time.time() + 3600},
                       keys[0], algorithm="EdDSA", headers={"kid": "ed"})
    real = Compute.status

    def status(self):
        if self.token is not None:
            return real(self)
        self.token = admin
        try:
            return real(self)
        finally:
            self.token = None
    monkeypatch.setattr(Compute, "status", status)


def token(ed, compute_id: str) -> dict:
    claims = {"compute_id": compute_id, "exp": time.time() + 300}
    return {"Authorization": "Bearer " + jwt.encode(claims, ed, algorithm="EdDSA", headers={"kid": "ed"})}


def write_config(c: Compute, spec: dict | None, jwks: dict, name: str = "config.json", **extra) -> str:
    path = os.path.join(c.base, name)
    with open(path, "w") as f:
        json.dump({"spec": spec, "compute_ctl_config": {"jwks": jwks, "tls": None}, **extra}, f, indent=2)
    return path


def launch_settings(c: Compute) -> dict:
    return StateStore(state_path(c.runtime_dir)).get("launch")


def assert_private_jwks(c: Compute, want: dict) -> None:
    path = os.path.join(c.runtime_dir, "jwks.json")
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)  # never world- or group-readable
    assert st.st_uid == pwd.getpwnam(COMPUTE_USER).pw_uid
    with open(path) as f:
        assert json.load(f) == want
    assert launch_settings(c)["jwks_path"] == path


def one_line_exit_1(c: Compute) -> str:
    assert c.wait_exit(60) == 1, c.output()
    lines = [ln for ln in c.output().splitlines() if ln.startswith("compute-ctl: ")]
    assert len(lines) == 1 and "Traceback" not in c.output(), c.output()
    return lines[0]


# -- -c --------------------------------------------------------------------------------------

def test_config_file_with_a_spec_starts_and_hands_its_jwks_to_the_api(keys):
    ed, _rs, jwks = keys
    c = Compute()
    c.args = ["-c", write_config(c, c.new_spec(), jwks), "-i", "compute-1"]
    with c:
        c.wait_status("running")
        assert_private_jwks(c, jwks)
        s = launch_settings(c)
        assert (s["compute_id"], s["internal_http_port"]) == ("compute-1", 3081)
        # The JWKS is in force: no token, no /configure; a token of this compute: reconfigured.
        spec = c.new_spec(work_mem="8MB")
        assert c.request("POST", "/configure", {"spec": spec})[0] == 400  # no Authorization header: 400, as HEAD
        code, body = c.request("POST", "/configure", {"spec": spec, "compute_ctl_config": {"jwks": jwks}},
                               headers=token(ed, "compute-1"))
        assert code == 200, body
        with psycopg.connect(c.admin_conninfo()) as conn:
            assert conn.execute("SHOW work_mem").fetchone()[0] == "8MB"


def test_config_file_with_a_null_spec_starts_empty_and_takes_configure(keys):
    ed, _rs, jwks = keys
    c = Compute()
    c.args = ["-c", write_config(c, None, jwks), "-i", "compute-1"]
    with c:
        c.wait_status("empty")
        assert_private_jwks(c, jwks)  # written before any program started, whatever the spec
        assert not os.path.exists(os.path.join(c.pgdata, "PG_VERSION"))
        assert c.request("POST", "/configure", {"spec": c.new_spec()})[0] == 400
        code, body = c.request("POST", "/configure", {"spec": c.new_spec(), "compute_ctl_config": {"jwks": jwks}},
                               headers=token(ed, "compute-1"))
        assert code == 200, body
        assert c.status()["status"] == "running"


def test_instance_id_never_switches_auth_off(keys):
    """HEAD skips authorization when INSTANCE_ID is set (Hadron); we never read it."""
    ed, _rs, jwks = keys
    c = Compute()
    c.args = ["-c", write_config(c, None, jwks), "-i", "compute-1"]
    c.env = {"INSTANCE_ID": "compute-1"}
    with c:
        c.wait_status("empty")
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, token(ed, "compute-2")):
            code, _ = c.request("POST", "/configure", {"spec": c.new_spec()}, headers=headers)
            assert code in (400, 401, 403), (headers, code)
        assert c.status()["status"] == "empty"


def test_explicit_jwks_wins_over_the_config_file(keys):
    ed, _rs, jwks = keys
    c = Compute()
    other = {"keys": [jwks["keys"][1]]}  # the RSA key only: an Ed25519 token no longer passes
    mine = c.use_jwks(jwks)
    c.args += ["-c", write_config(c, c.new_spec(), other), "-i", "compute-1"]
    with c:
        c.wait_status("running")
        assert launch_settings(c)["jwks_path"] == mine
        assert not os.path.exists(os.path.join(c.runtime_dir, "jwks.json"))
        assert f"--jwks {mine} given: the config file's compute_ctl_config.jwks is not used" in c.output()
        code, body = c.request("POST", "/configure", {"spec": c.new_spec()}, headers=token(ed, "compute-1"))
        assert code == 200, body


@pytest.mark.parametrize("content,wanted", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"spec": {"format_version": 1.0, "cluster": {}}}).encode(), "compute_ctl_config: is required"),
    (json.dumps({"spec": {"format_version": 1.0, "cluster": {"roles": [{"name": "a\"; DROP ROLE x; --",
                                                                        "encrypted_password": "nope"}]}},
                 "compute_ctl_config": {"jwks": {"keys": []}}}).encode(), "invalid spec: cluster.roles[0]"),
    (json.dumps({"spec": None, "compute_ctl_config": {"jwks": {"keys": [{"x": "A" * 70_000}]}}}).encode(),
     "compute_ctl_config.jwks.keys[0].x"),
    (b"\xff\xfe garbage", "not valid UTF-8"),
])
def test_invalid_config_files_are_one_line_and_touch_nothing(content, wanted):
    c = Compute()
    path = os.path.join(c.base, "config.json")
    with open(path, "wb") as f:
        f.write(content)
    os.makedirs(c.pgdata)
    with open(os.path.join(c.pgdata, "keep"), "w") as f:
        f.write("x")
    c.args = ["-c", path]
    with c:
        line = one_line_exit_1(c)
        assert wanted in line, line
    # (close() removed the base; checked before it, through the output: nothing started)


def test_invalid_config_file_leaves_pgdata_and_runtime_dir_alone():
    c = Compute()
    path = os.path.join(c.base, "config.json")
    with open(path, "w") as f:
        json.dump({"spec": {"format_version": 1.0, "cluster": {"settings": [
            {"name": "include", "value": "/etc/shadow", "vartype": "string"}]}},
            "compute_ctl_config": {"jwks": {"keys": []}}}, f)
    os.makedirs(c.pgdata)
    with open(os.path.join(c.pgdata, "keep"), "w") as f:
        f.write("x")
    c.args = ["-c", path]
    c.start()
    try:
        assert "invalid spec" in one_line_exit_1(c)
        assert os.listdir(c.pgdata) == ["keep"] and not os.path.exists(c.runtime_dir)
    finally:
        c.close()


def test_config_with_pull_mode_is_a_usage_error():
    c = Compute()
    c.args = ["-c", write_config(c, None, {"keys": []}), "-i", "x", "-p", "http://127.0.0.1:1"]
    with c:
        assert c.wait_exit(30) == 2
        assert "not allowed with argument -p/--control-plane-uri" in c.output()
        assert "Traceback" not in c.output() and not os.path.exists(c.runtime_dir)


# -- HEAD's flags --------------------------------------------------------------------------------

class HeadCompute(Compute):
    """compute-ctl started with HEAD's flag names (no -b: POSTGRES_PATH from the environment)."""

    def command(self) -> list[str]:
        return [COMPUTE_CTL, "--external-http-port", str(self.http_port), "--internal-http-port",
                str(self.internal_port), "--pgdata", self.pgdata, "--connstr", self.connstr,
                "--runtime-dir", self.runtime_dir, "--grace-seconds", "2", *self.args]


def test_heads_flags_start_a_compute_and_each_ignored_one_logs_one_line():
    c = HeadCompute()
    c.internal_port = free_port()
    c.env = {"POSTGRES_PATH": c.pgbin}
    c.args = ["-S", os.path.join(c.base, "spec.json"), "--compute-id", "ep-1",
              "-r", "http://ext.invalid//", "--dev", "--privileged-role-name", "neon_superuser",
              "--cgroup", "neon-postgres", "--filecache-connstr", "host=localhost password=SECRETVALUE",
              "--vm-monitor-addr", "0.0.0.0:10301", "--resize-swap-on-bind", "--set-disk-quota-for-fs", "/fs",
              "--installed-extensions-collection-interval", "60", "--pg-init-timeout", "5",
              "--lakebase-mode", "false"]
    with open(c.args[1], "w") as f:
        json.dump(c.new_spec(), f)
    with c:
        c.wait_status("running")
        s = launch_settings(c)
        assert (s["http_port"], s["internal_http_port"], s["compute_id"]) == (c.http_port, c.internal_port, "ep-1")
        assert s["pgbin"] == c.pgbin  # from POSTGRES_PATH
        out = c.output()
        for flag in ("-r/--remote-ext-base-url", "--dev", "--privileged-role-name", "--cgroup",
                     "--filecache-connstr", "--vm-monitor-addr", "--resize-swap-on-bind",
                     "--set-disk-quota-for-fs", "--installed-extensions-collection-interval",
                     "--pg-init-timeout", "--lakebase-mode"):
            assert sum(f"{flag} ignored: " in ln for ln in out.splitlines()) == 1, flag
        assert "SECRETVALUE" not in out
        assert sum(f"internal API (POST /grants, /extensions) on 127.0.0.1 port {c.internal_port}" in ln
                   for ln in out.splitlines()) == 1


def test_http_port_with_heads_port_flags_is_a_usage_error():
    c = Compute()  # passes --http-port
    c.spec = c.new_spec()
    c.args = ["--external-http-port", str(free_port())]
    with c:
        assert c.wait_exit(30) == 2
        assert "--http-port cannot be used with" in c.output() and not os.path.exists(c.runtime_dir)


# -- pull mode, v2 -------------------------------------------------------------------------------

def prometheus_page(c: Compute) -> str:
    code, body = c.request("GET", "/metrics")
    assert code == 200, body
    return body.decode()


def promtool_clean(page: str) -> None:
    from tests.support.promtool import check_clean  # HEAD's two `_ms` names are its only remark
    check_clean(page)


def secret_holders(c: Compute, secret: str) -> list[str]:
    """Every process of the tree whose argv or environment holds `secret` (compute-ctl included:
    it scrubs its own environment block before it forks anything)."""
    found = []
    for pid in [c.proc.pid] + [p.pid for p in descendants(c.proc.pid)]:
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    if secret.encode() in f.read():
                        found.append(f"{pid}/{part}")
            except OSError:
                pass
    return found


def test_v2_pull_mode_bearer_jwks_and_metric(keys):
    ed, _rs, jwks = keys
    secret = "cp-" + uuid.uuid4().hex
    c = Compute()
    with ControlPlanePeer(c.new_spec(), compute_id="compute-1", jwt=secret, jwks=jwks, fail_first=1) as cp:
        c.args = ["-i", "compute-1", "-p", cp.url]
        c.env = {"NEON_CONTROL_PLANE_TOKEN": secret}
        with c:
            c.wait_status("running")
            assert [r.api for r in cp.requests] == ["v2", "v2"]  # one 503, retried after 100 ms
            assert all(r.headers.get("Authorization") == f"Bearer {secret}" for r in cp.requests)
            assert_private_jwks(c, jwks)
            page = prometheus_page(c)
            promtool_clean(page)
            assert 'compute_ctl_cplane_requests_total{rpc="GetConfig",http_status="503 Service Unavailable"} 1' in page
            assert 'compute_ctl_cplane_requests_total{rpc="GetConfig",http_status="200 OK"} 1' in page
            # The answer's JWKS guards the API.
            assert c.request("POST", "/configure", {"spec": c.new_spec()})[0] == 400
            code, body = c.request("POST", "/configure", {"spec": c.new_spec()}, headers=token(ed, "compute-1"))
            assert code == 200, body
            # The control-plane token: in no argv, no environment of the tree, no log line.
            wait_for(lambda: len(descendants(c.proc.pid)) >= 5, what="the tree's programs")
            assert secret_holders(c, secret) == []
            assert secret not in c.output()


def test_v2_pull_mode_empty_answer_writes_the_jwks_then_waits(keys):
    ed, _rs, jwks = keys
    c = Compute()
    with ControlPlanePeer(None, compute_id="compute-1", jwks=jwks) as cp:
        c.args = ["-i", "compute-1", "-p", cp.url]
        with c:
            c.wait_status("empty")
            wait_for(lambda: os.path.exists(os.path.join(c.runtime_dir, "jwks.json")), what="jwks.json")
            assert_private_jwks(c, jwks)
            assert c.request("POST", "/configure", {"spec": c.new_spec()}, headers=token(ed, "compute-2"))[0] == 403
            code, body = c.request("POST", "/configure", {"spec": c.new_spec()}, headers=token(ed, "compute-1"))
            assert code == 200, body


@pytest.mark.parametrize("sent", ["wrong-token", None])
def test_v2_pull_mode_wrong_or_missing_token_fails_the_start(sent):
    secret = "cp-" + uuid.uuid4().hex
    c = Compute()
    with ControlPlanePeer(c.new_spec(), jwt=secret) as cp:
        c.args = ["-i", "compute-1", "-p", cp.url, "--grace-seconds", "60"]
        c.env = {"NEON_CONTROL_PLANE_TOKEN": sent} if sent else {}
        with c:
            # No JWKS ever came: /status is closed too (fails closed); /metrics is open.
            def failed() -> bool:
                try:
                    return 'compute_status{status="failed"} 1' in prometheus_page(c)
                except OSError:  # not bound yet
                    return False
            wait_for(failed, 60, "a failed start")
            out = c.output()
            assert "HTTP 401" in out and secret not in out
            assert len(cp.requests) == 1  # 401 is not retried
            assert cp.requests[0].headers.get("Authorization") == (f"Bearer {sent}" if sent else None)
            page = prometheus_page(c)
            promtool_clean(page)
            assert 'compute_ctl_cplane_requests_total{rpc="GetConfig",http_status="401 Unauthorized"} 1' in page
            assert not os.path.exists(os.path.join(c.runtime_dir, "jwks.json"))  # fails closed
            assert c.request("POST", "/terminate")[0] in (400, 401, 403)


def test_v2_pull_mode_explicit_jwks_wins_over_the_answers(keys):
    ed, _rs, jwks = keys
    c = Compute()
    mine = c.use_jwks(jwks)
    with ControlPlanePeer(c.new_spec(), jwks={"keys": []}) as cp:  # the answer's would refuse every token
        c.args += ["-i", "compute-1", "-p", cp.url]
        with c:
            c.wait_status("running")
            assert launch_settings(c)["jwks_path"] == mine
            assert not os.path.exists(os.path.join(c.runtime_dir, "jwks.json"))
            assert f"--jwks {mine} given: the control plane's compute_ctl_config.jwks will not be used" in c.output()
            code, body = c.request("POST", "/configure", {"spec": c.new_spec()}, headers=token(ed, "compute-1"))
            assert code == 200, body


def test_pull_mode_without_compute_id_is_a_usage_error():
    c = Compute()
    c.args = ["-p", "http://127.0.0.1:1"]
    with c:
        assert c.wait_exit(30) == 2
        assert "requires -i/--compute-id" in c.output() and not os.path.exists(c.runtime_dir)


def test_the_2023_path_stays_reachable_by_flag():
    c = Compute()
    with ControlPlanePeer(c.new_spec(), jwt="raw-token") as cp:
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env = {"NEON_CONTROL_PLANE_TOKEN": "raw-token"}
        with c:
            c.wait_status("running")
            assert cp.requests[0].api == "2023" and cp.requests[0].headers["Authorization"] == "raw-token"
            assert launch_settings(c)["jwks_path"] is None  # the 2023 answer carries no JWKS
            assert 'http_status="200 OK"} 1' in prometheus_page(c)
