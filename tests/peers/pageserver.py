"""A pageserver peer speaking the Postgres wire protocol (v3), enough for compute start-up.

It answers `basebackup <tenant> <timeline> [<lsn>] [--gzip] [--replica]` with COPY OUT of a tar file streamed
from disk (gzipped on the fly for `--gzip`, as Neon's pageservers do since mid-2023; `gzip=False`
answers like an older pageserver that does not know the flag; `--replica` is Neon's flag
for a Static or Replica compute, recorded in the queries). Faults, one per session in order
(`faults=["close", "fatal", "stall", ...]`, see FAULTS), make it refuse, drop or stall like a
pageserver that is restarting or wedged. Usable as a pytest helper (`with PageserverPeer(tar) as ps:`)
or as a script: `python -m tests.peers.pageserver --port N --tar FILE [--password P] [--fault F ...]`.

Sharding, as Neon's pageserver (pageserver/src/page_service.rs at 6a35a3e): `shards=["0002"]`
makes it host those shards (`<NN><CC>`, hex) of the tenant; default: the unsharded tenant
(`0000`). `basebackup` takes a plain tenant id (a shard-qualified one does not parse, as
`TenantId::from_str` refuses it) and answers from shard zero (`ShardSelector::Zero`): a
pageserver without shard zero of that tenant refuses. `lease lsn <tenant_shard_id> <timeline>
<lsn>` takes a tenant shard id (`<tenant>` means shard `0000`, `<tenant>-<NNCC>` that shard) and
answers only for a shard it hosts (`ShardSelector::Known`: an unqualified id for a sharded
tenant is not found): one row, column `valid_until`, milliseconds since the epoch
(`lease_seconds` from now), or NULL for an LSN behind `gc_cutoff`. Leases are recorded in
`leases`.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import re
import secrets
import shutil
import socket
import socketserver
import struct
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")

# What a session can be made to do instead of answering normally (consumed one per session that
# sent a startup message, in order):
FAULTS = {
    "close": "close the connection right after the startup message (no reply)",
    "fatal": "FATAL 57P03 'the database system is starting up' at authentication",
    "stall-auth": "never answer the startup message",
    "drop": "send half of the archive, then drop the connection",
    "stall": "send half of the archive, then go silent (the connection stays open)",
    "error": "ERROR XX000 instead of the COPY (a permanent answer)",
    "trickle": "start the COPY, then send the archive one byte per CopyData message every "
               "`trickle_every` s (progress, never an end) until the client goes",
}


@dataclass
class Session:
    """What one client connection sent us."""
    startup: dict[str, str] = field(default_factory=dict)
    password: str | None = None  # cleartext auth only (md5 sends a hash)
    authenticated: bool = False
    ssl_requested: bool = False
    gssenc_requested: bool = False
    cancel_request: bool = False
    queries: list[str] = field(default_factory=list)
    other_messages: list[str] = field(default_factory=list)  # e.g. 'P' if a client used extended protocol
    bytes_sent: int = 0  # tar bytes (before gzip)
    wire_bytes: int = 0  # CopyData payload bytes actually sent
    terminated: bool = False  # sent 'X'
    fault: str | None = None  # the fault this session played

    @property
    def user(self) -> str | None:
        return self.startup.get("user")

    @property
    def database(self) -> str | None:
        return self.startup.get("database")


@dataclass
class Lease:
    """One `lease lsn` a client asked for, and what it got (None: refused or failed)."""
    tenant_shard_id: str
    timeline_id: str
    lsn: str
    valid_until_ms: int | None
    at: float


def _shard_index(text: str) -> tuple[int, int]:
    if not re.fullmatch(r"[0-9a-f]{4}", text):
        raise ValueError(f"shard index {text!r}: 4 hex digits, shard number then shard count")
    return int(text[:2], 16), int(text[2:], 16)


def _lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class _Closed(Exception):
    pass


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def error_response(code: str, message: str, severity: str = "ERROR") -> bytes:
    body = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(code) + b"M" + _cstr(message)
    return _msg(b"E", body + b"\0")


class PageserverPeer:
    """Serves one tar file as the basebackup of any (or the configured) tenant/timeline."""

    def __init__(self, tar_path: str, *, password: str | None = None, auth: str = "cleartext",
                 tenant_id: str | None = None, timeline_id: str | None = None,
                 error_after_archive: bool = False, truncate_at: int | None = None,
                 chunk_size: int = 64 * 1024, chunk_delay: float = 0.0, gzip: bool = True,
                 faults: list[str] | tuple[str, ...] = (), trickle_every: float = 0.5,
                 one_message: int | None = None, huge_notice: int | None = None,
                 shards: list[str] | tuple[str, ...] = ("0000",), lease_seconds: float = 600.0,
                 gc_cutoff: str = "0/0", lease_reply: tuple[str, bytes | None] | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if auth not in ("cleartext", "md5"):
            raise ValueError("auth must be 'cleartext' or 'md5'")
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
        self.gzip = gzip  # knows `--gzip`
        self.faults = list(faults)
        self.tar_path = tar_path
        self.password = password
        self.auth = auth
        self.tenant_id = tenant_id
        self.timeline_id = timeline_id
        self.error_after_archive = error_after_archive
        self.truncate_at = truncate_at  # send only this many tar bytes, then end the COPY normally
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.trickle_every = trickle_every
        # A hostile pageserver: the whole answer as ONE CopyData message announced at this many
        # bytes (the archive, then zeros: a tar may end in zero blocks), streamed as it is sent.
        self.one_message = one_message
        self.huge_notice = huge_notice  # before the COPY: a NoticeResponse header announcing this many bytes
        self.shards = [_shard_index(x) for x in shards]  # (number, count) hosted
        self.lease_seconds = lease_seconds
        self.gc_cutoff = gc_cutoff
        self.lease_reply = lease_reply  # a hostile pageserver: (column name, value) instead of its answer
        self.leases: list[Lease] = []
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.peer = self
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def connstr(self) -> str:
        """Shaped like the control plane's pageserver_connstring (user is ignored by the pageserver)."""
        return f"postgresql://no_user@127.0.0.1:{self.port}"

    @property
    def last(self) -> Session:
        """The last session that sent a startup message (libpq may also open cancel connections)."""
        with self._lock:
            return [s for s in self.sessions if s.startup][-1]

    def start(self) -> "PageserverPeer":
        # shutdown() waits for the loop's next poll: the default 0.5 s was paid by every test
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="pageserver-peer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # stalled sessions return
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "PageserverPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, session: Session) -> None:
        with self._lock:
            self.sessions.append(session)

    def _take_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    @property
    def startups(self) -> list[Session]:
        """Sessions that sent a startup message (one per connection attempt of a client)."""
        with self._lock:
            return [s for s in self.sessions if s.startup]


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    peer: PageserverPeer


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = self.server.peer
        self.session = Session()
        self.peer._record(self.session)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise _Closed()
            buf += chunk
        return bytes(buf)

    def recv_message(self) -> tuple[bytes, bytes]:
        kind = self.recv_exact(1)
        (length,) = struct.unpack("!I", self.recv_exact(4))
        return kind, self.recv_exact(length - 4)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handle(self) -> None:
        try:
            if not self.startup():
                return
            fault = self.session.fault = self.peer._take_fault()
            if fault == "close":
                return
            if fault == "stall-auth":
                self.wait_for_close()
                return
            if fault == "fatal":
                self.send(error_response("57P03", "the database system is starting up", "FATAL"))
                return
            if self.authenticate():
                self.query_loop()
        except (_Closed, ConnectionError):
            pass

    def wait_for_close(self) -> None:
        """Go silent until the client gives up and closes (or the peer is closed)."""
        self.sock.settimeout(0.2)
        while not self.peer._closing.is_set():
            try:
                if not self.sock.recv(1 << 16):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    # -- start-up: SSL/GSS negotiation refused, then StartupMessage
    def startup(self) -> bool:
        while True:
            (length,) = struct.unpack("!I", self.recv_exact(4))
            body = self.recv_exact(length - 4)
            (code,) = struct.unpack("!I", body[:4])
            if code == SSL_REQUEST:
                self.session.ssl_requested = True
                self.send(b"N")
            elif code == GSSENC_REQUEST:
                self.session.gssenc_requested = True
                self.send(b"N")
            elif code == CANCEL_REQUEST:
                self.session.cancel_request = True
                return False
            elif code == PROTOCOL_3:
                parts = body[4:].split(b"\0")
                params = {parts[i].decode(): parts[i + 1].decode()
                          for i in range(0, len(parts) - 1, 2) if parts[i]}
                self.session.startup = params
                return True
            else:
                self.send(error_response("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}",
                                         "FATAL"))
                return False

    def authenticate(self) -> bool:
        peer, user = self.peer, self.session.user or ""
        if peer.password is not None:
            if peer.auth == "cleartext":
                self.send(_msg(b"R", struct.pack("!I", 3)))
            else:
                salt = secrets.token_bytes(4)
                self.send(_msg(b"R", struct.pack("!I", 5) + salt))
            kind, body = self.recv_message()
            if kind != b"p":
                self.send(error_response("08P01", "expected password response", "FATAL"))
                return False
            got = body.rstrip(b"\0").decode()
            if peer.auth == "cleartext":
                self.session.password = got
                ok = got == peer.password
            else:
                inner = hashlib.md5((peer.password + user).encode()).hexdigest()
                ok = got == "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
            if not ok:
                self.send(error_response("28P01", f'password authentication failed for user "{user}"',
                                         "FATAL"))
                return False
        self.session.authenticated = True
        out = [_msg(b"R", struct.pack("!I", 0))]
        for k, v in (("server_version", "15.0"), ("server_encoding", "UTF8"),
                     ("client_encoding", "UTF8"), ("DateStyle", "ISO"),
                     ("integer_datetimes", "on"), ("standard_conforming_strings", "on")):
            out.append(_msg(b"S", _cstr(k) + _cstr(v)))
        out.append(_msg(b"K", struct.pack("!II", os.getpid() & 0x7FFFFFFF, secrets.randbits(31))))
        out.append(_msg(b"Z", b"I"))
        self.send(b"".join(out))
        return True

    def query_loop(self) -> None:
        while True:
            kind, body = self.recv_message()
            if kind == b"X":
                self.session.terminated = True
                return
            if kind != b"Q":
                # The pageserver speaks the simple query protocol only.
                self.session.other_messages.append(kind.decode("latin-1"))
                self.send(error_response("08P01", f"unsupported message type {kind!r}", "FATAL"))
                return
            text = body.rstrip(b"\0").decode()
            self.session.queries.append(text)
            self.send(self.run_query(text) + _msg(b"Z", b"I"))

    def run_query(self, text: str) -> bytes:
        """Returns the final messages to send (before ReadyForQuery); streams COPY data itself."""
        if text.split()[:2] == ["lease", "lsn"]:
            return self.lease(text.split()[2:])
        parts = text.split()
        flags = [p for p in parts if p.startswith("--")]
        parts = [p for p in parts if not p.startswith("--")]
        if not parts or parts[0] != "basebackup" or len(parts) not in (3, 4):
            return error_response("42601", f"unsupported command: {text[:100]}")
        known = ("--gzip", "--replica") if self.peer.gzip else ("--replica",)
        unknown = [f for f in flags if f not in known]
        if unknown:
            # what a pageserver that does not know the flag says: it takes it for the LSN
            return error_response("XX000", f"invalid LSN {unknown[0]}")
        tenant, timeline = parts[1], parts[2]
        if not _HEX32.match(tenant):  # a shard-qualified id too: TenantId::from_str refuses it
            return error_response("XX000", f"Failed to parse tenant id from {tenant[:80]}")
        if not _HEX32.match(timeline):
            return error_response("XX000", "invalid tenant or timeline id")
        if not any(number == 0 for number, _ in self.peer.shards):
            return error_response("XX000", f"Tenant {tenant} not found: no shard zero on this pageserver")
        if len(parts) == 4 and not _LSN.match(parts[3]):
            return error_response("XX000", f"invalid LSN {parts[3]}")
        if self.peer.tenant_id is not None and tenant != self.peer.tenant_id:
            return error_response("XX000", f"Tenant {tenant} not found")
        if self.peer.timeline_id is not None and timeline != self.peer.timeline_id:
            return error_response("XX000", f"Timeline {tenant}/{timeline} was not found")
        if self.session.fault == "error":
            return error_response("XX000", "simulated permanent failure")
        if self.peer.huge_notice is not None:  # announced, never sent: the client must refuse it
            self.send(struct.pack("!cI", b"N", self.peer.huge_notice + 4))
            self.wait_for_close()
            raise _Closed()
        self.send(_msg(b"H", struct.pack("!bH", 0, 0)))  # CopyOutResponse: text, 0 columns
        self.stream_tar(gzip="--gzip" in flags)
        if self.peer.error_after_archive:
            return error_response("XX000", "basebackup: simulated failure after the archive")
        return _msg(b"c") + _msg(b"C", _cstr("SELECT 1"))

    def lease(self, params: list[str]) -> bytes:
        """`lease lsn <tenant_shard_id> <timeline_id> <lsn>` (LeaseLsnCmd::parse, handle_make_lsn_lease)."""
        if len(params) != 3:
            return error_response("XX000", f"invalid number of parameters for lease lsn command: {' '.join(params)[:100]}")
        tsid, timeline, lsn = params
        m = re.fullmatch(r"([0-9a-f]{32})(?:-([0-9a-f]{2})([0-9a-f]{2}))?", tsid)
        if m is None:
            return error_response("XX000", f"Failed to parse tenant id from {tsid[:80]}")
        if not _HEX32.match(timeline):
            return error_response("XX000", f"Failed to parse timeline id from {timeline[:80]}")
        if not _LSN.match(lsn):
            return error_response("XX000", f"Failed to parse lsn from {lsn[:80]}")
        tenant = m.group(1)
        index = (int(m.group(2), 16), int(m.group(3), 16)) if m.group(2) else (0, 0)
        if self.peer.tenant_id is not None and tenant != self.peer.tenant_id or index not in self.peer.shards:
            return error_response("XX000", f"Tenant {tsid} not found")
        if self.peer.timeline_id is not None and timeline != self.peer.timeline_id:
            return error_response("XX000", f"Timeline {tenant}/{timeline} was not found")
        if self.session.fault == "error":
            return error_response("XX000", "simulated permanent failure")
        valid_until = None
        if _lsn_int(lsn) >= _lsn_int(self.peer.gc_cutoff):
            valid_until = int((time.time() + self.peer.lease_seconds) * 1000)
        with self.peer._lock:
            self.peer.leases.append(Lease(tsid, timeline, lsn, valid_until, time.time()))
        column, raw = "valid_until", None if valid_until is None else str(valid_until).encode()
        if self.peer.lease_reply is not None:
            column, raw = self.peer.lease_reply
        value = b"\xff\xff\xff\xff" if raw is None else struct.pack("!I", len(raw)) + raw
        row_description = _msg(b"T", struct.pack("!H", 1) + _cstr(column)
                               + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0))
        return row_description + _msg(b"D", struct.pack("!H", 1) + value) + _msg(b"C", _cstr("SELECT 1"))

    def stream_one_message(self, size: int) -> None:
        """The archive and zero padding as one CopyData message of `size` bytes (plain tar)."""
        self.send(struct.pack("!cI", b"d", size + 4))
        left = size
        with open(self.peer.tar_path, "rb") as f:
            while left:
                raw = f.read(min(self.peer.chunk_size, left)) or bytes(min(1 << 20, left))
                self.send(raw)
                left -= len(raw)
                self.session.bytes_sent += len(raw)
                self.session.wire_bytes += len(raw)

    def trickle(self, packer) -> None:
        """One archive byte per message, every `trickle_every` s, until the client goes."""
        with open(self.peer.tar_path, "rb") as f:
            while not self.peer._closing.wait(self.peer.trickle_every):
                raw = f.read(1)
                data = raw if packer is None else packer.compress(raw) + packer.flush(zlib.Z_SYNC_FLUSH)
                try:
                    self.send(struct.pack("!cI", b"d", len(data) + 4) + data)
                except OSError:
                    break
                self.session.bytes_sent += len(raw)
        raise _Closed()

    def stream_tar(self, gzip: bool = False) -> None:
        """Send the archive as CopyData messages; a drop/stall fault ends the session (_Closed)."""
        limit = self.peer.truncate_at
        fault = self.session.fault
        if fault in ("drop", "stall"):
            half = os.path.getsize(self.peer.tar_path) // 2
            limit = half if limit is None else min(limit, half)
        packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None
        if fault == "trickle":
            self.trickle(packer)
        if self.peer.one_message is not None:
            return self.stream_one_message(self.peer.one_message)
        with open(self.peer.tar_path, "rb") as f:
            while True:
                size = self.peer.chunk_size
                if limit is not None:
                    size = min(size, limit - self.session.bytes_sent)
                raw = f.read(size) if size > 0 else b""
                self.session.bytes_sent += len(raw)
                data = raw
                if packer is not None:
                    data = packer.compress(raw) + (b"" if raw else packer.flush())
                if data:
                    self.send(struct.pack("!cI", b"d", len(data) + 4) + data)
                    self.session.wire_bytes += len(data)
                if not raw:
                    break
                if self.peer.chunk_delay:
                    time.sleep(self.peer.chunk_delay)  # a slow pageserver, for progress reporting
        if fault == "drop":
            self.sock.shutdown(socket.SHUT_RDWR)
            raise _Closed()
        if fault == "stall":
            self.wait_for_close()
            raise _Closed()


