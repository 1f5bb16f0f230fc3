"""supervisord inside compute-ctl: warm fork, exit decisions, log relay, the reaper, its config."""
