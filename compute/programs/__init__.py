"""The other supervised programs: the activity monitor, the postgres exporter's access."""