# ---------------------------------------------------------------- fixture tar

_tar_cache: dict[str, str] = {}
_tar_lock = threading.Lock()


def make_basebackup_tar(dest_tar: str, superuser: str = "cloud_admin") -> str:
    """Write to dest_tar a tar of a real PG15 data dir shaped like the pageserver's basebackup."""
    with _tar_lock:
        src = _tar_cache.get(superuser)
        if src is None or not os.path.exists(src):
            src = _tar_cache[superuser] = _build_basebackup_tar(superuser)
    if os.path.abspath(dest_tar) != src:
        shutil.copyfile(src, dest_tar)  # a copy: callers may alter theirs
    return dest_tar


def _build_basebackup_tar(superuser: str) -> str:
    from tests.support.pgcluster import Cluster, scratch_dir  # test-only dependency

    base = scratch_dir("cs-bbtar-")
    atexit.register(shutil.rmtree, base, True)
    cluster = Cluster(datadir=os.path.join(base, "data"), port=0, superuser=superuser)
    cluster.initdb()
    return tar_as_basebackup(cluster.datadir, os.path.join(base, "basebackup.tar"))


def tar_as_basebackup(data: str, out: str) -> str:
    """Tar a stopped data dir (changed in place) as the pageserver sends one: no
    postgresql.conf (the compute writes it), an empty auto.conf and a signal file telling neon's
    postgres where WAL starts; no server log or postmaster.opts of a test cluster."""
    for name in ("postgresql.conf", "server.log", "postmaster.opts"):
        if os.path.exists(os.path.join(data, name)):
            os.remove(os.path.join(data, name))
    for name, content in (("postgresql.auto.conf", ""), ("neon.signal", "PREV LSN: 0/0\n")):
        path = os.path.join(data, name)
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, 0o600)
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for entry in sorted(os.listdir(data)):
            tar.add(os.path.join(data, entry), arcname=entry)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--tar", required=True, help="tar file served as the basebackup")
    ap.add_argument("--password", help="require this password (the storage auth token)")
    ap.add_argument("--auth", choices=("cleartext", "md5"), default="cleartext")
    ap.add_argument("--tenant", help="only this tenant id exists")
    ap.add_argument("--timeline", help="only this timeline id exists")
    ap.add_argument("--error-after-archive", action="store_true")
    ap.add_argument("--no-gzip", action="store_true", help="answer like a pageserver without --gzip")
    ap.add_argument("--fault", action="append", default=[], choices=sorted(FAULTS),
                    help="one session's fault, in order (repeatable)")
    ap.add_argument("--shard", action="append", default=[], help="host this shard (<NN><CC> hex; repeatable; "
                    "default: the unsharded tenant, 0000)")
    ap.add_argument("--lease-seconds", type=float, default=600.0, help="length of the LSN leases granted")
    ap.add_argument("--gc-cutoff", default="0/0", help="LSN leases below this LSN are refused (NULL)")
    args = ap.parse_args(argv)
    peer = PageserverPeer(args.tar, password=args.password, auth=args.auth, tenant_id=args.tenant,
                          timeline_id=args.timeline, error_after_archive=args.error_after_archive,
                          gzip=not args.no_gzip, faults=args.fault, shards=args.shard or ("0000",),
                          lease_seconds=args.lease_seconds, gc_cutoff=args.gc_cutoff, host=args.host, port=args.port)
    print(f"pageserver peer listening on {args.host}:{peer.port}", flush=True)
    try:
        peer._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        peer._server.server_close()


if __name__ == "__main__":
    main()
