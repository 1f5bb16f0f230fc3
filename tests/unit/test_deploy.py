"""The Kubernetes example is well formed and probes routes that exist."""

import json
import os

import falcon.testing
import yaml

from compute.model.spec import parse_spec
from compute.shared.state import StateStore
from tests.support.installed import REPO as ROOT


def load():
    with open(os.path.join(ROOT, "deploy", "compute.yaml")) as f:
        return {d["kind"]: d for d in yaml.safe_load_all(f)}


def container():
    return load()["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]


def test_manifest_structure():
    docs = load()
    assert set(docs) == {"ConfigMap", "Secret", "StatefulSet", "Service", "ServiceMonitor"}
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 3080)
    assert c["livenessProbe"]["httpGet"]["path"] != c["readinessProbe"]["httpGet"]["path"]
    assert c["resources"]["limits"]["memory"]
    # The spec in the ConfigMap is valid and mounted where the args point.
    parse_spec(json.loads(docs["ConfigMap"]["data"]["spec.json"]), superuser="cloud_admin")
    spec_path = c["args"][c["args"].index("-S") + 1]
    assert any(m["mountPath"] == spec_path for m in c["volumeMounts"])


def test_token_from_secret_in_env_not_args():
    c = container()
    env = {e["name"]: e for e in c["env"]}
    assert env["NEON_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "compute-storage-token"
    assert not any("token" in a.lower() for a in c["args"])


def test_probe_paths_exist_in_the_api(tmp_path):
    from compute.api.app import create_app
    StateStore.create(str(tmp_path / "state.db"), {
        "launch": {"pgdata": str(tmp_path), "connstr": "postgresql://cloud_admin@127.0.0.1:1/postgres",
                   "superuser": "cloud_admin", "runtime_dir": str(tmp_path),
                   "http_port": 3080, "jwks_path": None, "compute_id": None},
        "status": "init", "start_time": 0.0})
    client = falcon.testing.TestClient(create_app(str(tmp_path)))
    c = container()
    assert client.simulate_get(c["livenessProbe"]["httpGet"]["path"]).status_code == 200
    assert client.simulate_get(c["startupProbe"]["httpGet"]["path"]).status_code == 200
    # Not running yet: not ready, but the route exists.
    assert client.simulate_get(c["readinessProbe"]["httpGet"]["path"]).status_code == 503


def test_both_metrics_endpoints_are_scraped():
    docs, c = load(), container()
    args = c["args"]
    exporter_port = int(args[args.index("--postgres-exporter-port") + 1])
    assert args[args.index("--postgres-exporter") + 1] == "/usr/bin/prometheus-postgres-exporter"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["pg-metrics"] == exporter_port and ports["http"] == 3080
    service_ports = {p["name"]: p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
    scraped = {e["port"] for e in docs["ServiceMonitor"]["spec"]["endpoints"]}
    assert scraped == {"http", "pg-metrics"} and all(service_ports[p] in ports for p in scraped)
    assert docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"] == docs["Service"]["metadata"]["labels"]
    # The compute-ctl parser accepts these args.
    from compute.boot.cli import build_parser
    parsed = build_parser().parse_args(args)
    assert parsed.postgres_exporter_port == exporter_port


def test_the_docs_give_the_probes_of_the_manifest():
    """docs/api.md's probes are the manifest's (port aside); docs/operations.md's table names the
    same route for each."""
    import re
    c = container()
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        api = f.read()
    block = re.search(r"## Kubernetes probes\n\n```yaml\n(.*?)```", api, re.S).group(1)
    documented = yaml.safe_load(block)
    probes = ("startupProbe", "livenessProbe", "readinessProbe")
    for probe in probes:
        want = {k: v for k, v in c[probe].items()}
        want["httpGet"] = {**want["httpGet"], "port": 3080}
        assert documented[probe] == want, probe
    with open(os.path.join(ROOT, "docs", "operations.md")) as f:
        ops = f.read()
    for probe in probes:
        row = re.search(rf"^\| {probe} \| `GET (\S+)` \|", ops, re.M)
        assert row is not None and row.group(1) == c[probe]["httpGet"]["path"], probe
