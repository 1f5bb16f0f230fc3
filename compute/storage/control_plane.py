"""Pulling the spec from the control plane (pull mode: `-i <compute id> -p <control plane URI>`).

Two protocols, chosen at launch by `--control-plane-api` (the launch setting `control_plane_api`):

`v2` (the default; Neon's compute_ctl at HEAD, compute_tools/src/spec.rs):

    GET {uri}/compute/api/v2/computes/{compute_id}/spec
    Authorization: Bearer <token>
    -> {"status": "empty" | "attached", "spec": {...} | null,
        "compute_ctl_config": {"jwks": {"keys": [...]}, "tls": ...}}

    3 attempts, 100 ms apart; retried: network errors, 502, 503, and a 200 whose body is not
    that shape (HEAD retries an answer it cannot deserialise). `attached` without a spec and any
    other status fail at once. The answer's `compute_ctl_config` comes back with the spec (its
    JWKS is written to the runtime dir by the driver: compute/shared/jwks_file.py).

`2023` (compute_ctl of spring 2023, our reference contract):

    GET {uri}/management/api/v2/computes/{compute_id}/spec
    Authorization: <the token, verbatim, as the original sends it>
    -> {"spec": {...}}  or  {"spec": null}  (null: start empty and wait for POST /configure)
    -> {"status": "attached", "spec": {...}}  or  {"status": "empty", ...}

    5 attempts, backing off from 0.5 s by x2; retried: network errors, 502, 503. With a
    `status`, "empty" means no spec yet whatever `spec` holds, and "attached" with no spec is an
    error; without one, `spec` alone decides.

The token comes from NEON_CONTROL_PLANE_TOKEN (compute_ctl from April 2023 on) or, failing that,
NEON_CONSOLE_JWT (before); without either no Authorization header is sent. Any other non-200
answer, or a body that is not such an object, raises ControlPlaneError. The token never appears
in an error message or a log line. Redirects are not followed (they would carry the token
elsewhere). Every request is reported to `on_request(http_status)` (HEAD's label: `200 OK`,
`503 Service Unavailable`, or `unknown` when no answer came), which the driver counts for
`compute_ctl_cplane_requests_total` (compute/api/prometheus.py).

Each attempt has an overall deadline (--attempt-deadline): `timeout` bounds one receive, so a
control plane that trickles its answer (a byte every few seconds) would otherwise hold the
start in `init` for ever. At the deadline the socket is shut down, and the attempt fails as a
passing fault (retried), its number and the deadline in the log and in the final error.
"""

from __future__ import annotations

import http
import http.client
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from compute.base.retry import RetryFailed, RetryPolicy, retry
from compute.model.compute_config import AttachedWithoutSpec, ComputeConfig, ConfigError, parse_pull_answer
from compute.model.launch import default

log = logging.getLogger("compute.storage.control_plane")

MAX_ANSWER_BYTES = 16 * 1024 * 1024
USER_AGENT = "compute-ctl (compute-supervisor)"


class ControlPlaneError(Exception):
    """The control plane refused the request, answered nonsense, or stayed unreachable."""


# Newest name first: compute_ctl read NEON_CONSOLE_JWT until April 2023, then NEON_CONTROL_PLANE_TOKEN.
TOKEN_ENV_NAMES = ("NEON_CONTROL_PLANE_TOKEN", "NEON_CONSOLE_JWT")
RETRIED_STATUSES = frozenset({502, 503})


def control_plane_token(environ=None) -> str | None:
    """The token to send as `Authorization`, from the first of TOKEN_ENV_NAMES that is set."""
    environ = os.environ if environ is None else environ
    for name in TOKEN_ENV_NAMES:
        if environ.get(name):
            return environ[name]
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None  # the 3xx answer surfaces as an HTTPError


