"""`compute-ctl supervisorctl` (compute/boot/supervisorctl_command.py): its arguments, and what it
says without a compute (the subcommand against a real tree: tests/e2e/test_e2e_day_two.py)."""

from __future__ import annotations

import pytest

from compute.boot.cli import main as cli_main
from compute.boot.supervisorctl_command import split_args, supervisorctl_argv


def test_only_a_leading_runtime_dir_is_ours():
    assert split_args(["--runtime-dir", "/r", "status"]) == ("/r", ["status"])
    assert split_args(["--runtime-dir=/r", "tail", "-f", "api"]) == ("/r", ["tail", "-f", "api"])
    assert split_args(["status", "--runtime-dir", "/r"]) == (None, ["status", "--runtime-dir", "/r"])
    assert split_args([]) == (None, [])
    for bad in (["--runtime-dir"], ["--runtime-dir="], ["--runtime-dir", ""]):
        with pytest.raises(ValueError):
            split_args(bad)


def test_supervisors_own_supervisorctl_with_the_computes_conf_and_a_safe_path():
    assert supervisorctl_argv("/venv/bin/python", "/run/compute-ctl", ["status"]) == [
        "/venv/bin/python", "-P", "-m", "supervisor.supervisorctl", "-c", "/run/compute-ctl/supervisord.conf", "status"]


def test_no_compute_there_is_a_sentence_and_exit_2(tmp_path, capsys):
    assert cli_main(["supervisorctl", "--runtime-dir", str(tmp_path), "status"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/supervisord.conf does not exist" in err and "--runtime-dir" in err
    assert cli_main(["supervisorctl", "--runtime-dir"]) == 2
