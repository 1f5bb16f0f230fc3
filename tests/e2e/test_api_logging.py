"""The api's gunicorn logger (compute/api/gunicorn_log.py): gunicorn's own lines and the app's
as `LEVEL: message` on stderr without gunicorn.glogging and its imports; gunicorn's Logger
(and its access-log format) only when COMPUTE_API_ACCESS_LOG asks for an access log.

This file: in a booted tree; gunicorn alone: tests/integration/test_api_logging.py."""

from __future__ import annotations

from tests.support.tree import Compute
from tests.support.waiting import wait_for


def test_access_log_in_a_tree_only_when_asked():
    for access_log in ("", "1"):
        c = Compute(env={"COMPUTE_API_ACCESS_LOG": access_log})
        c.spec = c.new_spec()
        with c:
            c.wait_status("running")
            # the api program answers (not compute-ctl's early responder, which logs no access
            # line): it comes after the start-up and takes the socket over
            c.wait_serving()
            assert c.request("GET", "/status")[0] == 200
            if access_log:
                wait_for(lambda: '"GET /status HTTP/1.1" 200' in c.output(), 30, "the access-log line")
            else:
                assert c.request("GET", "/no-such-route")[0] == 404
                wait_for(lambda: c.request("GET", "/status")[0] == 200, 10, "/status")
                assert "GET /status HTTP" not in c.output() and "GET /no-such-route" not in c.output()
