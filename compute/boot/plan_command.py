"""`compute-ctl plan`: the SQL a reconfiguration to a spec would run on a running compute,
printed (passwords as [redacted]) and not run; then the settings it would change in the running
postgres, those that need a restart marked (compute/postgres/setting_diff.py decides, from
pg_settings; this module only fetches and prints).

On the embedded default the superuser needs its password over TCP: like the compute's own
programs, `plan` finds it in the runtime dir's passfile (compute/postgres/localauth.py), unless the
connstr or PGPASSFILE names one."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping

from compute.postgres.localauth import passfile_path
from compute.model.modes import conf_settings, no_catalog_sql_reason
from compute.postgres.setting_diff import SETTINGS_QUERY, Running, format_changes, setting_changes
from compute.boot.paths import default_runtime_dir
from compute.postgres.sessions import named_superuser
from compute.reconcile import ReconcileError, dry_run, format_plan
from compute.model.spec import SpecError, load_spec_file, parse_spec_text


def with_runtime_passfile(connstr: str, runtime_dir: str, environ: Mapping[str, str],
                          readable: Callable[[str], bool]) -> str:
    """The connstr to plan with (pure but for `readable`): the runtime dir's superuser passfile
    added when the connstr names no password or passfile, PGPASSFILE is unset, and the file is
    there to read (root or the compute user); else the connstr as given."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    params = conninfo_to_dict(connstr)
    path = passfile_path(runtime_dir)
    if "password" in params or "passfile" in params or environ.get("PGPASSFILE") or not readable(path):
        return connstr
    return make_conninfo(connstr, passfile=path)


def _readable(path: str) -> bool:
    return os.access(path, os.R_OK)


def settings_plan(connstr: str, spec) -> str:
    """The settings part of the plan: pg_settings of the running postgres against what a
    reconfiguration would write to its postgresql.conf."""
    import psycopg
    with psycopg.connect(connstr, autocommit=True, connect_timeout=10) as conn:
        rows = [Running(*row) for row in conn.execute(SETTINGS_QUERY).fetchall()]
        pgdata, conf_file = conn.execute(
            "SELECT current_setting('data_directory'), current_setting('config_file')").fetchone()
    return format_changes(setting_changes(conf_settings(spec, pgdata), rows, conf_file))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="compute-ctl plan",
                                description="Print the statements a reconfiguration to SPEC would run "
                                            "against the running compute behind CONNSTR, without running them.")
    p.add_argument("-C", "--connstr", required=True, help="superuser connection string of the running compute")
    p.add_argument("--runtime-dir", default=None,
                   help="the compute's runtime dir, where the superuser's passfile is found on the embedded default "
                        "(default as compute-ctl's: /run/compute-ctl as root, else /tmp/compute-ctl-$USER)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-S", "--spec-path", help="the spec as a JSON file")
    src.add_argument("-s", "--spec", help="the spec as inline JSON")
    args = p.parse_args(argv)
    import psycopg
    try:
        superuser = named_superuser(args.connstr)
    except ValueError as e:
        print(f"compute-ctl plan: {e}", file=sys.stderr)
        return 1
    try:
        spec = (load_spec_file(args.spec_path, superuser=superuser) if args.spec_path
                else parse_spec_text(args.spec, superuser=superuser))
        connstr = with_runtime_passfile(args.connstr, args.runtime_dir or default_runtime_dir(),
                                        os.environ, _readable)
        skipped = no_catalog_sql_reason(spec)
        if skipped:  # what a reconfiguration would run: nothing; settings are still written
            print(f"-- {skipped}")
            try:
                print(settings_plan(connstr, spec), end="")
            except psycopg.Error as e:  # the catalog's answer stands: nothing runs
                print(f"-- settings not compared: {_one_line(e)}")
            return 0
        print(format_plan(dry_run(connstr, spec, superuser=superuser)), end="")
        print(settings_plan(connstr, spec), end="")
    except (SpecError, ReconcileError) as e:
        print(f"compute-ctl plan: {e}", file=sys.stderr)
        return 1
    except psycopg.Error as e:
        print(f"compute-ctl plan: settings: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
