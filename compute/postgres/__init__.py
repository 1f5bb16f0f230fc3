"""The local postgres: postgresql.conf and pg_hba, our superuser sessions, local auth, replicas, the shutdown LSN."""
