"""Exit paths while the start's storage request runs early (issue 22: the lifecycle driver is
forked before supervisord's loop and adopted by it, compute/tree/early_driver.py). The early
sync-safekeepers is held open (the stand-in's FAKE_SK_GATE) so the blow lands in that phase;
nothing of the tree may be left: kill -9 of compute-ctl (gone within 5 s), SIGTERM (exit 0,
nothing left when compute-ctl exits), SIGTERM before supervisord even has its handlers (kept,
then acted on: exit 0), and a bootstrap that fails after the fork (exit != 0, nothing left)."""

from __future__ import annotations

import os
import pwd
import signal
import time

import pytest

from compute.base.trace import read
from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.exit_paths import TreeRecord, listening
from tests.support.fault_tree import tree
from tests.support.templates import templates_with
from tests.support.tree import Compute, with_neon_storage
from tests.support.waiting import wait_for

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "early-fault-token"
GONE_WITHIN = 5.0


def gated_compute(connstr: str) -> Compute:
    """A Neon-path compute whose first sync waits at the gate until the test opens it."""
    c = Compute()
    c.pgbin = write_fake_postgres(c.base)
    c.gate = os.path.join(c.base, "gate")
    open(f"{c.gate}.armed", "w").close()
    c.trace = os.path.join(c.base, "trace")
    os.close(os.open(c.trace, os.O_CREAT | os.O_WRONLY, 0o666))
    os.chmod(c.trace, 0o666)
    c.env = {"FAKE_SK_GATE": c.gate, "COMPUTE_TRACE": c.trace}
    c.spec = with_neon_storage(c.new_spec(), connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
    return c


def held_sync(c: Compute) -> int:
    """The early sync's pid, once it waits at the gate; it is the early driver's child."""
    wait_for(lambda: os.path.exists(f"{c.gate}.waiting"), 60, "the early sync at its gate", 0.005)
    with open(f"{c.gate}.waiting") as f:
        pid = int(f.read().strip())
    procs = {p.pid: p for _, p in tree(c.proc.pid)}
    sync, driver = procs[pid], procs[procs[pid].ppid]
    assert driver.comm == "lifecycle" and driver.ppid == c.proc.pid, (driver, sync)
    return pid


def assert_ports_free(c: Compute) -> None:
    assert not listening(c.http_port) and not listening(c.pg_port)


def test_kill_9_compute_ctl_during_the_early_sync(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = gated_compute(ps.connstr)
        with c:
            rec = TreeRecord(c.proc.pid)
            try:
                held_sync(c)
                rec.record()
                assert "lifecycle" in rec.roles(), rec.roles()
                t0 = time.monotonic()
                os.kill(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
                _, left = rec.wait_gone(3 * GONE_WITHIN)
                gone_after = time.monotonic() - t0
                assert left == [], f"still there {gone_after:.1f} s after kill -9 of compute-ctl: {left}"
                assert gone_after <= GONE_WITHIN, gone_after
                assert_ports_free(c)
            finally:
                rec.kill_survivors()


def test_sigterm_during_the_early_sync_is_a_clean_exit(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = gated_compute(ps.connstr)
        with c:
            rec = TreeRecord(c.proc.pid).keep_recording()
            try:
                held_sync(c)
                rec.record()
                c.signal(signal.SIGTERM)
                code = c.wait_exit(30)
                rec.stop()
                assert code == 0, c.output()[-3000:]
                assert rec.survivors() == [], f"left behind when compute-ctl exited: {rec.survivors()}"
                assert_ports_free(c)
                assert ps.sessions == []  # no basebackup was asked for
            finally:
                rec.stop()
                rec.kill_survivors()


def test_sigterm_before_supervisord_runs_is_kept_and_acted_on(bb_tar: str) -> None:
    """SIGTERM the moment the driver is forked (supervisord has no handlers yet: once, that
    killed compute-ctl outright, the driver it had forked still running): kept, handed to
    supervisord, which stops the adopted driver and its sync; exit 0, nothing left."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = gated_compute(ps.connstr)
        with c:
            rec = TreeRecord(c.proc.pid).keep_recording()
            try:
                events = lambda: [e for _, _, e in read(c.trace)]  # noqa: E731
                wait_for(lambda: "compute-ctl: lifecycle forked early" in events(), 60, "the early fork", 0.001)
                sent = time.monotonic()
                c.signal(signal.SIGTERM)
                rec.record()
                code = c.wait_exit(30)
                rec.stop()
                loop = [t for t, _, e in read(c.trace) if e == "supervisord: loop"]
                print(f"\nSIGTERM {'before' if not loop or loop[0] > sent else 'after'} supervisord's loop; exit {code}")
                assert code == 0, c.output()[-3000:]
                assert rec.survivors() == [], f"left behind when compute-ctl exited: {rec.survivors()}"
                assert_ports_free(c)
            finally:
                rec.stop()
                rec.kill_survivors()


def broken_templates() -> str:
    """supervisord.conf templates supervisord refuses to read (a bad value in [program:monitor]):
    compute-ctl fails after the driver was forked."""
    return templates_with("monitor", "startsecs=0", "startsecs=never")


def exit_after_the_fork(c: Compute) -> tuple[int, list[str]]:
    """A started tree whose bootstrap fails after the driver's fork: its exit code and its trace
    events, once nothing of it is left (every process recorded while it ran is gone, the ports
    free)."""
    rec = TreeRecord(c.proc.pid).keep_recording(0.01)
    try:
        code = c.wait_exit(60)
        rec.stop()
        assert rec.survivors() == [], f"left behind when compute-ctl exited: {rec.survivors()}"
        assert_ports_free(c)
        return code, [e for _, _, e in read(c.trace)]
    finally:
        rec.stop()
        rec.kill_survivors()


@pytest.mark.parametrize("path", ["neon", "embedded"])
def test_a_bootstrap_that_fails_after_the_fork_leaves_nothing(bb_tar: str, path: str) -> None:
    """supervisord refuses its conf after the driver started the sync (held at its gate) or
    initdb (which runs in a session of its own, with a bootstrap postgres under it)."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = gated_compute(ps.connstr)
        if path == "embedded":
            c.spec = c.new_spec()
        c.env["COMPUTE_TEMPLATE_DIR"] = broken_templates()
        with c:
            code, events = exit_after_the_fork(c)
            assert code != 0, c.output()[-3000:]
            assert "compute-ctl: lifecycle forked early" in events
            started = [e for e in events if e.startswith("lifecycle: storage request")]
            print(f"\n{path}: the failed bootstrap stopped the driver {'after' if started else 'before'} "
                  "its storage request")  # a race with supervisord's parse: either way, nothing left


@pytest.mark.parametrize("path", ["neon", "embedded"])
def test_a_state_file_that_cannot_be_created_after_the_fork_leaves_nothing(bb_tar: str, path: str) -> None:
    """compute-ctl creates the state file after the driver's fork (its storage request does not
    need it, compute/boot/cli.py write_tree_files). A directory where the file goes: exit 1 with
    the reason, the driver and whatever it started stopped, nothing left."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = gated_compute(ps.connstr)
        if path == "embedded":
            c.spec = c.new_spec()
        pg = pwd.getpwnam("postgres")
        blocker = os.path.join(c.runtime_dir, "state.db")
        os.makedirs(os.path.join(blocker, "inside"))
        for d in (c.runtime_dir, blocker, os.path.join(blocker, "inside")):
            os.chown(d, pg.pw_uid, pg.pw_gid)
            os.chmod(d, 0o700)
        with c:
            code, events = exit_after_the_fork(c)
            assert code == 1, c.output()[-3000:]
            assert "state.db" in c.output(), c.output()[-3000:]
            assert "compute-ctl: lifecycle forked early" in events, events
            assert "compute-ctl: state file ready" not in events, events
            assert "supervisord: loop" not in events, events


@pytest.mark.parametrize("path", ["neon", "embedded"])
def test_a_jwks_refused_after_the_fork_leaves_nothing(bb_tar: str, path: str) -> None:
    """--jwks is checked (its keys built with PyJWT and cryptography) after the driver's fork,
    beside its storage request: a file with no usable key is one line, exit 1, the driver and
    whatever it started stopped, no state file, nothing left."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = gated_compute(ps.connstr)
        if path == "embedded":
            c.spec = c.new_spec()
        jwks = os.path.join(c.base, "jwks.json")
        with open(jwks, "w") as f:
            f.write('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
        os.chmod(jwks, 0o644)
        c.args += ["--jwks", jwks]
        with c:
            code, events = exit_after_the_fork(c)
            assert code == 1, c.output()[-3000:]
            lines = [ln for ln in c.output().splitlines() if ln.startswith("compute-ctl: ")]
            assert len(lines) == 1 and "no usable key" in lines[0], c.output()[-3000:]
            assert "compute-ctl: lifecycle forked early" in events, events
            assert "compute-ctl: state file ready" not in events, events
            assert not os.path.exists(os.path.join(c.runtime_dir, "state.db"))
