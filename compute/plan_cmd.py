"""`compute-ctl plan`: the SQL a reconfiguration to a spec would run on a running compute,
printed (passwords as [redacted]) and not run."""

from __future__ import annotations

import argparse
import sys

from .cli import UsageError, superuser_of
from .modes import no_catalog_sql_reason
from .reconcile import ReconcileError, dry_run, format_plan
from .spec import SpecError, load_spec_file, parse_spec_text


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="compute-ctl plan",
                                description="Print the statements a reconfiguration to SPEC would run "
                                            "against the running compute behind CONNSTR, without running them.")
    p.add_argument("-C", "--connstr", required=True, help="superuser connection string of the running compute")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-S", "--spec-path", help="the spec as a JSON file")
    src.add_argument("-s", "--spec", help="the spec as inline JSON")
    args = p.parse_args(argv)
    try:
        superuser = superuser_of(args.connstr)
        spec = (load_spec_file(args.spec_path, superuser=superuser) if args.spec_path
                else parse_spec_text(args.spec, superuser=superuser))
        skipped = no_catalog_sql_reason(spec)
        if skipped:  # what a reconfiguration would run: nothing
            print(f"-- {skipped}")
            return 0
        print(format_plan(dry_run(args.connstr, spec, superuser=superuser)))
    except (UsageError, SpecError, ReconcileError) as e:
        print(f"compute-ctl plan: {e}", file=sys.stderr)
        return 1
    return 0
