"""fetch_spec against the control-plane peer."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from compute.storage.control_plane import ControlPlaneError, fetch_spec, spec_url
from tests.peers.control_plane import ControlPlanePeer

SPEC = {"format_version": 1.0, "cluster": {"roles": [], "databases": []}}
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjb21wdXRlIn0.c2VjcmV0LXNpZ25hdHVyZQ"


def test_returns_the_spec_and_sends_the_raw_jwt():
    with ControlPlanePeer(SPEC, compute_id="compute-1") as cp:
        assert fetch_spec(cp.url, "compute-1", JWT) == SPEC
        (req,) = cp.requests
        assert req.path == "/management/api/v2/computes/compute-1/spec"
        assert req.headers["Authorization"] == JWT  # verbatim, as NEON_CONSOLE_JWT holds it


def test_null_spec_means_none():
    with ControlPlanePeer(None) as cp:
        assert fetch_spec(cp.url, "c", None) is None
        assert "Authorization" not in cp.requests[0].headers


def test_compute_id_is_quoted_in_the_path():
    odd = "a/b c?d#e%"
    with ControlPlanePeer(SPEC, compute_id=odd) as cp:
        assert fetch_spec(cp.url + "/", odd, None) == SPEC
        assert cp.requests[0].path == "/management/api/v2/computes/a%2Fb%20c%3Fd%23e%25/spec"


def test_retries_503_then_succeeds():
    with ControlPlanePeer(SPEC, fail_first=2) as cp:
        t0 = time.monotonic()
        assert fetch_spec(cp.url, "c", JWT, attempts=5, backoff=0.05) == SPEC
        assert len(cp.requests) == 3
        assert time.monotonic() - t0 >= 0.05 + 0.1  # exponential: 0.05, then 0.1


def test_retries_dropped_connections():
    with ControlPlanePeer(SPEC, drop_first=2) as cp:
        assert fetch_spec(cp.url, "c", None, attempts=3, backoff=0.01) == SPEC
        assert len(cp.requests) == 3


def test_gives_up_after_the_attempts_without_leaking_the_jwt(caplog):
    caplog.set_level(logging.DEBUG)
    with ControlPlanePeer(SPEC, fail_first=100) as cp:
        with pytest.raises(ControlPlaneError, match="after 3 attempt.*HTTP 503") as err:
            fetch_spec(cp.url, "c", JWT, attempts=3, backoff=0.01)
        assert len(cp.requests) == 3
    assert JWT not in str(err.value) and JWT not in caplog.text


def test_unreachable_control_plane():
    with ControlPlanePeer(SPEC) as cp:
        url = cp.url
    with pytest.raises(ControlPlaneError, match="after 2 attempt.*network error"):
        fetch_spec(url, "c", JWT, attempts=2, backoff=0.01, timeout=2)


def test_404_is_not_retried():
    with ControlPlanePeer(SPEC, compute_id="other") as cp:
        with pytest.raises(ControlPlaneError, match="HTTP 404"):
            fetch_spec(cp.url, "c", JWT, backoff=0.01)
        assert len(cp.requests) == 1


def test_401_with_a_wrong_jwt():
    with ControlPlanePeer(SPEC, jwt="right") as cp:
        with pytest.raises(ControlPlaneError, match="HTTP 401") as err:
            fetch_spec(cp.url, "c", "wrong-token", backoff=0.01)
        assert "wrong-token" not in str(err.value)
        assert fetch_spec(cp.url, "c", "right") == SPEC


@pytest.mark.parametrize("body, message", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "\"spec\" key"),
    (b'{"other": 1}', "\"spec\" key"),
    (b'{"spec": "text"}', "neither an object nor null"),
])
def test_malformed_answers(body, message):
    with ControlPlanePeer(raw_body=body) as cp:
        with pytest.raises(ControlPlaneError, match=message):
            fetch_spec(cp.url, "c", None, backoff=0.01)
        assert len(cp.requests) == 1


def test_error_body_echoing_the_jwt_is_scrubbed():
    with ControlPlanePeer(status=400, raw_body=f'{{"error": "bad token {JWT}"}}'.encode()) as cp:
        with pytest.raises(ControlPlaneError, match="HTTP 400") as err:
            fetch_spec(cp.url, "c", JWT, backoff=0.01)
    assert JWT not in str(err.value) and "bad token [redacted]" in str(err.value)


def test_redirects_are_not_followed():
    seen: list[dict] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers.items()))
            if self.path.startswith("/elsewhere"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"spec": null}')
                return
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with pytest.raises(ControlPlaneError, match="HTTP 302"):
            fetch_spec(f"http://127.0.0.1:{server.server_address[1]}", "c", JWT, backoff=0.01)
        assert len(seen) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_bad_uri():
    with pytest.raises(ControlPlaneError, match="http"):
        spec_url("file:///etc/passwd", "c")
    with pytest.raises(ControlPlaneError, match="empty"):
        spec_url("http://x", "")


# -- compute_ctl of April 2023: the token's second name, the `status` answer, what is retried --

def test_token_from_either_variable_newest_name_first():
    from compute.storage.control_plane import control_plane_token
    assert control_plane_token({"NEON_CONTROL_PLANE_TOKEN": "new", "NEON_CONSOLE_JWT": "old"}) == "new"
    assert control_plane_token({"NEON_CONSOLE_JWT": "old"}) == "old"
    assert control_plane_token({"NEON_CONTROL_PLANE_TOKEN": "", "NEON_CONSOLE_JWT": "old"}) == "old"
    assert control_plane_token({}) is None


def test_status_attached_returns_the_spec():
    with ControlPlanePeer(SPEC, answer_status="attached") as cp:
        assert fetch_spec(cp.url, "c", JWT) == SPEC


def test_status_empty_means_no_spec_whatever_spec_holds():
    with ControlPlanePeer(SPEC, answer_status="empty") as cp:
        assert fetch_spec(cp.url, "c", JWT) is None
    with ControlPlanePeer(raw_body=b'{"status": "empty"}') as cp:
        assert fetch_spec(cp.url, "c", JWT) is None


@pytest.mark.parametrize("body, message", [
    (b'{"status": "attached", "spec": null}', "attached, but its spec is empty"),
    (b'{"status": "attached"}', "attached, but its spec is empty"),
    (b'{"status": "detached", "spec": {}}', "unknown compute status 'detached'"),
    (b'{"status": ["x"], "spec": null}', "unknown compute status"),
    (b'{"status": "attached", "spec": [1]}', "neither an object nor null"),
])
def test_bad_status_answers_are_fatal(body, message):
    with ControlPlanePeer(raw_body=body) as cp:
        with pytest.raises(ControlPlaneError, match=message):
            fetch_spec(cp.url, "c", JWT, backoff=0.01)
        assert len(cp.requests) == 1


@pytest.mark.parametrize("status", [502, 503])
def test_502_and_503_are_retried(status):
    with ControlPlanePeer(SPEC, fail_first=2, fail_status=status, answer_status="attached") as cp:
        assert fetch_spec(cp.url, "c", JWT, attempts=3, backoff=0.01) == SPEC
        assert len(cp.requests) == 3


@pytest.mark.parametrize("status", [500, 504, 429, 403])
def test_other_codes_are_fatal_at_once(status):
    with ControlPlanePeer(SPEC, fail_first=1, fail_status=status) as cp:
        with pytest.raises(ControlPlaneError, match=f"refused .*HTTP {status}"):
            fetch_spec(cp.url, "c", JWT, attempts=3, backoff=0.01)
        assert len(cp.requests) == 1
