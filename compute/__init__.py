"""compute-supervisor: a Postgres compute node wrapper built on supervisord."""

__version__ = "0.1.0"
