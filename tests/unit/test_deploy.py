"""The Kubernetes example is well formed and probes routes that exist; valid for Kubernetes
(kubernetes-validate --strict, as a library), hardened as the image allows (Dockerfile) and
self-consistent (issue 20, item 3). What a real kubelet would do with it is not checked here:
scripts/test-image runs the image as this pod runs it, under podman (docs/operations.md)."""

import json
import os
import re

import falcon.testing
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from compute.model.spec import parse_spec
from compute.shared.state import StateStore
from tests.support.installed import REPO as ROOT


def load(name="compute.yaml"):
    with open(os.path.join(ROOT, "deploy", name)) as f:
        return {d["kind"]: d for d in yaml.safe_load_all(f)}


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def container():
    return load()["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]


def test_manifest_structure():
    docs = load()
    assert set(docs) == {"ConfigMap", "Secret", "StatefulSet", "Service"}
    # the Prometheus Operator's kind apart: `kubectl apply` of it fails where that operator is not
    assert set(load("servicemonitor.yaml")) == {"ServiceMonitor"}
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


def test_the_wrappers_metrics_are_scraped_and_the_exporter_only_with_an_image_that_has_it():
    docs, c = load(), container()
    args = c["args"]
    # The default image is built without prometheus-postgres-exporter: no --postgres-exporter,
    # no port 9187 (deploy/compute.yaml and deploy/servicemonitor.yaml say how to add them).
    assert re.search(r"^ARG WITH_POSTGRES_EXPORTER=0$", read("Dockerfile"), re.M)
    assert "--postgres-exporter" not in args and "--postgres-exporter-port" not in args
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 3080 and 9187 not in ports.values()
    service_ports = {p["name"]: p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
    monitor = load("servicemonitor.yaml")["ServiceMonitor"]
    scraped = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert scraped == {"http"} and all(service_ports[p] in ports for p in scraped)
    assert monitor["spec"]["selector"]["matchLabels"] == docs["Service"]["metadata"]["labels"]
    # The compute-ctl parser accepts these args.
    from compute.boot.cli import build_parser
    build_parser().parse_args(args)


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


# -- valid for Kubernetes, hardened, self-consistent (issue 20, item 3) -----------------------

def all_docs():
    return [d for name in ("compute.yaml", "servicemonitor.yaml") for d in load(name).values()]


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "Service", "StatefulSet"])
def test_every_resource_validates_strictly(kind):
    # raises on anything the schema does not know (strict: unexpected fields too)
    kubernetes_validate.validate(load()[kind], latest_version(), strict=True)


def test_strict_validation_would_catch_a_misplaced_field():
    bad = load()["StatefulSet"]
    bad["spec"]["template"]["spec"]["securityContext"]["readOnlyRootFilesystem"] = True  # container-level only
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, latest_version(), strict=True)


def test_the_pod_runs_the_images_numeric_user_hardened():
    user = re.search(r"^USER\s+(\S+)", read("Dockerfile"), re.M).group(1)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and uid != "0", f"the image's USER {user!r} must be a number (runAsNonRoot)"
    pod = load()["StatefulSet"]["spec"]["template"]["spec"]
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == int(uid) and ctx["runAsGroup"] == int(gid or uid)
    assert "fsGroupChangePolicy" not in ctx or "fsGroup" in ctx  # meaningless without fsGroup
    assert ctx["fsGroup"] == int(gid or uid) and ctx["fsGroupChangePolicy"] == "OnRootMismatch"
    sc = container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_pgdata_the_runtime_dir_and_the_socket_are_on_the_pods_volumes():
    """The root filesystem is read-only: everything compute-ctl and postgres write is on a
    volume, PGDATA and the runtime dir strictly inside its mount point (which stays the
    kubelet's, root's: compute/boot/paths.py)."""
    docs, c = load(), container()
    volumes = {v["name"]: v for v in docs["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    writable = [p for p, m in mounts.items() if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    args = c["args"]
    settings = {s["name"]: s["value"]
                for s in json.loads(docs["ConfigMap"]["data"]["spec.json"])["cluster"]["settings"]}
    for flag in ("-D", "--runtime-dir"):
        path = args[args.index(flag) + 1]
        assert any(path.startswith(w.rstrip("/") + "/") for w in writable), (flag, path)
    assert settings["unix_socket_directories"] in writable
    spec_path = args[args.index("-S") + 1]
    assert mounts[spec_path]["readOnly"] is True


def test_the_service_it_names_exists_and_the_ports_it_uses_are_declared():
    docs, c = load(), container()
    sts = docs["StatefulSet"]
    svc = docs["Service"]
    assert svc["metadata"]["name"] == sts["spec"]["serviceName"]
    assert svc["spec"]["clusterIP"] == "None"  # a StatefulSet's governing Service is headless
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    names = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in names

