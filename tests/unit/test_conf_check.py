"""What postgres rejected of postgresql.conf, as data (compute/postgres/conf_check.py), and its
own sentences from its log (compute/postgres/pglog.py)."""

from compute.postgres import pglog
from compute.postgres.conf_check import RESTART_ONLY_ERROR, UNRECOGNIZED, FileError, Rejection, describe, rejections

CONF = "/data/pgdata/postgresql.conf"
KNOWN = {"work_mem": False, "shared_buffers": False, "port": False, "max_connections": False}


def test_nothing_rejected():
    assert rejections([], KNOWN, ["work_mem", "port", "neon.tenant_id"]) == ()


def test_an_unknown_name_is_rejected_before_and_after_a_reload():
    errors = [FileError(CONF, 3, "work_mme", UNRECOGNIZED)]
    for before in (True, False):
        assert rejections(errors, KNOWN, ["work_mme"], before_reload=before) == (Rejection("work_mme", UNRECOGNIZED, 3),)


def test_names_are_checked_against_pg_settings_as_patroni_does():
    assert rejections([], KNOWN, ["Work_Mem", "wrk_mem"]) == (Rejection("wrk_mem", UNRECOGNIZED),)
    assert rejections([], KNOWN, ["myext.anything"]) == ()  # a placeholder: postgres accepts any


def test_a_bad_value_is_judged_after_the_reload_only():
    errors = [FileError(CONF, 4, "work_mem", RESTART_ONLY_ERROR)]
    assert rejections(errors, KNOWN, ["work_mem"], before_reload=True) == ()
    assert rejections(errors, KNOWN, ["work_mem"]) == (Rejection("work_mem", RESTART_ONLY_ERROR, 4),)


def test_a_valid_restart_only_change_is_not_a_rejection():
    errors = [FileError(CONF, 2, "shared_buffers", RESTART_ONLY_ERROR)]
    assert rejections(errors, {**KNOWN, "shared_buffers": True}, ["shared_buffers"]) == ()


def test_a_restart_only_setting_removed_from_the_file_is_not_a_rejection():
    """A promoted replica's file no longer has `hot_standby` (postmaster context)."""
    errors = [FileError(None, None, None, 'parameter "hot_standby" cannot be changed without restarting the server')]
    assert rejections(errors, KNOWN, [], before_reload=True) == ()
    assert rejections(errors, KNOWN, []) == ()


def test_a_syntax_error_has_no_name():
    errors = [FileError(CONF, 5, None, "syntax error")]
    found = rejections(errors, KNOWN, [], before_reload=True)
    assert found == (Rejection(None, "syntax error", 5),)
    assert "line 5 of postgresql.conf: syntax error" in describe(found)


def test_describe_prefers_postgres_sentence():
    found = (Rejection("work_mem", RESTART_ONLY_ERROR, 4), Rejection("wrk", UNRECOGNIZED))
    text = describe(found, {"work_mem": 'invalid value for parameter "work_mem": "lots"'})
    assert text.startswith("postgres rejected the new configuration (nothing was changed): ")
    assert "setting 'work_mem': invalid value for parameter \"work_mem\": \"lots\"" in text
    assert "setting 'wrk': unrecognized configuration parameter" in text


RELOAD_LOG = """\
2026-12-07 10:00:00.000 GMT [100] LOG:  received SIGHUP, reloading configuration files
2026-12-07 10:00:00.001 GMT [100] LOG:  invalid value for parameter "work_mem": "lots"
2026-12-07 10:00:00.001 GMT [100] HINT:  Valid units for this parameter are "B", "kB", "MB", "GB", and "TB".
2026-12-07 10:00:00.002 GMT [100] LOG:  configuration file "/d/postgresql.conf" contains errors; unaffected changes were applied
"""


def test_reasons_from_the_log():
    assert pglog.reasons(RELOAD_LOG, ["WORK_MEM", "port"]) == {
        "work_mem": 'invalid value for parameter "work_mem": "lots" (Valid units for this parameter are '
                    '"B", "kB", "MB", "GB", and "TB".)'}


START_TYPO = """\
2026-12-07 10:00:00.000 GMT [7] LOG:  unrecognized configuration parameter "work_mme" in file "/d/postgresql.conf" line 7
2026-12-07 10:00:00.000 GMT [7] FATAL:  configuration file "/d/postgresql.conf" contains errors
"""
PORT_IN_USE = """\
2026-12-07 10:00:00.000 GMT [7] LOG:  starting PostgreSQL 15.5 on x86_64-pc-linux-gnu
2026-12-07 10:00:00.001 GMT [7] LOG:  could not bind IPv4 address "127.0.0.1": Address already in use
2026-12-07 10:00:00.001 GMT [7] HINT:  Is another postmaster already running on port 5432? If not, wait a few seconds and retry.
2026-12-07 10:00:00.001 GMT [7] WARNING:  could not create listen socket for "127.0.0.1"
2026-12-07 10:00:00.001 GMT [7] FATAL:  could not create any TCP/IP sockets
2026-12-07 10:00:00.002 GMT [7] LOG:  database system is shut down
"""
REPLICA = """\
x [9] LOG:  entering standby mode
x [9] FATAL:  hot standby is not possible because of insufficient parameter settings
x [9] DETAIL:  max_connections = 10 is a lower setting than on the primary server, where its value was 100.
x [9] HINT:  You can restart the server after making the necessary configuration changes.
x [8] LOG:  startup process (PID 9) exited with exit code 1
"""


def test_failure_summary_of_a_failed_start():
    assert pglog.failure_summary(START_TYPO) == (
        'LOG: unrecognized configuration parameter "work_mme" in file "/d/postgresql.conf" line 7 / '
        'FATAL: configuration file "/d/postgresql.conf" contains errors')
    port = pglog.failure_summary(PORT_IN_USE)
    assert port.startswith('LOG: could not bind IPv4 address "127.0.0.1": Address already in use / HINT: Is another')
    assert port.endswith("FATAL: could not create any TCP/IP sockets") and "starting PostgreSQL" not in port
    assert pglog.failure_summary(REPLICA) == (
        "FATAL: hot standby is not possible because of insufficient parameter settings / DETAIL: max_connections = 10 "
        "is a lower setting than on the primary server, where its value was 100. / HINT: You can restart the "
        "server after making the necessary configuration changes.")


def test_failure_summary_is_bounded_and_none_without_a_failure():
    assert pglog.failure_summary(PORT_IN_USE.replace("FATAL", "LOG")) is None
    flood = "".join(f"p [1] FATAL:  {'x' * 500} {i}\n" for i in range(100))
    summary = pglog.failure_summary(flood)
    assert len(summary) <= pglog.MAX_SUMMARY + 3


def test_read_since_handles_rotation(tmp_path):
    path = tmp_path / "postgres.log"
    path.write_text("old line\nnew line\n")
    assert pglog.read_since(str(path), 9) == "new line\n"
    assert pglog.read_since(str(path), 10_000) == "old line\nnew line\n"  # shorter than the offset: rotated
    assert pglog.read_since(str(tmp_path / "absent"), 0) == ""
    assert pglog.size(str(path)) == 18
