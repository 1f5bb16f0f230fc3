"""What the warm image holds (compute/warmfork.py): PyJWT + cryptography (~8 MiB of private
pages in compute-ctl alone) only for a compute started with --jwks, and auth still verifying
tokens when it is."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jwt
import pytest

from compute.settings import Settings
from compute.state import StateStore, state_path
from compute.warmfork import JWT_MODULES, WARM_MODULES, jwks_configured, warm_modules
from tests.support.api_helpers import jwks_keys
from tests.support.fault_tree import tree
from tests.support.tree import Compute

CRYPTO_EXTENSION = "cryptography/hazmat/bindings/_rust"


def test_warm_modules_import_pyjwt_only_with_a_jwks():
    assert warm_modules(False) == WARM_MODULES
    assert not any(m.startswith("jwt") or m.startswith("cryptography") for m in WARM_MODULES)
    assert warm_modules(True) == WARM_MODULES + JWT_MODULES


def _settings(tmp_path, jwks_path):
    return Settings(pgdata=str(tmp_path / "pgdata"), connstr="postgresql://x@127.0.0.1/postgres",
                    pgbin="/usr/bin/postgres", pgbin_dir="/usr/bin", superuser="cloud_admin",
                    runtime_dir=str(tmp_path), jwks_path=jwks_path)


def test_jwks_configured_reads_the_settings_and_creates_nothing(tmp_path):
    assert jwks_configured(None) is False
    assert jwks_configured(str(tmp_path)) is False
    assert not os.path.exists(state_path(str(tmp_path)))  # no store conjured up by asking
    StateStore.create(state_path(str(tmp_path)), {"launch": _settings(tmp_path, None).to_json()})
    assert jwks_configured(str(tmp_path)) is False
    StateStore(state_path(str(tmp_path))).set(launch=_settings(tmp_path, "/etc/jwks.json").to_json())
    assert jwks_configured(str(tmp_path)) is True


def test_jwks_configured_on_a_store_without_settings_or_garbage(tmp_path):
    StateStore.create(state_path(str(tmp_path)), {"status": "init"})
    assert jwks_configured(str(tmp_path)) is False  # the bootstrap has not written them yet
    with open(state_path(str(tmp_path)), "r+b") as f:
        f.write(b"not a database at all" * 100)
    assert jwks_configured(str(tmp_path)) is False  # the programs report a bad store themselves


def test_the_api_imports_no_pyjwt_until_a_jwks_is_used():
    code = ("import sys, compute.api.app, compute.lifecycle, compute.monitor, compute.supervisord_main\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jwt', 'cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _maps_hold(pid: int, needle: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return needle in f.read()


def _wait_for_workers(c: Compute, deadline_s: float = 30) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        workers = [p.pid for role, p in tree(c.proc.pid) if role == "api worker"]
        if workers:
            return workers
        time.sleep(0.1)
    raise AssertionError("no api worker")


@pytest.mark.e2e
def test_a_tree_without_jwks_never_loads_cryptography():
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        c.wait_handed_over()
        code, _ = c.request("GET", "/dbs_and_roles")  # an auth_required route: open without --jwks
        assert code == 200
        procs = [(role, p.pid) for role, p in tree(c.proc.pid) if role != "postgres"]
        assert {"compute-ctl", "lifecycle", "monitor", "api master", "api worker"} <= {r for r, _ in procs}
        assert [r for r, pid in procs if _maps_hold(pid, CRYPTO_EXTENSION)] == []


@pytest.mark.e2e
def test_a_tree_with_jwks_has_pyjwt_in_its_warm_image_and_verifies_tokens():
    ed, rs, jwks = jwks_keys()
    c = Compute()
    c.spec = c.new_spec()
    c.use_jwks(jwks)
    with c:
        c.wait_status("running")
        # Imported before the first fork: shared by every program, not loaded per worker.
        assert _maps_hold(c.proc.pid, CRYPTO_EXTENSION)
        workers = _wait_for_workers(c)
        good = jwt.encode({"sub": "cp", "exp": time.time() + 300}, ed, algorithm="EdDSA", headers={"kid": "ed"})
        good_rs = jwt.encode({"sub": "cp", "exp": time.time() + 300}, rs, algorithm="RS256", headers={"kid": "rs"})
        expired = jwt.encode({"sub": "cp", "exp": time.time() - 60}, ed, algorithm="EdDSA", headers={"kid": "ed"})
        no_exp = jwt.encode({"sub": "cp"}, ed, algorithm="EdDSA", headers={"kid": "ed"})
        forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        assert c.request("GET", "/dbs_and_roles")[0] == 401
        for bad in (expired, no_exp, forged, "not.a.token"):
            assert c.request("GET", "/dbs_and_roles", headers={"Authorization": f"Bearer {bad}"})[0] == 401, bad
        for token in (good, good_rs):
            assert c.request("GET", "/dbs_and_roles", headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert c.request("GET", "/status")[0] == 200  # open routes stay open
        assert all(_maps_hold(pid, CRYPTO_EXTENSION) for pid in workers)


def test_the_api_master_freezes_its_objects_before_forking_a_worker(tmp_path, monkeypatch):
    """What the master made after its own fork (the app, the config) is out of the workers'
    collections (gunicorn's pre_fork hook): a full collection in a worker never copies it."""
    import gc
    import importlib

    StateStore.create(state_path(str(tmp_path)), {"launch": _settings(tmp_path, None).to_json()})
    monkeypatch.setenv("COMPUTE_RUNTIME_DIR", str(tmp_path))
    conf = importlib.import_module("compute.api.gunicorn_conf")
    made_by_the_master = [{"route": i} for i in range(1000)]
    try:
        before = gc.get_freeze_count()
        conf.pre_fork(None, None)
        assert gc.get_freeze_count() >= before + len(made_by_the_master)
        assert not any(o is made_by_the_master for o in gc.get_objects())  # no collection walks it
    finally:
        gc.unfreeze()


def test_bench_footprint_summary_and_own_process_figures():
    from bench.footprint import private_kib, summary, threads

    runs = [{"total_pss_mib": v, "total_private_mib": v / 2,
             "after_load": {"total_pss_mib": v + 10, "total_private_mib": v / 2 + 5}} for v in (84.5, 84.1, 90.0)]
    s = summary(runs)
    assert s["runs"] == 3
    assert s["idle_pss_mib"] == {"median": 84.5, "min": 84.1, "max": 90.0}
    assert s["after_load_pss_mib"] == {"median": 94.5, "min": 94.1, "max": 100.0}
    assert "after_load_pss_mib" not in summary([{"total_pss_mib": 1.0, "total_private_mib": 0.5}])
    assert private_kib(os.getpid()) > 0 and threads(os.getpid()) >= 1
    assert private_kib(2 ** 22 + 1) is None  # no such process (above pid_max)


def test_bench_cow_classifies_a_page_by_who_has_the_same_bytes():
    """bench.cow's verdict for one page (the diagnostic's fork measurement is not a test: on
    this VM a loaded CI run sorted 29 of 127 rewritten pages elsewhere, cause not found)."""
    from bench.cow import classify

    assert classify(b"a", None, []) == "ctl-none"
    assert classify(b"a", b"a", [b"b"]) == "=ctl"
    assert classify(b"a", b"b", [None, b"a"]) == "=other-child"
    assert classify(b"a", b"b", [b"c"]) == "unique"


def _holds_open(pid: int, suffix: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).endswith(suffix):
                return True
        except FileNotFoundError:
            pass
    return False


@pytest.mark.e2e
def test_an_idle_tree_keeps_its_programs_light():
    """The monitor's session is on the unix socket (peer: no SCRAM, no OpenSSL in it); the
    driver after the hand-over sleeps with nothing open (its look at the state file is made in
    a short-lived child)."""
    import psycopg
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        driver = c.wait_handed_over()
        with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while True:
                rows = conn.execute("SELECT client_addr IS NULL FROM pg_stat_activity"
                                    " WHERE application_name = 'compute_ctl:activity_monitor'").fetchall()
                if rows or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert rows == [(True,)], rows
        assert not _holds_open(driver, "state.db")
        # it still wakes for a /configure: tests/test_e2e_configure.py (pull mode), after each
        # hand-over, and tests/test_fault_kill.py -k lifecycle (an interrupted one is resumed)