class _Watchdog:
    """Shuts down the attempt's socket when its deadline passes (a blocked receive returns at
    once): the deadline bounds the whole answer, headers and body, however it trickles."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shutdown(self._sock)

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(base: type[http.client.HTTPConnection], watchdog: _Watchdog) -> Any:
    class Connection(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            super().connect()
            watchdog.attach(self.sock)
    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):  # noqa: D102
        return self.do_open(_watched(http.client.HTTPConnection, self.watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):  # noqa: D102
        return self.do_open(_watched(http.client.HTTPSConnection, self.watchdog), req, context=self._context)


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoRedirect(), _HTTPHandler(watchdog), _HTTPSHandler(watchdog))


API_V2 = "v2"
API_2023 = "2023"
APIS = (API_V2, API_2023)
_PATHS = {API_V2: "/compute/api/v2/computes/", API_2023: "/management/api/v2/computes/"}
# HEAD's rule (get_config_from_control_plane): 3 attempts, a fixed 100 ms between them.
V2_RETRY = RetryPolicy(attempts=3, first_delay=0.1, factor=1)
RPC_GET_CONFIG = "GetConfig"
UNKNOWN_HTTP_STATUS = "unknown"


def http_status_label(status: int | None) -> str:
    """HEAD's `http_status` label: reqwest's StatusCode as text (`200 OK`), `unknown` without an answer."""
    if status is None:
        return UNKNOWN_HTTP_STATUS
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} <unknown status code>"


def spec_url(control_plane_uri: str, compute_id: str, api: str = API_2023) -> str:
    parsed = urllib.parse.urlsplit(control_plane_uri)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ControlPlaneError(f"control plane URI must be an http(s) URL, got {control_plane_uri!r}")
    if not compute_id:
        raise ControlPlaneError("compute id must not be empty")
    base = control_plane_uri.rstrip("/")
    return f"{base}{_PATHS[api]}{urllib.parse.quote(compute_id, safe='')}/spec"


def fetch_spec(control_plane_uri: str, compute_id: str, jwt: str | None, *, attempts: int = 5,
               backoff: float = 0.5, timeout: float = 10,
               deadline: float = default("attempt_deadline")) -> dict | None:
    """The 2023 protocol: the compute's spec (decoded JSON, not yet validated), or None when the
    control plane has none for it yet. `timeout`: one receive; `deadline`: one attempt, in all."""
    return fetch_config(control_plane_uri, compute_id, jwt, api=API_2023, attempts=attempts, backoff=backoff,
                        timeout=timeout, deadline=deadline).spec


def fetch_config(control_plane_uri: str, compute_id: str, jwt: str | None, *, api: str = API_V2,
                 attempts: int | None = None, backoff: float = 0.5, timeout: float = 10,
                 deadline: float = default("attempt_deadline"),
                 on_request: Callable[[str], None] | None = None) -> ComputeConfig:
    """The compute's config (its `spec` decoded, not yet validated; None when the control plane
    has none yet) by protocol `api`. A 2023 answer has no `compute_ctl_config`: the result's
    is None then. `attempts` (2023 only): HEAD's rule is fixed for v2."""
    if api not in APIS:
        raise ControlPlaneError(f"unknown control plane API {api!r} (expected one of {', '.join(APIS)})")
    url = spec_url(control_plane_uri, compute_id, api)
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if jwt:
        headers["Authorization"] = f"Bearer {jwt}" if api == API_V2 else jwt
    policy = V2_RETRY if api == API_V2 else RetryPolicy(attempts=max(1, attempts or 5), first_delay=backoff, factor=2)

    def counted(status: int | None) -> None:
        if on_request is not None:
            try:
                on_request(http_status_label(status))
            except Exception:  # noqa: BLE001 - a metric never fails the pull
                log.exception("counting a control plane request failed")

    def attempt() -> ComputeConfig:
        with _Watchdog(deadline) as watchdog:
            try:
                status, body = _get(url, headers, min(timeout, deadline), watchdog)
            except (_Retryable, ControlPlaneError) as e:
                if not watchdog.fired:
                    counted(None)
                    if isinstance(e, ControlPlaneError):
                        raise
                    raise _Retryable(_scrub(str(e), jwt)) from None
            if watchdog.fired:  # a short read after the shutdown is no answer
                counted(None)
                raise _Retryable(f"no whole answer within the attempt deadline of {deadline:g} s "
                                 "(--attempt-deadline)")
        counted(status)
        if status == 200:
            return _parse(body, url, jwt) if api == API_2023 else _parse_v2(body, url, jwt)
        if status in RETRIED_STATUSES:
            raise _Retryable(f"HTTP {status}{_excerpt(body, jwt)}")
        raise ControlPlaneError(f"control plane refused GET {url}: HTTP {status}{_excerpt(body, jwt)}")

    def retrying(n: int, e: BaseException, delay: float) -> None:
        log.warning("fetching the spec from %s failed (attempt %d/%d): %s; retrying in %.2fs",
                    url, n, policy.attempts, e, delay)
    try:
        return retry(policy, attempt, catch=(_Retryable,), on_retry=retrying)
    except RetryFailed as failed:
        raise ControlPlaneError(f"cannot fetch the spec from {url} after {failed.attempts} attempt(s): "
                                f"{failed.error}") from None


