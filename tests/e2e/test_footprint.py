"""What the warm image holds (compute/tree/warmfork.py): PyJWT + cryptography (~8 MiB of private
pages in compute-ctl alone) only for a compute started with --jwks, and auth still verifying
tokens when it is.

This file: booted trees; the rest: tests/unit/ and tests/integration/test_footprint.py."""

from __future__ import annotations

import os
import time

import jwt

from tests.support.api_helpers import jwks_keys
from tests.support.fault_tree import tree
from tests.support.tree import Compute

CRYPTO_EXTENSION = "cryptography/hazmat/bindings/_rust"


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


def test_a_tree_without_jwks_never_loads_cryptography():
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        c.wait_handed_over()
        code, _ = c.request("GET", "/dbs_and_roles")  # a guarded route: loopback peers only without a JWKS
        assert code == 200
        procs = [(role, p.pid) for role, p in tree(c.proc.pid) if role != "postgres"]
        assert {"compute-ctl", "lifecycle", "monitor", "api master", "api worker"} <= {r for r, _ in procs}
        assert [r for r, pid in procs if _maps_hold(pid, CRYPTO_EXTENSION)] == []


def test_a_tree_with_jwks_has_pyjwt_in_its_warm_image_and_verifies_tokens():
    ed, rs, jwks = jwks_keys()
    # Admin tokens (this push-mode compute has no compute id); --jwt-require-exp: exp-less refused.
    claims = {"scope": "compute_ctl:admin", "aud": ["compute"]}
    good = jwt.encode({**claims, "exp": time.time() + 300}, ed, algorithm="EdDSA", headers={"kid": "ed"})
    c = Compute()
    c.spec = c.new_spec()
    c.use_jwks(jwks, good)
    c.args += ["--jwt-require-exp"]
    with c:
        c.wait_status("running")
        # Imported before the first fork: shared by every program, not loaded per worker.
        assert _maps_hold(c.proc.pid, CRYPTO_EXTENSION)
        workers = _wait_for_workers(c)
        good_rs = jwt.encode({**claims, "exp": time.time() + 300}, rs, algorithm="RS256", headers={"kid": "rs"})
        expired = jwt.encode({**claims, "exp": time.time() - 120}, ed, algorithm="EdDSA", headers={"kid": "ed"})
        no_exp = jwt.encode(claims, ed, algorithm="EdDSA", headers={"kid": "ed"})
        forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        assert c.request("GET", "/dbs_and_roles", headers={"Authorization": None})[0] == 400
        for bad in (expired, no_exp, forged, "not.a.token"):
            assert c.request("GET", "/dbs_and_roles", headers={"Authorization": f"Bearer {bad}"})[0] == 401, bad
        for token in (good, good_rs):
            assert c.request("GET", "/dbs_and_roles", headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert c.request("GET", "/status", headers={"Authorization": None})[0] == 400  # /status too, as HEAD
        assert c.request("GET", "/healthz", headers={"Authorization": None})[0] == 200  # probes need none
        assert all(_maps_hold(pid, CRYPTO_EXTENSION) for pid in workers)


def _holds_open(pid: int, suffix: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).endswith(suffix):
                return True
        except FileNotFoundError:
            pass
    return False


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
