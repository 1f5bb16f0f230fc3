"""What the warm image holds (compute/tree/warmfork.py): PyJWT + cryptography (~8 MiB of private
pages in compute-ctl alone) only for a compute started with --jwks, and auth still verifying
tokens when it is.

This file: in-process; a child interpreter: tests/integration/test_footprint.py; booted trees:
tests/e2e/test_footprint.py."""

from __future__ import annotations

import os

from compute.model.launch import LaunchSettings
from compute.shared.state import StateStore, state_path
from compute.tree.warmfork import JWT_MODULES, WARM_MODULES, jwks_configured, warm_modules


def test_warm_modules_import_pyjwt_only_with_a_jwks():
    assert warm_modules(False) == WARM_MODULES
    assert not any(m.startswith("jwt") or m.startswith("cryptography") for m in WARM_MODULES)
    assert warm_modules(True) == WARM_MODULES + JWT_MODULES


def _settings(tmp_path, jwks_path):
    return LaunchSettings(pgdata=str(tmp_path / "pgdata"), connstr="postgresql://x@127.0.0.1/postgres",
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
