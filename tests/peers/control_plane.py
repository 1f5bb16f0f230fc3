"""A control-plane peer, both protocols compute-ctl speaks (compute/storage/control_plane.py):

- v2 (Neon's control plane today): `GET /compute/api/v2/computes/{id}/spec`, with
  `Authorization: Bearer <jwt>` when `jwt` is set (401 otherwise, missing or wrong), answering
  HEAD's `ControlPlaneConfigResponse`: `{"status": "attached"|"empty", "spec": ..., "compute_ctl_config":
  {"jwks": <jwks>, "tls": null}}` (`status`: `answer_status`, else attached with a spec, empty without);
- 2023: `GET /management/api/v2/computes/{id}/spec`, `Authorization: <jwt>` verbatim, answering
  `{"spec": ...}` (plus `"status"` when `answer_status` is set).

    with ControlPlanePeer(spec={...}, compute_id="compute-1", jwks={"keys": [...]}) as cp:
        fetch_config(cp.url, "compute-1", jwt)
        cp.requests[-1].headers["Authorization"], cp.requests[-1].api

Knobs (attributes, changeable while running): `spec` (a dict, or None for `{"spec": null}`),
`compute_id` (None: any id), `fail_first` (answer the first N requests with `fail_status`,
default 503), `drop_first` (close the first N connections without answering), `jwt` (when set,
other Authorization values get 401), `jwks` (the v2 answer's JWK set, default `{"keys": []}`),
`raw_body` (answer these bytes verbatim with 200),
`status` (force this status, with `raw_body` or an error object as the body), `answer_status`
(the answer's `"status"`: "attached", "empty"; the 2023 route sends one only when set), `trickle` (seconds: answer 200 with `Content-Length: 100000`, then one byte of the
body every `trickle` seconds, until the client goes or the peer stops; `trickle_first` limits it
to the first N requests). Requests are recorded in `requests`.
Also a script: `python -m tests.peers.control_plane --port N [--spec-file F] [--compute-id ID]`.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIXES = {"/compute/api/v2/computes/": "v2", "/management/api/v2/computes/": "2023"}


@dataclass
class Request:
    method: str
    path: str
    compute_id: str | None
    headers: dict[str, str] = field(default_factory=dict)
    api: str | None = None  # "v2", "2023", or None (neither route)


class ControlPlanePeer:
    def __init__(self, spec: dict | None = None, *, compute_id: str | None = None, fail_first: int = 0,
                 fail_status: int = 503, drop_first: int = 0, jwt: str | None = None,
                 raw_body: bytes | None = None, status: int | None = None,
                 answer_status: str | None = None, trickle: float | None = None, trickle_first: int | None = None,
                 jwks: dict | None = None, host: str = "127.0.0.1", port: int = 0,
                 answer_after: threading.Event | None = None):
        self.spec = spec
        self.answer_after = answer_after  # set: each answer waits for it (a slow control plane)
        self.compute_id = compute_id
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.drop_first = drop_first
        self.jwt = jwt
        self.raw_body = raw_body
        self.status = status
        self.answer_status = answer_status
        self.jwks = jwks if jwks is not None else {"keys": []}
        self.trickle = trickle
        self.trickle_first = trickle_first
        self.stopped = threading.Event()
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ControlPlanePeer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="control-plane-peer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "ControlPlanePeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # decides what to do with one request (under the lock)
    def _decide(self, req: Request) -> tuple[str, int, bytes]:
        with self.lock:
            self.requests.append(req)
            if self.drop_first > 0:
                self.drop_first -= 1
                return "drop", 0, b""
            if self.trickle is not None and (self.trickle_first is None or self.trickle_first > 0):
                if self.trickle_first is not None:
                    self.trickle_first -= 1
                return "trickle", 200, b""
            if self.fail_first > 0:
                self.fail_first -= 1
                return "answer", self.fail_status, _json({"error": "temporarily unavailable"})
            if req.method != "GET" or req.compute_id is None:
                return "answer", 404, _json({"error": "not found"})
            if self.compute_id is not None and req.compute_id != self.compute_id:
                return "answer", 404, _json({"error": f"compute {req.compute_id} not found"})
            expected = None if self.jwt is None else (f"Bearer {self.jwt}" if req.api == "v2" else self.jwt)
            if expected is not None and req.headers.get("Authorization") != expected:
                return "answer", 401, _json({"error": "unauthorized"})
            if self.status is not None:
                return "answer", self.status, self.raw_body or _json({"error": f"status {self.status}"})
            if self.raw_body is not None:
                return "answer", 200, self.raw_body
            if req.api == "v2":
                status = self.answer_status or ("attached" if self.spec is not None else "empty")
                return "answer", 200, _json({"status": status, "spec": self.spec,
                                             "compute_ctl_config": {"jwks": self.jwks, "tls": None}})
            answer = {"spec": self.spec}
            if self.answer_status is not None:
                answer["status"] = self.answer_status
            return "answer", 200, _json(answer)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _handler_for(peer: ControlPlanePeer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            compute_id = api = None
            for prefix, route in PREFIXES.items():
                if path.startswith(prefix) and path.endswith("/spec"):
                    raw_id = path[len(prefix):-len("/spec")]
                    if raw_id and "/" not in raw_id:
                        compute_id, api = urllib.parse.unquote(raw_id), route
            req = Request(self.command, self.path, compute_id, dict(self.headers.items()), api)
            action, status, body = peer._decide(req)
            if action == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if action == "trickle":
                self._trickle()
                return
            if peer.answer_after is not None:
                peer.answer_after.wait(60)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _trickle(self) -> None:
            """200, a body announced at 100000 bytes, then one byte every `trickle` s: every
            receive of the client gets something, the answer never completes."""
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                self.wfile.flush()
                while not peer.stopped.wait(peer.trickle):
                    self.wfile.write(b" ")
                    self.wfile.flush()
            except OSError:
                pass  # the client went away

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="control-plane peer serving one compute spec")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--spec-file", help="JSON spec to serve (default: null spec)")
    ap.add_argument("--compute-id")
    ap.add_argument("--jwt")
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--answer-status", choices=("attached", "empty"))
    ap.add_argument("--jwks-file", help="the v2 answer's JWK set (default {\"keys\": []})")
    args = ap.parse_args(argv)
    jwks = None
    if args.jwks_file:
        with open(args.jwks_file) as f:
            jwks = json.load(f)
    spec = None
    if args.spec_file:
        with open(args.spec_file) as f:
            spec = json.load(f)
    peer = ControlPlanePeer(spec, compute_id=args.compute_id, jwt=args.jwt, fail_first=args.fail_first,
                            answer_status=args.answer_status, jwks=jwks, port=args.port)
    print(peer.url, flush=True)
    try:
        peer._server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
