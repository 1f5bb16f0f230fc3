"""compute/postgres/setting_diff.py: what a spec's settings would change in a running postgres
(`compute-ctl plan`), compared with pg_settings rows as Patroni compares them."""

from __future__ import annotations

from compute.model.spec import GenericOption
from compute.postgres.setting_diff import Running, format_changes, same_value, setting_changes

CONF = "/pgdata/postgresql.conf"


def row(name, setting, unit=None, vartype="string", context="sighup", shown=None, boot_val=None, sourcefile=CONF):
    return Running(name, setting, unit, vartype, context, shown if shown is not None else setting, boot_val,
                   sourcefile, False)


ROWS = [
    row("shared_buffers", "4096", "8kB", "integer", "postmaster", "32MB", "1024"),
    row("work_mem", "4096", "kB", "integer", "user", "4MB", "4096", sourcefile=None),
    row("statement_timeout", "0", "ms", "integer", "user", "0", "0", sourcefile=None),
    row("fsync", "off", None, "bool", "sighup", "off", "on"),
    row("wal_level", "replica", None, "enum", "postmaster", "replica", "replica"),
    row("listen_addresses", "127.0.0.1", None, "string", "postmaster", "127.0.0.1", "localhost"),
    row("vacuum_cost_delay", "2", "ms", "real", "user", "2ms", "2", sourcefile=None),
    row("primary_conninfo", "host=a password=s3cret", None, "string", "sighup", boot_val=""),
    row("neon.tenant_id", "abc", None, "string", "postmaster", boot_val=""),  # from a storage field
]


def opt(name, value, vartype="string"):
    return GenericOption(name, value, vartype)


def test_values_are_compared_in_the_settings_own_units():
    rows = {r.name: r for r in ROWS}
    assert same_value(rows["shared_buffers"], "32MB")
    assert same_value(rows["shared_buffers"], "32768kB")
    assert same_value(rows["shared_buffers"], "4096")  # a bare number is in the setting's unit
    assert not same_value(rows["shared_buffers"], "64MB")
    assert same_value(rows["work_mem"], "4MB") and not same_value(rows["work_mem"], "8MB")
    assert same_value(rows["statement_timeout"], "0") and not same_value(rows["statement_timeout"], "1min")
    assert same_value(rows["vacuum_cost_delay"], "2ms") and same_value(rows["vacuum_cost_delay"], "2000us")
    for text in ("off", "OFF", "false", "f", "no", "0"):
        assert same_value(rows["fsync"], text), text
    for text in ("on", "true", "yes", "1", "o", "maybe"):
        assert not same_value(rows["fsync"], text), text
    assert same_value(rows["wal_level"], "REPLICA") and not same_value(rows["wal_level"], "logical")
    assert same_value(rows["listen_addresses"], "127.0.0.1") and not same_value(rows["listen_addresses"], "*")
    assert not same_value(rows["work_mem"], "lots")  # not understood: shown as a change


def test_changes_mark_what_needs_a_restart_and_what_goes_back_to_its_default():
    wanted = [opt("shared_buffers", "64MB"), opt("work_mem", "4MB"), opt("wal_level", "replica", "enum"),
              opt("listen_addresses", "*"), opt("statement_timeout", "10s", "integer"),
              opt("neon.extension_thing", "1"), opt("work_mme", "8MB"), opt("vacuum_cost_delay", "2ms", "real")]
    changes = setting_changes(wanted, ROWS, CONF)
    by = {c.name: c for c in changes}
    assert list(by) == sorted(by, key=str.lower)
    assert set(by) == {"shared_buffers", "listen_addresses", "statement_timeout", "work_mme", "fsync",
                       "primary_conninfo"}
    assert by["shared_buffers"].needs_restart and by["listen_addresses"].needs_restart
    assert not by["statement_timeout"].needs_restart
    assert by["shared_buffers"].line() == ("shared_buffers: '32MB' -> '64MB'; needs a restart (context "
                                           "postmaster): applied at the compute's next start")
    assert by["work_mme"].unknown and "unknown to this postgres" in by["work_mme"].line()
    assert by["fsync"].removed and by["fsync"].line() == "fsync: 'off' -> its default 'on'; applied by the reload"
    text = format_changes(changes)
    assert text.startswith("-- settings: 6 changes, 2 needing a restart\n")
    assert "s3cret" not in text and "primary_conninfo: '[redacted]'" in text


def test_nothing_to_change():
    same = [opt("shared_buffers", "32MB"), opt("fsync", "off", "bool"), opt("wal_level", "replica", "enum"),
            opt("listen_addresses", "127.0.0.1"), opt("primary_conninfo", "host=a password=s3cret")]
    assert setting_changes(same, ROWS, CONF) == []
    assert format_changes([]) == "-- settings: no change\n"
