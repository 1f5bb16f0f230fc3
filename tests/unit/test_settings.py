"""compute.model.launch: the one typed record of the compute's settings, its defaults, its loader."""

from __future__ import annotations

import dataclasses

import pytest

from compute.model import launch as settings_mod
from compute.boot.cli import build_parser
from compute.model.launch import STATE_KEY, LaunchSettings, SettingsError, default, load
from compute.shared.state import StateStore

REQUIRED = {"pgdata": "/data", "connstr": "postgresql://cloud_admin@127.0.0.1:5432/postgres",
            "superuser": "cloud_admin", "runtime_dir": "/run/c"}


def test_round_trip_through_the_state_file(tmp_path):
    s = LaunchSettings(**REQUIRED, http_port=4000, jwks_path="/k.json", grace_seconds=1.5)
    StateStore.create(str(tmp_path / "state.db"), {STATE_KEY: s.to_json(), "status": "init"})
    assert load(StateStore(str(tmp_path / "state.db"))) == s  # a fresh store: read back from the file


def test_no_record_yet_is_none(tmp_path):
    store = StateStore.create(str(tmp_path / "state.db"), {"status": "init"})
    assert load(store) is None


def test_frozen():
    s = LaunchSettings(**REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.http_port = 1  # type: ignore[misc]


def test_absent_keys_take_the_one_default():
    s = LaunchSettings.from_json(REQUIRED)
    for f in dataclasses.fields(LaunchSettings):
        if f.name not in REQUIRED:
            assert getattr(s, f.name) == f.default == default(f.name)


@pytest.mark.parametrize("flag,field", [
    ("http_port", "http_port"), ("http_address", "http_address"), ("grace_seconds", "grace_seconds"),
    ("monitor_interval", "monitor_interval"), ("lock_timeout", "lock_timeout"),
    ("statement_timeout", "statement_timeout"), ("log_format", "log_format"),
    ("storage_timeout", "storage_timeout"), ("pgbin", "pgbin"),
    ("postgres_exporter_port", "postgres_exporter_port"),
])
def test_flag_defaults_are_the_settings_defaults(flag, field):
    args = build_parser().parse_args(["-D", "/d", "-C", "postgresql://a@127.0.0.1/x"])
    assert getattr(args, flag) == default(field)


def test_library_defaults_come_from_settings():
    from compute.programs import monitor, postgres_exporter
    from compute.storage import attempts
    from compute.reconcile import connections
    assert monitor.DEFAULT_INTERVAL == default("monitor_interval")
    assert attempts.DEFAULT_TIMEOUT == default("storage_timeout")
    assert connections.DEFAULT_LOCK_TIMEOUT == default("lock_timeout")
    assert connections.DEFAULT_STATEMENT_TIMEOUT == default("statement_timeout")
    assert postgres_exporter.DEFAULT_PORT == default("postgres_exporter_port") == 9187


def test_ints_are_accepted_for_seconds():
    s = LaunchSettings.from_json({**REQUIRED, "grace_seconds": 5, "lock_timeout": 0})
    assert s.grace_seconds == 5.0 and isinstance(s.grace_seconds, float)


@pytest.mark.parametrize("raw,message", [
    ({**REQUIRED, "http_port": "3080"}, "setting http_port: '3080' is not of type int"),
    ({**REQUIRED, "http_port": True}, "setting http_port: True is not of type int"),
    ({**REQUIRED, "grace_seconds": None}, "setting grace_seconds: None is not of type float"),
    ({**REQUIRED, "jwt_require_exp": "yes"}, "setting jwt_require_exp: 'yes' is not of type bool"),
    ({**REQUIRED, "jwks_path": 7}, "setting jwks_path: 7 is not of type str or NoneType"),
    ({**REQUIRED, "connstr": None}, "setting connstr: None is not of type str"),
    ({**REQUIRED, "jwks": "/k"}, "unknown setting(s): jwks"),
    ({k: v for k, v in REQUIRED.items() if k != "pgdata"}, "missing setting(s): pgdata"),
    (["not", "an", "object"], "settings must be a JSON object, not list"),
])
def test_bad_records_are_refused_in_one_line(raw, message):
    with pytest.raises(SettingsError) as e:
        LaunchSettings.from_json(raw)
    assert str(e.value) == message and "\n" not in str(e.value)


def test_settings_module_imports_nothing_of_the_compute():
    """Every program imports it, the log relay and gunicorn's config included: it stays light."""
    import ast
    tree = ast.parse(open(settings_mod.__file__).read())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not relative and not any(m and m.startswith("compute") for m in imported), imported


def test_require_is_the_one_rule_for_no_settings(tmp_path):
    """compute-ctl writes the settings before it starts any program: every program reads them
    with `require`, and a state file without them is said loudly, never defaulted."""
    from compute.model.launch import SettingsMissing, require
    store = StateStore.create(str(tmp_path / "state.db"), {"status": "init"})
    with pytest.raises(SettingsMissing, match="no settings .*before it starts any program"):
        require(store)
    s = LaunchSettings(**REQUIRED)
    store.set(**{STATE_KEY: s.to_json()})
    assert require(store) == s


def test_every_program_reads_the_settings_through_the_one_rule(tmp_path):
    """The driver, the exit watcher and the api fail loudly on a state file without settings."""
    from compute.api.context import ApiContext
    from compute.lifecycle.driver import Driver
    from compute.model.launch import SettingsMissing
    from compute.shared.state import state_path
    rt = str(tmp_path)
    StateStore.create(state_path(rt), {"status": "init"})
    with pytest.raises(SettingsMissing):
        Driver(rt)
    with pytest.raises(SettingsMissing):
        ApiContext(rt).settings
