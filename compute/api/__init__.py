"""The compute node's HTTP API (contract §7), a falcon app served by gunicorn gthread workers.

Workers are stateless: everything they answer comes from the shared state file (compute.shared.state)
or from postgres, so a worker crash or restart loses nothing.
"""
