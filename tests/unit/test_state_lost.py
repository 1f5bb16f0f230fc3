"""The state file removed, truncated or replaced while the compute runs (issue 21, item 2): a
store opens only the file compute-ctl created, never a substitute, and says so
(StateFileLost); the tree's exit watcher still ends the tree on postgres' exit with its code,
and stops the tree itself when the file is lost. In-process: SQLite and fakes, no process."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import types

import pytest
from supervisor.states import ProcessStates, SupervisorStates

from compute.shared.state import (STATE_ID_ENV, StateFileLost, StateStore, lost_reason, park_without_state,
                                  state_id_from_env, state_path)
from compute.tree.exitwatch import EXIT_STATE_LOST, ExitWatch, Timers
from tests.support.api_helpers import make_state


@pytest.fixture
def store(tmp_path):
    return make_state(str(tmp_path), status="running")


def test_a_removed_state_file_is_never_recreated(store):
    assert store.get("status") == "running"
    os.unlink(store.path)
    with pytest.raises(StateFileLost, match="removed"):
        store.get("status")  # not the stale `running` of the open connection
    with pytest.raises(StateFileLost):
        store.set(last_active=1.0)
    assert not os.path.exists(store.path)  # nothing created in its place
    fresh = StateStore(store.path, identity=store.identity)
    with pytest.raises(StateFileLost):
        fresh.get("status")
    assert not os.path.exists(store.path)


def test_a_truncated_state_file_is_lost_and_stays_lost(store):
    with open(store.path, "r+b") as f:
        f.truncate(0)
    with pytest.raises(StateFileLost, match="truncated"):
        store.get("status")
    with pytest.raises(StateFileLost, match="truncated"):
        store.get("status")


def test_a_state_file_without_its_database_header_is_lost_and_stays_lost(store):
    """Truncated, then pages written back past the empty header (a WAL checkpoint of a program
    that still had it open): the size looks fine, SQLite finds no database. Lost, for every use
    of the store from then on, not an sqlite3.DatabaseError that a caller would not expect."""
    store.close()  # a fresh connection: SQLite reads the header again
    with open(store.path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(0)
        f.seek(4096)
        f.write(b"\xff" * (size - 4096 if size > 8192 else 8192))
    with pytest.raises(StateFileLost, match="overwritten"):
        store.get("status")
    with pytest.raises(StateFileLost, match="overwritten"):
        store.check()  # the one stat the exit watcher makes: the loss is remembered
    with pytest.raises(StateFileLost):
        store.set(last_active=1.0)


@pytest.mark.parametrize("replacement", ["empty", "a valid database"])
def test_a_replaced_state_file_is_lost(store, tmp_path, replacement):
    other = str(tmp_path / "other.db")
    if replacement == "empty":
        open(other, "wb").close()
    else:
        shutil.copyfile(store.path, other)  # a readable database, but not the one created
    os.replace(other, store.path)
    with pytest.raises(StateFileLost):
        store.get("status")
    with pytest.raises(StateFileLost, match="replaced|truncated"):
        StateStore(store.path, identity=store.identity).get("status")


def test_identity_comes_from_compute_ctl_through_the_environment(store, monkeypatch):
    assert lost_reason(store.path, store.identity) is None
    monkeypatch.setenv(STATE_ID_ENV, store.identity)
    assert state_id_from_env() == store.identity
    assert StateStore(store.path).get("status") == "running"
    monkeypatch.setenv(STATE_ID_ENV, "1:2")  # another file than the one compute-ctl created
    with pytest.raises(StateFileLost, match="replaced"):
        StateStore(store.path).get("status")


def test_lost_is_an_operational_error_for_old_handlers(store):
    os.unlink(store.path)
    with pytest.raises(sqlite3.OperationalError):
        store.get("status")


class Lines(logging.Handler):
    """What one logger says (caplog depends on the root logger's set-up, which other tests change)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        self.was_disabled, self.logger.disabled = self.logger.disabled, False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.disabled = self.was_disabled


def test_park_returns_when_stopped_and_logs_once():
    stop = threading.Event()
    stop.set()
    with Lines("compute.shared.state") as lines:
        park_without_state(StateFileLost("gone"), "monitor", stop)
    assert sum("waiting to be stopped" in m for m in lines.messages) == 1


# -- the exit watcher without a state file --------------------------------------------------
class FakeProcess:
    def __init__(self, state, exitstatus):
        self.state, self.exitstatus, self.pid = state, exitstatus, 4242
        self.config = types.SimpleNamespace(name="postgres")

    def get_state(self):
        return self.state


def fake_supervisord(postgres: FakeProcess):
    group = types.SimpleNamespace(processes={"postgres": postgres})
    return types.SimpleNamespace(options=types.SimpleNamespace(mood=SupervisorStates.RUNNING),
                                 process_groups={"postgres": group})


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def watch_for(tmp_path, store, postgres):
    timers = Timers(Clock())
    watch = ExitWatch(fake_supervisord(postgres), str(tmp_path), timers)
    watch.settings = None  # no core dumps to look for
    return watch, timers


@pytest.mark.parametrize("loss", ["remove", "truncate"])
def test_postgres_exit_ends_the_tree_with_its_code_whatever_the_state_file(tmp_path, store, loss):
    postgres = FakeProcess(ProcessStates.EXITED, 3)
    watch, timers = watch_for(tmp_path, store, postgres)
    store.set(startup_done=True)
    if loss == "remove":
        os.unlink(store.path)
    else:
        with open(store.path, "r+b") as f:
            f.truncate(0)
    watch.on_event("PROCESS_STATE_EXITED", {"processname": "postgres"})
    timers.run_due()
    assert watch.supervisord.options.mood == SupervisorStates.SHUTDOWN  # not dropped
    assert watch.exit_code == 3


def test_killed_postgres_without_a_state_file_exits_1(tmp_path, store):
    postgres = FakeProcess(ProcessStates.EXITED, -1)
    watch, timers = watch_for(tmp_path, store, postgres)
    os.unlink(store.path)
    watch.on_event("PROCESS_STATE_EXITED", {"processname": "postgres"})
    timers.run_due()
    assert (watch.supervisord.options.mood, watch.exit_code) == (SupervisorStates.SHUTDOWN, 1)


def test_the_watcher_stops_the_tree_when_the_state_file_is_lost(tmp_path, store):
    postgres = FakeProcess(ProcessStates.RUNNING, 0)
    watch, timers = watch_for(tmp_path, store, postgres)
    watch.watch_state_file(period=0.5)
    for _ in range(3):
        timers.run_due()
        timers.clock.now += 0.5
    assert watch.supervisord.options.mood == SupervisorStates.RUNNING and watch.exit_code is None
    os.unlink(store.path)
    with Lines("compute.tree.exitwatch") as lines:
        for _ in range(3):
            timers.run_due()
            timers.clock.now += 0.5
    assert watch.supervisord.options.mood == SupervisorStates.SHUTDOWN
    assert watch.exit_code == EXIT_STATE_LOST and watch.state_lost
    assert sum("cannot be driven" in m for m in lines.messages) == 1  # one line, no spin
    assert timers.next_in() is None  # and no more looks


def test_the_first_exit_code_recorded_wins_in_memory_too(tmp_path, store):
    watch, _ = watch_for(tmp_path, store, FakeProcess(ProcessStates.RUNNING, 0))
    store.set(exit_code=1)  # the driver's failed start
    watch.record_exit(0)
    assert store.get("exit_code") == 1
    os.unlink(state_path(str(tmp_path)))
    watch.record_exit(5)  # the file gone: memory only, never an exception on the loop
    assert watch.exit_code == 0