class _Retryable(Exception):
    pass


def _get(url: str, headers: dict[str, str], timeout: float, watchdog: _Watchdog) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with _opener(watchdog).open(req, timeout=timeout) as resp:
            return resp.status, _read(resp)
    except urllib.error.HTTPError as e:
        try:
            body = _read(e)
        except Exception:  # noqa: BLE001 - the status is what matters
            body = b""
        finally:
            e.close()
        return e.code, body
    except urllib.error.URLError as e:
        raise _Retryable(f"network error: {e.reason}") from None
    except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
        raise _Retryable(f"network error: {type(e).__name__}: {e}") from None


def _read(resp: Any) -> bytes:
    body = resp.read(MAX_ANSWER_BYTES + 1)
    if len(body) > MAX_ANSWER_BYTES:
        raise ControlPlaneError(f"control plane answer larger than {MAX_ANSWER_BYTES} bytes")
    return body


def _parse(body: bytes, url: str, jwt: str | None) -> ComputeConfig:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ControlPlaneError(f"malformed answer from GET {url}: not JSON{_excerpt(body, jwt)}") from None
    try:
        return ComputeConfig(spec=spec_of_answer(obj), compute_ctl_config=None)
    except ValueError as e:
        raise ControlPlaneError(f"malformed answer from GET {url}: {e}") from None


def _parse_v2(body: bytes, url: str, jwt: str | None) -> ComputeConfig:
    """HEAD's answer; one it cannot deserialise is retried (as HEAD), `attached` without a spec is not."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Retryable(f"malformed answer: not JSON{_excerpt(body, jwt)}") from None
    try:
        config, _status = parse_pull_answer(obj)
    except AttachedWithoutSpec as e:
        raise ControlPlaneError(f"malformed answer from GET {url}: {e}") from None
    except ConfigError as e:
        raise _Retryable(f"malformed answer: {_scrub(str(e), jwt)}") from None
    return config


def spec_of_answer(obj: Any) -> dict | None:
    """The spec in a decoded answer (None: the compute has none yet); ValueError if malformed."""
    if not isinstance(obj, dict):
        raise ValueError("expected an object with a \"spec\" key")
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise ValueError("\"spec\" is neither an object nor null")
    if "status" not in obj:  # the older answer: the spec alone decides
        if "spec" not in obj:
            raise ValueError("expected an object with a \"spec\" key")
        return spec
    status = obj["status"]
    if status == "empty":
        return None
    if status == "attached":
        if spec is None:
            raise ValueError("compute is attached, but its spec is empty")
        return spec
    raise ValueError(f"unknown compute status {str(status)[:40]!r} (expected \"empty\" or \"attached\")")


def _scrub(text: str, jwt: str | None) -> str:
    return text.replace(jwt, "[redacted]") if jwt else text


def _excerpt(body: bytes, jwt: str | None) -> str:
    text = _scrub(body.decode("utf-8", "replace"), jwt).strip()[:200]  # scrub, then cut
    return f": {text!r}" if text else ""
