"""Launching as Neon's compute_ctl at HEAD launches (issue 18, items 1 and 4), without a process:
the flags and their conflicts, the `-c` config file's shape, where the JWKS goes, the v2 pull
protocol against the control-plane peer (route, Bearer, answer, HEAD's retry rule), and
`compute_ctl_cplane_requests_total`. The booted tree: tests/e2e/test_e2e_launch.py."""

from __future__ import annotations

import argparse
import json
import os
import stat
import threading

import pytest

from compute.boot import cli
from compute.model.compute_config import (MAX_JWKS_KEYS, AttachedWithoutSpec, ConfigError, parse_compute_config,
                                          parse_pull_answer)
from compute.model.launch import LaunchSettings, default
from compute.shared.jwks_file import jwks_path, write_jwks
from compute.storage.control_plane import (V2_RETRY, ControlPlaneError, fetch_config, http_status_label, spec_url)
from tests.peers.control_plane import ControlPlanePeer
from tests.support.api_helpers import client_for, make_state, parse_prometheus, rt

__all__ = ["rt"]

SPEC = {"format_version": 1.0, "cluster": {"roles": [], "databases": []}}
JWKS = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                  "alg": "EdDSA", "use": "sig", "key_ops": ["verify"], "kid": "k1"}]}
TOKEN = "cp-token.abc.def"
BASE = ["-D", "/d", "-C", "postgresql://cloud_admin@127.0.0.1:5432/postgres"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = cli.build_parser()
    args = p.parse_args(argv)
    cli.resolve_ports(p, args)
    cli.check_conflicts(p, args)
    return args


# -- flags ------------------------------------------------------------------------------------

def test_neon_local_argv_parses():
    """endpoint.rs's exact argv (control_plane/src/endpoint.rs, `start`)."""
    args = parse(["--external-http-port", "10001", "--internal-http-port", "10002", "--pgdata", "/d",
                  "--connstr", "postgresql://cloud_admin@127.0.0.1:10000/postgres", "--config", "/e/config.json",
                  "--pgbin", "/pg/bin/postgres", "--compute-id", "ep-1", "--remote-ext-base-url", "http://ext",
                  "--dev", "--privileged-role-name", "neon_superuser"])
    assert (args.http_port, args.internal_http_port, args.config, args.compute_id) == (10001, 10002,
                                                                                        "/e/config.json", "ep-1")
    assert args.internal_http_port_given
    cli.validate_flags(args)  # -c alone is a spec source; -i is fine without -p
    lines = cli.ignored_flag_lines(args)
    assert len(lines) == 3 and all(" ignored: " in line for line in lines)


def test_port_defaults_and_the_http_port_alias():
    args = parse(BASE + ["-S", "s.json"])
    assert (args.http_port, args.internal_http_port) == (3080, 3081) == (default("http_port"),
                                                                         default("internal_http_port"))
    assert parse(BASE + ["--http-port", "4000"]).http_port == 4000
    assert parse(BASE + ["--external-http-port", "4001"]).http_port == 4001


@pytest.mark.parametrize("argv", [
    ["--http-port", "1", "--external-http-port", "2"],
    ["--http-port", "1", "--internal-http-port", "2"],
    ["-c", "f", "-p", "http://cp", "-i", "x"],
    ["-p", "http://cp"],                                      # -p requires -i
    ["--external-http-port", "0"], ["--internal-http-port", "70000"],
    ["-r", "http://ext?x=1"], ["-r", "no-scheme"],
    ["--privileged-role-name", "NeonSuperuser"], ["--privileged-role-name", "$'x"], ["--privileged-role-name", ""],
    ["--lakebase-mode", "yes"], ["--lakebase-mode"], ["--pg-init-timeout", "-1"],
    ["--installed-extensions-collection-interval", "1.5"],
])
def test_conflicts_and_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(BASE + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


@pytest.mark.parametrize("argv,message", [
    ([], "exactly one spec source"), (["-c", "f", "-S", "s"], "exactly one spec source"),
    (["-s", "{}", "-i", "x", "-p", "http://cp"], "exactly one spec source"),
    (["-S", "s", "-i", ""], "-i/--compute-id must not be empty"),
    (["-S", "s", "--external-http-port", "4000", "--internal-http-port", "4000"], "must differ"),
])
def test_flag_combinations_refused_in_one_line(argv, message):
    with pytest.raises(cli.UsageError, match=message):
        cli.validate_flags(parse(BASE + argv))


def test_every_ignored_flag_is_accepted_with_heads_syntax_and_logs_one_line():
    argv = ["-r", "https://example.com//", "--privileged-role-name", "my_superuser", "--cgroup", "g",
            "--filecache-connstr", "host=x password=secret", "--vm-monitor-addr", "0.0.0.0:1",
            "--resize-swap-on-bind", "--set-disk-quota-for-fs", "/fs",
            "--installed-extensions-collection-interval", "60", "--dev", "--pg-init-timeout", "5",
            "--lakebase-mode", "true"]
    args = parse(BASE + argv)
    assert args.remote_ext_base_url == "https://example.com/"
    lines = cli.ignored_flag_lines(args)
    assert len(lines) == len(cli.IGNORED_FLAGS) == 11
    assert not any("secret" in line for line in lines)  # values are never logged
    assert cli.ignored_flag_lines(parse(BASE)) == []
    assert parse(BASE + ["--lakebase-mode", "false"]).lakebase_mode is False  # given: still one line
    assert len(cli.ignored_flag_lines(parse(BASE + ["--lakebase-mode", "false"]))) == 1


def test_pgbin_default_from_postgres_path(monkeypatch):
    monkeypatch.setenv("POSTGRES_PATH", "/opt/pg/bin/postgres")
    assert parse(BASE).pgbin == "/opt/pg/bin/postgres"
    assert parse(BASE + ["-b", "/other"]).pgbin == "/other"  # the flag wins
    monkeypatch.setenv("POSTGRES_PATH", "")
    assert parse(BASE).pgbin == default("pgbin")


def test_help_documents_the_head_flags():
    text = cli.build_parser().format_help()
    for flag in ("--config", "--external-http-port", "--internal-http-port", "--control-plane-api",
                 "--remote-ext-base-url", "--lakebase-mode", "POSTGRES_PATH"):
        assert flag in text


def test_launch_settings_carry_the_new_fields():
    s = LaunchSettings(pgdata="/d", connstr="c", superuser="u", runtime_dir="/r", internal_http_port=4001,
                       control_plane_api="2023")
    assert LaunchSettings.from_json(json.loads(json.dumps(s.to_json()))) == s


# -- the config file --------------------------------------------------------------------------

def test_config_file_shape():
    c = parse_compute_config({"spec": SPEC, "compute_ctl_config": {"jwks": JWKS, "tls": None}, "extra": 1})
    assert c.spec == SPEC and c.compute_ctl_config.jwks == JWKS and c.compute_ctl_config.tls is None
    assert parse_compute_config({"spec": None, "compute_ctl_config": {"jwks": {"keys": []}}}).spec is None
    assert parse_compute_config({"compute_ctl_config": {"jwks": {"keys": []}}}).spec is None  # Option: may be left out
    tls = parse_compute_config({"compute_ctl_config": {"jwks": {"keys": []},
                                                        "tls": {"key_path": "k", "cert_path": "c"}}})
    assert tls.compute_ctl_config.tls == {"key_path": "k", "cert_path": "c"}


@pytest.mark.parametrize("doc,field", [
    ([], "<document>"), ("x", "<document>"), ({"spec": SPEC}, "compute_ctl_config"),
    ({"spec": [], "compute_ctl_config": {"jwks": {"keys": []}}}, "spec"),
    ({"compute_ctl_config": None}, "compute_ctl_config"), ({"compute_ctl_config": {}}, "compute_ctl_config.jwks"),
    ({"compute_ctl_config": {"jwks": []}}, "compute_ctl_config.jwks"),
    ({"compute_ctl_config": {"jwks": {"keys": {}}}}, "compute_ctl_config.jwks"),
    ({"compute_ctl_config": {"jwks": {"keys": ["k"]}}}, "compute_ctl_config.jwks.keys[0]"),
    ({"compute_ctl_config": {"jwks": {"keys": [{}] * (MAX_JWKS_KEYS + 1)}}}, "compute_ctl_config.jwks.keys"),
    ({"compute_ctl_config": {"jwks": {"keys": [{"x": "A" * 100_000}]}}}, "compute_ctl_config.jwks.keys[0].x"),
    ({"compute_ctl_config": {"jwks": {"keys": []}, "tls": {"key_path": 1}}}, "compute_ctl_config.tls"),
    ({"compute_ctl_config": {"jwks": {"keys": [{f"f{n}": 1 for n in range(40)}]}}}, "compute_ctl_config.jwks.keys[0]"),
    ({"compute_ctl_config": {"jwks": {"keys": [{"x5c": [[["deep"]]]}]}}}, "compute_ctl_config.jwks.keys[0].x5c"),
    ({"compute_ctl_config": {"jwks": {"keys": [{"x5c": ["a"] * 40}]}}}, "compute_ctl_config.jwks.keys[0].x5c"),
    ({"compute_ctl_config": {"jwks": {"keys": [{"kid": {"a": 1}}]}}}, "compute_ctl_config.jwks.keys[0].kid"),
    ({"compute_ctl_config": {"jwks": {"keys": [{"k" * 65: "v"}]}}}, "compute_ctl_config.jwks.keys[0]"),
])
def test_hostile_config_documents_are_one_line_errors(doc, field):
    with pytest.raises(ConfigError) as e:
        parse_compute_config(doc)
    assert e.value.field == field and "\n" not in str(e.value)


def test_validate_reads_the_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"spec": SPEC, "compute_ctl_config": {"jwks": JWKS}}))
    doc, spec, superuser, ctl = cli.validate(parse(BASE + ["-c", str(path)]))
    assert spec is not None and doc is not None and superuser == "cloud_admin" and ctl.jwks == JWKS
    path.write_text(json.dumps({"spec": None, "compute_ctl_config": {"jwks": JWKS}}))
    assert cli.validate(parse(BASE + ["-c", str(path)]))[:2] == (None, None)


