"""The driver forked before supervisord runs (compute/tree/early_driver.py) gets what supervisord
would give its `lifecycle` program; and which storage request a driver starts before loading
the rest of itself (compute/lifecycle/steps.py early_request, pure)."""

from __future__ import annotations

import os

import pytest
from supervisor.options import ServerOptions

from compute.lifecycle.steps import DriverStep, DriverView, EarlyRequest, early_request, plan_run
from compute.shared.supervisor_rpc import socket_path
from compute.tree import early_driver
from compute.tree.supervisord_conf import render_supervisord_conf


def rendered(tmp_path, program_env) -> str:
    return render_supervisord_conf(
        runtime_dir=str(tmp_path), pgdata="/data/pg data", pgbin="/usr/bin/postgres", python="/venv/bin/python",
        auth_token="tok.en", vm_informant=None, informant_connstr="dbname=postgres",
        program_env=program_env)


@pytest.mark.parametrize("program_env", [
    {},
    {"lifecycle": {"NEON_AUTH_TOKEN": "a.b-c_d=", "NEON_CONSOLE_JWT": "Bearer x.y.z"}},
    {"lifecycle": {"NEON_CONTROL_PLANE_TOKEN": "p.c:t/+~ x"}, "postgres": {"NEON_AUTH_TOKEN": "s"}},
])
def test_the_early_driver_gets_what_supervisord_gives_lifecycle(tmp_path, program_env) -> None:
    (tmp_path / "run 1" / "logs").mkdir(parents=True)  # supervisor's reading checks the log dir
    conf = rendered(tmp_path / "run 1", program_env)
    path = tmp_path / "supervisord.conf"
    path.write_text(conf)
    opts = ServerOptions()
    opts.realize(args=["-n", "-c", str(path)])  # supervisord's own reading, as at its start
    (cfg,) = [p for g in opts.process_group_configs for p in g.process_configs if p.name == "lifecycle"]
    environ = {"PATH": "/usr/bin", "COMPUTE_RUNTIME_DIR": "overridden by the conf"}
    # supervisor.process.Subprocess._spawn_as_child, for this program
    want = {**environ, "SUPERVISOR_ENABLED": "1", "SUPERVISOR_SERVER_URL": cfg.serverurl or opts.serverurl,
            "SUPERVISOR_PROCESS_NAME": "lifecycle", "SUPERVISOR_GROUP_NAME": "lifecycle", **cfg.environment}
    got = early_driver.program_environment(environ, conf, f"unix://{socket_path(str(tmp_path / 'run 1'))}")
    assert got == want
    for name, value in program_env.get("lifecycle", {}).items():
        assert got[name] == value


def test_the_program_and_its_command_are_the_templates() -> None:
    conf = render_supervisord_conf(runtime_dir="/run/c", pgdata="/d", pgbin="/p", python="/venv/bin/python",
                                   auth_token=None, vm_informant=None, informant_connstr="")
    assert f"[program:{early_driver.PROGRAM}]\ncommand=/venv/bin/python -m {early_driver.MODULE}\n" in conf


FIRST = DriverView(status="init", postgres_state="STOPPED")


@pytest.mark.parametrize("source,sync,want", [
    ("pageserver", True, EarlyRequest.SYNC_SAFEKEEPERS),  # a Primary on the Neon path
    ("initdb", False, EarlyRequest.INITDB),                # the embedded default
    ("pageserver", False, None),                           # Static / Replica: a basebackup first (libpq)
    ("clone", False, None),                                # a replica of a plain primary: pg_basebackup
    (None, False, None),                                   # no spec stored: pull mode, `empty`
])
def test_the_first_start_starts_its_subprocess_request_early(source, sync, want) -> None:
    assert plan_run(FIRST)[:2] == (DriverStep.WAIT_FOR_SPEC, DriverStep.PREPARE_DATA)
    assert early_request(FIRST, source, sync) is want


@pytest.mark.parametrize("view", [
    DriverView(status="init", postgres_state="RUNNING"),            # a restarted driver resumes
    DriverView(status="running", startup_done=True),               # a hand-over's driver
    DriverView(status="failed"),                                    # the grace period
    DriverView(status="init", postgres_state="STOPPED", termination="requested"),
    DriverView(status="init", postgres_state="STOPPED", termination="tree"),
])
def test_nothing_early_unless_the_plan_prepares_pgdata(view) -> None:
    assert early_request(view, "pageserver", True) is None
    assert early_request(view, "initdb", False) is None


def test_held_stop_signals_are_replayed_in_order(monkeypatch) -> None:
    raised = []
    monkeypatch.setattr(early_driver.signal, "raise_signal", raised.append)
    early_driver.held_signals[:] = [15, 2]
    early_driver.replay_held_signals()
    assert raised == [15, 2] and early_driver.held_signals == []


def test_nothing_to_stop_when_supervisord_adopted_it() -> None:
    assert not early_driver.pending()
    assert early_driver.stop_unadopted() is False  # a no-op: no process, no fd
    assert os.getpid()


HELD = early_driver.FORKED_PROGRAMS_HELD_AT_MOST


@pytest.mark.parametrize("driver_running,since_loop,over", [
    (True, 0.0, False),            # the early driver runs its start-up: api and monitor wait
    (True, HELD / 2, False),
    (True, HELD, True),            # a long start-up: the api comes at the latest then
    (True, HELD * 10, True),
    (False, 0.0, True),            # it exited (hand-over, failure, kill), or there never was one
    (False, HELD * 10, True),
])
def test_the_forked_programs_wait_for_the_early_drivers_start_up(driver_running, since_loop, over) -> None:
    assert early_driver.start_up_over(driver_running, since_loop) is over



def test_the_state_files_variables_reach_the_early_drivers_environment(monkeypatch) -> None:
    """compute-ctl's side (state_file_ready, no early driver: nothing) and the driver's
    (forkinfo.wait_for_state_file) of the pipe that says the state file exists."""
    from compute.base import forkinfo
    early_driver.state_file_ready({"COMPUTE_STATE_FILE_ID": "1:2"})  # no early driver: a no-op
    r, w = os.pipe()
    os.write(w, b"COMPUTE_STATE_FILE_ID=64768:1234\n")
    os.close(w)
    monkeypatch.setattr(forkinfo, "state_ready_fd", r)
    monkeypatch.setenv("COMPUTE_STATE_FILE_ID", "")  # restored (absent) after the test
    forkinfo.wait_for_state_file()
    assert os.environ["COMPUTE_STATE_FILE_ID"] == "64768:1234"
    assert forkinfo.state_ready_fd is None
    forkinfo.wait_for_state_file()  # once only; any other driver: returns at once


def test_a_pipe_closed_without_the_state_file_ends_the_early_driver(monkeypatch) -> None:
    from compute.base import forkinfo
    r, w = os.pipe()
    os.close(w)  # compute-ctl's bootstrap failed after the fork (it stops the driver too)
    monkeypatch.setattr(forkinfo, "state_ready_fd", r)
    with pytest.raises(SystemExit) as exited:
        forkinfo.wait_for_state_file()
    assert exited.value.code == 1


@pytest.mark.parametrize("text, want", [
    ("", {}),
    ("COMPUTE_STATE_FILE_ID=1:2\n", {"COMPUTE_STATE_FILE_ID": "1:2"}),
    ("A=x=y\nB=\n", {"A": "x=y", "B": ""}),
])
def test_environment_lines(text, want) -> None:
    from compute.base.forkinfo import parse_environment_lines
    assert parse_environment_lines(text) == want
