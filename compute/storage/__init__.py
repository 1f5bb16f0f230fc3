"""Where PGDATA comes from: safekeepers, the pageserver's basebackup, initdb, the control plane's spec."""