@pytest.mark.parametrize("text,message", [
    ("{", "not valid JSON"), ("[]", "invalid config: <document>"),
    (json.dumps({"spec": {"format_version": 2.0, "cluster": {}}, "compute_ctl_config": {"jwks": {"keys": []}}}),
     "invalid spec: format_version"),
    ('{"compute_ctl_config": ' + "[" * 200_000 + "]" * 200_000 + "}", "not valid JSON"),  # too deep
    (json.dumps({"spec": {"format_version": 1.0, "cluster": {"roles": [{"name": "x\x00"}]}},
                 "compute_ctl_config": {"jwks": {"keys": []}}}), "invalid spec: cluster.roles[0]"),
])
def test_invalid_config_file_is_refused_before_anything(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.validate(parse(BASE + ["-c", str(path)]))


def test_oversized_config_file_is_refused(tmp_path):
    from compute.model.spec import MAX_SPEC_BYTES
    path = tmp_path / "config.json"
    with open(path, "w") as f:
        f.write('{"compute_ctl_config": {"jwks": {"keys": []}}, "pad": "')
        f.write("x" * (MAX_SPEC_BYTES + 10))
        f.write('"}')
    with pytest.raises(ValueError, match="larger than"):
        cli.validate(parse(BASE + ["-c", str(path)]))


# -- where the JWKS goes ----------------------------------------------------------------------

def _ctl(jwks):
    return parse_compute_config({"compute_ctl_config": {"jwks": jwks}}).compute_ctl_config


def test_choose_jwks():
    run = "/run/c"
    assert cli.choose_jwks(parse(BASE + ["-c", "f"]), run, _ctl(JWKS)) == (jwks_path(run), JWKS, None)
    path, written, note = cli.choose_jwks(parse(BASE + ["-c", "f", "--jwks", "/k.json"]), run, _ctl(JWKS))
    assert (path, written) == ("/k.json", None) and "--jwks /k.json given" in note
    assert cli.choose_jwks(parse(BASE + ["-i", "x", "-p", "http://cp"]), run, None) == (jwks_path(run), None, None)
    assert cli.choose_jwks(parse(BASE + ["-i", "x", "-p", "http://cp", "--control-plane-api", "2023"]), run,
                           None) == (None, None, None)
    assert cli.choose_jwks(parse(BASE + ["-S", "s"]), run, None) == (None, None, None)


@pytest.mark.parametrize("argv,known", [
    (["-S", "s", "--jwks", "/k.json"], True),                           # --jwks: known at once
    (["-c", "f", "--jwks", "/k.json"], True),                           # ... whatever -c holds
    (["-i", "x", "-p", "http://cp", "--jwks", "/k.json"], True),        # ... or the pull answer
    (["-c", "f"], None),                                                # -c's file not read yet
    (["-i", "x", "-p", "http://cp"], None),                             # v2 answer not fetched yet
    (["-i", "x", "-p", "http://cp", "--control-plane-api", "2023"], None),
    (["-S", "s"], False), (["-s", "{}"], False),                        # nothing can bring one
])
def test_early_jwks(argv, known):
    """The early responder's "JWKS known?" before the spec source is read: True, None or False."""
    assert cli.early_jwks(parse(BASE + argv)) is known


def test_jwks_file_is_private_and_replaced_atomically(tmp_path):
    path = str(tmp_path / "jwks.json")
    old = os.umask(0o000)  # the most permissive umask: the file is 0600 all the same
    try:
        write_jwks(path, JWKS)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.load(open(path)) == JWKS
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            with open(path) as f:
                seen.append(json.load(f))  # never a torn file
    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        write_jwks(path, {"keys": [{"kid": str(i)}]})
    stop.set()
    t.join()
    assert seen and all(isinstance(d, dict) and "keys" in d for d in seen)
    assert sorted(os.listdir(tmp_path)) == ["jwks.json"]  # no temporary file left behind


def test_jwks_file_never_follows_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    path = tmp_path / "jwks.json"
    os.symlink(victim, tmp_path / f".jwks.json.{os.getpid()}.tmp")
    write_jwks(str(path), JWKS)  # the leftover name is removed, not followed
    assert victim.read_text() == "mine" and json.load(open(path)) == JWKS


# -- pull mode, v2 ----------------------------------------------------------------------------

def test_v2_route_bearer_and_answer():
    with ControlPlanePeer(SPEC, compute_id="ep-1", jwt=TOKEN, jwks=JWKS) as cp:
        seen = []
        config = fetch_config(cp.url, "ep-1", TOKEN, on_request=seen.append)
        assert config.spec == SPEC and config.compute_ctl_config.jwks == JWKS
        (req,) = cp.requests
        assert req.path == "/compute/api/v2/computes/ep-1/spec" and req.api == "v2"
        assert req.headers["Authorization"] == f"Bearer {TOKEN}"
        assert seen == ["200 OK"]


def test_v2_empty_answer_has_no_spec_but_its_jwks():
    with ControlPlanePeer(None, jwks=JWKS) as cp:
        config = fetch_config(cp.url, "c", None)
        assert config.spec is None and config.compute_ctl_config.jwks == JWKS
        assert "Authorization" not in cp.requests[0].headers
    with ControlPlanePeer(SPEC, answer_status="empty") as cp:  # empty: whatever `spec` holds
        assert fetch_config(cp.url, "c", None).spec is None


@pytest.mark.parametrize("sent", [None, "wrong", f"Bearer {TOKEN}"])
def test_v2_wrong_or_missing_bearer_is_refused_at_once(sent):
    with ControlPlanePeer(SPEC, jwt=TOKEN) as cp:
        seen = []
        with pytest.raises(ControlPlaneError, match="HTTP 401") as e:
            fetch_config(cp.url, "c", sent, on_request=seen.append)  # "Bearer Bearer ...": wrong too
        assert len(cp.requests) == 1 and seen == ["401 Unauthorized"]
        assert TOKEN not in str(e.value)


def test_v2_retry_rule_is_heads():
    """3 attempts, 100 ms apart; 502, 503, network errors and an undecodable 200 are retried."""
    assert (V2_RETRY.attempts, V2_RETRY.delay_after(1), V2_RETRY.delay_after(2), V2_RETRY.delay_after(3)) == (
        3, 0.1, 0.1, None)
    with ControlPlanePeer(SPEC, fail_first=2, fail_status=502) as cp:
        seen = []
        assert fetch_config(cp.url, "c", None, on_request=seen.append).spec == SPEC
        assert seen == ["502 Bad Gateway", "502 Bad Gateway", "200 OK"]
    with ControlPlanePeer(SPEC, fail_first=5) as cp:
        seen = []
        with pytest.raises(ControlPlaneError, match="after 3 attempt"):
            fetch_config(cp.url, "c", None, on_request=seen.append)
        assert seen == ["503 Service Unavailable"] * 3
    with ControlPlanePeer(SPEC, drop_first=2) as cp:
        seen = []
        assert fetch_config(cp.url, "c", None, on_request=seen.append).spec == SPEC
        assert seen == ["unknown", "unknown", "200 OK"]
    with ControlPlanePeer(SPEC, raw_body=b'{"status": "attached", "spec": {}}') as cp:  # no compute_ctl_config
        seen = []
        with pytest.raises(ControlPlaneError, match="after 3 attempt.*compute_ctl_config"):
            fetch_config(cp.url, "c", None, on_request=seen.append)
        assert seen == ["200 OK"] * 3


@pytest.mark.parametrize("status", [404, 500, 401])
def test_v2_other_codes_fail_at_once(status):
    with ControlPlanePeer(SPEC, status=status) as cp:
        with pytest.raises(ControlPlaneError, match=f"HTTP {status}"):
            fetch_config(cp.url, "c", None)
        assert len(cp.requests) == 1


def test_v2_attached_without_spec_is_not_retried():
    body = json.dumps({"status": "attached", "spec": None, "compute_ctl_config": {"jwks": {"keys": []}}}).encode()
    with ControlPlanePeer(None, raw_body=body) as cp:
        with pytest.raises(ControlPlaneError, match="compute is attached, but spec is empty"):
            fetch_config(cp.url, "c", None)
        assert len(cp.requests) == 1
    with pytest.raises(AttachedWithoutSpec):
        parse_pull_answer({"status": "attached", "compute_ctl_config": {"jwks": {"keys": []}}})


def test_the_2023_path_stays_reachable():
    with ControlPlanePeer(SPEC, jwt=TOKEN) as cp:
        config = fetch_config(cp.url, "c", TOKEN, api="2023")
        assert config.spec == SPEC and config.compute_ctl_config is None
        assert cp.requests[0].api == "2023" and cp.requests[0].headers["Authorization"] == TOKEN
    assert spec_url("http://cp/", "a b", "v2") == "http://cp/compute/api/v2/computes/a%20b/spec"


def test_http_status_labels_are_heads():
    assert [http_status_label(s) for s in (200, 503, 502, 404, None, 599)] == [
        "200 OK", "503 Service Unavailable", "502 Bad Gateway", "404 Not Found", "unknown",
        "599 <unknown status code>"]


# -- the metric -------------------------------------------------------------------------------

def test_cplane_requests_counted_and_exported(rt):
    from compute.lifecycle.driver import count_cplane_request
    store = make_state(rt, status="init")
    r = client_for(rt).simulate_get("/metrics")
    assert "compute_ctl_cplane_requests_total" not in r.text  # no request made: no sample, as HEAD
    for label in ("503 Service Unavailable", "200 OK", "503 Service Unavailable"):
        count_cplane_request(store, "GetConfig", label)
    r = client_for(rt).simulate_get("/metrics")
    s = parse_prometheus(r.text)
    assert s['compute_ctl_cplane_requests_total{rpc="GetConfig",http_status="503 Service Unavailable"}'] == 2
    assert s['compute_ctl_cplane_requests_total{rpc="GetConfig",http_status="200 OK"}'] == 1
    assert "# TYPE compute_ctl_cplane_requests_total counter" in r.text
